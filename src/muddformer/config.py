"""MuddConfig: every option of the model family in one validated object.

Sizes use the published field names (`vocab_size`, `n_layer`, `dim`, `n_head`, `intermediate_size`,
`block_size`, `norm_eps`, `rope_base`). An impossible combination fails at construction with a
ConfigError that names the field, never deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from muddformer.block_options import attention_windows, check_block_options, moe_layer_flags
from muddformer.dense_options import check_dense_options, int_list, parse_dense_sources
from muddformer.errors import ConfigError
from muddformer.presets import PRESETS, RENAMED

BLOCKS = ("llama", "pythia")
CONNECTIONS = ("residual", "mudd", "ddformer", "denseformer", "mudd-static", "hc", "mhc", "attnres", "attnres-block")
FFN_SCHEDULES = ("constant", "linear")
DENSE_NORMS = ("none", "prepost")
DENSE_MIXES = ("replace", "add")
TABLE_DTYPES = ("float32", "bfloat16", "float16")
INIT_METHODS = ("normal", "xavier", "neox")
ATTN_IMPLS = ("sdpa", "reference")
ROPE_SCALINGS = ("none", "llama3")
MIX_IMPLS = ("auto", "reference", "matmul", "triton", "compiled")  # implemented in kernels/depth_mix.py
# Fields that may be given as None (typed without it): __post_init__ derives them from the block family.
DERIVED_FIELDS = ("intermediate_size", "norm_eps", "rotary_pct", "n_kv_head")
# Not what a model with given weights computes (architecture, idea 7): how it computes, the weights of the training
# loss's extra terms, how a fresh model is initialised. A run may change them, e.g. on resume.
EXECUTION_FIELDS = (
    "attn_impl",
    "mix_impl",
    "recompute_mix",
    "moe_aux_loss_weight",
    "moe_z_loss_weight",
    "init_method",
    "init_std",
)


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class MuddConfig:
    """Architecture of a MUDD-family causal language model.

    `block` picks the block family: "llama" (sequential pre-norm, RMSNorm, SwiGLU, full RoPE) or
    "pythia" (GPT-NeoX parallel residual, LayerNorm and linear biases, GELU MLP, partial RoPE).
    `connection` picks how each block's inputs are formed from earlier states (see connections/).
    Fields left as None take the block family's default when the config is built.
    """

    vocab_size: int = 8192
    n_layer: int = 4
    dim: int = 256
    n_head: int = 4
    # Key/value heads: grouped-query attention when fewer than n_head (1: multi-query); None: n_head.
    n_kv_head: int = None  # type: ignore[assignment]
    # Fields given as None are derived in __post_init__: after construction they always hold a value.
    intermediate_size: int = None  # type: ignore[assignment]  # None: find_multiple(8*dim/3, 256) llama, 4*dim pythia
    block_size: int = 256  # context length (positions covered by the rotary table)
    norm_eps: float = None  # type: ignore[assignment]  # None: 1e-6 llama, 1e-5 pythia
    rope_base: float = 10000.0
    # "llama3": Llama 3.1's frequency-dependent stretch of the rotary frequencies (converted Llama 3 checkpoints)
    rope_frequency_scaling: str = "none"
    rope_factor: float = 8.0  # llama3: long wavelengths divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are stretched fully
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    rope_original_max_position: int = 8192  # llama3: the context the frequencies were trained for
    qkv_bias: bool = False  # biases on the q, k and v projections of the llama block (Qwen2)
    block: str = "llama"
    connection: str = "mudd"
    rotary_pct: float = None  # type: ignore[assignment]  # share of head_dim that is rotated; None: 1.0 llama, 0.25 pythia
    use_qk_norm: bool = True  # per-head RMSNorm of q and k before RoPE (all released models)
    ffn_schedule: str = "linear"  # "linear": paper's width re-allocation 0.5x -> 1.5x over depth
    # Sliding-window attention: a query sees the attn_window newest tokens, itself included (0: full causal).
    attn_window: int = 0
    attn_global_every: int = 0  # with a window, every k-th layer (k-1, 2k-1, ...) is global; 0: none by period
    attn_global_layers: str = "none"  # with a window, these layers are global too, e.g. "0,-1"
    # Mixture-of-experts feed-forward: top-k routing over moe_experts experts, dropless (0: a dense FFN).
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_intermediate_size: int = 0  # width of each expert; 0: intermediate_size // moe_top_k (active width = dense)
    moe_shared_experts: int = 0  # experts every token passes through, of the expert width
    moe_layers: str = "all"  # the layers whose FFN is a mixture, e.g. "1,3,5"; the others stay dense
    moe_norm_topk: bool = True  # top-k gates renormalised to sum to 1 (Mixtral, Qwen3-MoE); False: raw softmax
    moe_aux_loss_weight: float = 0.01  # load-balancing loss (Switch Transformer), added to the training loss
    moe_z_loss_weight: float = 0.001  # router z-loss (ST-MoE): mean squared logsumexp of the router logits
    dense_round64: bool = True  # dense-connection generator width rounded up to the next 64-block
    dense_expand_last: bool = True  # last generator 4x wider
    dense_norm: str = "none"  # "prepost": PrePostDANorm of paper Eq. 10
    # "replace": a block's inputs are the weighted sums (the paper); "add": the newest state plus
    # dense_add_scale x the sums, with the static prior starting at zero (the GPT-2 speedrun's form).
    dense_mix: str = "replace"
    dense_add_scale: float = 0.1
    dense_gen_norm: bool = True  # RMSNorm (no weight) of the generator's input; the speedrun has none
    # More of the speedrun's additive form (dense_mix="add" only): the scale divided by sqrt(sources read),
    # its 0.2 / sqrt(L); an extra gain on the V stream's mix (its 1.15); the V mix added after the value
    # projection, with q, k and v all reading the R stream (its "V-fusion"; a multiway connection without q/k streams).
    dense_add_scale_by_sources: bool = False
    dense_v_gain: float = 1.0
    dense_v_after_proj: bool = False
    # Stability controls of the dynamic weights (mudd, ddformer); both leave a fresh model unchanged.
    dense_cap: float = (
        0.0  # tanh soft cap: dynamic weights w -> cap * tanh(w / cap); 0 = off (the MUDD authors' mudd_cap)
    )
    dense_gen_scale: float = 1.0  # fixed multiplier on the generator's output, the dynamic part of the weights
    rope_table_dtype: str = "float32"  # rounding of the cos/sin table; published models use 16-bit
    attn_impl: str = "sdpa"  # "reference": the published code's explicit softmax, bit-exact in bfloat16
    mix_impl: str = (
        "auto"  # depth mix: "reference" loop (bit-exact in bfloat16), "matmul", "triton", "compiled"; auto picks
    )
    # Sparse dense connections (paper Fig. 9, the GPT-2 speedrun's trimmed MUDD); defaults are the full form.
    dense_layers: str = (
        "all"  # aggregations to keep, by the block they follow: "all" or "0,5,-2" (negative from the end)
    )
    # States they may read (0 = embedding, j = block j-1's output): "all", "0,3" for every aggregation, or per
    # aggregation
    # "-2:0,8,10;-1:0,10" (by the block it follows; unlisted ones read all). The newest state is always read with
    # dense_mix="replace"; with "add" it is the base of the sum and is also mixed only where listed (or "all").
    dense_sources: str = "all"
    dense_streams: str = "qkvr"  # multiway streams that are mixed, e.g. "vr"; the others take the newest state
    dense_dilation: int = 1  # read every k-th state counting back from the newest
    dense_period: int = 1  # aggregate after every p-th block only (blocks p-1, 2p-1, ...)
    dense_hidden: int = 0  # generator hidden width; 0: the paper's K_l rule
    recompute_mix: bool = True  # dense connections: recompute block inputs (generator, mix, pre-norms) in backward;
    # on by default: it keeps MUDD's saved activations within 5 % of the residual model's at no measured step cost
    hyper_streams: int = (
        4  # hc, mhc: expansion rate n, the number of residual streams (4 in the MUDD paper's comparison)
    )
    sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations that make the stream mixing doubly stochastic
    attnres_blocks: int = 8  # attnres-block: groups of layers (at most n_layer); plain residual sums inside a group
    tie_word_embeddings: bool = False
    # "normal": N(0, init_std); "xavier": Xavier normal (paper scaling runs); "neox": Pythia's small_init / wang_init
    init_method: str = "normal"
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # a list: any of them ends the text (e.g. Llama-3-Instruct's)

    def __post_init__(self) -> None:
        self._check_types()
        # The derived fields left unset follow their inputs: replace() derives them again (a wider dim gets its own
        # FFN width, more heads their own key/value heads), as a new config would.
        self._derived = tuple(name for name in DERIVED_FIELDS if getattr(self, name) is None)
        self._fill_defaults()
        self._validate()

    # ---- construction helpers -------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(MuddConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _allowed_types(hints[f.name])
            if value is None and (type(None) in allowed or f.name in DERIVED_FIELDS):
                continue
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed)
            if not ok:
                names = " or ".join(t.__name__ for t in allowed)
                raise ConfigError(f"MuddConfig.{f.name} must be {names}, got {value!r}")

    def _fill_defaults(self) -> None:
        llama = self.block == "llama"
        if self.intermediate_size is None:
            self.intermediate_size = find_multiple(int(8 * self.dim / 3), 256) if llama else 4 * self.dim
        if self.norm_eps is None:
            self.norm_eps = 1e-6 if llama else 1e-5
        if self.rotary_pct is None:
            self.rotary_pct = 1.0 if llama else 0.25
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head

    def _validate(self) -> None:
        for name, choices in (
            ("block", BLOCKS),
            ("connection", CONNECTIONS),
            ("ffn_schedule", FFN_SCHEDULES),
            ("dense_norm", DENSE_NORMS),
            ("dense_mix", DENSE_MIXES),
            ("rope_table_dtype", TABLE_DTYPES),
            ("init_method", INIT_METHODS),
            ("attn_impl", ATTN_IMPLS),
            ("rope_frequency_scaling", ROPE_SCALINGS),
            ("mix_impl", MIX_IMPLS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"MuddConfig.{name}={getattr(self, name)!r} is unknown; choose one of {', '.join(choices)}"
                )
        for name in (
            "vocab_size",
            "n_layer",
            "dim",
            "n_head",
            "n_kv_head",
            "intermediate_size",
            "block_size",
            "hyper_streams",
            "sinkhorn_iters",
            "attnres_blocks",
            "dense_dilation",
            "dense_period",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"MuddConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_base", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"MuddConfig.{name} must be positive, got {getattr(self, name)}")
        if self.connection == "mhc" and self.hyper_streams < 2:
            raise ConfigError(
                f"MuddConfig.hyper_streams={self.hyper_streams} gives connection='mhc' a single stream, which its "
                "sigmoid and Sinkhorn weights cannot start as a residual; use hyper_streams >= 2"
            )
        check_dense_options(self)
        check_block_options(self)
        if self.dim % self.n_head:
            raise ConfigError(
                f"MuddConfig.dim={self.dim} is not divisible by n_head={self.n_head}; "
                "pick a dim that is a multiple of n_head"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"MuddConfig.n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: each key/value head "
                "serves a whole group of query heads"
            )
        if self.dense_v_after_proj and self.n_kv_head != self.n_head:
            raise ConfigError(
                "MuddConfig.dense_v_after_proj adds a dim-wide V mix to the value projection, which grouped-query "
                f"attention narrows to n_kv_head={self.n_kv_head} heads; use n_kv_head=n_head"
            )
        if not 0 < self.rotary_pct <= 1:
            raise ConfigError(f"MuddConfig.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        rot = self.rotary_dim
        if rot == 0 or rot % 2:
            raise ConfigError(
                f"MuddConfig.rotary_pct={self.rotary_pct} gives a rotary width of {rot} of head_dim {self.head_dim}; "
                "it must be even and positive: change rotary_pct"
            )
        for layer, width in enumerate(self.ffn_widths):
            if width <= 0:
                raise ConfigError(
                    f"MuddConfig.intermediate_size={self.intermediate_size} with ffn_schedule='linear' gives "
                    f"layer {layer} "
                    "an FFN width of 0; raise intermediate_size above 128 or use ffn_schedule='constant'"
                )
        if isinstance(self.eos_token_id, list) and not (
            self.eos_token_id and all(isinstance(t, int) and not isinstance(t, bool) for t in self.eos_token_id)
        ):
            raise ConfigError(
                f"MuddConfig.eos_token_id must be an id or a non-empty list of ids, got {self.eos_token_id}"
            )
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", self.eos_ids)):
            for tok in ids:
                if tok is not None and not 0 <= tok < self.vocab_size:
                    raise ConfigError(f"MuddConfig.{name}={tok} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def eos_ids(self) -> list[int]:
        """The end-of-text ids ([] when none is known)."""
        return id_list(self.eos_token_id)

    @property
    def dense_layer_set(self) -> set[int] | None:
        """The kept aggregations as indices 0..L-1 (None: all)."""
        if self.dense_layers == "all":
            return None
        return {i % self.n_layer for i in int_list(self.dense_layers, "dense_layers")}

    def _source_map(self) -> dict[int | None, set[int]]:
        return parse_dense_sources(self.dense_sources)

    def dense_sources_for(self, layer: int) -> set[int] | None:
        """The states the aggregation after block `layer` may read (None: all), as dense_sources gives them."""
        table = self._source_map()
        if None in table:
            return table[None]
        return next((states for key, states in table.items() if key is not None and key % self.n_layer == layer), None)

    @property
    def is_sparse(self) -> bool:
        return (
            self.dense_layers,
            self.dense_sources,
            self.dense_streams,
            self.dense_dilation,
            self.dense_period,
            self.dense_hidden,
        ) != ("all", "all", "qkvr", 1, 1, 0)

    # ---- derived sizes ----------------------------------------------------------------------
    @property
    def attn_windows(self) -> list[int]:
        """Each layer's attention window in tokens; 0 = global."""
        return attention_windows(self)

    @property
    def moe_flags(self) -> list[bool]:
        """Whether each layer's feed-forward is a mixture of experts."""
        return moe_layer_flags(self)

    @property
    def moe_expert_width(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size // self.moe_top_k

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections: n_kv_head heads of head_dim."""
        return self.n_kv_head * self.head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_widths(self) -> list[int]:
        """Per-layer FFN width: constant, or the paper's linear re-allocation (architecture §2.3).

        H_l = round(intermediate_size * (l/(L-1) + 0.5) / 128) * 128 with Python's round-half-to-even.
        """
        L, inter = self.n_layer, self.intermediate_size
        if self.ffn_schedule == "constant" or L == 1:
            return [inter] * L
        return [round(inter * (layer / (L - 1) + 0.5) / 128) * 128 for layer in range(L)]

    @property
    def is_dense(self) -> bool:
        return self.connection != "residual"

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MuddConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown MuddConfig field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MuddConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError("config JSON must be an object of MuddConfig fields")
        return cls.from_dict(d)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide what the model computes: every field but the EXECUTION_FIELDS."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def replace(self, **changes: Any) -> "MuddConfig":
        """A copy with some fields changed (validated like a new config); the derived fields that were not set
        (DERIVED_FIELDS) are derived again from the new values."""
        return self.from_dict({**self.to_dict(), **dict.fromkeys(self._derived), **changes})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MuddConfig":
        if name in RENAMED:
            raise ConfigError(
                f"preset {name!r} is now called {RENAMED[name]!r} (same model); the GPT-2 speedrun's own "
                f"form is {RENAMED[name].replace('last2', 'speedrun')!r}"
            )
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def id_list(ids: int | list[int] | None) -> list[int]:
    """Token ids given as one id, a list of them, or None (none), as a list."""
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _allowed_types(hint: Any) -> tuple[type, ...]:
    args = typing.get_args(hint)
    return tuple(typing.get_origin(a) or a for a in args) if args else (hint,)  # list[int] -> list


__all__ = ["MuddConfig", "find_multiple", "BLOCKS", "CONNECTIONS"]
