"""The interface every connection implements (architecture, idea 1).

A connection decides what each block reads. The body loop is the same for all of them:

    state = conn.begin(embedding)       # the connection's own state type
    for layer, block in enumerate(blocks):
        conn.run_block(state, layer, block, ctx)
    final = conn.output(state)

Each connection module defines the state it keeps while the body runs (ResidualState, DenseState,
HyperState, AttnResState), with names that say what they hold. Blocks never know which connection fed
them; a new variant is one new class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from muddformer.config import MuddConfig
from muddformer.layers import Block
from muddformer.telemetry import weight_stats


class Connection(nn.Module):
    """Base class: forms block inputs from the embedding and earlier block outputs."""

    # Last name parts of parameters that hold a static prior set by the init (an identity, a selection);
    # training exempts them from weight decay, which would pull the start towards zero.
    static_priors: tuple[str, ...] = ()
    # Last name parts of vectors that stand for a matrix of the method's paper (HC's beta projection, D x 1), grouped
    # and decayed with the generator's matrices rather than with the norms. AttnRes's pseudo-queries are vectors in
    # their paper too and stay with the undecayed vectors (no published setting decays them).
    projection_vectors: tuple[str, ...] = ()

    def __init__(self, cfg: MuddConfig):
        super().__init__()
        self.n_layer = cfg.n_layer
        # Set to {} to collect the next forward's weight statistics (telemetry.weight_stats); None: off.
        self.telemetry: dict[str, float] | None = None

    def record_weights(self, layer: int, weights: torch.Tensor) -> None:
        """Add the statistics of the weights (B, T, C, n) after block `layer` to `telemetry` when it is collecting."""
        if not torch.compiler.is_compiling() and self.telemetry is not None:
            self.telemetry.update(weight_stats(layer, self.stream_names(layer), weights))

    def stream_names(self, layer: int) -> str:
        """One letter per stream of the weights after block `layer` (telemetry keys)."""
        return "x"

    def multiway_input(self, layer: int) -> bool:
        """True when block `layer` reads four streams (q, k, v, r) and needs three pre-norms."""
        return False

    def begin(self, x0: torch.Tensor) -> Any:
        """The state before block 0, from the embedding x0 (B, T, D)."""
        raise NotImplementedError

    def run_block(self, state: Any, layer: int, block: Block, ctx) -> None:
        """Run block `layer` on the input the state gives it and advance the state."""
        raise NotImplementedError

    def output(self, state: Any) -> torch.Tensor:
        """The final state (B, T, D) that the output norm and head read."""
        raise NotImplementedError

    def mix_flops(self) -> int:
        """Forward FLOPs per token that its parameters do not account for (6 x parameters counts one
        multiply-add per weight): weighted sums over states and streams, weights used more than once.
        Norms and activations are left out, as they are for the body."""
        return 0

    def reset_parameters(self) -> None:
        """Initialise the connection's own parameters; each class documents how close that starts to a
        residual network (the dense family: exactly one)."""

    def static_prior_names(self) -> list[str]:
        """Names (inside the connection) of the parameters listed in `static_priors`."""
        return self._names_ending_in(self.static_priors)

    def projection_vector_names(self) -> list[str]:
        """Names (inside the connection) of the parameters listed in `projection_vectors`."""
        return self._names_ending_in(self.projection_vectors)

    def _names_ending_in(self, last_parts: tuple[str, ...]) -> list[str]:
        return [name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in last_parts]
