"""The published format: reference outputs of ../shared/fixtures/official reproduced exactly."""

import json

import pytest
import torch
from conftest import FIXTURE_NAMES, FIXTURE_TOL, build, randomize_connection
from reference_forward import reference_logits
from safetensors.torch import load_file

from muddformer import ConfigError, MuddConfig, MuddForCausalLM
from muddformer.adapters.folders import read_tensors
from muddformer.adapters.published import config_from_published


def expected(fixtures_dir, name):
    return load_file(fixtures_dir / name / "expected.safetensors")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("attn_impl", ["reference", "sdpa"])
def test_float32_logits_match_reference(fixtures_dir, name, attn_impl):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name, torch_dtype=torch.float32, attn_impl=attn_impl)
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        logits = model(exp["input_ids"]).logits
    assert logits.dtype == torch.float32
    assert logits.shape == exp["logits"].shape
    assert (logits - exp["logits"]).abs().max().item() <= FIXTURE_TOL[name]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_continuation_matches_reference(fixtures_dir, name):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name)
    exp = expected(fixtures_dir, name)
    out = model.generate(exp["prompt_ids"], max_new_tokens=9, do_sample=False)
    assert out.tolist() == exp["greedy_ids"].tolist()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_rope_table_rounding_is_what_makes_parity(fixtures_dir, name):
    # The published models round the cos/sin table to 16 bits; an exact float32 table misses.
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name)
    assert model.mudd_config.rope_table_dtype == ("bfloat16" if name == "mf_tiny" else "float16")
    exact = MuddForCausalLM.from_pretrained(fixtures_dir / name)
    exact.model.config.rope_table_dtype = "float32"
    exact.model.reset_rope()
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        diff = (exact(exp["input_ids"]).logits - exp["logits"]).abs().max().item()
    assert diff > 2 * FIXTURE_TOL[name]


# bfloat16 matmuls round differently on different CPUs (the fixtures' logits_bf16 come from an AVX2-only
# one): the reference run on an AVX-512 CPU moves mf_tiny's logits by up to 0.0083 (mean 2.2e-4) and
# mp_tiny's by 7e-9, i.e. up to 2.1 bfloat16 units in the last place at the logits' scale (|logit| <= 0.63,
# ulp 2**-8). Allowed: twice that spread, 4 ulps at the largest |logit|, and a mean 4.5x the measured one.
# A float32 run misses by 0.081 (mf_tiny) and 0.020 (mp_tiny), so the check still tells the dtypes apart.
BF16_ULPS_AT_LOGIT_SCALE = 4
BF16_MEAN_TOL = 1e-3


def bf16_tolerance(reference: torch.Tensor) -> float:
    exponent = torch.frexp(reference.abs().max())[1].item()  # |max| in [2**(e-1), 2**e)
    return BF16_ULPS_AT_LOGIT_SCALE * 2.0 ** (exponent - 1 - 7)  # bfloat16 keeps 7 stored fraction bits


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_bfloat16_logits_agree_with_reference_within_the_spread_between_cpus(fixtures_dir, name):
    # Published folders load with the reference's attention arithmetic: on the fixtures' CPU the two runs
    # are bit-identical; elsewhere they differ only as the reference itself differs between CPUs.
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name, torch_dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.mudd_config.attn_impl == "reference"
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        logits = model(exp["input_ids"]).logits
    assert logits.dtype == torch.bfloat16
    diff = (logits.float() - exp["logits_bf16"]).abs()
    assert diff.max().item() <= bf16_tolerance(exp["logits_bf16"])
    assert diff.mean().item() <= BF16_MEAN_TOL
    assert torch.equal(logits.float().argmax(-1), exp["logits_bf16"].argmax(-1))


def test_bfloat16_tolerance_tells_float32_from_bfloat16(fixtures_dir):
    for name in FIXTURE_NAMES:
        exp = expected(fixtures_dir, name)
        assert bf16_tolerance(exp["logits_bf16"]) == 4 * 2.0**-8  # |logit| ~ 0.63 in both fixtures
        assert (exp["logits"] - exp["logits_bf16"]).abs().max().item() > bf16_tolerance(exp["logits_bf16"])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_arithmetic_is_bit_identical_to_an_independent_reimplementation(fixtures_dir, name, dtype):
    # Same machine, same operations in the same order and dtype: the bits must agree on any CPU.
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name, torch_dtype=dtype)
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        ours = model(exp["input_ids"]).logits
    theirs = reference_logits(fixtures_dir / name, exp["input_ids"], dtype)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_bfloat16_sdpa_is_close_to_reference_bfloat16(fixtures_dir, name):
    # The fused kernel accumulates differently: a loose check (bfloat16 runs of the reference differ by up to 0.078).
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name, torch_dtype=torch.bfloat16, attn_impl="sdpa")
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        diff = (model(exp["input_ids"]).logits.float() - exp["logits_bf16"]).abs()
    assert 0 < diff.max().item() < 0.2
    assert diff.mean().item() < 0.01


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_published_format_round_trip(fixtures_dir, name, tmp_path):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name, torch_dtype="auto")
    model.save_pretrained(tmp_path, published_format=True)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (fixtures_dir / name / "config.json").read_text()
    )
    original, written = read_tensors(str(fixtures_dir / name)), read_tensors(str(tmp_path))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) and written[k].dtype == torch.bfloat16 for k in original)


@pytest.mark.parametrize("block", ["llama", "pythia"])
def test_a_model_of_ours_in_the_published_format_computes_the_same_after_reloading(block, tmp_path):
    """Ours -> published -> ours: the rotary table's rounding is part of what the format can hold, and a model
    whose token ids are unknown keeps them unknown."""
    table = "float16" if block == "pythia" else "bfloat16"
    model = build(block=block, rope_table_dtype=table, attn_impl="reference", mix_impl="reference").eval()
    randomize_connection(model)
    MuddForCausalLM(model.config, model=model).save_pretrained(tmp_path, published_format=True, dtype="float32")
    again = MuddForCausalLM.from_pretrained(tmp_path).model
    assert again.config.rope_table_dtype == table and again.config.eos_token_id is None
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=1e-6)
    float32_table = MuddForCausalLM(model.config.replace(rope_table_dtype="float32"))
    with pytest.raises(ConfigError, match=rf"rope_table_dtype='float32' \(the reference's {block} block rounds"):
        float32_table.save_pretrained(tmp_path / "refused", published_format=True)
    assert not (tmp_path / "refused").exists()


def test_muddformer_configs_end_text_at_gpt_neox_endoftext(fixtures_dir):
    """MUDDFormer-2.8B's config.json carries Llama's bos 1 / eos 2 beside GPT-NeoX-20B's vocabulary, where 2 is
    "!": it loads with 0 (<|endoftext|>), like the preset; a model with another vocabulary keeps its ids."""
    small = json.loads((fixtures_dir / "mf_tiny" / "config.json").read_text())
    assert (small["bos_token_id"], small["eos_token_id"]) == (1, 2)
    assert config_from_published(small).eos_token_id == 2
    full = config_from_published({**small, "vocab_size": 50432})
    assert (full.bos_token_id, full.eos_token_id) == (0, 0)
    preset = MuddConfig.from_preset("muddformer-2.8b")
    assert (preset.bos_token_id, preset.eos_token_id, preset.rope_table_dtype) == (0, 0, "bfloat16")
    assert MuddConfig.from_preset("muddpythia-1.4b").rope_table_dtype == "float16"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("shard", [None, 60_000])
def test_our_format_round_trip_is_bit_identical(fixtures_dir, name, shard, tmp_path):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard is None:
        assert files == ["config.json", "generation_config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and len(files) > 3
    again = MuddForCausalLM.from_pretrained(tmp_path)
    assert again.mudd_config == model.mudd_config
    a, b = model.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        assert torch.equal(model(exp["input_ids"]).logits, again(exp["input_ids"]).logits)


def test_resave_replaces_stale_shards(fixtures_dir, tmp_path):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / "mf_tiny")
    model.save_pretrained(tmp_path, max_shard_size=60_000)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert MuddForCausalLM.from_pretrained(tmp_path).mudd_config == model.mudd_config
