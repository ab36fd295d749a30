"""`mudd compare`: Welch's t-test, the compute multiplier, and a small end-to-end compare that resumes."""

import json
import math
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from muddformer._utils import exclusive_folder
from muddformer.cli import main
from muddformer.experiments.compare.runs import read_records
from muddformer.experiments.compare.settings import CompareConfig
from muddformer.experiments.compare.stats import (
    cohen_d,
    compute_multiplier,
    regularized_incomplete_beta,
    student_t_two_sided_p,
    welch_t_test,
)

PNG = b"\x89PNG\r\n\x1a\n"


# ---- Welch's t-test -------------------------------------------------------------------------------
# Reference values from scipy.stats.ttest_ind(a, b, equal_var=False) (statistic, pvalue, df).
@pytest.mark.parametrize(
    "a, b, t, df, p",
    [
        ([1.0, 2.0, 3.0, 4.0], [2.5, 3.5, 4.5, 6.0, 7.0], -2.1153194253318914, 6.946661847188643, 0.07252100711561206),
        ([5.1, 5.2, 5.15], [5.0, 5.05, 4.98], 3.933660408643102, 3.637279596977305, 0.02044611008525842),
        ([3.0, 3.1, 2.9, 3.05], [10.0, 20.0, 30.0], -2.9422408585590523, 2.000218751993379, 0.09869595806894292),
        ([4.20, 4.31, 4.27], [4.25, 4.26, 4.22, 4.24], 0.526152219601985, 2.2846327741600962, 0.6454542799108048),
    ],
)
def test_welch_t_test_matches_reference_values(a, b, t, df, p):
    r = welch_t_test(a, b)
    assert r["t"] == pytest.approx(t, rel=1e-10)
    assert r["df"] == pytest.approx(df, rel=1e-10)
    assert r["p"] == pytest.approx(p, rel=1e-9)


def test_cohen_d_against_a_hand_computed_case():
    # means 2 and 4, both variances 1 (ddof 1): pooled sd 1, d = -2; a one-value sample or no spread: None
    assert cohen_d([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]) == pytest.approx(-2.0)
    # variances 1 (n 3) and 4 (n 3): pooled sqrt(2.5)
    assert cohen_d([2.0, 3.0, 4.0], [0.0, 2.0, 4.0]) == pytest.approx(1.0 / math.sqrt(2.5))
    assert cohen_d([1.0], [1.0, 2.0]) is None and cohen_d([1.0, 1.0], [2.0, 2.0]) is None


def test_welch_t_test_edge_cases():
    assert welch_t_test([1.0, 1.0], [2.0, 2.0]) == {"t": -math.inf, "df": None, "p": 0.0}  # no variance, means differ
    assert welch_t_test([1.0, 1.0], [1.0, 1.0]) == {"t": 0.0, "df": None, "p": 1.0}
    assert welch_t_test([1.0], [1.0, 2.0]) == {"t": None, "df": None, "p": None}  # variance unknown
    assert welch_t_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])["p"] == pytest.approx(0.28786413472669053, rel=1e-9)


def test_student_t_and_incomplete_beta_against_known_values():
    # Two-sided p of the t distribution (scipy: 2 * stats.t.sf(|t|, df)) and the beta CDF (stats.beta.cdf).
    assert student_t_two_sided_p(2.0, 5.0) == pytest.approx(0.10193947882985835, rel=1e-10)
    assert student_t_two_sided_p(-12.7062047361747, 1.0) == pytest.approx(0.05, rel=1e-9)
    assert student_t_two_sided_p(1.959963984540054, 1e7) == pytest.approx(0.05000002772951259, rel=1e-7)  # ~ the normal
    assert student_t_two_sided_p(0.0, 3.0) == 1.0
    assert regularized_incomplete_beta(2.5, 7.0, 0.3) == pytest.approx(0.6412224629717214, rel=1e-10)
    assert regularized_incomplete_beta(30.0, 0.5, 0.99) == pytest.approx(0.43933436890525074, rel=1e-10)


# ---- compute multiplier ---------------------------------------------------------------------------
def baseline_curve(last=400, every=30):
    steps = list(range(every, last + 1, every))
    return steps, [4 / math.sqrt(s) for s in steps]


def test_multiplier_of_a_method_twice_as_efficient():
    steps, losses = baseline_curve()
    m = compute_multiplier(steps, losses, method_final_loss=4 / math.sqrt(200), method_steps=100)
    # 200 lies between evaluations 180 and 210: linear interpolation of a convex curve overshoots slightly.
    assert m["multiplier"] == pytest.approx(2.0, abs=0.02) and m["lower_bound"] is None
    assert 180 < m["step"] < 210


def test_multiplier_equal_lower_bound_and_upper_bound():
    steps, losses = baseline_curve()
    equal = compute_multiplier(steps, losses, losses[-1], steps[-1])
    assert equal["multiplier"] == pytest.approx(1.0)
    never = compute_multiplier(steps, losses, method_final_loss=0.1, method_steps=100)
    assert never["multiplier"] is None and never["lower_bound"] == pytest.approx(3.9)
    worse = compute_multiplier(steps, losses, method_final_loss=losses[3] + 1e-9, method_steps=390)
    assert worse["multiplier"] == pytest.approx(120 / 390, rel=1e-6)  # below 1: the baseline is better
    before = compute_multiplier(steps, losses, method_final_loss=5.0, method_steps=100)
    assert before["multiplier"] is None and before["upper_bound"] == pytest.approx(0.3)


def test_multiplier_uses_the_running_minimum():
    # A noisy bump after step 20 must not make the curve reach the loss "again" later.
    m = compute_multiplier([10, 20, 30, 40], [3.0, 2.0, 2.5, 1.0], method_final_loss=2.0, method_steps=40)
    assert m["step"] == 20 and m["multiplier"] == 0.5
    m = compute_multiplier([10, 20, 30, 40], [3.0, 2.0, 2.5, 1.0], method_final_loss=1.5, method_steps=20)
    assert m["step"] == pytest.approx(35.0) and m["multiplier"] == pytest.approx(1.75)


def test_default_eval_every_gives_ten_points():
    assert CompareConfig(steps=450).resolved().eval_every == 45
    assert CompareConfig(steps=4).resolved().eval_every == 1
    assert CompareConfig(steps=4, eval_every=3).resolved().eval_every == 3


# ---- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """One play to train on and part of another to validate on, with a 300-token BPE (fits nano's 512)."""
    from muddformer.data.corpus import bundled_plays
    from muddformer.data.shards import prepare_documents

    plays = {p["name"]: p["text"] for p in bundled_plays()}
    out = tmp_path_factory.mktemp("data") / "compare-bpe300"
    prepare_documents({"train": [plays["macbeth"]], "val": [plays["the-tempest"][:20_000]]}, out, vocab_size=300)
    return out


def compare_args(data, out, steps="4", eval_every="2"):
    return [
        "compare",
        "--preset",
        "nano",
        "--connections",
        "residual,mudd",
        "--seeds",
        "2",
        "--steps",
        steps,
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-windows",
        "2",
        "--eval-every",
        eval_every,
        "--device",
        "cpu",
        "--no-progress",
    ]


@pytest.mark.slow
def test_compare_end_to_end_resumes_and_refuses_other_settings(small_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(compare_args(small_data, out)) == 0
    printed = capsys.readouterr().out
    assert "[1/4] residual seed 0: started" in printed and "[4/4] mudd seed 1: finished" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "residual" and results["tokens_per_run"] == 4 * 2 * 16
    assert set(results["connections"]) == {"residual", "mudd"}
    for name, r in results["connections"].items():
        assert len(r["final_val_loss"]) == 2 and all(math.isfinite(v) for v in r["final_val_loss"])
        assert r["mean"] == pytest.approx(sum(r["final_val_loss"]) / 2)
        assert r["std"] == pytest.approx(abs(r["final_val_loss"][0] - r["final_val_loss"][1]) / math.sqrt(2))
        assert r["curve"]["step"] == [2, 4] and len(r["curve"]["mean"]) == 2
        assert r["parameters"] > 0 and r["flops_per_token"] > 0 and r["tokens_per_s"] > 0
        assert r["memory"]["kind"] == "saved_activations_one_batch" and r["memory"]["bytes"] > 0
        cm = r["compute_multiplier"]
        assert cm["multiplier"] is not None or cm["lower_bound"] is not None or cm["upper_bound"] is not None
    assert results["connections"]["residual"]["welch"] is None
    assert results["pairwise_welch"]["mudd"]["residual"] == results["connections"]["mudd"]["welch"]
    assert results["pairwise_welch"]["residual"]["mudd"]["t"] == pytest.approx(
        -results["connections"]["mudd"]["welch"]["t"]
    )
    assert set(results["connections"]["mudd"]["welch"]) == {"t", "df", "p", "d"}
    mudd, res = results["connections"]["mudd"]["final_val_loss"], results["connections"]["residual"]["final_val_loss"]
    assert results["connections"]["mudd"]["welch"]["d"] == pytest.approx(cohen_d(mudd, res))
    assert results["connections"]["mudd"]["parameters"] > results["connections"]["residual"]["parameters"]
    # Every connection's run of a seed trains with that seed (same init RNG and batches).
    first = lambda name: json.loads((out / "runs" / name / "seed0" / "run.json").read_text())
    assert first("mudd")["train_config"]["seed"] == first("residual")["train_config"]["seed"] == 0

    md = (out / "results.md").read_text()
    assert "| connection | params | val loss mean ± std | Δ vs baseline | p (Welch) |" in md
    assert "| residual (baseline) |" in md and "| mudd |" in md
    assert "mudd compare --preset nano --connections residual,mudd --seeds 2 --steps 4" in md
    assert "--eval-every 2" in md
    assert "| row − column | residual | mudd |" in md
    for png in ("loss_vs_step.png", "loss_vs_flops.png"):
        assert (out / png).read_bytes()[:8] == PNG

    # Re-running skips every finished run and leaves the run folders untouched.
    metrics = out / "runs" / "mudd" / "seed1" / "metrics.jsonl"
    stamp = os.stat(metrics).st_mtime_ns
    assert main(compare_args(small_data, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == 4 and "started" not in printed
    assert os.stat(metrics).st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())
    assert again["connections"]["mudd"]["final_val_loss"] == results["connections"]["mudd"]["final_val_loss"]

    # Other settings on the same folder: one line, exit 2, nothing changed.
    assert main(compare_args(small_data, out, steps="5")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mudd: error: ") and err.count("\n") == 1
    assert "different settings" in err and "steps 5 here, 4 there" in err
    assert os.stat(metrics).st_mtime_ns == stamp

    # --baseline-steps extends the compare: only the longer baseline runs are trained, and the
    # compute multiplier reads their curve.
    assert main(compare_args(small_data, out) + ["--baseline-steps", "4"]) == 2
    assert "--baseline-steps 4 must exceed --steps 4" in capsys.readouterr().err
    assert main(compare_args(small_data, out) + ["--baseline-steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == 4 and "[5/6] residual seed 0 (8 steps): started" in printed
    assert os.stat(metrics).st_mtime_ns == stamp
    longer = json.loads((out / "results.json").read_text())
    curve = longer["baseline_long"]["curve"]
    assert longer["baseline_long"]["steps"] == 8 and curve["step"] == [2, 4, 6, 8]
    own = compute_multiplier(curve["step"], curve["mean"], longer["connections"]["residual"]["mean"], 4)["multiplier"]
    for name, r in longer["connections"].items():
        expect = compute_multiplier(curve["step"], curve["mean"], r["mean"], 4)
        relative = r["compute_multiplier"].pop("relative")
        assert r["compute_multiplier"] == expect
        if expect["multiplier"] is not None and own:
            assert relative == pytest.approx(expect["multiplier"] / own)
    assert "--baseline-steps 8" in (out / "results.md").read_text()
    assert main(["compare", "--report", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == {"trained": 0, "skipped": 6}
    # A longer baseline run that has not finished is named too (its curve would end early).
    (out / "runs" / "residual" / "seed1-steps8" / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert main(["compare", "--report", "--out", str(out)]) == 2
    assert "1 runs of" in (err := capsys.readouterr().err) and "seed1-steps8" in err


def test_compare_resumes_an_unfinished_run(small_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = compare_args(small_data, out, steps="2", eval_every="1")
    args[args.index("residual,mudd")] = "residual"
    args[args.index("--seeds") + 1] = "1"
    assert main(args) == 0
    run = out / "runs" / "residual" / "seed0"
    # Simulate a run killed after its first checkpoint: drop the last checkpoint and its metrics.
    shutil.rmtree(run / "checkpoints" / "step_000002")
    lines = [l for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= 1]
    (run / "metrics.jsonl").write_text("".join(l + "\n" for l in lines))
    # While another process holds the compare folder, or the run folder, nothing runs and the error names it.
    for held, name in ((out, "cmp"), (run, "seed0")):
        with exclusive_folder(held, RuntimeError):
            capsys.readouterr()
            assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name} is in use by another process (pid {os.getpid()})" in err, err
    assert len(read_records(run)) == len(lines)
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    printed = captured.err  # with --json the progress lines go to stderr, stdout holds the JSON alone
    assert "[1/1] residual seed 0: resuming from step 1" in printed and "finished in" in printed
    results = json.loads(captured.out)
    assert results == json.loads((out / "results.json").read_text())
    assert results["connections"]["residual"]["std"] is None  # one seed: no spread, no test
    assert results["connections"]["residual"]["compute_multiplier"]["multiplier"] is not None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--connections", "residual,mud"], "unknown connection 'mud' in --connections; choose from residual, mudd"),
        (["--connections", "mudd,hc"], "--baseline 'residual' is not among --connections mudd,hc"),
        (["--seed-list", "0,x"], "--seed-list '0,x' must be comma-separated integers"),
        (["--set", "n_layers=3"], "unknown MuddConfig field 'n_layers'"),
        (["--lr-for", "hc=1e-3"], "--lr-for names 'hc', which is not among --connections residual,mudd"),
        (["--lr-for", "mudd:1e-3"], "--lr-for 'mudd:1e-3' must look like CONNECTION=LR"),
        (["--global-batch", "3"], "--global-batch 3 is not a multiple of --batch-size 2 x 1 rank(s)"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(small_data, tmp_path, capsys, extra, message):
    out = tmp_path / "cmp"
    args = compare_args(small_data, out)
    if "--seed-list" in extra:
        i = args.index("--seeds")
        del args[i : i + 2]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_each_connection_trains_at_its_own_learning_rate(small_data, tmp_path):
    out = tmp_path / "cmp"
    args = compare_args(small_data, out, steps="2")
    args[args.index("--seeds") + 1] = "1"
    assert (
        main(
            args
            + [
                "--lr",
                "2e-3",
                "--lr-for",
                "mudd=5e-4",
                "--recipe",
                "cpu",
                "--generator-lr-mult",
                "0.25",
                "--warmup",
                "0.5",
            ]
        )
        == 0
    )
    recipes = {
        name: json.loads((out / "runs" / name / "seed0" / "run.json").read_text())["recipe"]
        for name in ("residual", "mudd")
    }
    assert {name: r["lr"] for name, r in recipes.items()} == {"residual": 2e-3, "mudd": 5e-4}
    assert all(r["name"] == "cpu" and r["generator_lr_mult"] == 0.25 and r["warmup"] == 0.5 for r in recipes.values())
    md = (out / "results.md").read_text()  # the command that reproduces it
    assert "--lr-for mudd=0.0005 --recipe cpu --warmup 0.5 --generator-lr-mult 0.25" in md


@pytest.mark.slow
def test_report_from_the_small_files_alone(small_data, tmp_path, capsys):
    """A compare folder stripped to compare.json, metrics.jsonl and run.json (as committed under docs/results)
    reports the same figures; an unfinished run is named; a compare.json older than a setting still reads."""
    out, kept = tmp_path / "cmp", tmp_path / "kept"
    args = compare_args(small_data, out, steps="2", eval_every="1")
    assert main(args) == 0
    full = json.loads((out / "results.json").read_text())
    for path in out.rglob("*"):
        if path.name in ("compare.json", "metrics.jsonl", "run.json"):
            (kept / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, kept / path.relative_to(out))
    settings = json.loads((kept / "compare.json").read_text())
    del settings["settings"]["recipe"], settings["settings"]["recipe_overrides"]  # as written before they existed
    (kept / "compare.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(["compare", "--report", "--out", str(kept), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not list(kept.rglob("checkpoints")) and (kept / "results.md").is_file()
    for key in ("connections", "pairwise_welch", "tokens_per_run", "baseline"):
        assert report[key] == full[key]
    assert report["runs"] == {"trained": 0, "skipped": 4}

    metrics = kept / "runs" / "mudd" / "seed1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1 if "val_loss" in records[-1] else -2]["val_loss"] = math.nan
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["compare", "--report", "--out", str(kept)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mudd/seed1 has validation loss nan at step 2; compare finite runs" in err
    records[-1 if "val_loss" in records[-1] else -2]["val_loss"] = 5.0
    next(r for r in records if "val_loss" in r)["val_loss"] = math.inf  # a curve's point: the multiplier's input
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["compare", "--report", "--out", str(kept)]) == 2
    assert "mudd/seed1 has validation loss inf at step 1; compare finite runs" in capsys.readouterr().err
    (kept / "runs" / "mudd" / "seed1" / "metrics.jsonl").write_text("")
    assert main(["compare", "--report", "--out", str(kept)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 runs of" in err and str(kept / "runs" / "mudd" / "seed1") in err
    assert main(["compare", "--report", "--out", str(tmp_path)]) == 2
    assert "holds no compare.json" in capsys.readouterr().err


@pytest.mark.slow
def test_evidence_report_script_on_two_small_compares(small_data, tmp_path, capsys):
    """scripts/experiments/evidence_report.py (the docs/results.md tables) on tiny stand-ins of its folders."""
    root = tmp_path / "evidence"
    script = Path(__file__).parents[1] / "scripts" / "experiments" / "evidence_report.py"

    def report() -> None:
        argv, sys.argv = sys.argv, [str(script), str(root)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv

    for part, connections in (("main", "residual,ddformer,mudd"), ("depth", "residual,mudd")):
        args = compare_args(small_data, root / part, steps="2", eval_every="1")
        args[args.index("residual,mudd")] = connections
        assert main(args + ["--lr-for", "mudd=2e-3"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit, match="has no longer residual runs: run the long part"):
        report()  # the planned multiplier needs residual's longer curve
    args = compare_args(small_data, root / "main", steps="2", eval_every="1")
    args[args.index("residual,mudd")] = "residual,ddformer,mudd"
    assert main(args + ["--lr-for", "mudd=2e-3", "--baseline-steps", "3"]) == 0
    stale = json.loads((root / "main" / "results.json").read_text())
    stale["connections"]["mudd"]["flops_per_token"] = 1.0  # as an older version's report might have left it
    (root / "main" / "results.json").write_text(json.dumps(stale))
    capsys.readouterr()
    report()
    printed = capsys.readouterr().out
    summary = json.loads((root / "summary.json").read_text())
    results = json.loads((root / "main" / "results.json").read_text())
    mudd, res = (results["connections"][n]["final_val_loss"] for n in ("mudd", "residual"))
    assert summary["mudd_vs"]["residual"]["delta"] == pytest.approx(sum(mudd) / 2 - sum(res) / 2)
    assert summary["mudd_vs"]["ddformer"]["p"] == results["pairwise_welch"]["mudd"]["ddformer"]["p"]
    flops = {n: results["connections"][n]["flops_per_token"] for n in ("mudd", "residual")}
    # recomputed from the runs, not the stale results.json; MUDD's generators and weighted sums cost more per step
    assert flops["mudd"] > flops["residual"] > 1.0
    steps, in_flops = (summary["mudd_vs"]["residual"][k] for k in ("multiplier", "multiplier_flops"))
    for key in ("multiplier", "lower_bound", "upper_bound"):
        expected = None if steps[key] is None else steps[key] * flops["residual"] / flops["mudd"]
        assert in_flops[key] == pytest.approx(expected), key
    assert set(summary["targets"]) == {
        "p < 0.01 against residual (two-sided Welch, MUDD lower)",
        "seed std <= 2x residual's",
        "compute multiplier >= 1.5",
    }
    depth = json.loads((root / "depth" / "results.json").read_text())["connections"]
    gain_18 = depth["mudd"]["mean"] - depth["residual"]["mean"]
    assert summary["depth"]["gain_18"][0] == pytest.approx(gain_18)
    assert summary["depth"]["difference"] == pytest.approx(gain_18 - summary["depth"]["gain_6"][0])
    mudd_row = next(line for line in printed.splitlines() if line.startswith("| mudd | "))
    assert " | 0.002 | " in mudd_row and "| 18 layers, dim 112 |" in printed  # its own LR; the depth row
    assert "transformer++" not in summary["mudd_vs"]  # the arm's folder is optional

    args = compare_args(small_data, root / "tfmpp", steps="2", eval_every="1")  # the Transformer++ arm
    args[args.index("residual,mudd")] = "residual"
    assert main(args + ["--set", "ffn_schedule=constant", "--set", "use_qk_norm=false"]) == 0
    capsys.readouterr()
    report()
    printed = capsys.readouterr().out
    summary = json.loads((root / "summary.json").read_text())
    arm = json.loads((root / "tfmpp" / "results.json").read_text())["connections"]["residual"]
    assert summary["transformer++"]["final_val_loss"] == arm["final_val_loss"]
    assert summary["mudd_vs"]["transformer++"]["delta"] == pytest.approx(sum(mudd) / 2 - arm["mean"])
    assert summary["residual_vs"]["transformer++"]["delta"] == pytest.approx(sum(res) / 2 - arm["mean"])
    mudd_std = results["connections"]["mudd"]["std"]
    assert summary["mudd_std_over_transformer++"] == pytest.approx(mudd_std / arm["std"])
    assert "- mudd against Transformer++: Δ" in printed and "- residual against Transformer++: Δ" in printed
    assert "targets_transformer++" not in summary  # the targets against it need its longer curve

    assert main(args + ["--set", "ffn_schedule=constant", "--set", "use_qk_norm=false", "--baseline-steps", "3"]) == 0
    capsys.readouterr()
    report()
    printed = capsys.readouterr().out
    summary = json.loads((root / "summary.json").read_text())
    curve = json.loads((root / "tfmpp" / "results.json").read_text())["baseline_long"]["curve"]
    for name, finals in (("mudd", mudd), ("residual", res)):
        v = summary["mudd_vs" if name == "mudd" else "residual_vs"]["transformer++"]
        assert v["multiplier"] == compute_multiplier(curve["step"], curve["mean"], sum(finals) / 2, 2), name
        assert v["baseline_own"] == compute_multiplier(curve["step"], curve["mean"], arm["mean"], 2)["multiplier"]
    assert set(summary["targets_transformer++"]) == {
        "p < 0.01 against Transformer++ (two-sided Welch, MUDD lower)",
        "seed std <= 2x Transformer++'s",
        "compute multiplier >= 1.5",
    }
    std_target = summary["targets_transformer++"]["seed std <= 2x Transformer++'s"]
    assert std_target["met"] == (mudd_std <= 2 * arm["std"])
    assert "compute multiplier on its 3-step curve" in printed and "read against the Transformer++ arm" in printed


def test_evidence_report_tests_the_depth_gain_with_welchs_t_over_four_groups():
    script = Path(__file__).parents[1] / "scripts" / "experiments" / "evidence_report.py"
    difference_of_gains = runpy.run_path(str(script))["difference_of_gains"]
    shallow = (-0.3, [(0.002, 5), (0.008, 5)])  # (gain, [(variance of the mean, seeds) of mudd, of residual])
    deep = (-0.5, [(0.002, 5), (0.008, 5)])
    test = difference_of_gains(shallow, deep)
    assert test["difference"] == pytest.approx(-0.2) and test["se"] == pytest.approx(math.sqrt(0.02))
    assert test["df"] == pytest.approx(0.02**2 / (2 * (0.002**2 + 0.008**2) / 4))  # 11.76, not a normal's infinity
    assert test["p"] == pytest.approx(student_t_two_sided_p(-0.2 / math.sqrt(0.02), test["df"]))
    assert test["p"] > math.erfc(0.2 / math.sqrt(0.02) / math.sqrt(2)) + 0.02  # wider than the normal's 0.157
    assert difference_of_gains((-0.3, []), deep)["p"] is None  # one seed: no variance


def test_the_evidence_report_divides_the_multiplier_by_the_baselines_own_reading_of_its_longer_curve():
    script = Path(__file__).parents[1] / "scripts" / "experiments" / "evidence_report.py"
    versus = runpy.run_path(str(script))["versus"]

    def connection(finals, flops):
        return {"final_val_loss": finals, "mean": sum(finals) / len(finals), "flops_per_token": flops}

    results = {
        "baseline": "residual",
        "steps": 500,
        "baseline_long": {"steps": 1000, "curve": {"step": [250, 500, 750, 1000], "mean": [5.0, 4.8, 4.6, 4.5]}},
        "connections": {"residual": connection([4.7, 4.7], 100.0), "mudd": connection([4.55, 4.55], 102.0)},
    }
    v = versus(results, "mudd", "residual")
    assert v["baseline_own"] == pytest.approx(625 / 500)  # 4.7: halfway between steps 500 and 750
    assert v["multiplier"]["multiplier"] == pytest.approx(875 / 500)  # 4.55: 875 steps of residual
    assert v["multiplier_flops"]["multiplier"] == pytest.approx(1.75 * 100 / 102)
    assert v["multiplier_flops_relative"]["multiplier"] == pytest.approx(1.75 * 100 / 102 / 1.25)
    results["connections"]["mudd"] = connection([4.4, 4.4], 102.0)  # below the whole curve: bounds scale too
    v = versus(results, "mudd", "residual")
    assert v["multiplier_flops_relative"]["lower_bound"] == pytest.approx(2.0 * 100 / 102 / 1.25)
    del results["baseline_long"]  # on the baseline's own curve there is nothing to divide by
    results["connections"]["residual"]["curve"] = {"step": [250, 500], "mean": [5.0, 4.7]}
    v = versus(results, "mudd", "residual")
    assert v["baseline_own"] is None and v["multiplier_flops_relative"] is None


def test_the_multiplier_target_is_undetermined_when_only_a_bound_on_the_wrong_side_is_known():
    script = Path(__file__).parents[1] / "scripts" / "experiments" / "evidence_report.py"
    reaches = runpy.run_path(str(script))["reaches"]

    def mult(multiplier=None, low=None, high=None):
        return dict(multiplier=multiplier, lower_bound=low, upper_bound=high)

    assert reaches(mult(1.6), 1.5) is True and reaches(mult(1.4), 1.5) is False
    assert reaches(mult(low=2.0), 1.5) is True and reaches(mult(high=1.2), 1.5) is False
    assert reaches(mult(low=1.2), 1.5) is None  # MUDD ends below the baseline's whole curve: at least 1.2x
    assert reaches(mult(high=2.0), 1.5) is None and reaches(mult(), 1.5) is None
    assert reaches(mult(high=1.5), 1.5) is False  # an upper bound is strict: below 1.5x


def test_non_finite_losses_give_no_test_and_no_multiplier():
    assert welch_t_test([1.0, math.nan], [2.0, 2.5])["p"] is None
    assert compute_multiplier([10, 20], [5.0, 4.0], math.nan, 20) == dict.fromkeys(
        ("multiplier", "step", "lower_bound", "upper_bound")
    )
    with pytest.raises(ValueError, match="needs a finite baseline curve"):  # not a silent NaN multiplier
        compute_multiplier([10, 20, 30], [5.0, math.nan, 4.0], 4.5, 20)


@pytest.mark.parametrize(
    "means, decided",
    [
        ({"default": 5.00, "gen-lr-0.25": 5.10, "prepost": 4.995, "cap10": 5.02}, "default"),  # 0.005 < 0.01
        ({"default": 5.00, "gen-lr-0.25": 5.10, "prepost": 4.98, "cap10": 4.985}, "prepost"),
    ],
)
def test_mudd_recipe_report_applies_the_fixed_rule(tmp_path, capsys, means, decided):
    for variant, mean in means.items():
        (tmp_path / variant).mkdir()
        finals = {"connections": {"mudd": {"final_val_loss": [mean - 0.01, mean + 0.01]}}}
        (tmp_path / variant / "results.json").write_text(json.dumps(finals))
    script = Path(__file__).parents[1] / "scripts" / "experiments" / "mudd_recipe_report.py"
    argv, sys.argv = sys.argv, [str(script), str(tmp_path)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert f"decided: {decided} " in capsys.readouterr().out
