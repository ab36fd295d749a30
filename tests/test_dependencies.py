"""The dependency APIs that can drift between releases (docs/dependencies.md), each pinned by a check
that fails with a clear message instead of letting a silent change through."""

import dataclasses
import inspect

import torch
from conftest import small_config

from muddformer import MuddConfig, MuddForCausalLM, MuddModel
from muddformer.adapters.hf import CACHE_NAME, MuddHFConfig, is_cache_object, transformers_cache_name
from muddformer.compat import dynamo_recompile_limit
from muddformer.inference.kv_cache import KVCache, StaticKVCache


def test_cache_name_is_what_both_generation_hooks_use():
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert CACHE_NAME == transformers_cache_name()
    assert CACHE_NAME in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert CACHE_NAME in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    # transformers carries the cache from one step's outputs into the next step's inputs under this name
    model = MuddForCausalLM(small_config()).eval()
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    before = {
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "cache_position": torch.arange(3),
        "use_cache": True,
    }
    carried = model._update_model_kwargs_for_generation(out, before)
    assert carried[CACHE_NAME] is getattr(out, CACHE_NAME) and carried[CACHE_NAME].get_seq_length() == 3
    step = model.prepare_inputs_for_generation(torch.tensor([[1, 2, 3, 4]]), **carried)
    assert step[CACHE_NAME] is carried[CACHE_NAME]


def test_transformers_dynamic_cache_appends_along_the_sequence():
    from transformers import DynamicCache

    config = MuddHFConfig.from_mudd(small_config())
    cache = DynamicCache(config=config)
    k1, v1 = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    k2, v2 = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    keys, values = cache.update(k1, v1, 0)
    assert torch.equal(keys, k1) and torch.equal(values, v1)
    keys, values = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and torch.equal(values, torch.cat([v1, v2], 2))
    assert cache.get_seq_length(0) == 6 and is_cache_object(cache)


def test_our_caches_count_as_caches():
    assert is_cache_object(KVCache(2))
    assert is_cache_object(StaticKVCache(2, 1, 2, 16, 8, torch.float32, "cpu"))
    assert not is_cache_object(torch.zeros(2))


def test_post_init_keeps_the_cores_initialisation():
    # PreTrainedModel.post_init may re-initialise weights; the static prior must stay one-hot on the newest state.
    cfg = small_config()
    torch.manual_seed(3)
    core = MuddModel(cfg)
    torch.manual_seed(3)
    wrapped = MuddForCausalLM(MuddConfig.from_dict(cfg.to_dict()))
    a, b = core.state_dict(), wrapped.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b["connection.dense_bs.0"].tolist() == [[0.0, 1.0]] * 4


def test_torch_rms_norm_is_the_reference_formula_in_float32():
    # RMSNorm and the generator's norm call torch's rms_norm on float32 because it computes the reference
    # formula bit for bit in fewer dispatches; a release that changes its arithmetic must not pass silently.
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 96) * 3).requires_grad_()
    w = torch.randn(96).requires_grad_()
    for weight in (w, None):
        ours = torch.nn.functional.rms_norm(x, (96,), weight, 1e-6)
        reference = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        reference = reference * weight if weight is not None else reference
        assert torch.equal(ours, reference)
        g = torch.randn_like(ours)
        inputs = (x, w) if weight is not None else (x,)
        grads = torch.autograd.grad(ours, inputs, g), torch.autograd.grad(reference, inputs, g)
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_torch_fused_rms_norm_returns_the_formula_and_its_rstd():
    # The float32 norm's own backward (layers._Float32RMSNorm) takes out and rstd from this private op.
    torch.manual_seed(0)
    x = torch.randn(3, 7, 96) * 3
    for weight in (torch.randn(96), None):
        out, rstd = torch.ops.aten._fused_rms_norm(x, [96], weight, 1e-6)
        assert torch.equal(out, torch.nn.functional.rms_norm(x, (96,), weight, 1e-6))
        assert torch.equal(rstd, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_dynamo_recompile_limit_is_raised_inside_the_context():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    with dynamo_recompile_limit(before + 17):
        assert getattr(config, name) == before + 17
    assert getattr(config, name) == before


def test_byte_level_bpe_training_is_unchanged():
    # Token shards made with one tokenizers release must mean the same ids with the next one.
    from muddformer.data.corpus import bundled_plays
    from muddformer.data.tokenizers import train_tokenizer

    macbeth = next(p["text"] for p in bundled_plays() if p["name"] == "macbeth")
    tok = train_tokenizer([macbeth], 300)
    ids = tok.encode("Double, double toil and trouble; Fire burn and caldron bubble.").ids
    assert ids == [
        36,
        260,
        66,
        76,
        69,
        12,
        275,
        260,
        66,
        76,
        69,
        289,
        73,
        76,
        283,
        257,
        82,
        260,
        66,
        76,
        69,
        27,
        221,
        38,
        73,
        263,
        269,
        85,
        82,
        78,
        283,
        279,
        65,
        76,
        68,
        82,
        274,
        269,
        85,
        66,
        66,
        76,
        69,
        14,
    ]
    assert tok.decode(ids) == "Double, double toil and trouble; Fire burn and caldron bubble."


def test_safetensors_keeps_bfloat16_bits_and_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    x = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"x": x}, tmp_path / "a.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == ["x"]
        assert torch.equal(f.get_tensor("x"), x) and f.get_tensor("x").dtype == torch.bfloat16
