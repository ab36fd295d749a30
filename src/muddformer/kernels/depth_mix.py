"""depth_mix: out[c] = sum_j w[c, ..., j] * states[j].

`depth_mix_reference` is the plain version every faster one is compared against. It sums in
order j = 0..N-1 in the states' dtype, as the reference implementation's `layer_mix` does, which
is what bit-parity with the published checkpoints needs (spec §2.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def depth_mix_reference(states: Sequence[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """Mix N states (each (B, T, D)) with weights (C, B, T, N), or broadcastable (C, 1, 1, N).

    Returns C tensors of shape (B, T, D), one per stream.
    """
    if weights.shape[-1] != len(states):
        raise ValueError(f"depth_mix: {weights.shape[-1]} weights per stream for {len(states)} states")
    mixed = []
    for c in range(weights.shape[0]):
        acc = weights[c, ..., 0, None] * states[0]
        for j in range(1, len(states)):
            acc = acc + weights[c, ..., j, None] * states[j]
        mixed.append(acc)
    return mixed


IMPLEMENTATIONS = {"reference": depth_mix_reference}


def depth_mix(states: Sequence[torch.Tensor], weights: torch.Tensor, impl: str = "reference") -> list[torch.Tensor]:
    """Dispatch to a depth_mix implementation by name (see IMPLEMENTATIONS)."""
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown depth_mix implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}") from None
    return fn(states, weights)
