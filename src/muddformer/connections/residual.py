"""Plain pre-norm residual stream (Transformer++): block l reads the output of block l-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from muddformer.connections.base import Connection
from muddformer.layers import Block


@dataclass
class ResidualState:
    """The residual stream: the embedding before block 0, then the latest block's output."""

    stream: torch.Tensor


class ResidualConnection(Connection):
    def begin(self, x0: torch.Tensor) -> ResidualState:
        return ResidualState(x0)

    def block_input(self, state: ResidualState, layer: int) -> torch.Tensor:
        return state.stream

    def advance(self, state: ResidualState, layer: int, out: torch.Tensor) -> None:
        state.stream = out

    def run_block(self, state: ResidualState, layer: int, block: Block, ctx) -> None:
        self.advance(state, layer, block(self.block_input(state, layer), ctx))

    def output(self, state: ResidualState) -> torch.Tensor:
        return state.stream
