"""The reference implementation's forward pass (architecture §2), written out in plain tensor operations.

Independent of muddformer's modules: it reads a published folder's config.json and safetensors by
their published key names and runs every operation in the order and dtype the reference does
(architecture §2.2, §2.3, §2.4, §2.5, §2.6). On one machine, muddformer's reference-arithmetic path
must give bit-identical bfloat16 logits; the fixtures' logits_bf16 were made on another CPU, whose
bfloat16 kernels may round differently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def published_weights(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name != "expected.safetensors":
            tensors.update(load_file(shard))
    return {k: v.to(dtype) for k, v in tensors.items()}


def rms_norm(x, weight, eps):  # float32 statistics, cast back, then the weight
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_table(n_rot: int, block_size: int, base: float, table_dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, n_rot, 2)[: n_rot // 2].float() / n_rot))
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], -1).to(table_dtype).float()  # the 16-bit table (§2.5)


def rotate(x, table, n_rot):  # (B, T, H, d): rotate-half on the first n_rot features, in float32
    half = n_rot // 2
    xf = x[..., :n_rot].float()
    cos, sin = table[None, : x.shape[1], None, :, 0], table[None, : x.shape[1], None, :, 1]
    a, b = xf[..., :half], xf[..., half:]
    out = torch.cat([a * cos - b * sin, b * cos + a * sin], -1).type_as(x)
    return torch.cat([out, x[..., n_rot:]], -1)


def reference_logits(folder: Path, input_ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    cfg = json.loads((folder / "config.json").read_text())
    W = published_weights(folder, dtype)
    pythia = cfg["model_type"] == "muddpythia"
    D, H, L, eps = cfg["dim"], cfg["n_head"], cfg["n_layer"], cfg["norm_eps"]
    d = D // H
    n_rot = int(d * cfg.get("rotary_pct", 1.0))
    table = rope_table(n_rot, cfg["block_size"], cfg["rope_base"], torch.float16 if pythia else torch.bfloat16)
    B, T = input_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def linear(x, name):
        return F.linear(x, W[name + ".weight"], W.get(name + ".bias"))

    def norm(x, name):
        if pythia:
            return F.layer_norm(x, (D,), W[name + ".weight"], W[name + ".bias"], eps)
        return rms_norm(x, W[name + ".weight"], eps)

    def attention(l, xq, xk, xv):
        p = f"layers.{l}.attention."
        q = rms_norm(linear(xq, p + "wq").view(B, T, H, d), W[p + "q_norm.weight"], eps)
        k = rms_norm(linear(xk, p + "wk").view(B, T, H, d), W[p + "k_norm.weight"], eps)
        q, k = rotate(q, table, n_rot).transpose(1, 2), rotate(k, table, n_rot).transpose(1, 2)
        v = linear(xv, p + "wv").view(B, T, H, d).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
        if pythia:  # softmax in the model dtype, fp16 mask value (§2.4)
            probs = scores.masked_fill(~causal, torch.finfo(torch.float16).min).softmax(-1)
        else:  # float32 softmax (§2.3)
            probs = scores.float().masked_fill(~causal, torch.finfo(torch.float32).min).softmax(-1).to(v.dtype)
        return linear((probs @ v).transpose(1, 2).reshape(B, T, D), p + "wo")

    def block(l, x):
        p = f"layers.{l}."
        if l == 0:
            xq = xk = xv = norm(x, p + "attention_norm")
            xr = x
        else:
            xq, xk, xv = (norm(s, p + f"attention_norms.{i}") for i, s in enumerate(x[:3]))
            xr = x[3]
        attn = attention(l, xq, xk, xv)
        if pythia:  # parallel residual, GELU MLP with biases on the R stream
            return (
                xr
                + attn
                + linear(F.gelu(linear(norm(xr, p + "ffn_norm"), p + "feed_forward.w1")), p + "feed_forward.w2")
            )
        h = xr + attn
        n = norm(h, p + "ffn_norm")
        return h + linear(
            F.silu(linear(n, p + "feed_forward.w1")) * linear(n, p + "feed_forward.w3"), p + "feed_forward.w2"
        )

    x = F.embedding(input_ids, W["tok_embeddings.weight"])
    states = [x]
    for l in range(L):
        out = block(l, x)
        states.append(out)
        g = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)  # no weight, no upcast (§2.2)
        g = F.gelu(g @ W[f"dynamic_dense.{l}.w1.weight"].T) @ W[f"dynamic_dense.{l}.w2.weight"].T
        prior = W[f"dense_bs.{l}"]
        C, n = prior.shape
        dw = g.view(B, T, C, n).permute(2, 0, 1, 3) + prior[:, None, None, :]  # (C, B, T, n)
        mixed = []
        for c in range(C):  # a sequential sum over states in the model dtype, like `layer_mix`
            acc = dw[c, :, :, 0, None] * states[0]
            for j in range(1, n):
                acc = acc + dw[c, :, :, j, None] * states[j]
            mixed.append(acc)
        x = tuple(mixed) if C == 4 else mixed[0]
    return linear(norm(x, "norm"), "output")
