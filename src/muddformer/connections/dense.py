"""Dense cross-layer connections: MUDD and the variants the paper compares it with.

After block l, the inputs of block l+1 are weighted sums of every stored state X_0..X_{l+1}
(X_0 = embedding, X_{j+1} = output of block j). The weights are a static prior a_l (`dense_bs`),
plus, for dynamic variants, a per-token MLP of the newest state (spec §2.2):

    dw = W2 @ GELU(W1 @ RMSNormNoScale(X_{l+1})) + a_l      # (C, B, T, l+2)
    stream c = sum_j dw[c, ..., j] * X_j

C = 4 streams (q, k, v, r) for multiway variants, 1 for single-way; the last layer is always
R only. Initialisation (spec §2.8): W2 = 0 and a_l one-hot on the newest state, so a fresh model
computes exactly what a residual model computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MuddConfig
from ..kernels import depth_mix
from ..layers import RMSNorm, rms_norm_no_scale
from .base import Connection, DepthState


def generator_width(n_streams: int, n_states: int, last: bool, expand_last: bool, round64: bool) -> int:
    """Hidden width K_l of the weight generator (spec §2.2); round64 always adds a block (64 -> 128)."""
    width = n_streams * n_states
    if last and expand_last:
        width *= 4
    if round64:
        width = (width // 64 + 1) * 64
    return width


class WeightGenerator(nn.Module):
    """The per-token MLP that makes dense weights from the newest state: W2 @ GELU(W1 @ norm(x))."""

    def __init__(self, dim: int, hidden: int, n_out: int, eps: float, scaled_norm: bool):
        super().__init__()
        self.eps = eps
        self.norm = RMSNorm(dim, eps) if scaled_norm else None
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else rms_norm_no_scale(x, self.eps)
        return self.w2(F.gelu(self.w1(h)))


class DenseConnection(Connection):
    """Dense connection over depth; subclasses fix the number of streams and whether it is dynamic."""

    n_streams = 4
    dynamic = True

    def __init__(self, cfg: MuddConfig):
        super().__init__(cfg)
        L, C = cfg.n_layer, self.n_streams
        self.prepost = cfg.dense_norm == "prepost"
        self.streams = [C if layer < L - 1 else 1 for layer in range(L)]
        self.dense_bs = nn.ParameterList(nn.Parameter(torch.zeros(self.streams[layer], layer + 2)) for layer in range(L))
        if self.dynamic:
            self.dynamic_dense = nn.ModuleList(
                WeightGenerator(
                    cfg.dim,
                    generator_width(self.streams[layer], layer + 2, layer == L - 1, cfg.dense_expand_last, cfg.dense_round64),
                    self.streams[layer] * (layer + 2), cfg.norm_eps, scaled_norm=self.prepost)
                for layer in range(L))
        if self.prepost:
            # PrePostDANorm (paper Eq. 10): every stored state is normalised; the R stream's sum is
            # normalised again with a small scale and added to the newest state.
            self.pre_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(L + 1))
            self.post_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(L))
        self.dim = cfg.dim
        self.reset_parameters()

    def multiway_input(self, layer: int) -> bool:
        return layer >= 1 and self.streams[layer - 1] == 4

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for bias in self.dense_bs:
                bias.zero_()
                if not self.prepost:
                    bias[:, -1] = 1.0
            if self.dynamic:
                for gen in self.dynamic_dense:
                    nn.init.normal_(gen.w1.weight, std=self.dim ** -0.5)
                    nn.init.zeros_(gen.w2.weight)
                    if gen.norm is not None:
                        nn.init.ones_(gen.norm.weight)
            if self.prepost:
                for norm in self.pre_norms:
                    nn.init.ones_(norm.weight)
                for norm in self.post_norms:
                    nn.init.constant_(norm.weight, 1e-3)

    def begin(self, x0: torch.Tensor) -> DepthState:
        return DepthState(inputs=x0, states=[self.pre_norms[0](x0) if self.prepost else x0])

    def dense_weights(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Weights (C, B, T, n) for the states after block `layer`; static ones are (C, 1, 1, n)."""
        bias = self.dense_bs[layer]
        if not self.dynamic:
            return bias[:, None, None, :]
        B, T, _ = out.shape
        C, n = bias.shape
        dw = self.dynamic_dense[layer](out).view(B, T, C, n).permute(2, 0, 1, 3)
        return dw + bias[:, None, None, :]

    def advance(self, state: DepthState, layer: int, out: torch.Tensor) -> None:
        state.states.append(self.pre_norms[layer + 1](out) if self.prepost else out)
        mixed = depth_mix(state.states, self.dense_weights(layer, out))
        if self.prepost:
            last = len(mixed) - 1  # the R stream
            mixed = [out + (self.post_norms[layer](m) if c == last else m) for c, m in enumerate(mixed)]
        state.inputs = tuple(mixed) if len(mixed) == 4 else mixed[0]


class MuddConnection(DenseConnection):
    """MUDD: multiway (q, k, v, r) dynamic dense connections."""

    n_streams, dynamic = 4, True


class DDFormerConnection(DenseConnection):
    """DDFormer: single-way dynamic dense; one aggregate feeds q, k, v and the residual."""

    n_streams, dynamic = 1, True


class DenseFormerConnection(DenseConnection):
    """DenseFormer (Pagliardini et al. 2024): single-way static depth-weighted average."""

    n_streams, dynamic = 1, False


class StaticMultiwayConnection(DenseConnection):
    """Static multiway: MUDD's four streams with static weights only (paper Table 5)."""

    n_streams, dynamic = 4, False
