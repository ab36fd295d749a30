"""The peak-LR sweep (scripts/experiments/lr_sweep.sh) from its copied result files: a table of final
validation loss per connection and LR, and each connection's best LR by the rule fixed before the sweep: the
lowest final validation loss, and where that is the smallest or largest LR the connection was trained at, the
grid is extended by a factor of 2 that way (to at most 2.5e-4 .. 3.2e-2) until the best LR is inside.

    python scripts/experiments/lr_sweep_report.py [DIR]              table; choice.json and lr_sweep.png once decided
    python scripts/experiments/lr_sweep_report.py DIR --extensions   the runs still needed: lines "LR conn1,conn2"
"""

import json
import sys
from pathlib import Path

from muddformer.experiments.compare.runs import final_val_loss, read_records

GRID = (1e-3, 2e-3, 4e-3, 8e-3)
LIMITS = (2.5e-4, 3.2e-2)


def read_sweep(root: Path) -> tuple[list[str], dict[str, dict[float, float]]]:
    """Connections in the order of the first folder and {connection: {lr: final val loss}} of finished runs."""
    order, losses = [], {}
    for path in sorted(root.glob("lr*/compare.json"), key=lambda p: float(p.parent.name[2:])):
        s = json.loads(path.read_text())["settings"]
        for c in s["connections"]:
            if c not in losses:
                order.append(c)
                losses[c] = {}
            got = final_val_loss(read_records(path.parent / "runs" / c / "seed0"), s["steps"])
            if got is not None:
                losses[c][s["lr"]] = got
        if len(s["connections"]) == len(order):  # a folder with every connection: its order for the table
            order = list(s["connections"])
    return order, losses


def needed(losses: dict[str, dict[float, float]]) -> dict[float, list[str]]:
    """{lr: connections} still to train: the grid, then one step past a best LR on the edge."""
    out: dict[float, list[str]] = {}
    for c, by_lr in losses.items():
        missing = [lr for lr in GRID if lr not in by_lr]
        if not missing:
            best = min(by_lr, key=by_lr.get)
            step = best / 2 if best == min(by_lr) else best * 2 if best == max(by_lr) else None
            if step is not None and LIMITS[0] <= step <= LIMITS[1]:
                missing = [step]
        for lr in missing:
            out.setdefault(lr, []).append(c)
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/lr-sweep")
    order, losses = read_sweep(root)
    todo = needed(losses)
    if "--extensions" in sys.argv:
        for lr, names in sorted(todo.items()):
            if lr not in GRID:
                print(f"{lr:g} {','.join(names)}")
        return
    lrs = sorted({lr for by_lr in losses.values() for lr in by_lr} | set(GRID))
    print("| connection | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |")
    print("|---|" + "---:|" * (len(lrs) + 1))
    for c in order:
        best = min(losses[c], key=losses[c].get) if losses[c] else None
        cells = [
            ("**{:.4f}**" if lr == best else "{:.4f}").format(losses[c][lr]) if lr in losses[c] else "-" for lr in lrs
        ]
        status = "" if c not in sum(todo.values(), []) else " (not decided)"
        print(f"| {c} | " + " | ".join(cells) + f" | {f'{best:g}' if best else '-'}{status} |")
    if todo:
        print("\nstill to run: " + "; ".join(f"lr {lr:g}: {', '.join(n)}" for lr, n in sorted(todo.items())))
        return
    choice = {c: min(losses[c], key=losses[c].get) for c in order}
    (root / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
    from muddformer.plotting import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in order:
        xs = sorted(losses[c])
        ax.plot(xs, [losses[c][lr] for lr in xs], "o-", label=c)
    ax.set_xscale("log", base=2)
    tried = sorted({lr for c in order for lr in losses[c]})
    ax.set_xticks(tried, labels=[f"{lr:g}" for lr in tried])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("peak-LR sweep, seed 0")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, root / "lr_sweep.png")


if __name__ == "__main__":
    main()
