"""Named configurations: the published checkpoints, the paper's scaling sizes, small CPU models.

Each preset is a dict of MuddConfig fields; fields it leaves out take the block family's defaults.
Each names its default training recipe in PRESET_RECIPES (recipes.py).
"""

from __future__ import annotations

from typing import Any

_PILE = dict(vocab_size=50432, block_size=2048)
_PILE_PYTHIA = dict(vocab_size=50304, block_size=2048)  # Pythia pads its embedding to 50304, MUDDPythia to 50432
# Baselines keep the block but use a plain residual stream and constant FFN width (paper Fig. 3).
_TFMPP = dict(connection="residual", ffn_schedule="constant", use_qk_norm=False)
_MUDD = dict(connection="mudd", ffn_schedule="linear")
# MUDDPythia trains with Pythia's own init (architecture §2.8): GPT-NeoX's small_init and wang_init.
_PYTHIA_INIT = dict(init_method="neox")

PRESETS: dict[str, dict[str, Any]] = {
    # The three published checkpoints (architecture §3.1).
    "muddformer-2.8b": dict(
        _PILE,
        block="llama",
        n_layer=32,
        dim=2560,
        n_head=32,
        intermediate_size=6912,
        # The config.json says bos 1 / eos 2, Llama's ids; the tokenizer is GPT-NeoX-20B's, where 2 is "!" and
        # <|endoftext|> is 0 (architecture §3.1), so generation stops at 0.
        bos_token_id=0,
        eos_token_id=0,
        rope_table_dtype="bfloat16",  # as the published model computes it
        **_MUDD,
    ),
    "muddpythia-1.4b": dict(
        _PILE,
        block="pythia",
        n_layer=24,
        dim=2048,
        n_head=16,
        intermediate_size=8192,
        bos_token_id=0,
        eos_token_id=0,
        rope_table_dtype="float16",
        **_MUDD,
        **_PYTHIA_INIT,
    ),
    "muddpythia-2.8b": dict(
        _PILE,
        block="pythia",
        n_layer=32,
        dim=2560,
        n_head=32,
        intermediate_size=10240,
        bos_token_id=0,
        eos_token_id=0,
        rope_table_dtype="float16",
        **_MUDD,
        **_PYTHIA_INIT,
    ),
    # Their baselines: the same body with a residual stream (Pythia as in the paper's Table 3).
    "tfm++-2.8b": dict(_PILE, block="llama", n_layer=32, dim=2560, n_head=32, intermediate_size=6912, **_TFMPP),
    "pythia-1.4b": dict(
        _PILE_PYTHIA,
        block="pythia",
        n_layer=24,
        dim=2048,
        n_head=16,
        intermediate_size=8192,
        bos_token_id=0,
        eos_token_id=0,
        **_TFMPP,
        **_PYTHIA_INIT,
    ),
    "pythia-2.8b": dict(
        _PILE_PYTHIA,
        block="pythia",
        n_layer=32,
        dim=2560,
        n_head=32,
        intermediate_size=10240,
        bos_token_id=0,
        eos_token_id=0,
        **_TFMPP,
        **_PYTHIA_INIT,
    ),
}

# The paper's scaling sizes (architecture §5, Table 2). MUDD uses PrePostDANorm: the official training
# configuration of the 405M model (MaxText exp.py MUDDLlama2Medium: mudd_prenorm, mudd_postnorm) and
# the paper's DeepNarrow runs (architecture §2.8, §8).
_SCALING = {
    "405m": dict(n_layer=24, dim=1024, n_head=16),
    "834m": dict(n_layer=24, dim=1536, n_head=24),
    "1.4b": dict(n_layer=24, dim=2048, n_head=32),
    "deepnarrow-797m": dict(n_layer=34, dim=1280, n_head=20),
    "deepnarrow-1.34b": dict(n_layer=42, dim=1536, n_head=24),
}
# The paper's scaling runs initialise with Xavier normal (architecture §2); MUDDFormer-2.8B's preset and the
# CPU ones keep N(0, 0.02), the Pythia-size ones Pythia's init.
_PAPER_INIT = dict(init_method="xavier")
for _size, _shape in _SCALING.items():
    PRESETS[f"tfm++-{_size}"] = dict(_PILE, block="llama", **_shape, **_TFMPP, **_PAPER_INIT)
    PRESETS[f"muddformer-{_size}"] = dict(
        _PILE, block="llama", use_qk_norm=False, **_shape, **_MUDD, dense_norm="prepost", **_PAPER_INIT
    )

# Small models for CPU work (8k vocabulary) and tests.
_CPU = {
    "nano": dict(vocab_size=512, block_size=64, n_layer=2, dim=64, n_head=2),
    "tiny": dict(vocab_size=8192, block_size=256, n_layer=4, dim=256, n_head=4),
    "small": dict(vocab_size=8192, block_size=512, n_layer=8, dim=384, n_head=6),
}
for _size, _shape in _CPU.items():
    PRESETS[_size] = dict(block="llama", **_shape, **_MUDD)
    PRESETS[f"tfm++-{_size}"] = dict(block="llama", **_shape, **_TFMPP)


def last2_mudd(n_layer: int) -> dict[str, Any]:
    """Sparse MUDD in the paper's form on the inputs of the last two blocks (after blocks L-3 and L-2), reading
    the embedding, two middle states and the newest one, mixing only the value and residual streams, with a
    64-wide generator. A cheap MUDD in the spirit of the GPT-2 speedrun's, not its form (see speedrun_mudd)."""
    middle = n_layer // 2
    return dict(
        connection="mudd",
        dense_layers="-3,-2",
        dense_sources=f"0,{middle},{middle + 1}",
        dense_streams="vr",
        dense_hidden=64,
    )


def speedrun_mudd(n_layer: int) -> dict[str, Any]:
    """The trimmed MUDD of the GPT-2 speedrun record (modded-nanogpt, 2026-04-22 MuddFormer, v1), at any depth.

    Its 11-layer model mixes after block 9 (the last block's input) the embedding, block 7's and block 9's
    outputs, and after block 10 (the final state before the head) the embedding and block 9's output: states
    {0, L-3, L-1} and {0, L-1} here. Only the V and R streams; a 64-wide generator reading the raw block output
    (no norm); W2 and the priors zero, the mix ADDED to the stream with scale 0.2 / sqrt(sources), the V mix
    x 1.15 and added after the value projection, so q, k and v all read the R stream. Not followed: its W1
    init (kaiming-uniform; ours N(0, 1/D)) and everything outside MUDD (its body and optimizer)."""
    return dict(
        connection="mudd",
        dense_mix="add",
        dense_gen_norm=False,
        dense_layers="-2,-1",
        dense_sources=f"-2:0,{n_layer - 3},{n_layer - 1};-1:0,{n_layer - 1}",
        dense_streams="vr",
        dense_hidden=64,
        dense_add_scale=0.2,
        dense_add_scale_by_sources=True,
        dense_v_gain=1.15,
        dense_v_after_proj=True,
    )


for _size in ("tiny", "small"):  # both trimmed forms need three blocks or more
    _shape = _CPU[_size]
    PRESETS[f"mudd-last2-{_size}"] = dict(
        block="llama", **_shape, ffn_schedule="constant", **last2_mudd(_shape["n_layer"])
    )
    PRESETS[f"mudd-speedrun-{_size}"] = dict(
        block="llama", **_shape, ffn_schedule="constant", **speedrun_mudd(_shape["n_layer"])
    )
for _name, _form in (("last2", last2_mudd), ("speedrun", speedrun_mudd)):
    PRESETS[f"muddformer-{_name}-405m"] = dict(
        _PILE,
        block="llama",
        use_qk_norm=False,
        **_SCALING["405m"],
        ffn_schedule="constant",
        **_form(_SCALING["405m"]["n_layer"]),
        **_PAPER_INIT,
    )
# Presets renamed since: the name a user may still type, and what it became.
RENAMED = {f"mudd-trimmed-{size}": f"mudd-last2-{size}" for size in ("tiny", "small")}
RENAMED["muddformer-trimmed-405m"] = "muddformer-last2-405m"
# Mixture of experts: the paper's MoE comparison (1.8B total, ~405M active: 16 experts of width 1408, top-2, in
# every layer of the 405M shape) and small CPU ones (8 experts, top-2, active FFN width that of the dense model).
# Every layer is a mixture, so the FFN width schedule has nothing to act on: constant.
_MOE_PAPER = dict(moe_experts=16, moe_top_k=2, moe_intermediate_size=1408, ffn_schedule="constant")
PRESETS["tfm++-moe-1.8b-a405m"] = dict(
    _PILE, block="llama", **_SCALING["405m"], **{**_TFMPP, **_MOE_PAPER}, **_PAPER_INIT
)
PRESETS["muddformer-moe-1.8b-a405m"] = dict(
    _PILE,
    block="llama",
    use_qk_norm=False,
    **_SCALING["405m"],
    **{**_MUDD, **_MOE_PAPER},
    dense_norm="prepost",
    **_PAPER_INIT,
)
_MOE_CPU = dict(moe_experts=8, moe_top_k=2, ffn_schedule="constant")
PRESETS["moe-tiny"] = dict(block="llama", **_CPU["tiny"], **{**_MUDD, **_MOE_CPU})
PRESETS["tfm++-moe-tiny"] = dict(block="llama", **_CPU["tiny"], **{**_TFMPP, **_MOE_CPU})
PRESETS["muddpythia-tiny"] = dict(block="pythia", **_CPU["tiny"], **_MUDD)
PRESETS["pythia-tiny"] = dict(block="pythia", **_CPU["tiny"], **_TFMPP)


def _recipe_of(preset: str) -> str:
    if "-speedrun-" in preset:  # the record's settings for the MUDD parameters on the size's own recipe
        return "paper-405m-speedrun" if preset.endswith("-405m") else "cpu-speedrun"
    if preset.endswith("-moe-1.8b-a405m"):  # the 405M model's compute per token, 26B tokens
        return "paper-moe-1.8b-a405m"
    if preset in ("muddformer-2.8b", "tfm++-2.8b"):
        return "muddformer-2.8b"
    for size in ("1.4b", "2.8b"):
        if preset.endswith("pythia-" + size):  # pythia-* and muddpythia-*
            return "pythia-" + size
    scale = next((size for size in _SCALING if preset.endswith("-" + size)), None)
    return f"paper-{scale}" if scale else "cpu"


# Every preset's default recipe: the paper's for its size, the released models' own, "cpu" for the small ones.
PRESET_RECIPES: dict[str, str] = {name: _recipe_of(name) for name in PRESETS}
