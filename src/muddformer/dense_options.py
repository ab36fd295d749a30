"""The dense family's own options: which aggregations and states a sparse model keeps, the additive
(speedrun) form, the generator's scaling; their parsing and their checks against each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from muddformer.errors import ConfigError

if TYPE_CHECKING:
    from muddformer.config import MuddConfig

DENSE_FAMILY = ("mudd", "ddformer", "denseformer", "mudd-static")  # connections/dense.py
DYNAMIC_DENSE = ("mudd", "ddformer")  # the dense connections with a weight generator


def int_list(text: str, name: str, word: str = "all") -> list[int]:
    """Comma-separated integers; `word` is the field's keyword for "no list" (the caller handles it)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"MuddConfig.{name}={text!r} must be {word!r} or comma-separated integers, e.g. '0,3,-1'"
        ) from None


def parse_dense_sources(text: str) -> dict[int | None, set[int]]:
    """dense_sources parsed: {None: states} for one list, {aggregation: states} per aggregation, {} for all."""
    spec, text = text, text.strip()
    if text == "all":
        return {}
    if ":" not in text:
        return {None: set(int_list(text, "dense_sources"))}
    out: dict[int | None, set[int]] = {}
    for item in text.split(";"):
        layer, sep, states = item.partition(":")
        try:
            key = int(layer)
        except ValueError:
            key = None
        if not sep or key is None or key in out:
            raise ConfigError(
                f"MuddConfig.dense_sources={spec!r}: write one list ('0,3') or "
                "'LAYER:STATES' items once per aggregation, e.g. '-2:0,8,10;-1:0,10'"
            )
        out[key] = set(int_list(states, "dense_sources"))
    return out


def check_dense_options(cfg: MuddConfig) -> None:
    """The dense family's own options against each other and the connection; a ConfigError names the field."""
    if cfg.dense_hidden < 0:
        raise ConfigError(f"MuddConfig.dense_hidden must be >= 0 (0: the paper's width rule), got {cfg.dense_hidden}")
    if not cfg.dense_cap >= 0:
        raise ConfigError(f"MuddConfig.dense_cap must be >= 0 (0: no cap), got {cfg.dense_cap}")
    if not cfg.dense_gen_scale > 0:
        raise ConfigError(f"MuddConfig.dense_gen_scale must be positive (1: unscaled), got {cfg.dense_gen_scale}")
    if cfg.dense_mix == "add" and cfg.dense_norm == "prepost":
        raise ConfigError("dense_mix='add' and dense_norm='prepost' both add the mix to the newest state; pick one")
    if (cfg.dense_mix, cfg.dense_add_scale) != ("replace", 0.1) and cfg.connection not in DENSE_FAMILY:
        raise ConfigError(
            f"dense_mix and dense_add_scale apply to the dense connections ({', '.join(DENSE_FAMILY)}), "
            f"not connection={cfg.connection!r}; drop them or pick one of those"
        )
    if not cfg.dense_gen_norm and cfg.connection not in DYNAMIC_DENSE:
        raise ConfigError(
            f"dense_gen_norm=False applies to the dynamic dense connections ({', '.join(DYNAMIC_DENSE)}), "
            f"not connection={cfg.connection!r}"
        )
    if (cfg.dense_cap, cfg.dense_gen_scale) != (0.0, 1.0) and cfg.connection not in DYNAMIC_DENSE:
        raise ConfigError(
            f"dense_cap and dense_gen_scale act on dynamic dense weights ({', '.join(DYNAMIC_DENSE)}), "
            f"not connection={cfg.connection!r}; drop them or pick one of those"
        )
    L = cfg.n_layer
    for layer in [] if cfg.dense_layers == "all" else int_list(cfg.dense_layers, "dense_layers"):
        if not -L <= layer < L:
            raise ConfigError(f"MuddConfig.dense_layers: layer {layer} is outside [-{L}, {L}) for n_layer={L}")
    for key, sources in parse_dense_sources(cfg.dense_sources).items():
        if key is not None and not -L <= key < L:
            raise ConfigError(f"MuddConfig.dense_sources: aggregation {key} is outside [-{L}, {L}) for n_layer={L}")
        for j in sources:
            if not 0 <= j <= L:
                raise ConfigError(
                    f"MuddConfig.dense_sources: state {j} is outside [0, {L}] (0 = embedding, j = block j-1's output)"
                )
    additive_only = {
        "dense_add_scale_by_sources": cfg.dense_add_scale_by_sources,
        "dense_v_gain": cfg.dense_v_gain != 1.0,
        "dense_v_after_proj": cfg.dense_v_after_proj,
    }
    for name, used in additive_only.items():
        if used and cfg.dense_mix != "add":
            raise ConfigError(f"MuddConfig.{name} shapes the additive mix; set dense_mix='add' or drop it")
    if cfg.dense_v_gain != 1.0 and (cfg.connection not in ("mudd", "mudd-static") or "v" not in cfg.dense_streams):
        raise ConfigError(
            "MuddConfig.dense_v_gain scales the V stream's mix: it needs connection mudd or mudd-static "
            f"with 'v' in dense_streams, got {cfg.connection!r} and {cfg.dense_streams!r}"
        )
    if cfg.dense_v_after_proj and (
        cfg.connection not in ("mudd", "mudd-static")
        or "v" not in cfg.dense_streams
        or set("qk") & set(cfg.dense_streams)
    ):
        raise ConfigError(
            f"MuddConfig.dense_v_after_proj adds a V mix after the projection while q, k and v read the R "
            f"stream: it needs connection mudd or mudd-static and dense_streams with 'v' but no 'q' or 'k', "
            f"got {cfg.connection!r} and {cfg.dense_streams!r}"
        )
    streams = cfg.dense_streams
    if not streams or set(streams) - set("qkvr") or len(set(streams)) != len(streams):
        raise ConfigError(f"MuddConfig.dense_streams={streams!r} must be distinct letters of 'qkvr', e.g. 'vr'")
    if cfg.is_sparse and cfg.connection not in DENSE_FAMILY:
        raise ConfigError(
            f"sparse dense_* options apply to the dense connections ({', '.join(DENSE_FAMILY)}), "
            f"not connection={cfg.connection!r}; drop them or pick one of those"
        )
    if streams != "qkvr" and cfg.connection in ("ddformer", "denseformer"):
        raise ConfigError(
            f"MuddConfig.dense_streams={streams!r} needs a multiway connection (mudd, mudd-static); "
            f"{cfg.connection} mixes one stream"
        )
