"""The tables of docs/results.md from the evidence folders (scripts/experiments/evidence.sh), written before the
runs finished so that the analysis is fixed in advance:

- main: every connection's final validation loss over seeds, Δ against residual with Welch's p and Cohen's d,
  the compute multiplier on residual's longer curve, the seed spread against residual's;
- MUDD against residual and against DDFormer (Δ, p, d, multiplier in FLOPs: the steps' multiplier times the
  other's training FLOPs per token over MUDD's, and in steps; against DDFormer the multiplier reads
  DDFormer's own curve, so it is a bound when MUDD ends below DDFormer's last point);
- the targets (p < 0.01 against residual, seed std at most 2x residual's, multiplier in FLOPs >= 1.5) as met,
  missed or not determined; beside the multiplier's, residual's own shorter run read on its longer curve and the
  multiplier divided by that (the planned target reads the undivided one);
- the Transformer++ arm (folder tfmpp, added later; optional): MUDD and residual against it, the multiplier read
  on its longer curve once it has one (the tfmpp-long part, also later; as for residual, with the division
  beside it), else on its own; with the longer curve, the three targets read against it as well;
- depth: MUDD's gain over residual at 6 and at 18 layers and the difference of the two gains, with its
  standard error and Welch's t-test over the four groups (Welch-Satterthwaite degrees of freedom).

Each folder's results.json (and results.md, plots) is first recomputed from its runs' metrics.jsonl and run.json by
this code, as `mudd compare --report` does: a results.json left by an older version (its FLOPs per token, its
memory) never reaches the tables.

    python scripts/experiments/evidence_report.py [docs/results/evidence]     prints Markdown, writes summary.json
"""

import json
import math
import statistics
import sys
from pathlib import Path

from muddformer.errors import InputError
from muddformer.experiments.compare.report import finite_or_none, format_multiplier, format_p
from muddformer.experiments.compare.runner import report_compare
from muddformer.experiments.compare.stats import compute_multiplier, difference_test, student_t_two_sided_p

# The targets speak of Transformer++; the comparison's baseline is MUDD's own body with a residual stream.
BASELINE_NOTE = (
    "The baseline `residual` is the `tiny` family's body (the linear FFN width re-allocation and q/k norm that "
    "MUDDFormer uses) with a residual stream, not the paper's Transformer++ (constant FFN width, no q/k norm; "
    "preset `tfm++-tiny`). The paper's ablation (Table 5) found the re-allocation alone hurts a Transformer "
    "(405M perplexity 11.93 against 11.68), so this baseline may be weaker than Transformer++."
)


BOUNDS = ("multiplier", "lower_bound", "upper_bound")
VERDICT = {True: "yes", False: "no", None: "not determined"}
RELATIVE_VERDICT = {
    True: "that reading meets the target",
    False: "that reading misses the target",
    None: "not determined",
}
TFMPP = "transformer++"


def load(folder: Path) -> dict | None:
    """A compare folder's results, recomputed from its runs by this code; None where the folder has no compare."""
    if not (folder / "compare.json").is_file():
        return None
    try:
        return report_compare(folder)
    except InputError as e:
        sys.exit(str(e))


def reaches(multiplier: dict, target: float) -> bool | None:
    """Whether a compute multiplier reaches the target; None when only a bound below it is known (the curves
    end before the answer: a lower bound under the target, an upper bound over it)."""
    m, low, high = multiplier["multiplier"], multiplier["lower_bound"], multiplier["upper_bound"]
    if m is not None:
        return m >= target
    if low is not None and low >= target:
        return True
    if high is not None and high <= target:  # an upper bound is strict: the loss lies above the curve's first point
        return False
    return None


def fmt(value: float | None, spec: str = "+.4f") -> str:
    return "—" if value is None else format(value, spec)


def main_table(results: dict) -> list[str]:
    lr_for, base = results["settings"]["lr_for"], results["connections"]["residual"]
    rows = [
        "| connection | params | peak LR | val loss mean ± std (n) | Δ vs residual | p (Welch) | d | "
        "multiplier (steps) | std / residual's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["connections_order"]:
        r = results["connections"][name]
        ratio = r["std"] / base["std"] if r["std"] and base["std"] else None
        rows.append(
            f"| {name} | {r['parameters']:,} | {lr_for.get(name, results['settings']['lr'])} | "
            f"{r['mean']:.4f} ± {fmt(r['std'], '.4f')} ({len(r['final_val_loss'])}) | "
            f"{'—' if name == 'residual' else fmt(r['delta_vs_baseline'])} | {format_p(r['welch'])} | "
            f"{fmt(r['welch'] and r['welch']['d'], '+.2f')} | {format_multiplier(r['compute_multiplier'])} | "
            f"{fmt(ratio, '.2f')} |"
        )
    return rows


def scaled(multiplier: dict, factor: float | None) -> dict | None:
    """A multiplier's value and bounds times `factor` (None: not known); `step` stays in steps."""
    if factor is None:
        return None
    return {k: v * factor if k in BOUNDS and v is not None else v for k, v in multiplier.items() if k != "relative"}


def versus(results: dict, a: str, b: str) -> dict:
    """a against b: Δ of the means, the test, and the multiplier read on b's own mean curve. On the baseline's
    longer curve also `baseline_own` (where the baseline's own final loss lies on it, in steps: a longer run's
    learning rate is still high where a shorter one's has decayed) and `multiplier_flops_relative` (the FLOPs
    multiplier divided by that)."""
    ra, rb = results["connections"][a], results["connections"][b]
    long = b == results["baseline"] and results.get("baseline_long")
    curve = results["baseline_long"]["curve"] if long else rb["curve"]
    steps = compute_multiplier(curve["step"], curve["mean"], ra["mean"], results["steps"])
    # In compute: a step of `a` costs flops_a / flops_b of b's (MUDD's mix and generators: a few % on these models).
    flops = scaled(steps, rb["flops_per_token"] / ra["flops_per_token"])
    own = compute_multiplier(curve["step"], curve["mean"], rb["mean"], results["steps"])["multiplier"] if long else None
    return {
        "delta": ra["mean"] - rb["mean"],
        **difference_test(ra["final_val_loss"], rb["final_val_loss"]),
        "multiplier": steps,
        "multiplier_flops": flops,
        "baseline_own": own,
        "multiplier_flops_relative": scaled(flops, 1 / own) if own else None,
    }


def with_arm(results: dict, arm: dict, name: str) -> dict:
    """`results` with another compare's baseline added as connection `name` (its runs, curve and FLOPs), so that
    `versus` can read MUDD against it: on the arm's longer curve when it has longer runs, else on its own."""
    merged = {**results, "connections": {**results["connections"], name: arm["connections"][arm["baseline"]]}}
    if arm.get("baseline_long"):
        merged.update(baseline=name, baseline_long=arm["baseline_long"])
    return merged


def targets(m: dict, base: dict, base_name: str, v: dict) -> dict:
    """The issue's three targets for MUDD (`m`) against a baseline (`base`), from their `versus` reading `v`:
    {name: (met or None, value)}. The multiplier is read in FLOPs, as the paper's is."""
    mult = v["multiplier_flops"]
    return {
        f"p < 0.01 against {base_name} (two-sided Welch, MUDD lower)": (
            None if v["p"] is None else v["p"] < 0.01 and v["delta"] < 0,
            f"p {format_p(v)}, Δ {v['delta']:+.4f}",
        ),
        f"seed std <= 2x {base_name}'s": (
            None if None in (m["std"], base["std"]) else m["std"] <= 2 * base["std"],
            f"{fmt(m['std'], '.4f')} against {fmt(base['std'], '.4f')}",
        ),
        "compute multiplier >= 1.5": (reaches(mult, 1.5), format_multiplier(mult)),
    }


def target_report(named: dict) -> tuple[dict, list[str]]:
    """The targets as summary.json keeps them, and as a table."""
    kept = {k: {"met": ok, "value": text} for k, (ok, text) in named.items()}
    table = ["", "| target | met | value |", "|---|---|---|"]
    return kept, table + [f"| {k} | {VERDICT[ok]} | {text} |" for k, (ok, text) in named.items()]


def arm_lines(results: dict, arm: dict, summary: dict) -> list[str]:
    """The Transformer++ arm (a separate compare of the `tfm++-tiny` body): MUDD and the planned baseline against it."""
    merged = with_arm(results, arm, TFMPP)
    t, m = merged["connections"][TFMPP], merged["connections"]["mudd"]
    lines = [
        f"\nTransformer++ arm (`tfm++-tiny` body, residual stream, {t['parameters']:,} parameters): "
        f"{t['mean']:.4f} ± {fmt(t['std'], '.4f')} ({len(t['final_val_loss'])} seeds)."
    ]
    long = arm.get("baseline_long")
    curve = f"its {long['steps']}-step curve" if long else f"its own {results['steps']}-step curve"
    for name in ("mudd", "residual"):
        v = summary["mudd_vs" if name == "mudd" else "residual_vs"][TFMPP] = versus(merged, name, TFMPP)
        ratio = merged["connections"][name]["std"] / t["std"] if t["std"] else None
        relative = (
            f"; divided by Transformer++'s own {results['steps']}-step reading of that curve "
            f"({v['baseline_own']:.2f}x), {format_multiplier(v['multiplier_flops_relative'])}"
            if v["baseline_own"]
            else ""
        )
        bounded = v["multiplier_flops"]["multiplier"] is None
        bound_note = "; > marks a bound: the curve ends above that loss" if bounded else ""
        lines.append(
            f"- {name} against Transformer++: Δ {v['delta']:+.4f}, p {format_p(v)}, d {fmt(v['d'], '+.2f')}, "
            f"seed std {fmt(ratio, '.2f')}x Transformer++'s, compute multiplier on {curve} "
            f"{format_multiplier(v['multiplier_flops'])} in FLOPs ({format_multiplier(v['multiplier'])} in "
            f"steps{relative}{bound_note})"
        )
    if long:  # the issue's targets, read against Transformer++ itself (the planned ones read residual)
        summary["targets_transformer++"], table = target_report(
            targets(m, t, "Transformer++", summary["mudd_vs"][TFMPP])
        )
        lines += ["", "The targets read against the Transformer++ arm:"] + table
    summary["transformer++"] = {"mean": t["mean"], "std": t["std"], "final_val_loss": t["final_val_loss"]}
    summary["mudd_std_over_transformer++"] = m["std"] / t["std"] if t["std"] else None
    return lines


def gain(results: dict) -> tuple[float, list[tuple[float, int]]]:
    """MUDD's mean loss minus residual's, and each group's (variance of its mean, seeds); [] below two seeds."""
    m, r = (results["connections"][n]["final_val_loss"] for n in ("mudd", "residual"))
    parts = [(statistics.variance(x) / len(x), len(x)) for x in (m, r)] if min(len(m), len(r)) > 1 else []
    return statistics.fmean(m) - statistics.fmean(r), parts


def difference_of_gains(shallow: tuple, deep: tuple) -> dict:
    """Gain at depth minus gain shallow: its standard error and Welch's t-test over the four groups (the
    Welch-Satterthwaite degrees of freedom of a sum of four sample means' variances)."""
    diff, parts = deep[0] - shallow[0], shallow[1] + deep[1]
    if len(parts) < 4:
        return {"difference": diff, "se": None, "t": None, "df": None, "p": None}
    var = sum(v for v, _ in parts)
    if var == 0:
        return {"difference": diff, "se": 0.0, "t": None, "df": None, "p": None}
    se, df = math.sqrt(var), var**2 / sum(v**2 / (n - 1) for v, n in parts)
    return {"difference": diff, "se": se, "t": diff / se, "df": df, "p": student_t_two_sided_p(diff / se, df)}


def gain_with_se(g: tuple) -> tuple[float, float | None]:
    return g[0], math.sqrt(sum(v for v, _ in g[1])) if g[1] else None


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/evidence")
    main_results, depth, arm = load(root / "main"), load(root / "depth"), load(root / "tfmpp")
    if main_results is None:
        sys.exit(f"{root / 'main'} holds no compare: run scripts/experiments/evidence.sh first")
    if main_results["baseline_long"] is None:  # the planned multiplier reads residual's longer curve
        sys.exit(f"{root / 'main'} has no longer residual runs: run the long part (evidence.sh ... long) first")
    measured = " The Transformer++ arm below measures the two." if arm is not None else ""
    lines = [BASELINE_NOTE + measured, ""] + main_table(main_results) + [""]
    summary: dict = {"mudd_vs": {}, "residual_vs": {}}
    for other in ("residual", "ddformer"):
        v = summary["mudd_vs"][other] = versus(main_results, "mudd", other)
        lines.append(
            f"- MUDD against {other}: Δ {v['delta']:+.4f}, p {format_p(v)}, d {fmt(v['d'], '+.2f')}, "
            f"compute multiplier {format_multiplier(v['multiplier_flops'])} in FLOPs "
            f"({format_multiplier(v['multiplier'])} in steps)"
        )
    m, r = (main_results["connections"][n] for n in ("mudd", "residual"))
    against = summary["mudd_vs"]["residual"]
    summary["targets"], table = target_report(targets(m, r, "residual", against))
    lines += table
    if against["baseline_own"] is not None:
        relative = against["multiplier_flops_relative"]
        lines.append(
            f"\nThe multiplier target reads MUDD's loss on residual's {main_results['baseline_long']['steps']}-step "
            f"curve, as planned. On that curve residual's own {main_results['steps']}-step loss lies at "
            f"{against['baseline_own']:.2f}x (at step {main_results['steps']} the longer run's learning rate is "
            f"still high where the shorter run's has decayed); divided by that, MUDD's multiplier is "
            f"{format_multiplier(relative)} in FLOPs ({RELATIVE_VERDICT[reaches(relative, 1.5)]}). "
            "Past that step the longer run also repeats more of the small training corpus, which flattens its curve "
            "where MUDD's loss is read."
        )
    if arm is not None:
        lines += arm_lines(main_results, arm, summary)
    if depth is not None:
        shallow, deep = gain(main_results), gain(depth)
        test = difference_of_gains(shallow, deep)
        summary["depth"] = {"gain_6": gain_with_se(shallow), "gain_18": gain_with_se(deep), **test}
        lines += ["", "| depth | residual | mudd | MUDD − residual (± s.e.) | p (Welch) |", "|---|---:|---:|---:|---:|"]
        for label, res, g in (("6 layers, dim 192", main_results, shallow), ("18 layers, dim 112", depth, deep)):
            c, (value, se) = res["connections"], gain_with_se(g)
            lines.append(
                f"| {label} | {c['residual']['mean']:.4f} ± {fmt(c['residual']['std'], '.4f')} | "
                f"{c['mudd']['mean']:.4f} ± {fmt(c['mudd']['std'], '.4f')} | {value:+.4f} ± {fmt(se, '.4f')} | "
                f"{format_p(c['mudd']['welch'])} |"
            )
        lines.append(
            f"\nGain at 18 layers minus gain at 6: {test['difference']:+.4f} ± {fmt(test['se'], '.4f')} (Welch "
            f"p {format_p(test)}; negative means MUDD gains more when deeper)."
        )
    print("\n".join(lines))
    (root / "summary.json").write_text(json.dumps(finite_or_none(summary), indent=2) + "\n")


if __name__ == "__main__":
    main()
