"""The depth-wise weighted sum over stored states: MUDD's one hot spot (architecture, idea 4)."""

from muddformer.kernels.depth_mix import depth_mix, depth_mix_reference

__all__ = ["depth_mix", "depth_mix_reference"]
