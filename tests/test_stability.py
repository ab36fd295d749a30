"""Stability controls of the dynamic dense weights: the tanh cap and the generator output scale."""

import pytest
import torch
from conftest import (
    assert_grads_close,
    build,
    explicit_dense_forward,
    loss_and_grads,
    randomize_connection,
    speedrun_options,
)

from muddformer import copy_shared_weights
from muddformer.adapters.published import config_to_published
from muddformer.errors import ConfigError

CONTROLS = [dict(dense_cap=2.0), dict(dense_gen_scale=0.25), dict(dense_cap=0.5, dense_gen_scale=4.0)]


def ids(seed=3):
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", CONTROLS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("connection", ["mudd", "ddformer"])
def test_a_fresh_model_with_controls_is_the_residual_model(options, connection):
    fresh_model_equal_to_residual(connection, options)


def fresh_model_equal_to_residual(connection: str, options: dict):
    """A fresh model with these options, its body copied from a residual model: the logits must be equal."""
    residual = build(seed=5, n_layer=4, connection="residual")
    model = build(seed=6, n_layer=4, connection=connection, **options)
    copy_shared_weights(residual, model)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, residual(ids()).logits)
    return model


@pytest.mark.parametrize("options", CONTROLS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("connection, dense_norm", [("mudd", "none"), ("mudd", "prepost"), ("ddformer", "none")])
def test_controls_match_the_explicit_formula(options, connection, dense_norm):
    model = build(n_layer=4, connection=connection, dense_norm=dense_norm, **options)
    randomize_connection(model, scale=1.0)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, explicit_dense_forward(model, x), atol=1e-5, rtol=1e-5)


def test_cap_bounds_the_dynamic_weights_and_scale_multiplies_them():
    plain = build(n_layer=3)
    randomize_connection(plain, scale=30.0)  # a blown-up generator
    capped = build(n_layer=3, dense_cap=1.5)
    scaled = build(n_layer=3, dense_gen_scale=0.1)
    capped.load_state_dict(plain.state_dict())
    scaled.load_state_dict(plain.state_dict())
    out = torch.randn(2, 5, 32)
    with torch.no_grad():
        prior = plain.connection.dense_bs["0"]
        raw = plain.connection.dense_weights(0, out) - prior
        assert raw.abs().max() > 10
        torch.testing.assert_close(capped.connection.dense_weights(0, out) - prior, 1.5 * torch.tanh(raw / 1.5))
        assert (capped.connection.dense_weights(0, out) - prior).abs().max() <= 1.5
        torch.testing.assert_close(scaled.connection.dense_weights(0, out) - prior, 0.1 * raw)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dense_cap=-1.0), "dense_cap must be >= 0"),
        (dict(dense_gen_scale=0.0), "dense_gen_scale must be positive"),
        (dict(dense_cap=2.0, connection="denseformer"), "act on dynamic dense weights"),
        (dict(dense_gen_scale=0.5, connection="residual"), "act on dynamic dense weights"),
    ],
)
def test_control_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build(**options)


def test_controls_cannot_be_written_in_the_published_format():
    with pytest.raises(ConfigError, match="dense_cap / dense_gen_scale"):
        config_to_published(build(dense_cap=10.0).config)


def block_output_rms(model, x) -> list[float]:
    rms = []
    hooks = [
        b.register_forward_hook(lambda mod, i, out: rms.append(out.float().pow(2).mean().sqrt().item()))
        for b in model.layers
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rms


@pytest.mark.slow
def test_prepost_norm_keeps_a_deep_models_states_bounded_where_plain_mudd_explodes():
    # The mechanism behind the divergence reports at 24 layers: unnormalised dense sums feed each block's
    # output into every later sum, so large dynamic weights compound over depth. PrePostDANorm normalises
    # every stored state; the cap bounds each weight but not the compounding.
    x = ids()
    rms = {}
    for name, options in (("plain", {}), ("prepost", dict(dense_norm="prepost")), ("cap", dict(dense_cap=2.0))):
        model = build(n_layer=24, **options)
        randomize_connection(model, scale=3.0)  # a generator that has drifted far from its zero init
        rms[name] = block_output_rms(model, x)
    assert not all(torch.isfinite(torch.tensor(rms["plain"]))) or max(rms["plain"]) > 1e6
    assert max(rms["prepost"]) < 100 and rms["prepost"][-1] < 10 * rms["prepost"][6]
    assert 1e3 < max(rms["cap"]) < max(rms["plain"])


SPEEDRUN_4 = speedrun_options(4)  # sources "-2:0,1,3;-1:0,3"
ADDITIVE = [
    ("mudd", dict(dense_mix="add")),
    ("ddformer", dict(dense_mix="add")),
    ("denseformer", dict(dense_mix="add")),
    ("mudd", dict(dense_mix="add", dense_add_scale=0.5, dense_gen_norm=False)),
    ("ddformer", dict(dense_mix="add", dense_add_scale=0.5, dense_gen_norm=False)),
    ("mudd", dict(dense_mix="add", dense_streams="vr", dense_layers="-2,-1", dense_sources="0,2")),
    # the speedrun's whole form at n_layer 4: per-aggregation sources without the newest state after the
    # last block, the scale over sqrt(sources), the V gain, the V mix after the value projection
    ("mudd", SPEEDRUN_4),
    ("mudd", {**SPEEDRUN_4, "dense_v_after_proj": False}),
    ("mudd-static", {**SPEEDRUN_4, "dense_gen_norm": True}),
    (
        "mudd",
        dict(
            dense_mix="add",
            dense_streams="qkvr",
            dense_sources="1:0,2;-1:0,1,3",
            dense_v_gain=2.0,
            dense_add_scale_by_sources=True,
        ),
    ),
]


@pytest.mark.parametrize(
    "connection, options",
    ADDITIVE,
    ids=lambda o: o if isinstance(o, str) else ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_additive_mix_starts_as_the_residual_model_and_matches_the_formula(connection, options):
    model = fresh_model_equal_to_residual(connection, options)  # zero prior, zero W2: nothing added
    x = ids()
    with torch.no_grad():
        assert all(float(b.abs().max()) == 0 for b in model.connection.dense_bs.values())
        randomize_connection(model, scale=1.0)
        torch.testing.assert_close(model(x).logits, explicit_dense_forward(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dense_mix="add", dense_norm="prepost"), "pick one"),
        (dict(dense_mix="sum"), "dense_mix='sum' is unknown"),
        (dict(dense_mix="add", connection="residual"), "apply to the dense connections"),
        (dict(dense_gen_norm=False, connection="denseformer"), "applies to the dynamic dense connections"),
        (dict(dense_v_after_proj=True, dense_streams="vr"), "set dense_mix='add'"),
        (dict(dense_add_scale_by_sources=True), "set dense_mix='add'"),
        (dict(dense_mix="add", dense_v_after_proj=True, dense_streams="qvr"), "no 'q' or 'k'"),
        (dict(dense_mix="add", dense_v_after_proj=True, dense_streams="r"), "with 'v'"),
        (dict(dense_mix="add", dense_v_gain=1.15, connection="ddformer"), "scales the V stream's mix"),
        (dict(dense_sources="-1:0;-1:1"), "once per aggregation"),
        (dict(dense_sources="x:0"), "once per aggregation"),
        (dict(dense_sources="7:0"), r"aggregation 7 is outside"),
        (dict(dense_sources="1:0,9"), r"state 9 is outside"),
    ],
)
def test_additive_mix_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build(**options)


def test_speedrun_form_layout_and_its_mix_scales():
    """After block 2 of 4: v and r over states (0, 1, 3), scale 0.2/sqrt(3), V x 1.15, one input with the V mix
    added after W_v; after block 3: r over (0, 3) only (the newest state 4 is the base, not mixed), 0.2/sqrt(2)."""
    model = build(n_layer=4, **SPEEDRUN_4)
    conn = model.connection
    assert {k: tuple(b.shape) for k, b in conn.dense_bs.items()} == {"2": (2, 3), "3": (1, 2)}
    assert [agg and agg.sources for agg in conn.plan] == [None, None, (0, 1, 3), (0, 3)]
    assert conn.add_scales[2][2:] == pytest.approx([0.2 / 3**0.5 * 1.15, 0.2 / 3**0.5])
    assert conn.add_scales[3][0] == pytest.approx(0.2 / 2**0.5)
    assert [conn.multiway_input(layer) for layer in range(4)] == [False] * 4
    assert [g.norm is None and not g.input_norm for g in conn.dynamic_dense.values()] == [True, True]


@pytest.mark.parametrize("impl", ["reference", "matmul"])
def test_speedrun_form_recomputed_equals_stored(impl):
    results = {}
    for recompute in (False, True):
        model = build(seed=4, n_layer=4, connection="mudd", mix_impl=impl, recompute_mix=recompute, **SPEEDRUN_4)
        randomize_connection(model, scale=1.0)
        results[recompute] = loss_and_grads(model, ids())
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-6)
    assert_grads_close(results[True][1], results[False][1])


def test_speedrun_form_compiles_with_fullgraph():
    model = build(n_layer=4, connection="mudd", **SPEEDRUN_4)
    randomize_connection(model, scale=1.0)
    x = ids()
    loss, grads = loss_and_grads(model, x)
    closs, cgrads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(cgrads, grads)
