"""Grouped-query attention, local/global windows and experts together, under every connection and both block
families: the fresh model is the residual model, causality, exact gradients, cached decoding, compilation."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_CONNECTIONS, assert_causal, build, randomize_connection

from muddformer import copy_shared_weights
from muddformer.inference.kv_cache import KVCache, StaticKVCache
from muddformer.model import training_loss

# 4 layers: layer 1 and 3 global, 0 and 2 windowed; experts (one shared) on layers 1 and 2; 2 KV heads for 4.
PIECES = dict(
    n_layer=4,
    dim=32,
    n_head=4,
    n_kv_head=2,
    attn_window=5,
    attn_global_every=2,
    moe_experts=4,
    moe_top_k=2,
    moe_intermediate_size=24,
    moe_shared_experts=1,
    moe_layers="1,2",
    ffn_schedule="constant",
    norm_eps=1e-12,  # AttnRes starts as a uniform mean, the residual model only up to the norms' eps
)
CASES = [(block, c) for block in ("llama", "pythia") for c in ALL_CONNECTIONS]
LLAMA_CASES = [("llama", c) for c in ALL_CONNECTIONS]  # the slower checks: every connection on one block family


def ids(seq=16, seed=3):
    return torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block, connection", CASES)
def test_a_fresh_connection_computes_the_residual_model(block, connection):
    residual = build(seed=5, block=block, connection="residual", **PIECES)
    model = build(seed=6, block=block, connection=connection, **PIECES)
    untouched = copy_shared_weights(residual, model)
    assert all(name.startswith("connection.") for name in untouched)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, residual(ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block, connection", CASES)
def test_one_seed_gives_every_connection_the_same_body(block, connection):
    # Runs of a comparison at one seed start from the same body, so that they can be read as pairs.
    residual = dict(build(seed=5, block=block, connection="residual", **PIECES).named_parameters())
    model = dict(build(seed=5, block=block, connection=connection, **PIECES).named_parameters())
    body = [name for name in model if not name.startswith("connection.") and name in residual]
    assert len(body) > 0.9 * len(residual)  # the multiway blocks' extra pre-norms are the only names not shared
    for name in body:
        assert torch.equal(model[name], residual[name]), name


@pytest.mark.parametrize("block, connection", CASES)
def test_later_tokens_never_reach_earlier_positions(block, connection):
    model = build(block=block, connection=connection, **PIECES)
    randomize_connection(model)
    assert_causal(model, ids(), cut=9)


@pytest.mark.parametrize("block, connection", LLAMA_CASES + [("pythia", "mudd")])
def test_gradients_equal_finite_differences_and_reach_every_parameter(block, connection):
    model = build(block=block, connection=connection, **PIECES).double()
    randomize_connection(model)
    x = ids()
    training_loss(model(x, labels=x)).backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # A routed expert may get no token in 32; every other parameter must learn.
        routed = ".feed_forward.w" in name or ".feed_forward.b" in name
        assert routed or p.grad.abs().max() > 0, name
    # Directional derivative along a random direction of all parameters, by the five-point stencil (error of
    # order h^4: a randomized connection makes the loss sharply curved); h is small enough that no token
    # changes its experts, so the loss is smooth along it.
    g = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    predicted = sum((p.grad * direction[n]).sum() for n, p in params.items())
    h, at = 1e-6, {}
    with torch.no_grad():
        for step in (2, 1, -1, -2):
            for n, p in params.items():
                p.add_(step * h * direction[n])
            at[step] = training_loss(model(x, labels=x))
            for n, p in params.items():
                p.sub_(step * h * direction[n])
    measured = (8 * (at[1] - at[-1]) - (at[2] - at[-2])) / (12 * h)
    torch.testing.assert_close(measured, predicted, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "block, connection, kind",
    [(b, c, "dynamic") for b, c in LLAMA_CASES] + [("pythia", "mudd", "dynamic"), ("llama", "mudd", "static")],
)
def test_cached_decode_equals_the_full_forward(block, connection, kind):
    model = build(block=block, connection=connection, **PIECES).double()
    randomize_connection(model)
    cfg, x = model.config, ids(seq=20)
    kv = (
        KVCache(cfg.n_layer, cfg.attn_windows)
        if kind == "dynamic"
        else StaticKVCache(
            cfg.n_layer, 2, cfg.n_kv_head, cfg.head_dim, 24, torch.float64, "cpu", windows=cfg.attn_windows
        )
    )
    with torch.no_grad():
        full = model(x).logits
        pieces = [model(x[:, :7], cache=kv).logits] + [model(x[:, t : t + 1], cache=kv).logits for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-10, rtol=1e-10)


def test_all_pieces_compile_with_fullgraph():
    model = build(connection="mudd", **PIECES)
    randomize_connection(model)
    x = ids()
    want = model(x, labels=x)
    got = torch.compile(model, fullgraph=True)(x, labels=x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)  # float32 sums in another order
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
