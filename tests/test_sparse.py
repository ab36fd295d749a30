"""Sparse MUDD: layer, source and stream subsets, dilation and period, the trimmed presets (last2, speedrun)."""

import pytest
import torch
from conftest import assert_grads_close, build, explicit_dense_forward, loss_and_grads, randomize_connection

from muddformer import MuddConfig, MuddModel, copy_shared_weights
from muddformer.adapters.published import config_to_published
from muddformer.errors import ConfigError

# Each selects a different kind of subset; n_layer=4 so that dilation and period leave something out.
SPARSE = [
    dict(dense_layers="1,-1"),
    dict(dense_sources="0,2"),
    dict(dense_streams="vr"),
    dict(dense_streams="q"),
    dict(dense_dilation=2),
    dict(dense_period=2),
    dict(dense_dilation=2, dense_period=2, dense_streams="kr", dense_hidden=16),
]


def ids(batch=2, seq=11, seed=3):
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", SPARSE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("connection, dense_norm", [("mudd", "none"), ("mudd", "prepost"), ("mudd-static", "none")])
def test_sparse_options_match_the_explicit_formula(options, connection, dense_norm):
    model = build(n_layer=4, connection=connection, dense_norm=dense_norm, **options)
    randomize_connection(model)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, explicit_dense_forward(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(dense_layers="1,-1"), dict(dense_sources="0,2"), dict(dense_dilation=2)])
def test_sparse_single_way_connections(options):
    for connection in ("ddformer", "denseformer"):
        model = build(n_layer=4, connection=connection, **options)
        randomize_connection(model)
        x = ids()
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, explicit_dense_forward(model, x), atol=1e-5, rtol=1e-5)


def test_selecting_everything_is_the_dense_computation():
    full = build(seed=2, n_layer=4)
    randomize_connection(full)
    everything = MuddModel(full.config.replace(dense_layers="0,1,2,3", dense_sources="0,1,2,3,4", dense_streams="rvkq"))
    everything.load_state_dict(full.state_dict())  # same names and shapes
    x = ids()
    loss, grads = loss_and_grads(full, x)
    eloss, egrads = loss_and_grads(everything, x)
    torch.testing.assert_close(eloss, loss, atol=0, rtol=0)
    assert_grads_close(egrads, grads, rel=0)


@pytest.mark.parametrize("options", SPARSE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fresh_sparse_model_is_the_residual_model(options):
    residual = build(seed=5, n_layer=4, connection="residual")
    model = build(seed=6, n_layer=4, **options)
    copy_shared_weights(residual, model)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, residual(x).logits)


@pytest.mark.parametrize("impl", ["matmul", "compiled"])
@pytest.mark.parametrize("options", [dict(dense_sources="0,2"), dict(dense_streams="vr", dense_period=2)])
def test_fast_mixes_and_recompute_equal_the_reference_on_sparse_models(impl, options):
    results = {}
    for name, extra in (
        ("reference", dict(mix_impl="reference")),
        ("fast", dict(mix_impl=impl)),
        ("recompute", dict(mix_impl=impl, recompute_mix=True)),
    ):
        model = build(seed=4, n_layer=4, **options, **extra)
        randomize_connection(model)
        results[name] = loss_and_grads(model, ids())
    ref_loss, ref_grads = results["reference"]
    for name in ("fast", "recompute"):
        loss, grads = results[name]
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        assert_grads_close(grads, ref_grads)


def test_sparse_model_is_causal_and_every_parameter_learns():
    model = build(n_layer=4, dense_sources="0,2", dense_streams="vr", dense_dilation=1)
    randomize_connection(model)
    x = ids(batch=1, seq=10)
    y = x.clone()
    y[0, 6:] = (y[0, 6:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[:, :6], model(y).logits[:, :6])
    _, grads = loss_and_grads(model, x)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_parameter_layout_of_a_sparse_model():
    model = build(n_layer=4, dense_layers="1,-1", dense_sources="0", dense_streams="vr", dense_hidden=16)
    conn = model.connection
    assert sorted(conn.dense_bs) == ["1", "3"]
    # after block 1: v and r over states (0, 2); after the last block: r over (0, 4)
    assert tuple(conn.dense_bs["1"].shape) == (2, 2) and tuple(conn.dense_bs["3"].shape) == (1, 2)
    assert [g.w1.weight.shape[0] for g in conn.dynamic_dense.values()] == [16, 16]
    assert [conn.multiway_input(layer) for layer in range(4)] == [False, False, True, False]


def test_last2_and_speedrun_presets():
    cfg = MuddConfig.from_preset("mudd-speedrun-small")  # 8 layers: the record's {0, L-3, L-1} and {0, L-1}
    assert (cfg.dense_layers, cfg.dense_sources, cfg.dense_streams, cfg.dense_mix) == (
        "-2,-1",
        "-2:0,5,7;-1:0,7",
        "vr",
        "add",
    )
    assert (cfg.dense_add_scale, cfg.dense_v_gain, cfg.dense_v_after_proj, cfg.dense_gen_norm) == (
        0.2,
        1.15,
        True,
        False,
    )
    with pytest.raises(ConfigError, match="'mudd-trimmed-tiny' is now called 'mudd-last2-tiny'.*'mudd-speedrun-tiny'"):
        MuddConfig.from_preset("mudd-trimmed-tiny")
    cfg = MuddConfig.from_preset("mudd-last2-tiny")
    assert (cfg.dense_layers, cfg.dense_sources, cfg.dense_streams, cfg.dense_hidden) == ("-3,-2", "0,2,3", "vr", 64)
    with torch.device("meta"):
        model, base = MuddModel(cfg), MuddModel(MuddConfig.from_preset("tfm++-tiny", use_qk_norm=True))
    extra = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in base.parameters()) - 1
    assert 0 < extra < 0.006  # under 0.6 % more parameters at this small width
    assert sorted(model.connection.dense_bs) == ["1", "2"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dense_streams="vx"), "distinct letters of 'qkvr'"),
        (dict(dense_streams="vv"), "distinct letters"),
        (dict(dense_layers="0,7"), r"layer 7 is outside \[-3, 3\)"),
        (dict(dense_layers="a,b"), "comma-separated integers"),
        (dict(dense_sources="5"), r"state 5 is outside \[0, 3\]"),
        (dict(dense_dilation=0), "dense_dilation must be positive"),
        (dict(dense_hidden=-1), "dense_hidden must be >= 0"),
        (dict(connection="residual", dense_period=2), "apply to the dense connections"),
        (dict(connection="ddformer", dense_streams="vr"), "needs a multiway connection"),
    ],
)
def test_sparse_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build(**options)


def test_sparse_models_cannot_be_written_in_the_published_format():
    with pytest.raises(ConfigError, match="sparse dense_"):
        config_to_published(build(dense_streams="vr").config)
