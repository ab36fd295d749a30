"""The rival connections (hc, mhc, attnres, attnres-block): init, an independent recomputation of each
paper's formula, causality, gradients, cached decoding, parameter counts, config errors."""

import pytest
import torch
from conftest import RIVAL_CONNECTIONS, assert_causal, build, randomize_connection

from muddformer import ConfigError, MuddConfig, copy_shared_weights, count_parameters
from muddformer.connections.hyper import sinkhorn
from muddformer.inference.kv_cache import KVCache, StaticKVCache
from muddformer.layers import AttentionContext
from muddformer.training.parallel import apply_activation_checkpointing
from muddformer.training.recipes import get_recipe, param_groups

BLOCKS = ["llama", "pythia"]


def ids(batch=2, seq=11, seed=3, vocab=97):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sublayers(model, ctx):
    """(layer, function) per sub-layer: attention and FFN apart (llama), the parallel pair as one (pythia)."""
    out = []
    for layer, block in enumerate(model.layers):
        if block.parallel_residual:
            out.append((layer, lambda h, b=block: b.attention_part(h, ctx) + b.ffn_part(h)))
        else:
            out += [(layer, lambda h, b=block: b.attention_part(h, ctx)), (layer, block.ffn_part)]
    return out


def explicit_hyper(model, x):
    """HC (arXiv 2409.19606 Eqs. 1-2, 11-13) and mHC (arXiv 2512.24880 Eqs. 7-9) written out with einsum."""
    cfg, conn = model.config, model.connection
    n, ctx = cfg.hyper_streams, AttentionContext(rope=model.rope[: x.shape[1]][None])
    H = torch.stack([model.tok_embeddings(x)] * n, dim=2)  # (B, T, n, D)
    sites = [site for layer in conn.layers for site in layer.sites]
    for site, (_, f) in zip(sites, sublayers(model, ctx)):
        if cfg.connection == "hc":
            normed = site.norm(H)
            alpha = site.static_alpha + site.alpha_scale * torch.tanh(
                torch.einsum("btnd,dk->btnk", normed, site.dynamic_alpha)
            )
            beta = site.static_beta + site.beta_scale * torch.tanh(
                torch.einsum("btnd,d->btn", normed, site.dynamic_beta)
            )
            h = torch.einsum("btn,btnd->btd", alpha[..., 0], H)
            carried = torch.einsum("btij,btid->btjd", alpha[..., 1:], H)  # A_r^T H
        else:
            flat = H.flatten(2)
            coeff = (flat / flat.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt()) @ site.projection
            a_pre, a_post, a_res = site.scales
            pre = torch.sigmoid(a_pre * coeff[..., :n] + site.bias_pre)
            beta = 2 * torch.sigmoid(a_post * coeff[..., n : 2 * n] + site.bias_post)
            m = torch.exp(a_res * coeff[..., 2 * n :].unflatten(-1, (n, n)) + site.bias_res)
            for _ in range(cfg.sinkhorn_iters):
                m = m / m.sum(-1, keepdim=True)
                m = m / m.sum(-2, keepdim=True)
            h = torch.einsum("btn,btnd->btd", pre, H)
            carried = torch.einsum("btij,btjd->btid", m, H)  # H_res x
        H = carried + beta[..., None] * f(h)[..., None, :]
    return model.output(model.norm(H.mean(2)))


def explicit_attnres(model, x, uniform=False):
    """AttnRes (arXiv 2603.15031): h = sum_i softmax_i(w . RMSNorm(v_i)) v_i over the embedding and the
    earlier outputs, or for Block AttnRes over the group sums and the open partial sum; `uniform`
    replaces every mix by the plain mean of its sources."""
    cfg, conn = model.config, model.connection
    ctx = AttentionContext(rope=model.rope[: x.shape[1]][None])
    n_groups = min(cfg.attnres_blocks, cfg.n_layer)

    def attend(site, sources):  # sub-layer 0 has no query: its one source passes through
        V = torch.stack(sources)  # (S, B, T, D)
        if uniform or site == 0:
            return V.mean(0)
        query, norm = conn.queries[site - 1], conn.key_norms[site - 1]
        weights = torch.softmax(torch.einsum("d,sbtd->sbt", query, norm(V)), dim=0)
        return torch.einsum("sbt,sbtd->btd", weights, V)

    done, partial, group = [model.tok_embeddings(x)], None, None
    for site, (layer, f) in enumerate(sublayers(model, ctx)):
        new_group = site if cfg.connection == "attnres" else layer * n_groups // cfg.n_layer
        if partial is not None and new_group != group:
            done, partial = done + [partial], None
        group = new_group
        out = f(attend(site, done + ([] if partial is None else [partial])))
        partial = out if partial is None else partial + out
    return model.output(model.norm(attend(len(conn.queries), done + [partial])))


def explicit(model, x):
    return explicit_hyper(model, x) if model.config.connection in ("hc", "mhc") else explicit_attnres(model, x)


# ---- init ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
@pytest.mark.parametrize("eps", [None, 1e-12])
def test_fresh_model_against_the_residual_model(block, connection, eps):
    residual = build(seed=5, block=block, connection="residual", norm_eps=eps)
    model = build(seed=6, block=block, connection=connection, norm_eps=eps)
    untouched = copy_shared_weights(residual, model)
    assert untouched and all(name.startswith("connection.") for name in untouched)
    x = ids()
    with torch.no_grad():
        got, want = model(x).logits, residual(x).logits
    if connection == "hc":  # a = e_{k mod n}, R = I, b = 1, W = 0: bitwise the residual model
        assert torch.equal(got, want)
    elif connection == "mhc":  # sigmoid pre weights sum to 1 only up to rounding
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    elif eps is None:  # uniform averages: the residual stream over the number of sources, which only
        assert (got - want).abs().max() > 1e-5  # the norms' eps tells apart
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("streams", [1, 3, 8])
def test_hc_start_is_exact_for_any_stream_count_and_in_bfloat16(streams):
    residual = build(seed=5, connection="residual")
    model = build(seed=6, connection="hc", hyper_streams=streams)
    copy_shared_weights(residual, model)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, residual(x).logits)
        assert torch.equal(model.to(torch.bfloat16)(x).logits, residual.to(torch.bfloat16)(x).logits)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", ["attnres", "attnres-block"])
def test_attnres_starts_as_uniform_averages(block, connection):
    model = build(block=block, connection=connection)
    conn = model.connection
    assert all(bool((q == 0).all()) for q in conn.queries)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, explicit_attnres(model, x, uniform=True), atol=1e-5, rtol=1e-5)
        sources = [torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(j)) for j in range(5)]
        torch.testing.assert_close(conn.mix(0, tuple(sources)), torch.stack(sources).mean(0))


def test_hc_and_mhc_static_start():
    hc = build(connection="hc").connection
    first, second = hc.layers[0].sites
    assert first.static_alpha.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert second.static_alpha[:, 0].tolist() == [0, 1, 0, 0]  # sub-layer 1 reads stream 1
    assert second.static_beta.tolist() == [1, 1, 1, 1] and second.alpha_scale.item() == pytest.approx(0.01)
    mhc = build(connection="mhc").connection
    site = mhc.layers[1].sites[1]  # sub-layer 3 reads stream 3
    pre, post, res = site.weights(torch.randn(2, 3, 4, 32))
    torch.testing.assert_close(pre, torch.tensor([0.01, 0.01, 0.01, 0.97]).expand(2, 3, 4))
    assert bool((post == 1).all()) and bool((res == 0.25).all())


def test_mhc_mixing_is_doubly_stochastic_for_random_parameters():
    model = build(connection="mhc")
    randomize_connection(model, scale=0.1)
    H = torch.randn(2, 11, 4, 32, generator=torch.Generator().manual_seed(0))
    for layer in model.connection.layers:
        for site in layer.sites:
            _, _, res = site.weights(H)
            assert bool((res >= 0).all()) and res.std() > 1e-3  # really moved away from the uniform start
            torch.testing.assert_close(res.sum(-1), torch.ones(2, 11, 4), atol=1e-5, rtol=0)
            torch.testing.assert_close(res.sum(-2), torch.ones(2, 11, 4), atol=1e-5, rtol=0)
    # Wider logit spreads need more steps than the paper's 20; the last step always fixes the columns.
    logits = torch.randn(1000, 4, 4, generator=torch.Generator().manual_seed(1))
    m = sinkhorn(logits, 50)
    torch.testing.assert_close(m.sum(-1), torch.ones(1000, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(sinkhorn(4 * logits, 20).sum(-2), torch.ones(1000, 4), atol=1e-5, rtol=0)


def test_attnres_block_groups():
    def groups(**kw):
        return build(connection="attnres-block", **kw).connection.groups

    assert groups(n_layer=3) == [0, 0, 1, 1, 2, 2]  # fewer layers than the 8 default groups: one each
    assert groups(n_layer=4, attnres_blocks=2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert groups(n_layer=3, attnres_blocks=2, block="pythia") == [0, 0, 1]
    assert build(connection="attnres", n_layer=2).connection.groups == [0, 1, 2, 3]
    assert MuddConfig.from_preset("tfm++-405m", connection="attnres-block").attnres_blocks == 8


# ---- the formulas, causality, gradients -------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
def test_trained_rival_matches_the_explicit_formula(block, connection):
    model = build(block=block, connection=connection)
    x = ids()
    with torch.no_grad():
        fresh = model(x).logits
        randomize_connection(model, scale=0.1)
        got = model(x).logits
        torch.testing.assert_close(got, explicit(model, x), atol=1e-5, rtol=1e-5)
    assert (got - fresh).abs().max() > 1e-3


@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
def test_causality(connection):
    model = build(connection=connection)
    randomize_connection(model)
    assert_causal(model, ids(seq=16), cut=9)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
def test_gradients_reach_every_parameter(block, connection):
    model = build(block=block, connection=connection)
    x = ids(seq=12)
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():  # at the start zero-initialised paths may give exact zeros
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.zero_grad()
    randomize_connection(model)
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
def test_activation_checkpointing_reruns_the_rivals(connection):
    # The rivals run inside the block call, so the checkpoint wrapper around Block.forward covers them.
    results = []
    for checkpointed in (False, True):
        model = build(seed=2, connection=connection)
        randomize_connection(model)
        if checkpointed:
            apply_activation_checkpointing(model)
        saved = []
        x = ids()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(x, labels=x).loss
        loss.backward()
        results.append((sum(saved), loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_saved, plain_loss, plain_grads), (saved, loss, grads) = results
    assert saved < plain_saved / 3
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5)


def test_rivals_compile_with_fullgraph():
    model = build(connection="attnres-block")
    randomize_connection(model)
    x = ids()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


# ---- decoding, dtypes --------------------------------------------------------------------------------
@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_decode_equals_full_forward_in_float64(connection, kind):
    # Mixing over depth is per token, so the KV cache is all that decoding keeps.
    model = build(connection=connection).eval()
    randomize_connection(model)
    model.to(torch.float64)
    x = ids(seq=14)
    cfg = model.config
    with torch.no_grad():
        full = model(x).logits
        cache = (
            KVCache(cfg.n_layer)
            if kind == "dynamic"
            else StaticKVCache(cfg.n_layer, 2, cfg.n_head, cfg.head_dim, 16, torch.float64, "cpu")
        )
        pieces = [model(x[:, :6], cache=cache).logits] + [
            model(x[:, t : t + 1], cache=cache).logits for t in range(6, 14)
        ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
def test_bfloat16_forward(connection):
    model = build(connection=connection)
    randomize_connection(model, scale=0.1)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        got = model.to(torch.bfloat16)(x).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


# ---- sizes, optimiser groups, config ------------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
def test_parameter_counts(block):
    L, D, n = 3, 32, 4
    sites = L if block == "pythia" else 2 * L
    norm = 2 * D if block == "pythia" else D  # LayerNorm has a bias
    expected = {
        "hc": sites * (norm + n * (n + 1) + n + D * (n + 1) + D + 2),
        "mhc": sites * (n * D * n * (n + 2) + n + n + n * n + 3),
        "attnres": sites * 2 * D,  # a query and a key-norm weight per sub-layer after the first, and the output's
        "attnres-block": sites * 2 * D,
    }
    residual_total = count_parameters(build(block=block, connection="residual"))["total"]
    for connection, extra in expected.items():
        counts = count_parameters(build(block=block, connection=connection))
        assert counts["dense"] == extra, connection
        assert counts["total"] == residual_total + extra, connection
    assert count_parameters(build(connection="hc", hyper_streams=2))["dense"] == 6 * (D + 6 + 2 + 3 * D + D + 2)


@pytest.mark.parametrize("connection", RIVAL_CONNECTIONS)
def test_no_scalar_parameters(connection):
    # FSDP2's fully_shard refuses 0-d parameters.
    assert all(p.dim() >= 1 for p in build(connection=connection).connection.parameters())


@pytest.mark.parametrize(
    "connection, priors", [("hc", {"static_alpha", "static_beta"}), ("mhc", {"bias_pre", "bias_post", "bias_res"})]
)
def test_static_priors_are_not_weight_decayed(connection, priors):
    model = build(connection=connection)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, get_recipe("cpu"))
    decayed = {
        names[id(p)].rsplit(".", 1)[-1]
        for g in groups
        if g["weight_decay"] > 0
        for p in g["params"]
        if names[id(p)].startswith("connection.")
    }
    kept = {
        names[id(p)].rsplit(".", 1)[-1]
        for g in groups
        if g["weight_decay"] == 0
        for p in g["params"]
        if names[id(p)].startswith("connection.")
    }
    assert priors <= kept and not priors & decayed
    # HC's whole dynamic part is decayed, its beta projection (a (D, 1) matrix stored as a vector) included.
    assert decayed == ({"dynamic_alpha", "dynamic_beta"} if connection == "hc" else {"projection"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hyper_streams=0), "MuddConfig.hyper_streams must be positive, got 0"),
        (dict(sinkhorn_iters=0), "MuddConfig.sinkhorn_iters must be positive, got 0"),
        (dict(attnres_blocks=-1), "MuddConfig.attnres_blocks must be positive, got -1"),
        (dict(connection="mhc", hyper_streams=1), "hyper_streams=1 gives connection='mhc' a single stream"),
        (dict(hyper_streams=2.5), "MuddConfig.hyper_streams must be int"),
        (dict(connection="attnres-blocks"), "connection='attnres-blocks' is unknown"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        MuddConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_fields_round_trip():
    cfg = MuddConfig(connection="mhc", hyper_streams=2, sinkhorn_iters=7, attnres_blocks=3)
    again = MuddConfig.from_json(cfg.to_json())
    assert again == cfg and (again.hyper_streams, again.sinkhorn_iters, again.attnres_blocks) == (2, 7, 3)
    assert (MuddConfig().hyper_streams, MuddConfig().sinkhorn_iters, MuddConfig().attnres_blocks) == (4, 20, 8)
    assert MuddConfig(connection="hc", hyper_streams=1).hyper_streams == 1  # one stream is valid HC
