"""Sliding-window attention and the local/global layer pattern: training forward, cached decoding with caches
that stay within the window, transformers' generate, compile."""

from __future__ import annotations

import pytest
import torch
from conftest import build, randomize_connection

from muddformer import ConfigError, MuddConfig, MuddForCausalLM
from muddformer.adapters.hf import MuddHFConfig
from muddformer.adapters.published import config_to_published
from muddformer.inference.generation import generate
from muddformer.inference.kv_cache import KVCache, StaticKVCache
from muddformer.training.metrics import flops_per_token

CASES = [("llama", "residual"), ("llama", "mudd"), ("pythia", "mudd"), ("llama", "hc"), ("llama", "attnres")]
SHAPE = dict(n_layer=3, dim=32, n_head=2, block_size=40)


def ids(seed: int, shape=(2, 30)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def test_the_pattern_of_local_and_global_layers():
    assert MuddConfig(n_layer=6, attn_window=8, attn_global_every=3).attn_windows == [8, 8, 0, 8, 8, 0]
    assert MuddConfig(n_layer=4, attn_window=8, attn_global_layers="0,-1").attn_windows == [0, 8, 8, 0]
    assert MuddConfig(n_layer=4, attn_window=8).attn_windows == [8] * 4
    assert MuddConfig(n_layer=4).attn_windows == [0] * 4


@pytest.mark.parametrize("window", [1, 4])
def test_a_query_sees_exactly_the_window_newest_tokens(window):
    # One layer: position t depends on tokens t-window+1..t and on no earlier one.
    model = build(n_layer=1, dim=32, n_head=2, connection="residual", attn_window=window).double().eval()
    x = ids(0, (1, 20))
    base = model(x).logits[0, 12]
    for earlier in range(0, 13):
        y = x.clone()
        y[0, earlier] = (y[0, earlier] + 1) % 97
        moved = (model(y).logits[0, 12] - base).abs().max().item()
        assert (moved > 1e-9) == (earlier > 12 - window), (earlier, moved)
    later = x.clone()
    later[0, 13:] = (later[0, 13:] + 1) % 97
    assert torch.equal(model(later).logits[0, :13], model(x).logits[0, :13])  # causal: later tokens never seen


def test_a_window_as_long_as_the_context_is_full_attention():
    full = build(**SHAPE)
    windowed = build(**SHAPE, attn_window=30)
    x = ids(1)
    torch.testing.assert_close(windowed(x).logits, full(x).logits, atol=0, rtol=0)
    assert not torch.allclose(build(**SHAPE, attn_window=5)(x).logits, full(x).logits)


@pytest.mark.parametrize("block, connection", CASES)
def test_reference_attention_agrees_with_sdpa_under_windows(block, connection):
    options = dict(SHAPE, block=block, connection=connection, attn_window=6, attn_global_layers="1")
    model = build(**options).double()
    randomize_connection(model)
    reference = build(**options, attn_impl="reference").double()
    reference.load_state_dict(model.state_dict())
    x = ids(2)  # the llama family's reference softmax runs in float32
    torch.testing.assert_close(reference(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block, connection", CASES)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_decode_past_the_window_equals_the_full_forward(block, connection, kind):
    # 30 tokens through windows of 5: the ring buffers wrap several times; layer 1 stays global.
    model = build(**SHAPE, block=block, connection=connection, attn_window=5, attn_global_layers="1").double()
    randomize_connection(model)
    cfg, x = model.config, ids(3)
    kv = (
        KVCache(cfg.n_layer, cfg.attn_windows)
        if kind == "dynamic"
        else StaticKVCache(cfg.n_layer, 2, cfg.n_kv_head, cfg.head_dim, 32, torch.float64, "cpu", cfg.attn_windows)
    )
    with torch.no_grad():
        full = model(x).logits
        pieces = [model(x[:, :9], cache=kv).logits]
        pieces += [model(x[:, t : t + 1], cache=kv).logits for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-11, rtol=1e-11)
    assert kv.get_seq_length() == 30
    # The windowed layers never hold more than the window; the global one holds every token.
    held = [k.shape[2] for k in kv.keys]
    assert held == ([4, 30, 4] if kind == "dynamic" else [5, 32, 5])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_left_padding_under_windows(cache):
    # A left-padded row must decode as it does alone: padding takes cache slots but never a window's place.
    model = build(**SHAPE, connection="mudd", attn_window=4, attn_global_every=3).double().eval()
    randomize_connection(model)
    short, long = ids(4, (1, 5)), ids(5, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    both = generate(model, batch, 12, attention_mask=mask, cache=cache)
    assert both[0, 4:].tolist() == generate(model, short, 12, cache=cache)[0].tolist()
    assert both[1].tolist() == generate(model, long, 12, cache=cache)[0].tolist()


def test_transformers_generate_equals_ours_and_keeps_windowed_layers_short():
    core = build(**SHAPE, connection="mudd", attn_window=4, attn_global_layers="0").eval()
    randomize_connection(core)
    hf = MuddForCausalLM(MuddHFConfig.from_mudd(core.config), model=core).eval()
    prompt = ids(6, (1, 7))
    out = hf.generate(prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, top_k=None)
    assert out.sequences.tolist() == generate(core, prompt, 10).tolist()
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    held = [layer.keys.shape[2] for layer in cache.layers]
    assert held[0] == 16 and held[1:] == [3, 3]


def test_windows_compile_with_fullgraph_and_train():
    model = build(**SHAPE, connection="mudd", attn_window=5, attn_global_every=2)
    x = ids(7)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # inductor: test_model_pieces
    torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    loss = model(x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for p in model.layers.parameters())


def test_windowed_flops_count_only_the_window():
    full, local = MuddConfig(n_layer=4, dim=64), MuddConfig(n_layer=4, dim=64, attn_window=32, attn_global_every=2)
    attention = flops_per_token(full, 10**6, 256) - flops_per_token(local, 10**6, 256)
    assert attention == 12 * 64 * 2 * (256 - 32)


def test_window_refusals():
    with pytest.raises(ConfigError, match="set attn_window"):
        MuddConfig(attn_global_every=2)
    with pytest.raises(ConfigError, match="attn_global_layers: layer 7 is outside"):
        MuddConfig(n_layer=4, attn_window=8, attn_global_layers="7")
    with pytest.raises(ConfigError, match="attn_global_layers='x'"):
        MuddConfig(n_layer=4, attn_window=8, attn_global_layers="x")
    with pytest.raises(ConfigError, match="attn_window=8 .*no sliding-window attention"):
        config_to_published(MuddConfig(attn_window=8, intermediate_size=256))


@pytest.mark.parametrize("connection", ["mudd", "ddformer", "hc"])
def test_a_fresh_connection_computes_the_residual_model_with_windows(connection):
    from muddformer import copy_shared_weights

    options = dict(SHAPE, attn_window=4, attn_global_every=2)
    residual = build(**options, connection="residual")
    other = build(seed=3, **options, connection=connection)
    copy_shared_weights(residual, other)
    x = ids(8)
    torch.testing.assert_close(other(x).logits, residual(x).logits, atol=1e-6, rtol=1e-6)
