"""The interface every connection implements (architecture, idea 1).

A connection decides what each block reads. The body loop is the same for all of them:

    state = conn.begin(embedding)
    for layer, block in enumerate(blocks):
        # = conn.advance(state, layer, block(conn.block_input(state, layer), ctx))
        conn.run_block(state, layer, block, ctx)
    final = conn.output(state)

Blocks never know which connection fed them; a new variant is one new class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MuddConfig
from ..layers import BlockInput


@dataclass
class DepthState:
    """What a connection keeps while the body runs: stored states and the next block's input."""

    inputs: BlockInput
    states: list[torch.Tensor] = field(default_factory=list)
    buffer: Any = None  # a kernels.DepthBuffer holding `states`, when the connection uses one


class Connection(nn.Module):
    """Base class: forms block inputs from the embedding and earlier block outputs."""

    # Last name parts of parameters that hold a static prior set by the init (an identity, a selection);
    # training exempts them from weight decay, which would pull the start towards zero.
    static_priors: tuple[str, ...] = ()

    def __init__(self, cfg: MuddConfig):
        super().__init__()
        self.n_layer = cfg.n_layer
        # Set to {} to collect the next forward's weight statistics (telemetry.weight_stats); None: off.
        self.telemetry: dict[str, float] | None = None

    def record_weights(self, layer: int, weights: torch.Tensor) -> None:
        """Add the statistics of the weights (B, T, C, n) after block `layer` to `telemetry` when it is collecting."""
        if not torch.compiler.is_compiling() and self.telemetry is not None:
            from ..telemetry import weight_stats

            self.telemetry.update(weight_stats(layer, self.stream_names(layer), weights))

    def stream_names(self, layer: int) -> str:
        """One letter per stream of the weights after block `layer` (telemetry keys)."""
        return "x"

    def multiway_input(self, layer: int) -> bool:
        """True when block `layer` reads four streams (q, k, v, r) and needs three pre-norms."""
        return False

    def begin(self, x0: torch.Tensor) -> DepthState:
        return DepthState(inputs=x0)

    def block_input(self, state: DepthState, layer: int) -> BlockInput:
        return state.inputs

    def advance(self, state: DepthState, layer: int, out: torch.Tensor) -> None:
        raise NotImplementedError

    def run_block(self, state: DepthState, layer: int, block: nn.Module, ctx) -> None:
        """Run block `layer` on its input and advance the state. Connections that act inside a block
        (between its attention and feed-forward parts) or recompute inputs override this."""
        self.advance(state, layer, block(self.block_input(state, layer), ctx))

    def output(self, state: DepthState) -> torch.Tensor:
        out = state.inputs
        return out[-1] if isinstance(out, tuple) else out

    def reset_parameters(self) -> None:
        """Initialise the connection's own parameters; each class documents how close that starts to a
        residual network (the dense family: exactly one)."""

    def static_prior_names(self) -> list[str]:
        """Names (inside the connection) of the parameters listed in `static_priors`."""
        return [name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in self.static_priors]
