"""The published format: reference outputs of ../shared/fixtures/official reproduced exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from muddformer import MuddForCausalLM
from muddformer.checkpoints import read_tensors

from conftest import FIXTURE_NAMES, FIXTURE_TOL


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


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_bfloat16_run_is_bit_identical_to_reference_bfloat16(fixtures_dir, name):
    # Published folders load with the reference's attention arithmetic, so even bfloat16 matches exactly.
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name, torch_dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.mudd_config.attn_impl == "reference"
    exp = expected(fixtures_dir, name)
    with torch.no_grad():
        logits = model(exp["input_ids"]).logits
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits.float(), exp["logits_bf16"])


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
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((fixtures_dir / name / "config.json").read_text())
    original, written = read_tensors(str(fixtures_dir / name)), read_tensors(str(tmp_path))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) and written[k].dtype == torch.bfloat16 for k in original)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("shard", [None, 60_000])
def test_our_format_round_trip_is_bit_identical(fixtures_dir, name, shard, tmp_path):
    model = MuddForCausalLM.from_pretrained(fixtures_dir / name)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert MuddForCausalLM.from_pretrained(tmp_path).mudd_config == model.mudd_config
