"""Key/value caches for decoding. MUDD mixes states over depth at one position, never over time,
so the attention keys and values are the only memory of earlier tokens (architecture §4)."""

from __future__ import annotations

import torch


class KVCache:
    """Grows by concatenation: simple, any length up to the context."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append these tokens' keys and values (B, H, T, d); all of the layer's so far come back."""
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only (or reorder to) these batch rows."""
        self.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows) for v in self.values]


class StaticKVCache:
    """Preallocated (B, H, max_length, d) buffers written in place at `cache_position`.

    Shapes never change, so a decode step compiles once (and can be captured in a CUDA graph). The slots
    come with each `update` (cache_kwargs["cache_position"]); `filled`, one past the highest slot written,
    is a tensor updated in place, so a compiled step keeps it without a graph break or a host sync.
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
    ):
        shape = (batch, n_kv_head, max_length, head_dim)
        self.max_length = max_length
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.filled = torch.zeros((), dtype=torch.long, device=device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write these tokens' keys and values (B, H, T, d) at their slots; the whole buffers come back."""
        position = (cache_kwargs or {}).get("cache_position")
        if position is None:
            raise ValueError("StaticKVCache.update needs cache_kwargs={'cache_position': slots of the T tokens}")
        self.keys[layer_idx].index_copy_(2, position, k)
        self.values[layer_idx].index_copy_(2, position, v)
        if layer_idx == 0:
            self.filled.copy_(torch.maximum(self.filled, position.max() + 1))
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots written so far (reads `filled`: a host synchronisation on a GPU)."""
        return int(self.filled)
