"""Building blocks of the body: norms, rotary embedding, attention, MLPs and the two block families."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from muddformer._utils import at_least_float32
from muddformer.config import MuddConfig
from muddformer.moe import MoEFeedForward

TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension, kept as (..., 1): the reference formula's rstd."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")  # (out, rstd) in one call; not in older torch


class _Float32RMSNorm(torch.autograd.Function):
    """x * rstd(x) (* weight) on float32 with torch's fused forward and a backward of five passes over x.

    Eager autograd of torch's rms_norm on the CPU runs its composite form: about twice the passes and
    allocations, and saves more for backward. This saves x (alive anyway) and one rstd per row."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        if HAS_FUSED_RMS_NORM:
            out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        else:  # torch releases before the fused op: the same values in two more passes
            out, rstd = F.rms_norm(x, (x.shape[-1],), weight, eps), inverse_rms(x, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # d(x * rstd)/dx applied to g: rstd * (g - x_hat * mean(g * x_hat)), g the gradient through the weight.
            grad_x = grad * weight if weight is not None else grad.clone()
            mean = torch.linalg.vecdot(x_hat, grad_x, dim=-1).unsqueeze(-1).div_(x.shape[-1])
            grad_x.addcmul_(x_hat, mean, value=-1).mul_(rstd)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = x_hat.mul_(grad).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_weight, None


def float32_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """torch's rms_norm on float32 (the reference formula bit for bit: test_dependencies), through the
    short backward where eager autograd needs one; compiled graphs leave the fusing to inductor."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    if needs_grad and not torch.compiler.is_compiling():
        return cast(torch.Tensor, _Float32RMSNorm.apply(x, weight, eps))
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as the reference does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:
            # In lower precision torch's rms_norm rounds once less than the reference: that keeps the explicit form.
            return float32_rms_norm(x, self.weight, self.eps)
        xf = at_least_float32(x)
        return (xf * inverse_rms(xf, self.eps)).type_as(x) * self.weight


def rms_norm_no_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The dense-weight generator's norm: no weight and no float32 upcast (architecture §2.2)."""
    if x.dtype == torch.float32:
        return float32_rms_norm(x, None, eps)
    return x * inverse_rms(x, eps)


def make_norm(cfg: MuddConfig, dim: int | None = None) -> RMSNorm | nn.LayerNorm:
    """The block family's norm: RMSNorm (llama) or LayerNorm with bias (pythia)."""
    dim = cfg.dim if dim is None else dim
    return RMSNorm(dim, cfg.norm_eps) if cfg.block == "llama" else nn.LayerNorm(dim, eps=cfg.norm_eps)


def rotary_table(cfg: MuddConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin for positions [0, block_size) as a (block_size, 2, rotary_dim) float32 tensor: row 0 is
    (cos, cos), row 1 is (-sin, sin), over the two halves of the rotated features.

    Computed in float32, then rounded through `rope_table_dtype`: the published models use a
    bfloat16 (MUDDFormer) or float16 (MUDDPythia) table, which moves scores measurably (architecture §2.5).
    Full-width contiguous rows let the rotation run as two multiplies and an add over whole heads.
    """
    n = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, n, 2, device=device)[: n // 2].float() / n))
    if cfg.rope_frequency_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, cfg)
    angles = torch.outer(torch.arange(cfg.block_size, device=device).float(), inv_freq)
    cos, sin = (t.to(TABLE_DTYPES[cfg.rope_table_dtype]).float() for t in (torch.cos(angles), torch.sin(angles)))
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)


def llama3_frequencies(inv_freq: torch.Tensor, cfg: MuddConfig) -> torch.Tensor:
    """Llama 3.1's rotary scaling: wavelengths longer than original / low_freq_factor are divided by `factor`,
    shorter than original / high_freq_factor kept, and those between blended linearly in original / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = cfg.rope_original_max_position / wavelength
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    blend = ((ratio - low) / (high - low)).clamp(0, 1)  # 0: fully stretched, 1: kept
    return (1 - blend) * inv_freq / cfg.rope_factor + blend * inv_freq


def apply_rotary(x: torch.Tensor, table: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate-half RoPE on the first `rotary_dim` features of x (B, T, H, d); table is (B or 1, T, 2, rotary_dim),
    the rows of `rotary_table` at each token's position.

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as x * (cos, cos) + (x2, x1) * (-sin, sin): the same
    products and sums, so the same bits. The reference writes the rotated pairs interleaved; the same
    permutation hits q and k, so attention scores are identical to this contiguous layout (architecture §2.5).
    """
    half = rotary_dim // 2
    xf = at_least_float32(x[..., :rotary_dim])
    swapped = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    rotated = (xf * table[:, :, None, 0] + swapped * table[:, :, None, 1]).type_as(x)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


@dataclass
class AttentionContext:
    """What every block's attention needs besides its inputs.

    rope: the `rotary_table` rows at each query's position, (B or 1, T, 2, rotary_dim).
    mask: bool (B or 1, 1, T, S), True where a query may attend to a key; None means plain causal
        attention over the T tokens themselves (training, full forward).
    window_mask: the same for layers with an attention window (None when no layer has one).
    cache: a KV cache with `update(k, v, layer_idx, cache_kwargs) -> (all_k, all_v)` (ours or a transformers
        Cache); cache_kwargs carries `cache_position`, the cache slots (T,) of these tokens.

    Masks are laid out over the cache slots 0..S-1. A cache may hand back fewer keys for a windowed layer:
    the newest ones (a trimmed dynamic cache), or any slots it names through `key_slots(layer_idx)` (a ring buffer).
    """

    rope: torch.Tensor
    mask: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None
    cache: Any = None
    cache_position: torch.Tensor | None = None


def window_band(query_slots: torch.Tensor, key_slots: torch.Tensor, window: int) -> torch.Tensor:
    """(T, S) True where a key is among the `window` newest tokens up to its query (itself included)."""
    distance = query_slots[:, None] - key_slots[None, :]
    return (distance >= 0) & (distance < window)


def mask_for_keys(mask: torch.Tensor, n_keys: int, slots: torch.Tensor | None) -> torch.Tensor:
    """The columns of a slot-layout mask for the keys a cache handed back: those at `slots` (-1: empty),
    else the newest n_keys."""
    if slots is not None:
        return mask.index_select(-1, slots.clamp(min=0)) & (slots >= 0)
    return mask if mask.shape[-1] == n_keys else mask[..., mask.shape[-1] - n_keys :]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_float32: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention computed as the reference implementation does, for bit-parity in 16-bit dtypes.

    Scores in the model dtype; the llama family casts them to float32 for the masked softmax and
    back, the pythia family softmaxes in the model dtype (architecture §2.3, §2.4). mask None = causal.
    """
    if mask is None:
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if softmax_float32:
        scores = at_least_float32(scores)
    mask_value = torch.finfo(scores.dtype if softmax_float32 else torch.float16).min
    probs = torch.softmax(scores.masked_fill(~mask, mask_value), dim=-1).to(v.dtype)
    return probs @ v


def repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Keys or values (B, H_kv, S, d) for n_head query heads: each kv head serves n_head / H_kv consecutive ones."""
    B, H_kv, S, d = x.shape
    if H_kv == n_head:
        return x
    return x[:, :, None].expand(B, H_kv, n_head // H_kv, S, d).reshape(B, n_head, S, d)


class Attention(nn.Module):
    """Causal multi-head attention with separate q/k/v inputs, optional per-head QK RMSNorm, RoPE."""

    def __init__(self, cfg: MuddConfig, layer_idx: int):
        super().__init__()
        bias = cfg.block == "pythia"
        self.layer_idx = layer_idx
        self.n_head, self.head_dim, self.rotary_dim = cfg.n_head, cfg.head_dim, cfg.rotary_dim
        self.n_kv_head = cfg.n_kv_head
        self.window = cfg.attn_windows[layer_idx]  # 0: global
        self.attn_impl, self.softmax_float32 = cfg.attn_impl, cfg.block == "llama"
        qkv_bias = bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=bias)
        self.q_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.use_qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.use_qk_norm else None

    def queries_and_keys(
        self, xq: torch.Tensor, xk: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, head_dim) and k (B, H_kv, T, head_dim): projection, per-head QK-norm, RoPE."""
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, self.n_head, self.head_dim)
        k = self.wk(xk).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope, self.rotary_dim), apply_rotary(k, rope, self.rotary_dim)
        return q.transpose(1, 2), k.transpose(1, 2)

    def forward(
        self,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        ctx: AttentionContext,
        value_add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, D = xq.shape
        q, k = self.queries_and_keys(xq, xk, ctx.rope)
        v = self.wv(xv) if value_add is None else self.wv(xv) + value_add
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        mask = ctx.window_mask if self.window else ctx.mask
        if ctx.cache is not None:  # the cache holds the n_kv_head heads only
            k, v = ctx.cache.update(k, v, self.layer_idx, {"cache_position": ctx.cache_position})
            if mask is not None:
                key_slots = getattr(ctx.cache, "key_slots", None)
                mask = mask_for_keys(mask, k.shape[2], key_slots(self.layer_idx) if key_slots else None)
        k, v = repeat_kv(k, self.n_head), repeat_kv(v, self.n_head)
        if self.attn_impl == "reference":
            out = reference_attention(q, k, v, self.softmax_float32, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0 / math.sqrt(self.head_dim)
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no bias (llama family)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)) with biases and exact (erf) GELU (pythia family)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


@dataclass
class ValueAdded:
    """A single block input whose attention values get `value` added after the value projection
    (the GPT-2 speedrun's V mix: q, k and v read norm(x), then v = W_v norm(x) + value)."""

    x: torch.Tensor
    value: torch.Tensor


class Streams(tuple):
    """The four streams (q, k, v, r) as views of one (B, T, 4, D) tensor, `stacked`, which a block
    normalises q, k and v of in one call instead of three (the decode step's fixed cost)."""

    stacked: torch.Tensor

    def __new__(cls, stacked: torch.Tensor) -> Streams:
        streams = super().__new__(cls, stacked.unbind(-2))
        streams.stacked = stacked
        return streams


BlockInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | ValueAdded


def residual_input(x: BlockInput) -> torch.Tensor:
    """The stream a block adds its sub-layers to: XR of four streams, else the single input."""
    if isinstance(x, tuple):
        return x[3]
    return x.x if isinstance(x, ValueAdded) else x


class Block(nn.Module):
    """One transformer block fed by a connection.

    Input is one state (used for q, k, v and the residual) or four streams (XQ, XK, XV, XR). With
    four streams, Q, K and V each get their own pre-norm and XR stays un-normalised (architecture §2.3).
    llama: h = XR + Attn; out = h + FFN(norm(h)).  pythia: out = XR + Attn + FFN(norm(XR)).
    """

    def __init__(self, cfg: MuddConfig, layer_idx: int, ffn_width: int, multiway_input: bool):
        super().__init__()
        self.layer_idx = layer_idx
        # Three RMSNorms of one width can run as one call on stacked streams (Streams).
        self.stacked_norms = multiway_input and cfg.block == "llama"
        if multiway_input:
            self.attention_norms = nn.ModuleList(make_norm(cfg) for _ in range(3))
        else:
            self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg, layer_idx)
        mlp = SwiGLU if cfg.block == "llama" else GeluMLP
        self.feed_forward: nn.Module = MoEFeedForward(cfg) if cfg.moe_flags[layer_idx] else mlp(cfg.dim, ffn_width)
        self.ffn_norm = make_norm(cfg)
        self.parallel_residual = cfg.block == "pythia"

    def attention_inputs(self, x: BlockInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The normalised query, key and value inputs (one shared tensor for a single input)."""
        if isinstance(x, Streams) and self.stacked_norms and x.stacked.dtype == torch.float32:
            # One norm over the q, k, v rows: per row the arithmetic of three separate calls.
            norms = [cast(RMSNorm, norm) for norm in self.attention_norms]
            weights = torch.stack([norm.weight for norm in norms])
            q, k, v = (F.rms_norm(x.stacked[..., :3, :], weights.shape[-1:], None, norms[0].eps) * weights).unbind(-2)
            return q, k, v
        if isinstance(x, tuple):
            return tuple(norm(s) for norm, s in zip(self.attention_norms, x[:3]))
        normed = self.attention_norm(x.x if isinstance(x, ValueAdded) else x)
        return normed, normed, normed

    def attention_part(self, x: BlockInput, ctx: AttentionContext) -> torch.Tensor:
        """Pre-norm(s) and attention: the attention sub-layer's output, without the residual add."""
        return self.attention(*self.attention_inputs(x), ctx, value_add=x.value if isinstance(x, ValueAdded) else None)

    def finish(self, xr: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The block output from its residual input and attention output (adds the FFN sub-layer)."""
        if self.parallel_residual:
            return xr + attn + self.ffn_part(xr)
        h = xr + attn
        return h + self.ffn_part(h)

    def ffn_part(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm and feed-forward: the FFN sub-layer's output, without the residual add."""
        return self.feed_forward(self.ffn_norm(x))

    def forward(self, x: Any, ctx: AttentionContext, around: Any = None) -> Any:
        """The block's output state. A connection that acts around each sub-layer (hyper-connections,
        attention residuals) passes itself as `around` and computes the block from `attention_part`
        and `ffn_part` on its own state `x`; running it inside this call keeps activation
        checkpointing, FSDP2's hooks and per-block compilation, which wrap the block call, applying."""
        if around is not None:
            return around.through_block(self, x, ctx)
        return self.finish(residual_input(x), self.attention_part(x, ctx))
