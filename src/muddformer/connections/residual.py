"""Plain pre-norm residual stream (Transformer++): block l reads the output of block l-1."""

from __future__ import annotations

import torch

from .base import Connection, DepthState


class ResidualConnection(Connection):
    def advance(self, state: DepthState, layer: int, out: torch.Tensor) -> None:
        state.inputs = out
