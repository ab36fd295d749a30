"""How MUDD's cost ratios grow with depth: `mudd bench` at several layer counts of one width.

    python benchmarks/depth_scaling.py OUT [--preset tiny] [--depths 4,12,24] [--reps 5] [--compile]

The depth mix does O(L^2) work in all (each of L aggregations reads up to L+1 states), the rest of the
model O(L): the ratios to Transformer++ at each depth show whether that term shows. Per depth: the train
step, saved-activation and decode ratios with recompute_mix off (the block inputs kept, as in
docs/benchmarks.md run 8), the saved-activation ratio with it on (the default), and the mix's speedup over
the naive loop. Writes OUT/depth.json, OUT/depth.md and OUT/depth.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from muddformer.config import MuddConfig
from muddformer.experiments.bench import BenchConfig, build, run_bench, training_activation_bytes
from muddformer.plotting import pyplot, save_png

RATIOS = ("train_step_ratio", "memory_ratio", "recompute_memory_ratio", "decode_ratio", "mix_speedup")


def recompute_memory_ratio(bc: BenchConfig) -> float:
    """Saved activations of MUDD with recompute_mix over Transformer++'s (exact bytes, no timing)."""
    cfg = MuddConfig.from_preset(bc.preset).replace(**bc.overrides)
    seq = bc.seq_len or cfg.block_size
    ids = torch.randint(0, cfg.vocab_size, (bc.batch_size, seq), generator=torch.Generator().manual_seed(0))
    saved = {
        name: training_activation_bytes(
            build(cfg.replace(connection=name, recompute_mix=True), bc, torch.device("cpu")), ids
        )
        for name in ("residual", "mudd")
    }
    return saved["mudd"] / saved["residual"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--depths", default="4,12,24")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        bc = BenchConfig(
            preset=args.preset,
            reps=args.reps,
            batch_size=args.batch_size,
            compile=args.compile,
            overrides={"n_layer": depth, "recompute_mix": False},
            decode_tokens=32,
        )
        report = run_bench(bc)
        row = {"n_layer": depth, **{k: report[k] for k in RATIOS if k in report}}
        row["recompute_memory_ratio"] = recompute_memory_ratio(bc)
        row["environment"] = report["environment"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "environment"}), flush=True)
        torch.compiler.reset()
    (args.out / "depth.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| layers | " + " | ".join(RATIOS) + " |", "|---" * (len(RATIOS) + 1) + "|"]
    lines += [f"| {r['n_layer']} | " + " | ".join(f"{r[k]:.3f}" for k in RATIOS) + " |" for r in rows]
    (args.out / "depth.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in RATIOS:
        ax.plot([r["n_layer"] for r in rows], [r[key] for r in rows], marker="o", label=key)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("layers")
    ax.set_ylabel("MUDD / Transformer++ (mix: naive / ours)")
    ax.set_title(f"{args.preset} width, {'compiled' if args.compile else 'eager'}")
    ax.legend(fontsize=7)
    save_png(fig, args.out / "depth.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
