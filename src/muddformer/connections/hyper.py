"""Hyper-connections: the residual stream widened to n streams that are mixed around every sub-layer.

The state is H, n streams of width D (B, T, n, D), which starts as n copies of the embedding. Around
each sub-layer T (attention and FFN separately; the pythia block's parallel pair is one sub-layer,
T(h) = Attn(h) + FFN(h)) a site reads one input h from H, runs T and writes T(h) back:

    h = a^T H          H <- R^T H + b^T T(h)        (a: n, R: n x n, b: n)

The final norm reads the mean of the streams. The papers sum them; the final norm is scale
invariant up to its eps, and the mean of n equal streams is the stream itself, which keeps HC's start
exact. Every weight is per token, so decoding keeps only the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import nn

from muddformer.config import MuddConfig
from muddformer.connections.base import Connection
from muddformer.layers import Block, inverse_rms, make_norm


@dataclass
class HyperState:
    """The n residual streams H (B, T, n, D); all equal to the embedding before block 0."""

    streams: torch.Tensor


HC_DYNAMIC_SCALE = 0.01  # HC paper: the learnable scales s_alpha, s_beta start at 0.01
MHC_GATE_SCALE = 0.01  # mHC: small start of the learnable scales alpha_pre, alpha_post, alpha_res
MHC_OFF_WEIGHT = 0.01  # mHC start: weight on the streams that a residual model would not read


class HyperConnectionBase(Connection):
    """n residual streams and one site per sub-layer; subclasses give the site."""

    def __init__(self, cfg: MuddConfig):
        super().__init__(cfg)
        self.n_streams, self.dim = cfg.hyper_streams, cfg.dim
        per_block = 1 if cfg.block == "pythia" else 2
        self.layers = nn.ModuleList(
            HyperLayer([self.make_site(cfg, layer * per_block + j) for j in range(per_block)])
            for layer in range(cfg.n_layer)
        )
        self.reset_parameters()

    def make_site(self, cfg: MuddConfig, index: int) -> nn.Module:
        raise NotImplementedError

    def mix_flops(self) -> int:
        return sum(
            cast(Site, site).mix_flops(self.dim) for layer in self.layers for site in cast(HyperLayer, layer).sites
        )

    def reset_parameters(self) -> None:
        for layer in self.layers:
            for site in cast(HyperLayer, layer).sites:
                cast(Site, site).reset_parameters()

    def begin(self, x0: torch.Tensor) -> HyperState:
        return HyperState(x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n_streams, x0.shape[-1]))

    def run_block(self, state: HyperState, layer: int, block: Block, ctx) -> None:
        # The block's sites ride along as a module argument: every layer then runs the same code, so a
        # per-block compile builds one graph for all of them.
        state.streams = block(state.streams, ctx, around=self.layers[layer])

    def output(self, state: HyperState) -> torch.Tensor:
        # The streams' mean, written as H_0 + mean(H_i - H_0): while the streams are equal (a fresh HC)
        # that is H_0 bitwise for any n, where a plain mean of n equal values can round.
        H = state.streams
        first = H[..., 0, :]
        return first + (H - first[..., None, :]).mean(-2)


class Site(Protocol):
    """What HyperLayer needs of a site: HyperSite (HC) and ManifoldSite (mHC)."""

    def read(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def reset_parameters(self) -> None: ...

    def mix_flops(self, dim: int) -> int: ...


class HyperLayer(nn.Module):
    """The sites around one block: attention and FFN (llama), or one for the parallel pair (pythia)."""

    def __init__(self, sites: list[nn.Module]):
        super().__init__()
        self.sites = nn.ModuleList(sites)

    def through_block(self, block: Block, H: torch.Tensor, ctx) -> torch.Tensor:
        """The block on streams H (B, T, n, D); a pure function of H, so checkpointing can rerun it."""
        if block.parallel_residual:
            h, carried, gain = self.site(0).read(H)
            return write(carried, gain, block.attention_part(h, ctx), block.ffn_part(h))
        h, carried, gain = self.site(0).read(H)
        H = write(carried, gain, block.attention_part(h, ctx))
        h, carried, gain = self.site(1).read(H)
        return write(carried, gain, block.ffn_part(h))

    def site(self, index: int) -> Site:
        return cast(Site, self.sites[index])


def write(carried: torch.Tensor, gain: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
    """carried + gain^T out for each output in turn (B, T, n, D); one add per output keeps the
    pythia block's (x + attn) + ffn order, so a fresh HC matches the residual model bitwise."""
    for out in outputs:
        carried = carried + gain[..., None] * out[..., None, :]
    return carried


class HyperSite(nn.Module):
    """One dynamic hyper-connection: alpha = [a | R] (n, n+1) and beta = b (n), each a static part plus
    tanh(norm(H) W) * s with W zero and s = 0.01 at the start."""

    def __init__(self, cfg: MuddConfig, n: int, index: int):
        super().__init__()
        self.n, self.index = n, index
        self.norm = make_norm(cfg)
        self.static_alpha = nn.Parameter(torch.empty(n, n + 1))
        self.static_beta = nn.Parameter(torch.empty(n))
        self.dynamic_alpha = nn.Parameter(torch.empty(cfg.dim, n + 1))
        self.dynamic_beta = nn.Parameter(torch.empty(cfg.dim))
        self.alpha_scale = nn.Parameter(torch.empty(1))  # shape (1,): FSDP2 cannot shard 0-d parameters
        self.beta_scale = nn.Parameter(torch.empty(1))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # Sub-layer k reads stream k mod n, every stream is carried unchanged and gets the output once.
            self.static_alpha.zero_()
            self.static_alpha[self.index % self.n, 0] = 1.0
            self.static_alpha[:, 1:] = torch.eye(self.n)
            self.static_beta.fill_(1.0)
            self.dynamic_alpha.zero_()
            self.dynamic_beta.zero_()
            self.alpha_scale.fill_(HC_DYNAMIC_SCALE)
            self.beta_scale.fill_(HC_DYNAMIC_SCALE)
            nn.init.ones_(self.norm.weight)
            bias = getattr(self.norm, "bias", None)  # LayerNorm's (pythia); RMSNorm has none
            if bias is not None:
                nn.init.zeros_(bias)

    def mix_flops(self, dim: int) -> int:
        # alpha's and beta's projections read each of the n streams (the parameters count one), alpha^T H, and
        # the output added to every stream with its gain.
        n = self.n
        return 2 * dim * ((n - 1) * (n + 2) + (n + 1) * n + n)

    def read(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sub-layer input h (B, T, D), the carried streams R^T H (B, T, n, D) and the gains b (B, T, n)."""
        normed = self.norm(H)
        alpha = torch.tanh(normed @ self.dynamic_alpha) * self.alpha_scale + self.static_alpha  # (B, T, n, n+1)
        beta = torch.tanh(normed @ self.dynamic_beta) * self.beta_scale + self.static_beta  # (B, T, n)
        mixed = alpha.transpose(-1, -2).to(H.dtype) @ H  # row 0: a^T H; rows 1..n: R^T H
        return mixed[..., 0, :], mixed[..., 1:, :], beta.to(H.dtype)


class HyperConnection(HyperConnectionBase):
    """Dynamic hyper-connections, DHC (Zhu et al., ICLR 2025, arXiv 2409.19606), expansion rate
    `hyper_streams` (n = 4 in the MUDD paper's comparison).

    Init (the paper's): a = e_{k mod n} for sub-layer k, R = I, b = 1, dynamic weights W = 0 with
    scales s = 0.01. All streams stay equal to the residual stream, and a fresh model computes
    bitwise what the residual model computes with the same body weights.
    """

    static_priors = ("static_alpha", "static_beta")
    projection_vectors = ("dynamic_beta",)  # the (D, 1) projection of beta, stored as a vector; decayed like alpha's

    def make_site(self, cfg: MuddConfig, index: int) -> nn.Module:
        return HyperSite(cfg, self.n_streams, index)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic (..., n, n) from logits: exp, then alternately normalise rows and columns.
    Ends on the columns, so they sum to 1 exactly and the rows to 1 up to the convergence left."""
    m = torch.exp(logits - logits.amax((-1, -2), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class ManifoldSite(nn.Module):
    """One mHC site: pre, post and residual weights from one projection of the RMS-normalised
    flattened streams, alpha * (x phi) + bias, through sigmoid, 2 sigmoid and Sinkhorn."""

    def __init__(self, cfg: MuddConfig, n: int, index: int):
        super().__init__()
        self.n, self.index = n, index
        self.eps, self.iters = cfg.norm_eps, cfg.sinkhorn_iters
        self.projection = nn.Parameter(torch.empty(n * cfg.dim, n * (n + 2)))  # phi: pre | post | res
        self.bias_pre = nn.Parameter(torch.empty(n))
        self.bias_post = nn.Parameter(torch.empty(n))
        self.bias_res = nn.Parameter(torch.empty(n, n))
        self.scales = nn.Parameter(torch.empty(3))  # alpha_pre, alpha_post, alpha_res

    def reset_parameters(self) -> None:
        n = self.n
        off = min(MHC_OFF_WEIGHT, 0.5 / n)  # keeps `on` >= 0.5 however many streams
        on = 1.0 - (n - 1) * off
        with torch.no_grad():
            self.projection.zero_()
            self.scales.fill_(MHC_GATE_SCALE)
            # pre: sigmoid gives `on` to stream k mod n and `off` to the others (they sum to 1).
            self.bias_pre.fill_(logit(off))
            self.bias_pre[self.index % n] = logit(on)
            self.bias_post.zero_()  # 2 sigmoid(0) = 1: every stream gets the output once
            # res: uniform 1/n. Any doubly stochastic matrix carries equal streams unchanged; a start near
            # I (large diagonal logits) would leave 20 Sinkhorn steps far from doubly stochastic as soon
            # as training moves the logits (rows off by ~1e-2 at logit noise 0.3).
            self.bias_res.zero_()

    def weights(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre (B, T, n), post (B, T, n) and the doubly stochastic res (B, T, n, n), in float32 at least."""
        n, dtype = self.n, torch.promote_types(H.dtype, torch.float32)
        flat = H.flatten(-2).to(dtype)
        x = flat * inverse_rms(flat, self.eps)
        pre, post, res = (x @ self.projection.to(dtype)).split([n, n, n * n], dim=-1)
        a_pre, a_post, a_res = self.scales.to(dtype).unbind(0)
        pre = torch.sigmoid(a_pre * pre + self.bias_pre.to(dtype))
        post = 2.0 * torch.sigmoid(a_post * post + self.bias_post.to(dtype))
        res = sinkhorn(a_res * res.unflatten(-1, (n, n)) + self.bias_res.to(dtype), self.iters)
        return pre, post, res

    def mix_flops(self, dim: int) -> int:
        n = self.n  # pre H, res H and the output added to every stream with its gain
        return 2 * dim * (n + n * n + n)

    def read(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sub-layer input pre H (B, T, D), the carried streams res H (B, T, n, D) and the gains post."""
        pre, post, res = self.weights(H)
        h = (pre.to(H.dtype)[..., None, :] @ H).squeeze(-2)
        return h, res.to(H.dtype) @ H, post.to(H.dtype)


class ManifoldHyperConnection(HyperConnectionBase):
    """mHC, manifold-constrained hyper-connections (Xie et al., DeepSeek, arXiv 2512.24880): the
    residual mixing of HC projected onto doubly stochastic matrices by `sinkhorn_iters` Sinkhorn-Knopp
    steps, sigmoid-gated pre weights and 2 sigmoid post weights, all from one projection phi of the
    RMS-normalised n*D stream with static biases and learnable scales alpha.

    Init: phi = 0 and alpha = 0.01, so the weights start at their static values. Exact: post = 1 and
    res = 1/n everywhere (Sinkhorn of equal logits). Not exact: a sigmoid cannot reach HC's one-hot a,
    so pre starts at 1 - 0.01 (n - 1) on stream k mod n (which breaks the symmetry between streams, as
    in HC) and 0.01 on the others; its sum is 1 only up to rounding. The streams start as equal
    copies and stay equal, so a fresh model computes the residual model up to float rounding (about
    1e-6 relative), not bitwise. With 20 Sinkhorn steps the columns of res sum to 1 exactly and the
    rows to within 1e-6 while its logits stay within about +-1 of each other; wider spreads need more
    steps (rows off by ~1e-3 at logit noise 1).
    """

    static_priors = ("bias_pre", "bias_post", "bias_res")

    def make_site(self, cfg: MuddConfig, index: int) -> nn.Module:
        return ManifoldSite(cfg, self.n_streams, index)
