"""Key/value caches for decoding. MUDD mixes states over depth at one position, never over time,
so the attention keys and values are the only memory of earlier tokens (architecture §4)."""

from __future__ import annotations

import torch


class KVCache:
    """Grows by concatenation: simple, any length up to the context."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only (or reorder to) these batch rows."""
        self.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows) for v in self.values]


class StaticKVCache:
    """Preallocated (B, H, max_length, d) buffers written in place at `cache_position`.

    Shapes never change, so a decode step compiles once (and can be captured in a CUDA graph).
    The model passes `cache_position` explicitly; `length` counts the slots written so far.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, n_head, max_length, head_dim)
        self.max_length = max_length
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.position: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.position, k)
        self.values[layer_idx].index_copy_(2, self.position, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length
