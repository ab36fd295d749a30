"""Mixture-of-experts feed-forward: top-k token-choice routing over stacked experts, dropless (every token
reaches its k experts, no capacity), optional shared experts every token passes through.

The router's load-balancing loss (Switch Transformer: E * sum_e f_e * P_e, f_e the share of assignments to
expert e and P_e its mean router probability) and z-loss (ST-MoE: mean squared logsumexp of the logits) are
kept on the module after each forward; the model adds them, weighted, to its output's `aux_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from muddformer._utils import at_least_float32
from muddformer.config import MuddConfig


def expert_parameters(cfg: MuddConfig) -> int:
    """Parameters of one expert: SwiGLU's three matrices (llama) or the GELU MLP's two with biases (pythia)."""
    D, H = cfg.dim, cfg.moe_expert_width
    return 3 * D * H if cfg.block == "llama" else 2 * D * H + H + D


def inactive_parameters(cfg: MuddConfig) -> int:
    """Parameters a token does not pass through: the routed experts it is not sent to."""
    return sum(cfg.moe_flags) * (cfg.moe_experts - cfg.moe_top_k) * expert_parameters(cfg)


class MoEFeedForward(nn.Module):
    """moe_experts routed experts (top moe_top_k per token) and moe_shared_experts shared ones, stacked as
    (experts, out, in) weights; routed experts first. The block family's MLP: SwiGLU (llama) or GELU with
    biases (pythia)."""

    def __init__(self, cfg: MuddConfig):
        super().__init__()
        self.n_routed, self.top_k, self.norm_topk = cfg.moe_experts, cfg.moe_top_k, cfg.moe_norm_topk
        n, D, H = cfg.moe_experts + cfg.moe_shared_experts, cfg.dim, cfg.moe_expert_width
        self.router = nn.Linear(D, cfg.moe_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n, H, D))
        self.w2 = nn.Parameter(torch.empty(n, D, H))
        self.gated = cfg.block == "llama"
        self.w3 = nn.Parameter(torch.empty(n, H, D)) if self.gated else None
        self.b1 = None if self.gated else nn.Parameter(torch.zeros(n, H))
        self.b2 = None if self.gated else nn.Parameter(torch.zeros(n, D))
        # Set by each forward: the weighted-free router losses and each routed expert's share of the assignments.
        self.balance_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.load: torch.Tensor | None = None

    def reset_parameters(self, init_matrix: Callable[..., None]) -> None:
        """Every expert's matrices and the router's with the model's `init_matrix(weight, output=...)`; the down
        projections w2 are the outputs."""
        with torch.no_grad():
            for weight, output in ((self.router.weight, False), (self.w1, False), (self.w2, True), (self.w3, False)):
                if weight is None:
                    continue
                for matrix in weight if weight.dim() == 3 else [weight]:
                    init_matrix(matrix, output=output)
            for bias in (self.b1, self.b2):
                if bias is not None:
                    bias.zero_()

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, D)."""
        return expert_mlp(x, self.w1[e], self.w2[e], _at(self.w3, e), _at(self.b1, e), _at(self.b2, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, E, k = x.shape, self.n_routed, self.top_k
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        logits = at_least_float32(logits)  # routing in float32 at least
        probs = torch.softmax(logits, dim=-1)
        gates, chosen = probs.topk(k, dim=-1)  # (N, k)
        if self.norm_topk:
            gates = gates / gates.sum(-1, keepdim=True)
        assigned = chosen.reshape(-1)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, assigned, torch.ones_like(assigned))
        self.load = counts.detach().float() / assigned.numel()
        self.balance_loss = E * (counts.float() / assigned.numel() * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        # Dropless dispatch: assignments sorted by expert, each expert runs on its own contiguous slice.
        order = assigned.argsort(stable=True)
        token = order // k
        # Autocast does not reach inside the custom op: cast as it would cast a linear layer's operands.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
        weights = [None if w is None else w.to(dtype) for w in (self.w1, self.w2, self.w3, self.b1, self.b2)]
        routed = grouped_experts(flat.index_select(0, token).to(dtype), counts, *weights)
        routed = routed * gates.reshape(-1)[order, None].to(routed.dtype)
        out = torch.zeros_like(flat, dtype=routed.dtype).index_add_(0, token, routed)
        for e in range(E, self.w1.shape[0]):
            out = out + self.expert(e, flat)
        return out.reshape(shape)


def _at(weight: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if weight is None else weight[e]


def expert_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """One expert: SwiGLU when w3 is given, else GELU with biases."""
    if w3 is not None:
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# The expert loop splits the tokens by a data-dependent count per expert. As one custom op (static shapes in and
# out: the sorted assignments) torch.compile traces the rest of the model around it in a single graph; its
# backward is a second op with the gradients written out.
@torch.library.custom_op("muddformer::grouped_experts", mutates_args=())
def grouped_experts(
    x: torch.Tensor,
    sizes: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """Routed experts on assignments x (n, D) sorted by expert: the first sizes[0] rows to expert 0, and so on."""
    parts = torch.split(x, sizes.tolist())
    outs = [expert_mlp(part, w1[e], w2[e], _at(w3, e), _at(b1, e), _at(b2, e)) for e, part in enumerate(parts)]
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


@grouped_experts.register_fake
def _(x, sizes, w1, w2, w3, b1, b2):
    return x.new_empty(x.shape[0], w2.shape[1])


@torch.library.custom_op("muddformer::grouped_experts_backward", mutates_args=())
def grouped_experts_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    sizes: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Gradients of grouped_experts for x and each weight given (in that order), written out: the op runs
    below autograd, so it cannot differentiate itself."""
    gx = torch.empty_like(x)
    g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
    g3, gb1, gb2 = (None if t is None else torch.zeros_like(t) for t in (w3, b1, b2))
    start = 0
    for e, n in enumerate(sizes.tolist()):
        xe, dy = x[start : start + n], grad[start : start + n]
        a = F.linear(xe, w1[e], None if b1 is None else b1[e])
        if w3 is not None and g3 is not None:  # SwiGLU: y = (silu(a) * b) W2^T
            b, sig = F.linear(xe, w3[e]), torch.sigmoid(a)
            h = a * sig * b
            dh = dy @ w2[e]
            da = dh * b * sig * (1 + a * (1 - sig))
            db = dh * a * sig
            g3[e] = db.T @ xe
            gx[start : start + n] = da @ w1[e] + db @ w3[e]
        else:  # exact GELU: y = gelu(a) W2^T + b2
            h = F.gelu(a)
            cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
            da = (dy @ w2[e]) * (cdf + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi))
            gx[start : start + n] = da @ w1[e]
            if gb1 is not None and gb2 is not None:
                gb1[e], gb2[e] = da.sum(0), dy.sum(0)
        g1[e], g2[e] = da.T @ xe, dy.T @ h
        start += n
    return [t for t in (gx, g1, g2, g3, gb1, gb2) if t is not None]


@grouped_experts_backward.register_fake
def _(grad, x, sizes, w1, w2, w3, b1, b2):
    return [torch.empty_like(t) for t in (x, w1, w2, w3, b1, b2) if t is not None]


def _setup(ctx, inputs, output) -> None:
    x, sizes, w1, w2, w3, b1, b2 = inputs
    ctx.given = [t is not None for t in (w3, b1, b2)]
    ctx.save_for_backward(x, sizes, w1, w2, *(t for t in (w3, b1, b2) if t is not None))


def _backward(ctx, grad):
    x, sizes, w1, w2, *rest = ctx.saved_tensors
    it = iter(rest)
    w3, b1, b2 = (next(it) if given else None for given in ctx.given)
    grads = iter(grouped_experts_backward(grad.contiguous(), x, sizes, w1, w2, w3, b1, b2))
    gx, g1, g2 = next(grads), next(grads), next(grads)
    g3, gb1, gb2 = (next(grads) if given else None for given in ctx.given)
    return gx, None, g1, g2, g3, gb1, gb2


grouped_experts.register_autograd(_backward, setup_context=_setup)
