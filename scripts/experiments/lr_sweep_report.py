"""The peak-LR sweep (scripts/experiments/lr_sweep.sh) from its copied result files: a table of final
validation loss per connection and LR, and each connection's best LR by the rule fixed before the sweep
(the lowest final validation loss; a best LR on the edge of the grid is flagged, because the grid must then be
extended that way). Writes choice.json ({connection: best lr}) and lr_sweep.png once the grid is complete.

    python scripts/experiments/lr_sweep_report.py [docs/results/lr-sweep]
"""

import json
import sys
from pathlib import Path

from muddformer.plotting import pyplot, save_png


def final_val_loss(run: Path) -> tuple[int, float] | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [json.loads(line) for line in path.read_text().splitlines() if '"val_loss"' in line]
    return (vals[-1]["step"], vals[-1]["val_loss"]) if vals else None


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/lr-sweep")
    folders = sorted(root.glob("lr*/compare.json"), key=lambda p: float(p.parent.name[2:]))
    if not folders:
        sys.exit(f"no lr*/compare.json under {root}")
    settings = [json.loads(p.read_text())["settings"] for p in folders]
    lrs, steps, connections = [s["lr"] for s in settings], settings[0]["steps"], settings[0]["connections"]
    losses = {c: {} for c in connections}
    for lr, folder in zip(lrs, folders):
        for c in connections:
            got = final_val_loss(folder.parent / "runs" / c / "seed0")
            if got and got[0] == steps:
                losses[c][lr] = got[1]
    print("| connection | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |")
    print("|---|" + "---:|" * (len(lrs) + 1))
    choice, complete = {}, all(len(v) == len(lrs) for v in losses.values())
    for c in connections:
        best = min(losses[c], key=losses[c].get) if losses[c] else None
        cells = [(f"**{losses[c][lr]:.4f}**" if lr == best else f"{losses[c][lr]:.4f}") if lr in losses[c] else "-"
                 for lr in lrs]
        edge = " (grid edge)" if best in (lrs[0], lrs[-1]) and len(losses[c]) == len(lrs) else ""
        print(f"| {c} | " + " | ".join(cells) + f" | {best:g}{edge} |" if best else f"| {c} | " + " | ".join(cells) + " | - |")
        if best is not None:
            choice[c] = best
    if not complete:
        print(f"\ngrid incomplete: choice.json not written")
        return
    (root / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in connections:
        ax.plot(lrs, [losses[c][lr] for lr in lrs], "o-", label=c)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"validation loss at step {steps}")
    ax.set_title("peak-LR sweep, seed 0")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, root / "lr_sweep.png")


if __name__ == "__main__":
    main()
