"""Summary of scripts/experiments/stability_depth.sh from the copied result files: per variant and seed the
final validation loss, the largest gradient norm and its step, the steps the trainer's spike watch flags;
a plot of the training-loss and gradient-norm curves.

    python scripts/experiments/stability_depth_report.py [docs/results/stability-depth]
"""

import json
import sys
from pathlib import Path

from muddformer.plotting import pyplot, save_png
from muddformer.telemetry import SpikeWatch

VARIANTS = ["residual", "mudd", "mudd-prepost", "mudd-cap10", "mudd-telemetry"]  # the last: later code, see the doc


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/stability-depth")
    rows, curves = [], {}
    for variant in VARIANTS:
        for run in sorted((root / variant).glob("seed*")):
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if "loss" in r]
            watch = SpikeWatch()
            flagged = [r["step"] for r in train if watch.check(r["step"], r)]
            peak = max(train, key=lambda r: r["grad_norm"])
            vals = [r for r in records if "val_loss" in r]
            rows.append(
                {
                    "variant": variant,
                    "seed": run.name,
                    "final_val_loss": vals[-1]["val_loss"],
                    "val_step": vals[-1]["step"],
                    "max_grad_norm": peak["grad_norm"],
                    "at_step": peak["step"],
                    "spike_steps": flagged,
                }
            )
            curves[(variant, run.name)] = train
    print("| variant | seed | val loss (step) | max grad norm (step) | steps flagged (first 5) |")
    print("|---|---|---|---|---|")
    for r in rows:
        flagged = r["spike_steps"]
        first = ", ".join(map(str, flagged[:5])) + (", ..." if len(flagged) > 5 else "")
        print(
            f"| {r['variant']} | {r['seed']} | {r['final_val_loss']:.3f} ({r['val_step']}) | "
            f"{r['max_grad_norm']:.3g} ({r['at_step']}) | {f'{len(flagged)} ({first})' if flagged else '-'} |"
        )
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    plt = pyplot()
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(14, 4.5), layout="constrained")
    colors = dict(zip(VARIANTS, ["black", "tab:red", "tab:blue", "tab:green", "tab:purple"]))
    for (variant, seed), train in curves.items():
        style = "-" if seed == "seed0" else "--"
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], style, color=colors[variant], lw=0.8, label=f"{variant} {seed}")
        ax_grad.plot(steps, [r["grad_norm"] for r in train], style, color=colors[variant], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="training loss", title="24 layers x 128: training loss", ylim=(4.5, 10))
    ax_grad.set(xlabel="step", ylabel="gradient norm (before clipping)", yscale="log", title="gradient norm")
    ax_loss.legend(fontsize="x-small", ncol=2)
    save_png(fig, root / "curves.png")


if __name__ == "__main__":
    main()
