"""The results of a compare: per-connection figures, tests, Markdown, plots (results.json, results.md, PNGs)."""

from __future__ import annotations

import json
import math
import statistics
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from muddformer._utils import atomic_path, write_json_atomic
from muddformer.data.batches import sample_batch
from muddformer.data.shards import TokenData
from muddformer.errors import InputError
from muddformer.experiments.bench import saved_activation_bytes
from muddformer.experiments.compare.runs import final_val_loss, read_records, run_folder, train_config
from muddformer.experiments.compare.settings import FORMAT, FORMAT_VERSION, CompareConfig, command_line
from muddformer.experiments.compare.stats import compute_multiplier, difference_test
from muddformer.model import MuddModel, next_token_loss
from muddformer.plotting import pyplot, save_png
from muddformer.training.config import model_config
from muddformer.training.metrics import flops_per_token


def tokens_per_second(records: list[dict]) -> float | None:
    """Training throughput of one run: logged tokens over logged time, without the first step (warm-up)."""
    logs = sorted((r for r in records if "tokens_per_s" in r), key=lambda r: r["step"])
    tokens = seconds = 0.0
    for prev, rec in zip(logs, logs[1:]):
        delta = rec["tokens"] - prev["tokens"]
        if rec["tokens_per_s"] > 0:
            tokens, seconds = tokens + delta, seconds + delta / rec["tokens_per_s"]
    if seconds > 0:
        return tokens / seconds
    return logs[0]["tokens_per_s"] if logs else None


def activation_bytes(cc: CompareConfig, connection: str, data: str, seq_len: int) -> int:
    """Bytes of activations saved for backward by one training batch (CPU, the run's dtype)."""
    cfg = model_config(train_config(cc, connection, 0, data, Path("."), progress=False))
    torch.manual_seed(0)
    model = MuddModel(cfg)
    x, y = sample_batch(TokenData(data).split("train", seq_len), seq_len, cc.batch_size, seed=0, step=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def loss() -> torch.Tensor:
        low = torch.autocast("cpu", dtype=torch.bfloat16) if cc.dtype == "bfloat16" else nullcontext()
        with low:
            logits = model(x).logits
        return next_token_loss(logits, y)

    return saved_activation_bytes(loss, params)


def val_curve(runs: list[list[dict]]) -> dict:
    """Mean, min and max validation loss over seeds at the evaluation steps all runs share."""
    per_run = [{r["step"]: r["val_loss"] for r in records if "val_loss" in r} for records in runs]
    steps = sorted(set.intersection(*(set(v) for v in per_run)))
    values = [[v[s] for v in per_run] for s in steps]
    return {
        "step": steps,
        "mean": [statistics.fmean(v) for v in values],
        "min": [min(v) for v in values],
        "max": [max(v) for v in values],
    }


def finite_records(folder: Path) -> list[dict]:
    """A run's records, refused if any validation loss is not finite: a mean, a test or a multiplier of it (the
    curves' points too) would mean nothing."""
    records = read_records(folder)
    for r in records:
        if "val_loss" in r and not math.isfinite(r["val_loss"]):
            raise InputError(
                f"run {folder} has validation loss {r['val_loss']} at step {r['step']}; compare finite runs "
                "(train that one again at a lower --lr, or leave its connection out)"
            )
    return records


def connection_results(cc: CompareConfig, connection: str, data: str, out: Path) -> dict:
    """One connection's figures from its run folders: losses over seeds, curve, speed, memory, size."""
    runs = [finite_records(run_folder(out, connection, seed)) for seed in cc.seeds]
    first = json.loads((run_folder(out, connection, cc.seeds[0]) / "run.json").read_text())
    finals = [final_val_loss(records, cc.steps) for records in runs]
    params, seq_len = first["parameters"]["total"], first["seq_len"]
    cfg = model_config(train_config(cc, connection, 0, data, out, progress=False))
    cuda_peaks = [r["max_memory_gb"] for records in runs for r in records if "max_memory_gb" in r]
    if cuda_peaks:
        memory = {"kind": "cuda_max_memory_allocated", "bytes": round(max(cuda_peaks) * 1e9)}
    else:
        memory = {"kind": "saved_activations_one_batch", "bytes": activation_bytes(cc, connection, data, seq_len)}
    speeds = [s for s in (tokens_per_second(records) for records in runs) if s is not None]
    return {
        "parameters": params,
        "seq_len": seq_len,
        "seeds": list(cc.seeds),
        "final_val_loss": finals,
        "mean": statistics.fmean(finals),
        "std": statistics.stdev(finals) if len(finals) > 1 else None,
        "tokens_per_s": statistics.fmean(speeds) if speeds else None,
        "memory": memory,
        "flops_per_token": flops_per_token(cfg, params, seq_len),
        "curve": val_curve(runs),
    }


def collect_results(cc: CompareConfig, data: str, out: Path) -> dict:
    """Every connection's figures plus the comparisons with the baseline (Welch test, compute multiplier)."""
    per = {name: connection_results(cc, name, data, out) for name in cc.connections}
    base = per[cc.baseline]
    first = json.loads((run_folder(out, cc.baseline, cc.seeds[0]) / "run.json").read_text())
    final_record = [r for r in read_records(run_folder(out, cc.baseline, cc.seeds[0])) if r.get("tokens")][-1]
    tokens_per_step = final_record["tokens"] // final_record["step"]
    curve = base["curve"]
    long = None
    if cc.baseline_steps:
        curve = val_curve([finite_records(run_folder(out, cc.baseline, seed, cc.baseline_steps)) for seed in cc.seeds])
        long = {"steps": cc.baseline_steps, "curve": curve}
    for name, r in per.items():
        r["delta_vs_baseline"] = r["mean"] - base["mean"]
        r["welch"] = difference_test(r["final_val_loss"], base["final_val_loss"]) if name != cc.baseline else None
        r["compute_multiplier"] = compute_multiplier(curve["step"], curve["mean"], r["mean"], cc.steps)
    own = per[cc.baseline]["compute_multiplier"]["multiplier"]
    for r in per.values():  # on a longer baseline's curve: relative to where the baseline's own loss lies
        m = r["compute_multiplier"]
        m["relative"] = m["multiplier"] / own if long and own and m["multiplier"] is not None else None
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "command": command_line(cc, out),
        "settings": asdict(cc),
        "baseline": cc.baseline,
        "baseline_long": long,
        "connections_order": list(cc.connections),
        "steps": cc.steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_run": tokens_per_step * cc.steps,
        "data": first["data"],
        "environment": first["environment"],
        "connections": per,
        "pairwise_welch": pairwise_welch(per, cc.connections),
    }


def pairwise_welch(per: dict, names: list[str]) -> dict:
    """Welch's test of every pair (row minus column), for orderings among the connections themselves."""
    return {
        a: {b: difference_test(per[a]["final_val_loss"], per[b]["final_val_loss"]) for b in names if b != a}
        for a in names
    }


def pairwise_table(results: dict) -> str:
    """Welch p-values and Cohen's d of every pair, with the sign of the row's mean loss minus the column's."""
    names = results["connections_order"]
    rows = ["| row − column | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            w = results["pairwise_welch"][a].get(b)
            diff = results["connections"][a]["mean"] - results["connections"][b]["mean"]
            cells.append("—" if w is None else f"{diff:+.3f} (p {format_p(w)}, d {format_d(w)})")
        rows.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def finite_or_none(obj: object) -> object:
    """JSON has no infinities or NaN: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def format_multiplier(m: dict) -> str:
    if m["multiplier"] is not None:
        return f"{m['multiplier']:.2f}×" + (f" ({m['relative']:.2f}× rel.)" if m.get("relative") is not None else "")
    if m["lower_bound"] is not None:
        return f">{m['lower_bound']:.2f}×"
    return "—" if m["upper_bound"] is None else f"<{m['upper_bound']:.2f}×"


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_p(welch: dict | None) -> str:
    if welch is None or welch["p"] is None:
        return "—"
    return f"{welch['p']:.3g}" if welch["p"] >= 1e-4 else f"{welch['p']:.1e}"


def format_d(test: dict | None) -> str:
    return "—" if test is None or test.get("d") is None else f"{test['d']:+.2f}"


def markdown_table(results: dict) -> str:
    base = results["baseline"]
    rows = [
        "| connection | params | val loss mean ± std | Δ vs baseline | p (Welch) | d (Cohen) | compute multiplier "
        "| tokens/s | memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["connections_order"]:
        r = results["connections"][name]
        std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        delta = "—" if name == base else f"{r['delta_vs_baseline']:+.4f}"
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        label = f"{name} (baseline)" if name == base else name
        rows.append(
            f"| {label} | {r['parameters']:,} | {r['mean']:.4f}{std} | {delta} | {format_p(r['welch'])} | "
            f"{format_d(r['welch'])} | "
            f"{format_multiplier(r['compute_multiplier'])} | {speed} | {format_bytes(r['memory']['bytes'])} |"
        )
    return "\n".join(rows)


def markdown_report(results: dict) -> str:
    s = results["settings"]
    kinds = {r["memory"]["kind"] for r in results["connections"].values()}
    if kinds == {"cuda_max_memory_allocated"}:
        memory_note = "peak CUDA memory allocated during training"
    elif kinds == {"saved_activations_one_batch"}:
        memory_note = "bytes of activations saved for backward by one training batch"
    else:
        memory_note = "CUDA peak where trained on CUDA, else activations saved for backward by one batch"
    lines = [
        f"# mudd compare: {s['preset']}, {len(s['seeds'])} seeds, {results['steps']} steps",
        "",
        f"{results['tokens_per_run']:,} training tokens per run ({results['tokens_per_step']:,} per step), "
        f"data {results['data']}, device {results['environment'].get('device')}.",
        "",
        markdown_table(results),
        "",
        f"- Validation loss: final mean over seeds {', '.join(map(str, s['seeds']))} (std with ddof=1), nats/token.",
        f"- Δ, p and d: against {results['baseline']}; p is the two-sided Welch t-test of the final losses, d "
        "the difference of the means in pooled standard deviations (Cohen's d).",
        f"- Compute multiplier: steps {results['baseline']} needs to reach the connection's final mean loss "
        "(its mean curve, running minimum, interpolated) divided by the connection's steps"
        + (
            f", read on the baseline's {results['baseline_long']['steps']}-step runs (their own learning-rate "
            'schedule; the baseline\'s own entry shows what that schedule alone gives, and "rel." divides by it)'
            if results.get("baseline_long")
            else ""
        )
        + "; "
        "> marks a lower bound (never reached), < an upper bound (reached before the first evaluation).",
        f"- tokens/s: mean over seeds of the training throughput; memory: {memory_note}.",
        "",
        "Every pair: mean final loss of the row minus the column's, the Welch p-value and Cohen's d.",
        "",
        pairwise_table(results),
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot_curves(results: dict, path: Path, flops: bool) -> None:
    """Mean validation curve per connection with a min-max band over seeds, against step or FLOPs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in results["connections_order"]:
        r = results["connections"][name]
        scale = results["tokens_per_step"] * r["flops_per_token"] if flops else 1.0
        x = [s * scale for s in r["curve"]["step"]]
        (line,) = ax.plot(x, r["curve"]["mean"], "o-" if len(x) < 30 else "-", markersize=3, linewidth=1.4, label=name)
        ax.fill_between(x, r["curve"]["min"], r["curve"]["max"], color=line.get_color(), alpha=0.18, linewidth=0)
    long = results.get("baseline_long")
    if long:  # the longer baseline runs the compute multiplier reads
        r = results["connections"][results["baseline"]]
        scale = results["tokens_per_step"] * r["flops_per_token"] if flops else 1.0
        ax.plot(
            [s * scale for s in long["curve"]["step"]],
            long["curve"]["mean"],
            ":",
            color="black",
            linewidth=1.2,
            label=f"{results['baseline']} ({long['steps']} steps)",
        )
    ax.set_xlabel("training FLOPs" if flops else "step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{results['settings']['preset']}: mean of {len(results['settings']['seeds'])} seeds, min-max band")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(results: dict, out: Path) -> None:
    write_json_atomic(str(out / "results.json"), finite_or_none(results))
    with atomic_path(str(out / "results.md")) as tmp:
        Path(tmp).write_text(markdown_report(results))
    plot_curves(results, out / "loss_vs_step.png", flops=False)
    plot_curves(results, out / "loss_vs_flops.png", flops=True)
