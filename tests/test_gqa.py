"""Grouped-query and multi-query attention (n_kv_head < n_head) with every connection family."""

from __future__ import annotations

import pytest
import torch
from conftest import build, randomize_connection

from muddformer import ConfigError, MuddConfig, copy_shared_weights, count_parameters
from muddformer.adapters.published import config_to_published
from muddformer.inference.kv_cache import KVCache, StaticKVCache

SHAPE = dict(dim=48, n_head=4, rotary_pct=1.0)
CASES = [("llama", "residual"), ("llama", "mudd"), ("pythia", "mudd"), ("llama", "hc"), ("llama", "attnres")]


def widen_kv(gqa, n_head: int):
    """The multi-head model whose key/value heads are copies of the GQA model's, one per query head."""
    mha = build(connection=gqa.config.connection, block=gqa.config.block, **SHAPE).double()
    state = gqa.state_dict()
    group = n_head // gqa.config.n_kv_head
    for name, value in list(state.items()):
        if name.endswith(("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")):
            heads = value.view(gqa.config.n_kv_head, gqa.config.head_dim, *value.shape[1:])
            state[name] = heads.repeat_interleave(group, dim=0).reshape(n_head * gqa.config.head_dim, *value.shape[1:])
    mha.load_state_dict(state)
    return mha


@pytest.mark.parametrize("block, connection", CASES)
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_attention_equals_multi_head_with_shared_key_value_heads(block, connection, n_kv_head):
    gqa = build(connection=connection, block=block, n_kv_head=n_kv_head, **SHAPE).double()
    randomize_connection(gqa)
    mha = widen_kv(gqa, SHAPE["n_head"])
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("block, connection", CASES)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_decode_keeps_only_the_key_value_heads(block, connection, kind):
    model = build(connection=connection, block=block, n_kv_head=2, **SHAPE).double()
    randomize_connection(model)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    cfg = model.config
    kv = (
        KVCache(cfg.n_layer)
        if kind == "dynamic"
        else StaticKVCache(cfg.n_layer, 2, cfg.n_kv_head, cfg.head_dim, 24, torch.float64, "cpu")
    )
    with torch.no_grad():
        full = model(ids).logits
        pieces = [model(ids[:, :8], cache=kv).logits]
        pieces += [model(ids[:, t : t + 1], cache=kv).logits for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-11, rtol=1e-11)
    assert kv.keys[0].shape[1] == 2 and kv.get_seq_length() == 20


@pytest.mark.parametrize("connection", ["mudd", "ddformer", "denseformer", "hc"])  # AttnRes starts as a mean
def test_a_fresh_connection_computes_the_residual_model_with_gqa(connection):
    residual = build(connection="residual", n_kv_head=1, **SHAPE)
    other = build(seed=3, connection=connection, n_kv_head=1, **SHAPE)
    copy_shared_weights(residual, other)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(other(x).logits, residual(x).logits, atol=1e-6, rtol=1e-6)


def test_gqa_has_fewer_parameters():
    # Its fullgraph compile: test_model_pieces (GQA with windows and experts).
    model = build(connection="mudd", n_kv_head=2, **SHAPE)
    mha = build(connection="mudd", **SHAPE)
    saved = count_parameters(mha)["total"] - count_parameters(model)["total"]
    assert saved == model.config.n_layer * 2 * SHAPE["dim"] * (SHAPE["dim"] - model.config.kv_dim)


def test_gqa_refusals():
    with pytest.raises(ConfigError, match="n_kv_head=3 does not divide n_head=4"):
        MuddConfig(dim=48, n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="n_kv_head must be positive"):
        MuddConfig(dim=48, n_head=4, n_kv_head=0)
    speedrun = dict(dense_mix="add", dense_streams="vr", dense_v_after_proj=True)
    with pytest.raises(ConfigError, match="dense_v_after_proj .* n_kv_head=2"):
        MuddConfig(dim=48, n_head=4, n_kv_head=2, **speedrun)
    cfg = MuddConfig(dim=48, n_head=4, n_kv_head=2, ffn_schedule="linear", intermediate_size=256)
    with pytest.raises(ConfigError, match="n_kv_head=2 .*no grouped-query attention"):
        config_to_published(cfg)
    assert MuddConfig(dim=48, n_head=4).n_kv_head == 4
