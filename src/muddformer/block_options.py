"""The block's own options beyond the published model: attention windows (sliding-window attention with a
local/global layer pattern) and the mixture-of-experts feed-forward; which layers they apply to, and their checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from muddformer.dense_options import int_list
from muddformer.errors import ConfigError

if TYPE_CHECKING:
    from muddformer.config import MuddConfig


def layer_set(cfg: MuddConfig, name: str, word: str) -> set[int] | None:
    """The layers listed in field `name` as indices 0..L-1 (negative counts from the end); None for `word`."""
    text = getattr(cfg, name)
    if text.strip() == word:
        return None
    L = cfg.n_layer
    layers = int_list(text, name, word)
    for layer in layers:
        if not -L <= layer < L:
            raise ConfigError(f"MuddConfig.{name}: layer {layer} is outside [-{L}, {L}) for n_layer={L}")
    return {layer % L for layer in layers}


def attention_windows(cfg: MuddConfig) -> list[int]:
    """Each layer's attention window in tokens, 0 for global (full causal) attention. With attn_window set,
    a layer is global when listed in attn_global_layers or when it is every attn_global_every-th one
    (layers k-1, 2k-1, ...: k=6 is the 5-local-to-1-global pattern)."""
    L, window = cfg.n_layer, cfg.attn_window
    if window == 0:
        return [0] * L
    listed = layer_set(cfg, "attn_global_layers", "none") or set()
    every = cfg.attn_global_every
    return [0 if layer in listed or (every and (layer + 1) % every == 0) else window for layer in range(L)]


def moe_layer_flags(cfg: MuddConfig) -> list[bool]:
    """Whether each layer's feed-forward is a mixture of experts."""
    if cfg.moe_experts == 0:
        return [False] * cfg.n_layer
    listed = layer_set(cfg, "moe_layers", "all")
    return [listed is None or layer in listed for layer in range(cfg.n_layer)]


def check_block_options(cfg: MuddConfig) -> None:
    """Windows and experts against each other; a ConfigError names the field and the fix."""
    if cfg.attn_window < 0 or cfg.attn_global_every < 0:
        raise ConfigError("MuddConfig.attn_window and attn_global_every must be >= 0 (0: off)")
    if cfg.attn_window == 0 and (cfg.attn_global_every or cfg.attn_global_layers.strip() != "none"):
        raise ConfigError(
            "MuddConfig.attn_global_every / attn_global_layers pick the global layers among windowed ones; "
            "set attn_window (e.g. 128) or drop them"
        )
    attention_windows(cfg)  # checks attn_global_layers
    E, k = cfg.moe_experts, cfg.moe_top_k
    if E < 0:
        raise ConfigError(f"MuddConfig.moe_experts must be >= 0 (0: a dense feed-forward), got {E}")
    if E == 0:
        moe_only = ("moe_intermediate_size", "moe_shared_experts")
        if any(getattr(cfg, name) for name in moe_only) or cfg.moe_layers.strip() != "all":
            raise ConfigError(
                "MuddConfig.moe_intermediate_size / moe_shared_experts / moe_layers shape the experts; "
                "set moe_experts (e.g. 8) or drop them"
            )
        return
    if not 1 <= k <= E:
        raise ConfigError(f"MuddConfig.moe_top_k={k} must be in [1, moe_experts={E}]")
    if cfg.ffn_schedule == "linear" and cfg.n_layer > 1:
        raise ConfigError(
            "MuddConfig.ffn_schedule='linear' re-allocates the FFN width over depth, which experts of one width "
            "do not follow; set ffn_schedule='constant' with moe_experts (as the moe presets do)"
        )
    if cfg.moe_intermediate_size < 0 or cfg.moe_shared_experts < 0:
        raise ConfigError("MuddConfig.moe_intermediate_size and moe_shared_experts must be >= 0")
    if cfg.moe_expert_width <= 0:
        raise ConfigError(
            f"MuddConfig.moe_intermediate_size=0 takes intermediate_size // moe_top_k = {cfg.moe_expert_width}; "
            "set moe_intermediate_size"
        )
    for name in ("moe_aux_loss_weight", "moe_z_loss_weight"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"MuddConfig.{name} must be >= 0 (0: off), got {getattr(cfg, name)}")
    moe_layer_flags(cfg)  # checks moe_layers
