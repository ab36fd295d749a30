"""The published checkpoint format (architecture §3): config.json import and export, tensor names, detection.

The reference's config.json describes the model with its own fields (dense, dense_type, sepln, round64, ...);
its tensor names are ours except that the connection's tensors carry no `connection.` prefix.
"""

from __future__ import annotations

import re
from typing import Any

from muddformer.config import MuddConfig
from muddformer.errors import ConfigError

# The published config.json fields (architecture §3.1) that describe the computation.
_PUBLISHED_REQUIRED = ("vocab_size", "n_layer", "n_head", "dim", "block_size")


def config_from_published(d: dict[str, Any]) -> MuddConfig:
    """MuddConfig from a published config.json (model_type "muddformer" or "muddpythia")."""
    model_type = d.get("model_type")
    if model_type not in PUBLISHED_MODEL_TYPES:
        raise ConfigError(
            f"config.json model_type {model_type!r} is not a MUDD model; expected 'muddformer' or 'muddpythia'"
        )
    missing = [k for k in _PUBLISHED_REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"published config.json lacks field {missing[0]!r}")
    pythia = model_type == "muddpythia"
    if d.get("n_local_heads", d["n_head"]) != d["n_head"]:
        raise ConfigError(
            "config.json n_local_heads differs from n_head: grouped-query attention is not part of the MUDD family"
        )
    if pythia and not (d.get("use_parallel_residual", True) and d.get("use_linear_bias", True)):
        raise ConfigError(
            "muddpythia config.json with use_parallel_residual or use_linear_bias false is not a published layout"
        )
    if not d.get("dense", True):
        connection = "residual"
    else:
        if not d.get("dynamic_dense", True):
            raise ConfigError(
                "config.json dense=true with dynamic_dense=false has no computation in the reference code; "
                "set dynamic_dense=true"
            )
        if d.get("sepln", True) is False and d.get("dense_type", "qkvr") == "qkvr":
            raise ConfigError(
                "config.json sepln=false with dense_type 'qkvr' is broken in the reference code; set sepln=true"
            )
        dense_type = d.get("dense_type", "qkvr")
        if dense_type not in ("qkvr", "l"):
            raise ConfigError(f"config.json dense_type {dense_type!r} is unknown; expected 'qkvr' or 'l'")
        connection = "mudd" if dense_type == "qkvr" else "ddformer"
    bos, eos = token_ids(d)
    return MuddConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["n_layer"],
        dim=d["dim"],
        n_head=d["n_head"],
        intermediate_size=d.get("intermediate_size"),  # type: ignore[arg-type]  # None: derived
        block_size=d["block_size"],
        norm_eps=d.get("norm_eps", 1e-5 if pythia else 1e-6),
        rope_base=float(d.get("rope_base", 10000)),
        block="pythia" if pythia else "llama",
        connection=connection,
        rotary_pct=float(d.get("rotary_pct", 0.25)) if pythia else 1.0,
        use_qk_norm=bool(d.get("use_qk_norm", False)),
        ffn_schedule="linear",
        dense_round64=bool(d.get("round64", False)),
        dense_expand_last=bool(d.get("expand_last", False)),
        rope_table_dtype="float16" if pythia else "bfloat16",
        attn_impl="reference",
        mix_impl="reference",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=bos,
        eos_token_id=eos,
    )


def token_ids(d: dict[str, Any]) -> tuple[int | None, int | None]:
    """bos/eos of a published config.json. MUDDFormer's files carry Llama's 1 / 2 beside the GPT-NeoX-20B
    vocabulary (50432 ids), in which 2 is "!" and <|endoftext|> is 0: such a model ends its text with 0."""
    bos, eos = d.get("bos_token_id"), d.get("eos_token_id")
    if d.get("model_type") == "muddformer" and d["vocab_size"] == 50432 and (bos, eos) == (1, 2):
        return 0, 0
    return bos, eos


def config_to_published(cfg: MuddConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The published config.json for a model the reference code can compute (architecture §3.1)."""
    problems = []
    if cfg.connection != "mudd":
        problems.append(f"connection={cfg.connection!r} (the published layout holds 'mudd' models)")
    if cfg.n_kv_head != cfg.n_head:
        problems.append(f"n_kv_head={cfg.n_kv_head} (the reference has no grouped-query attention)")
    if cfg.rope_frequency_scaling != "none" or cfg.qkv_bias:
        problems.append("rope_frequency_scaling / qkv_bias (the reference has neither)")
    if cfg.attn_window:
        problems.append(f"attn_window={cfg.attn_window} (the reference has no sliding-window attention)")
    if cfg.moe_experts:
        problems.append(f"moe_experts={cfg.moe_experts} (the reference has no mixture of experts)")
    if cfg.ffn_schedule != "linear":
        problems.append("ffn_schedule='constant' (the reference always uses the linear width schedule)")
    if cfg.is_sparse:
        problems.append("sparse dense_* options (the reference connects every layer to every state)")
    if cfg.dense_norm != "none":
        problems.append(f"dense_norm={cfg.dense_norm!r} (the reference has no PrePostDANorm)")
    if (cfg.dense_cap, cfg.dense_gen_scale) != (0.0, 1.0):
        problems.append("dense_cap / dense_gen_scale (the reference uses the raw generator output)")
    if cfg.dense_mix != "replace" or not cfg.dense_gen_norm:  # (the other additive options need dense_mix='add')
        problems.append(
            "dense_mix='add' or dense_gen_norm=False (the reference replaces the inputs and normalises "
            "the generator's input)"
        )
    if cfg.block == "llama" and cfg.rotary_pct != 1.0:
        problems.append("partial rotary on the llama block (the reference rotates the full head)")
    if cfg.tie_word_embeddings:
        problems.append("tie_word_embeddings=True (the reference has an untied head)")
    # The reference rounds its rotary table: with another rounding a reloaded model would compute other logits.
    table = "float16" if cfg.block == "pythia" else "bfloat16"
    if cfg.rope_table_dtype != table:
        problems.append(
            f"rope_table_dtype={cfg.rope_table_dtype!r} (the reference's {cfg.block} block rounds the rotary "
            f"table to {table}; save in our format, or set rope_table_dtype={table!r} before training)"
        )
    if problems:
        raise ConfigError("cannot write the published format: " + "; ".join(problems))
    pythia = cfg.block == "pythia"
    name = "MUDDPythia" if pythia else "MUDDFormer"
    module = name.lower()
    out: dict[str, Any] = {
        "architectures": [name],
        "auto_map": {
            "AutoConfig": f"configuration_{module}.{name}Config",
            "AutoModelForCausalLM": f"modeling_{module}.{name}",
        },
        "block_size": cfg.block_size,
        "bos_token_id": cfg.bos_token_id,  # None (null) rather than ids the tokenizer may not have
        "dense": True,
        "dense_type": "qkvr",
        "dim": cfg.dim,
        "dynamic_dense": True,
        "eos_token_id": cfg.eos_token_id,
        "expand_last": cfg.dense_expand_last,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "is_training": False,
        "model_type": module,
        "n_head": cfg.n_head,
        "n_layer": cfg.n_layer,
        "n_local_heads": cfg.n_head,
        "norm_eps": cfg.norm_eps,
        "rope_base": int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base,
        "round64": cfg.dense_round64,
        "sepln": True,
        "stack_hidden": False,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.35.0",
        "use_gradient_checkpointing": False,
        "use_layer_cache": True,
        "use_qk_norm": cfg.use_qk_norm,
        "vocab_size": cfg.vocab_size,
    }
    if pythia:
        out.update(rotary_pct=cfg.rotary_pct, use_linear_bias=True, use_parallel_residual=True)
    return dict(sorted(out.items()))


_CONNECTION_KEY_RE = re.compile(r"^(dense_bs|dynamic_dense)\.")


# Fields every published config.json carries (the reference's config class writes all of its fields).
PUBLISHED_MARKERS = ("dense", "dense_type", "dynamic_dense")
PUBLISHED_MODEL_TYPES = ("muddformer", "muddpythia")


def is_published(raw: dict) -> bool:
    """A config (a config.json's or a transformers config's dict) in the published layout: no `mudd_format`
    marker, which every config of ours carries, and the reference's own fields."""
    return "mudd_format" not in raw and any(k in raw for k in PUBLISHED_MARKERS)


def published_to_ours(name: str) -> str:
    return "connection." + name if _CONNECTION_KEY_RE.match(name) else name


def ours_to_published(name: str) -> str:
    return name.removeprefix("connection.")
