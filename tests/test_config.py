import json

import pytest

from muddformer import ConfigError, MuddConfig
from muddformer.adapters.published import config_from_published, config_to_published
from muddformer.presets import PRESETS

# architecture §2.3: the paper's linear FFN re-allocation of the three published models.
SPEC_WIDTHS = {
    "muddformer-2.8b": [
        3456,
        3712,
        3840,
        4096,
        4352,
        4608,
        4736,
        4992,
        5248,
        5504,
        5632,
        5888,
        6144,
        6400,
        6528,
        6784,
        7040,
        7296,
        7424,
        7680,
        7936,
        8192,
        8320,
        8576,
        8832,
        9088,
        9216,
        9472,
        9728,
        9984,
        10112,
        10368,
    ],
    "muddpythia-2.8b": [
        5120,
        5504,
        5760,
        6144,
        6400,
        6784,
        7040,
        7424,
        7808,
        8064,
        8448,
        8704,
        9088,
        9472,
        9728,
        10112,
        10368,
        10752,
        11008,
        11392,
        11776,
        12032,
        12416,
        12672,
        13056,
        13440,
        13696,
        14080,
        14336,
        14720,
        14976,
        15360,
    ],
    "muddpythia-1.4b": [
        4096,
        4480,
        4864,
        5120,
        5504,
        5888,
        6272,
        6528,
        6912,
        7296,
        7680,
        8064,
        8320,
        8704,
        9088,
        9472,
        9856,
        10112,
        10496,
        10880,
        11264,
        11520,
        11904,
        12288,
    ],
}


@pytest.mark.parametrize("name", list(SPEC_WIDTHS))
def test_linear_ffn_widths_match_the_published_models(name):
    cfg = MuddConfig.from_preset(name)
    assert cfg.ffn_widths == SPEC_WIDTHS[name]
    assert sum(cfg.ffn_widths) == cfg.n_layer * cfg.intermediate_size


def test_ffn_widths_round_half_to_even():
    # inter 192, L=4: 96/128=0.75 -> 1, 160/128=1.25 -> 1, 224/128=1.75 -> 2, 288/128=2.25 -> 2 (mf_tiny README)
    assert MuddConfig(n_layer=4, dim=64, n_head=4, intermediate_size=192).ffn_widths == [128, 128, 256, 256]
    # inter 320, L=3: 160/128=1.25 -> 1; 320/128=2.5 -> 2 (half to even); 480/128=3.75 -> 4
    assert MuddConfig(n_layer=3, dim=64, n_head=4, intermediate_size=320).ffn_widths == [128, 256, 512]
    assert (
        MuddConfig(n_layer=3, dim=64, n_head=4, intermediate_size=320, ffn_schedule="constant").ffn_widths == [320] * 3
    )


def test_block_defaults():
    llama = MuddConfig(dim=256, n_head=4)
    assert (llama.intermediate_size, llama.norm_eps, llama.rotary_pct) == (768, 1e-6, 1.0)
    pythia = MuddConfig(dim=256, n_head=4, block="pythia")
    assert (pythia.intermediate_size, pythia.norm_eps, pythia.rotary_pct, pythia.rotary_dim) == (1024, 1e-5, 0.25, 16)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = MuddConfig.from_preset(name)
    again = MuddConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == cfg.to_dict()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim=100, n_head=3), "dim=100"),
        (dict(connection="hyper"), "connection='hyper'"),
        (dict(block="gpt2"), "block='gpt2'"),
        (dict(dim=64, n_head=4, rotary_pct=0.2), "rotary_pct=0.2 gives a rotary width of 3"),
        (dict(n_layer=0), "n_layer"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(ffn_schedule="cubic"), "ffn_schedule"),
        (dict(dense_norm="post"), "dense_norm"),
        (dict(rope_table_dtype="int8"), "rope_table_dtype"),
        (dict(intermediate_size=64, n_layer=4), "intermediate_size=64"),
        (dict(n_layer="4"), "n_layer must be int"),
        (dict(use_qk_norm=1), "use_qk_norm must be bool"),
        (dict(eos_token_id=9000, vocab_size=8192), "eos_token_id=9000"),
        (dict(eos_token_id=[2, 9000], vocab_size=8192), "eos_token_id=9000"),
        (dict(eos_token_id=[]), "eos_token_id must be an id or a non-empty list of ids, got []"),
        (dict(eos_token_id=[2, "x"]), "eos_token_id must be an id or a non-empty list of ids"),
    ],
)
def test_impossible_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("+", r"\+").replace("[", r"\[")):
        MuddConfig(**kwargs)


def test_several_end_of_text_ids():
    cfg = MuddConfig.from_preset("nano", eos_token_id=[2, 7])
    assert MuddConfig.from_json(cfg.to_json()) == cfg and cfg.eos_ids == [2, 7]
    assert MuddConfig.from_preset("nano", eos_token_id=3).eos_ids == [3] and MuddConfig().eos_ids == []


def test_unknown_field_and_preset_are_refused():
    with pytest.raises(ConfigError, match="unknown MuddConfig field 'n_layers'"):
        MuddConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        MuddConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MuddConfig.from_json("{dim: 3")


def test_preset_overrides_and_replace():
    cfg = MuddConfig.from_preset("tiny", connection="residual")
    assert cfg.connection == "residual" and cfg.n_layer == 4
    assert cfg.replace(n_layer=6).n_layer == 6
    with pytest.raises(ConfigError):
        cfg.replace(n_head=7)


def test_published_config_round_trip(fixtures_dir):
    for name in ("mf_tiny", "mp_tiny"):
        raw = json.loads((fixtures_dir / name / "config.json").read_text())
        cfg = config_from_published(raw)
        assert config_to_published(cfg) == raw
    assert config_from_published(json.loads((fixtures_dir / "mp_tiny" / "config.json").read_text())).rotary_dim == 8


def test_published_export_refuses_what_the_reference_cannot_compute():
    with pytest.raises(ConfigError, match="connection='denseformer'"):
        config_to_published(MuddConfig(connection="denseformer"))
    with pytest.raises(ConfigError, match="ffn_schedule='constant'"):
        config_to_published(MuddConfig(ffn_schedule="constant"))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        config_from_published({"model_type": "llama"})


def test_replace_derives_again_what_was_not_set():
    wider = MuddConfig.from_preset("tiny").replace(dim=1024, n_head=16)
    assert wider == MuddConfig.from_preset("tiny", dim=1024, n_head=16)  # as a new config would be
    assert (wider.n_kv_head, wider.intermediate_size) == (16, 2816)  # not tiny's 4 key/value heads, FFN 768
    grouped = MuddConfig.from_preset("tiny", n_kv_head=2).replace(n_head=8, dim=512)
    assert grouped.n_kv_head == 2  # a field that was set stays set
