"""Checkpoints of transformers' own decoder families (Llama, Qwen2, Qwen3, GPT-NeoX/Pythia) as our models.

A local folder with config.json and safetensors becomes a residual model of ours that computes the same
function; with another connection (`mudd`, sparse options, a rival) the body weights are the same and the
connection starts at its identity, so the converted model still computes exactly the original at the start
(AttnRes excepted: it starts as the mean of its sources, the residual model only up to the norms' eps).
Anything the model family cannot express is refused with a message naming it.
"""

from __future__ import annotations

from typing import Any

import torch

from muddformer._utils import write_json_atomic
from muddformer.adapters.folders import (
    CONFIG_NAME,
    DEFAULT_SHARD_SIZE,
    parse_dtype,
    read_folder_raw_config,
    read_tensors,
    save_tensors,
)
from muddformer.config import MuddConfig
from muddformer.errors import CheckpointError
from muddformer.model import MuddModel, copy_body_weights

LLAMA_LIKE = ("llama", "qwen2", "qwen3")
FAMILIES = (*LLAMA_LIKE, "gpt_neox")
# transformers' per-layer names -> ours, for the llama-like families (q/k/v biases and q/k norms when present).
_LLAMA_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_NEOX_LAYER = {
    "attention.dense": "attention.wo",
    "mlp.dense_h_to_4h": "feed_forward.w1",
    "mlp.dense_4h_to_h": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def is_transformers_checkpoint(raw: dict) -> bool:
    return raw.get("model_type") in FAMILIES and "mudd_format" not in raw


def _rope(raw: dict) -> dict[str, Any]:
    """Rotary options from transformers 5's `rope_parameters` or 4's `rope_theta` / `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))
    out: dict[str, Any] = {"rope_base": float(theta)}
    if kind == "llama3":
        out.update(
            rope_frequency_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position=int(params["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise CheckpointError(f"rope type {kind!r} cannot be converted; supported: default, llama3")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get("rotary_pct")))
    if partial is not None:
        out["rotary_pct"] = float(partial)
    return out


def _windows(raw: dict) -> dict[str, Any]:
    """Qwen2/Qwen3 sliding-window layers as attn_window with the full-attention layers listed as global."""
    if not raw.get("use_sliding_window"):
        return {}
    if raw.get("sliding_window") is None:
        raise CheckpointError("use_sliding_window is set but sliding_window is missing from config.json")
    types = raw.get("layer_types")
    if not types:  # configs written before layer_types: layers from max_window_layers on are windowed
        start = raw.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(raw["num_hidden_layers"])]
    if "sliding_attention" not in types:
        return {}
    full = [str(layer) for layer, kind in enumerate(types) if kind == "full_attention"]
    return {"attn_window": int(raw["sliding_window"]), "attn_global_layers": ",".join(full) or "none"}


def config_from_transformers(raw: dict, **overrides: Any) -> MuddConfig:
    """Our residual config for a transformers config.json dict (then `overrides`, e.g. connection="mudd")."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"model_type {family!r} cannot be converted; supported: {', '.join(FAMILIES)}")
    dim, heads = raw["hidden_size"], raw["num_attention_heads"]
    if raw.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(
            f"head_dim={raw['head_dim']} differs from hidden_size / num_attention_heads = {dim // heads}; "
            "our attention has head_dim = dim / n_head"
        )
    act = raw.get("hidden_act", "silu")
    if act != ("gelu" if family == "gpt_neox" else "silu"):
        raise CheckpointError(f"hidden_act={act!r} cannot be converted for {family} (ours: silu, gelu for gpt_neox)")
    if raw.get("mlp_bias") or (family in ("llama", "qwen3") and raw.get("attention_bias")):
        raise CheckpointError(
            "attention_bias / mlp_bias on a llama-like model cannot be converted (only Qwen2's q/k/v)"
        )
    if family == "gpt_neox" and not raw.get("use_parallel_residual", True):
        raise CheckpointError("use_parallel_residual=False cannot be converted: our pythia block is parallel")
    fields: dict[str, Any] = dict(
        vocab_size=raw["vocab_size"],
        n_layer=raw["num_hidden_layers"],
        dim=dim,
        n_head=heads,
        n_kv_head=raw.get("num_key_value_heads") or heads,
        intermediate_size=raw["intermediate_size"],
        block_size=raw.get("max_position_embeddings", 2048),
        block="pythia" if family == "gpt_neox" else "llama",
        connection="residual",
        ffn_schedule="constant",
        use_qk_norm=family == "qwen3",
        qkv_bias=family == "qwen2",
        norm_eps=float(raw.get("layer_norm_eps", 1e-5) if family == "gpt_neox" else raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rotary_pct=0.25 if family == "gpt_neox" else 1.0,  # transformers' defaults where config.json is silent
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=end_ids(raw.get("eos_token_id")),
    )
    fields.update(_rope(raw), **_windows(raw))
    return MuddConfig(**{**fields, **overrides})


def end_ids(eos: Any) -> int | list[int] | None:
    """A config's eos_token_id as ours: an id, a list of them (one id alone as itself), or None."""
    if isinstance(eos, list):
        return eos[0] if len(eos) == 1 else (eos or None)
    return eos


def state_from_transformers(family: str, tensors: dict[str, torch.Tensor], cfg: MuddConfig) -> dict[str, torch.Tensor]:
    """transformers' tensors under our names (GPT-NeoX's fused q/k/v split per head)."""
    prefix, layer_map = ("gpt_neox.", _NEOX_LAYER) if family == "gpt_neox" else ("model.", _LLAMA_LAYER)
    top = {"embed_in": "tok_embeddings", "embed_tokens": "tok_embeddings", "final_layer_norm": "norm", "norm": "norm"}
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name.startswith(("lm_head.", "embed_out.")):
            out["output." + name.split(".", 1)[1]] = value
            continue
        if not name.startswith(prefix):
            raise CheckpointError(f"tensor {name!r} is not part of a {family} model; cannot convert it")
        rest = name[len(prefix) :]
        module, _, leaf = rest.rpartition(".")
        if module in top:
            out[f"{top[module]}.{leaf}"] = value
            continue
        parts = module.split(".", 2)  # layers.{i}.{module}
        if len(parts) < 3 or parts[0] != "layers":
            raise CheckpointError(f"tensor {name!r} has no counterpart in our model; cannot convert it")
        layer, sub = parts[1], parts[2]
        if family == "gpt_neox" and sub == "attention" and leaf in ("bias", "masked_bias"):
            continue  # older GPT-NeoX files store the causal-mask buffers; transformers skips them too
        if family == "gpt_neox" and sub == "attention.query_key_value":
            heads = value.view(cfg.n_head, 3, cfg.head_dim, *value.shape[1:])
            for i, ours in enumerate(("wq", "wk", "wv")):
                out[f"layers.{layer}.attention.{ours}.{leaf}"] = heads[:, i].reshape(cfg.dim, *value.shape[1:])
        elif sub in layer_map:
            out[f"layers.{layer}.{layer_map[sub]}.{leaf}"] = value
        elif not sub.endswith("rotary_emb"):
            raise CheckpointError(f"tensor {name!r} has no counterpart in our model; cannot convert it")
    return out


def load_transformers_model(folder: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> MuddModel:
    """A transformers checkpoint folder as our model: residual by default; `connection=...` (and any other
    config override) builds that model with the same body weights, its connection at the identity."""
    raw = read_folder_raw_config(folder)
    residual_cfg = config_from_transformers(raw)
    residual = MuddModel(residual_cfg).to(dtype)
    state = state_from_transformers(raw["model_type"], read_tensors(folder), residual_cfg)
    if residual_cfg.tie_word_embeddings:
        state.pop("output.weight", None)
    expected = residual.state_dict()
    if residual_cfg.tie_word_embeddings:
        expected.pop("output.weight")
    missing = [k for k in expected if k not in state and not _zero_bias(k, residual_cfg)]
    if missing or set(state) - set(expected):
        name = missing[0] if missing else sorted(set(state) - set(expected))[0]
        raise CheckpointError(f"{folder}: tensor {name!r} does not match the converted {raw['model_type']} model")
    with torch.no_grad():
        for name, value in state.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{folder}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
                )
            expected[name].copy_(value)
    if not overrides:
        return residual.eval()
    model = MuddModel(config_from_transformers(raw, **overrides)).to(dtype)
    copy_body_weights(residual, model)
    return model.eval()


def _zero_bias(name: str, cfg: MuddConfig) -> bool:
    # GPT-NeoX without attention_bias: our pythia block keeps its biases, at zero.
    return cfg.block == "pythia" and name.endswith(".bias") and ".attention." in name


# ---- the other way: a residual model of ours in transformers' own layout ------------------------------------
def transformers_family(cfg: MuddConfig) -> str:
    """The transformers family that computes this model, or a CheckpointError naming what none of them has."""
    problems = []
    if cfg.connection != "residual":
        problems.append(f"connection={cfg.connection!r} (transformers' models have a plain residual stream)")
    if cfg.ffn_schedule != "constant" and len(set(cfg.ffn_widths)) > 1:
        problems.append("ffn_schedule='linear' (their FFN width is the same in every layer)")
    if cfg.moe_experts:
        problems.append("moe_experts (the dense families have no experts)")
    if cfg.rope_table_dtype != "float32" or cfg.attn_impl == "reference" and cfg.block == "pythia":
        problems.append("a 16-bit rotary table or the reference attention (they compute both in float32)")
    if cfg.block == "pythia":
        if cfg.use_qk_norm or cfg.n_kv_head != cfg.n_head or cfg.attn_window:
            problems.append("q/k norm, grouped-query attention or windows on the pythia block (GPT-NeoX has none)")
        family = "gpt_neox"
    else:
        if cfg.rotary_pct != 1.0:
            problems.append(f"rotary_pct={cfg.rotary_pct} (the llama families rotate the whole head)")
        if cfg.use_qk_norm and cfg.qkv_bias:
            problems.append("q/k norm with q/k/v biases (Qwen3 has no biases, Qwen2 no q/k norm)")
        family = "qwen3" if cfg.use_qk_norm else "qwen2" if cfg.qkv_bias or cfg.attn_window else "llama"
    if problems:
        raise CheckpointError("cannot write a transformers checkpoint: " + "; ".join(problems))
    return family


def config_to_transformers(cfg: MuddConfig) -> dict[str, Any]:
    family = transformers_family(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_frequency_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    out: dict[str, Any] = dict(
        model_type=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.ffn_widths[0],
        max_position_embeddings=cfg.block_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        rope_parameters=rope,
        torch_dtype="float32",
    )
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = cfg.rotary_pct
        out.update(hidden_act="gelu", layer_norm_eps=cfg.norm_eps, use_parallel_residual=True, attention_bias=True)
        out.update(architectures=["GPTNeoXForCausalLM"], rotary_pct=cfg.rotary_pct, rope_theta=cfg.rope_base)
        return out
    out.update(hidden_act="silu", rms_norm_eps=cfg.norm_eps, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim)
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    out["architectures"] = [names[family]]
    if family != "qwen2":
        out.update(attention_bias=False, mlp_bias=False)
    if family != "llama":
        windows = cfg.attn_windows
        out.update(
            use_sliding_window=bool(cfg.attn_window),
            sliding_window=cfg.attn_window or None,
            max_window_layers=cfg.n_layer,
            layer_types=["sliding_attention" if w else "full_attention" for w in windows],
        )
    return out


def state_to_transformers(cfg: MuddConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' names (GPT-NeoX's q/k/v fused per head)."""
    family = transformers_family(cfg)
    prefix, layer_map = ("gpt_neox.", _NEOX_LAYER) if family == "gpt_neox" else ("model.", _LLAMA_LAYER)
    embed = "embed_in" if family == "gpt_neox" else "embed_tokens"
    top = {"tok_embeddings": prefix + embed, "norm": prefix + ("final_layer_norm" if family == "gpt_neox" else "norm")}
    top["output"] = "embed_out" if family == "gpt_neox" else "lm_head"
    ours_to_theirs = {v: k for k, v in layer_map.items()}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        module, _, leaf = name.rpartition(".")
        if module in top:
            if not (module == "output" and cfg.tie_word_embeddings):
                out[f"{top[module]}.{leaf}"] = value
            continue
        _, layer, sub = module.split(".", 2)
        if family == "gpt_neox" and sub in ("attention.wq", "attention.wk", "attention.wv"):
            continue  # fused below
        out[f"{prefix}layers.{layer}.{ours_to_theirs[sub]}.{leaf}"] = value
    if family == "qwen2" and not cfg.qkv_bias:  # Qwen2 always has q/k/v biases: ours are zero
        for layer in range(cfg.n_layer):
            for proj, width in (("q_proj", cfg.dim), ("k_proj", cfg.kv_dim), ("v_proj", cfg.kv_dim)):
                out[f"{prefix}layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(width)
    if family == "gpt_neox":
        for layer in range(cfg.n_layer):
            for leaf in ("weight", "bias"):
                parts = [state[f"layers.{layer}.attention.{w}.{leaf}"] for w in ("wq", "wk", "wv")]
                heads = torch.stack([p.reshape(cfg.n_head, cfg.head_dim, *p.shape[1:]) for p in parts], dim=1)
                out[f"{prefix}layers.{layer}.attention.query_key_value.{leaf}"] = heads.reshape(
                    3 * cfg.dim, *parts[0].shape[1:]
                )
    return out


def save_transformers_model(
    model: MuddModel, folder: str, max_shard_size: int | str = DEFAULT_SHARD_SIZE, dtype: str | None = None
) -> str:
    """Write a residual model as the transformers checkpoint that computes it (weights in `dtype`, default
    float32); returns the family written."""
    cfg = model.config
    config = config_to_transformers(cfg)
    target = parse_dtype(dtype or "float32")
    config["torch_dtype"] = str(target).removeprefix("torch.")
    state = {k: v.to(target) for k, v in model.state_dict().items()}
    save_tensors(state_to_transformers(cfg, state), folder, max_shard_size)
    write_json_atomic(f"{folder}/{CONFIG_NAME}", config)
    return config["model_type"]
