"""Key/value caches for decoding. MUDD mixes states over depth at one position, never over time,
so the attention keys and values are the only memory of earlier tokens (architecture §4)."""

from __future__ import annotations

import torch


class KVCache:
    """Grows by concatenation: simple, any length up to the context. A layer with an attention window
    (`windows[layer]` > 0) keeps only the window's newest tokens but one, so it never grows past the window."""

    def __init__(self, n_layer: int, windows: list[int] | None = None):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.windows = list(windows) if windows else [0] * n_layer
        self.seen = [0] * n_layer  # tokens written per layer, kept or not

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append these tokens' keys and values (B, H, T, d); the layer's kept ones and these come back."""
        self.seen[layer_idx] += k.shape[2]
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        window = self.windows[layer_idx]
        # A windowed layer's next query sees itself and the window - 1 newest tokens before it.
        keep = k.shape[2] if not window else min(k.shape[2], window - 1)
        self.keys[layer_idx], self.values[layer_idx] = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen[layer_idx]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only (or reorder to) these batch rows."""
        self.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows) for v in self.values]


class StaticKVCache:
    """Preallocated (B, H, max_length, d) buffers written in place at `cache_position`.

    Shapes never change, so a decode step compiles once (and can be captured in a CUDA graph). The slots
    come with each `update` (cache_kwargs["cache_position"]); `filled`, one past the highest slot written,
    is a tensor updated in place, so a compiled step keeps it without a graph break or a host sync.
    A layer with an attention window shorter than max_length gets a ring buffer of the window's size:
    slot s lives at s % window, and `key_slots(layer)` names the slot of each key handed back.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
        windows: list[int] | None = None,
    ):
        self.max_length = max_length
        self.rings = [w if 0 < w < max_length else 0 for w in (windows or [0] * n_layer)]
        sizes = [ring or max_length for ring in self.rings]
        self.keys = [torch.zeros(batch, n_kv_head, n, head_dim, dtype=dtype, device=device) for n in sizes]
        self.values = [torch.zeros(batch, n_kv_head, n, head_dim, dtype=dtype, device=device) for n in sizes]
        # The slot held at each ring position (-1: none yet), and the slots of the keys the last update handed back.
        self.slots = [torch.full((ring,), -1, dtype=torch.long, device=device) if ring else None for ring in self.rings]
        self.handed: list[torch.Tensor | None] = [None] * n_layer
        self.filled = torch.zeros((), dtype=torch.long, device=device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write these tokens' keys and values (B, H, T, d) at their slots; the whole buffers come back."""
        position = (cache_kwargs or {}).get("cache_position")
        if position is None:
            raise ValueError("StaticKVCache.update needs cache_kwargs={'cache_position': slots of the T tokens}")
        if layer_idx == 0:
            self.filled.copy_(torch.maximum(self.filled, position.max() + 1))
        keys, values, slots, ring = (
            self.keys[layer_idx],
            self.values[layer_idx],
            self.slots[layer_idx],
            self.rings[layer_idx],
        )
        if slots is None:
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
            return keys, values
        if k.shape[2] == 1:  # a decode step: the new key overwrites one that left the window
            at = position % ring
            keys.index_copy_(2, at, k)
            values.index_copy_(2, at, v)
            slots.index_copy_(0, at, position)
            self.handed[layer_idx] = slots
            return keys, values
        # Several tokens (a prefill): the earlier ring and all of them come back; the newest stay in the ring.
        out = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        self.handed[layer_idx] = torch.cat([slots, position])
        kept = position[-ring:]
        keys.index_copy_(2, kept % ring, k[:, :, -ring:])
        values.index_copy_(2, kept % ring, v[:, :, -ring:])
        slots.index_copy_(0, kept % ring, kept)
        return out

    def key_slots(self, layer_idx: int) -> torch.Tensor | None:
        """The cache slot of each key the last update of a ring-buffer layer handed back; None for full layers."""
        return self.handed[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots written so far (reads `filled`: a host synchronisation on a GPU)."""
        return int(self.filled)
