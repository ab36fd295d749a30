"""Training telemetry: dense-weight statistics, per-group gradient norms, spike and blow-up reports."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, build, nano_run

from muddformer.experiments.analyze.plots import logged, mean_of
from muddformer.telemetry import BLOWUP, GRAD_SPIKE, ExpertTally, SpikeWatch, group_grad_norms, weight_stats
from muddformer.training.trainer import train


def test_static_weights_give_their_own_statistics_and_no_spread():
    model = build(n_layer=3)  # W2 = 0: the weights are the static prior
    with torch.no_grad():
        model.connection.dense_bs["0"].copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0], [-1.0, -1.0]]))
    model.connection.telemetry = {}
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    stats = model.connection.telemetry
    expected = {"q": (1.5, 2.0), "k": (0.25, 0.5), "v": (2.0, 3.0), "r": (1.0, 1.0)}
    for stream, (mean_abs, max_abs) in expected.items():
        assert stats[f"dense/0/{stream}/mean_abs"] == mean_abs and stats[f"dense/0/{stream}/max_abs"] == max_abs
        assert stats[f"dense/0/{stream}/token_std"] == 0.0
    assert stats["dense/2/r/max_abs"] == 1.0 and "dense/2/q/max_abs" not in stats  # the last aggregation: R only
    assert len(stats) == 3 * (4 + 4 + 1)


def test_weight_statistics_by_hand():
    w = torch.tensor([[1.0, 3.0], [3.0, -5.0]]).view(1, 2, 1, 2)  # two tokens, one stream, two sources
    stats = weight_stats(4, "x", w)
    # |w| mean (1+3+3+5)/4; spread: source 0 has 1, 3 (std 1), source 1 has 3, -5 (std 4)
    assert stats == {"dense/4/x/mean_abs": 3.0, "dense/4/x/max_abs": 5.0, "dense/4/x/token_std": 2.5}


def test_group_gradient_norms():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.AdamW([dict(name="one", params=[a]), dict(name="two", params=[b, c])])
    a.grad, b.grad, c.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    assert group_grad_norms(opt) == {"grad_norm/one": 5.0, "grad_norm/two": 5.0}


def test_spike_and_blowup_reports_name_the_layer_and_the_fixes():
    watch = SpikeWatch()
    weights = {"dense/3/v/max_abs": 2.0, "dense/5/r/max_abs": 7.5}
    for step, loss in enumerate([5.0, 4.9, 4.8, 4.7, 4.6, 4.55]):
        assert watch.check(step, {"loss": loss, **weights}) is None
    message = watch.check(6, {"loss": 6.0, **weights})
    assert message.startswith("loss spike at step 6: 6.000") and "7.5 after block 5, stream r" in message
    assert "--set dense_cap=10" in message
    blown = watch.check(7, {"loss": 4.5, "dense/1/q/max_abs": BLOWUP + 1})
    assert blown.startswith("dense weights blowing up at step 7") and "after block 1, stream q" in blown
    assert SpikeWatch().check(0, {"loss": 9.0}) is None


def test_a_gradient_norm_spike_names_the_group_that_grew_most():
    watch = SpikeWatch()
    steady = [(1.0, 0.9, 0.3), (1.2, 1.1, 0.2), (0.8, 0.7, 0.4), (1.1, 1.0, 0.3), (0.9, 0.8, 0.2)]
    for step, (total, matrices, generator) in enumerate(steady):
        record = {"loss": 5.0, "grad_norm": total, "grad_norm/matrices": matrices, "grad_norm/generator": generator}
        assert watch.check(step, record) is None
    # medians so far: total 1.0, matrices 0.9, generator 0.3
    just_under = {"loss": 5.0, "grad_norm": 0.99 * GRAD_SPIKE, "grad_norm/matrices": 1.0, "grad_norm/generator": 5.0}
    assert watch.check(5, just_under) is None
    # medians of the last six: total (1.0 + 1.1) / 2, matrices 0.95, generator 0.3; 2.1 x 12.5 = 26.25
    spike = {"loss": 5.0, "grad_norm": 26.25, "grad_norm/matrices": 1.9, "grad_norm/generator": 24.0}
    message = watch.check(6, {**spike, "dense/2/k/max_abs": 3.0})
    assert message.startswith("gradient norm spike at step 6: 26.2, 25x the median of the recent logged ones")
    assert "most of all generator (80x)" in message and "after block 2, stream k" in message
    assert "--generator-lr-mult 0.25" in message
    assert watch.check(7, {"loss": 5.0, "grad_norm": math.inf}).startswith("gradient norm spike at step 7: inf")
    assert watch.check(8, {"loss": 5.0, "grad_norm": 1.0}) is None  # the infinite norm did not enter the median


def test_the_spike_rules_on_the_24_layer_runs_they_were_set_on():
    """docs/results/stability-depth: the stable runs (residual, PrePostDANorm) get no gradient-norm report; every
    unstable MUDD run gets them early (its first by step 32; these runs log every step)."""
    root = Path(__file__).parents[1] / "docs" / "results" / "stability-depth"
    for run in sorted(root.glob("*/seed*")):
        watch = SpikeWatch()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        reports = [(r["step"], watch.check(r["step"], r)) for r in records if "loss" in r]
        grad = [step for step, m in reports if m and m.startswith("gradient norm spike")]
        if run.parent.name in ("residual", "mudd-prepost"):
            assert grad == [], run
        else:
            assert grad and grad[0] <= 32, run


@pytest.mark.parametrize("connection, telemetry", [("mudd", True), ("residual", True), ("mudd", False)])
def test_metrics_carry_the_telemetry(play_data, tmp_path, connection, telemetry):
    out = tmp_path / "run"
    train(nano_run(play_data, out, connection=connection, log_every=1, telemetry=telemetry))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 2
    for r in train_records:
        dense = {k for k in r if k.startswith("dense/")}
        groups = {k for k in r if k.startswith("grad_norm/")}
        if not telemetry:
            assert not dense and not groups
            continue
        assert groups == (
            {"grad_norm/matrices", "grad_norm/vectors"}
            | ({"grad_norm/generator_matrices", "grad_norm/priors"} if connection == "mudd" else set())
        )
        assert (
            dense
            == {
                f"dense/{l}/{s}/{k}"
                for l, streams in ((0, "qkvr"), (1, "r"))
                for s in streams
                for k in ("mean_abs", "max_abs", "token_std")
            }
        ) == (connection == "mudd")
        assert connection != "mudd" or r["dense/0/q/max_abs"] >= r["dense/0/q/mean_abs"] > 0


def test_a_telemetry_series_is_drawn_only_where_it_was_logged():
    """Records without a series (dense statistics on some log steps only) leave no NaN gaps, which would break a
    line into invisible single points."""
    train = [{"step": 1, "loss": 5.0, "dense/0/r/max_abs": 2.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.0}]
    train.append({"step": 4, "loss": 2.0, "dense/0/r/max_abs": 6.0, "dense/0/q/max_abs": 1.0})
    keys = ["dense/0/r/max_abs", "dense/0/q/max_abs"]
    assert logged(train, lambda r: max((r[k] for k in keys if k in r), default=None)) == ([1, 4], [2.0, 6.0])
    assert logged(train, lambda r: mean_of(r, keys)) == ([1, 4], [2.0, 3.5])
    assert logged(train, lambda r: r["loss"]) == ([1, 2, 3, 4], [5.0, 4.0, 3.0, 2.0])


def test_analyze_plots_a_runs_telemetry(play_data, tmp_path, run_cli):
    run = tmp_path / "run"
    train(nano_run(play_data, run, max_steps=3, log_every=1, eval_every=3, save_every=3))
    proc = run_cli("analyze", "--run", run, "--out", tmp_path / "analysis")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert (tmp_path / "analysis" / "telemetry.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peaks = result["telemetry"]["largest_dense_weight_per_block"]
    assert set(peaks) == {"0", "1"} and result["telemetry"]["steps"] == 3
    assert peaks["1"]["max_abs"] == max(r["dense/1/r/max_abs"] for r in records if "loss" in r)
    assert_one_line_error(run_cli("analyze", "--out", tmp_path / "x"), "nothing to analyze")
    assert_one_line_error(run_cli("analyze", "--run", tmp_path, "--out", tmp_path / "x"), "not a run folder")


def test_expert_load_is_the_mean_over_a_steps_forwards_and_ranks():
    from types import SimpleNamespace

    def model(*loads):  # a dense layer, then mixture-of-experts layers with these shares of the assignments
        layers = [SimpleNamespace(feed_forward=SimpleNamespace())]
        return SimpleNamespace(
            layers=layers + [SimpleNamespace(feed_forward=SimpleNamespace(load=torch.tensor(l))) for l in loads]
        )

    tally = ExpertTally()
    assert tally.read() == {}
    tally.add(model([0.5, 0.5], [1.0, 0.0, 0.0, 0.0]), torch.tensor(0.3))
    tally.add(model([0.25, 0.75], [0.0, 0.0, 0.5, 0.5]), torch.tensor(0.1))
    assert tally.read() == pytest.approx(
        {
            "moe/router_loss": 0.2,
            "moe/1/load/0": 0.75,  # mean share 0.375 x 2 experts
            "moe/1/load/1": 1.25,
            "moe/1/max_load": 1.25,
            "moe/2/load/0": 2.0,  # 0.5 x 4
            "moe/2/load/1": 0.0,
            "moe/2/load/2": 1.0,
            "moe/2/load/3": 1.0,
            "moe/2/max_load": 2.0,  # of the mean load, not the mean of each forward's maximum (4.0 and 2.0)
        }
    )
    other_rank = torch.tensor([0.4, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25])  # what the ranks' mean mixes in
    averaged = tally.read(lambda t: (t + other_rank) / 2)
    assert averaged["moe/router_loss"] == pytest.approx(0.3) and averaged["moe/2/max_load"] == pytest.approx(1.5)
