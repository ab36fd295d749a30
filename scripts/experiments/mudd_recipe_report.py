"""The MUDD recipe arm's table and decision from docs/results/mudd-recipe/<variant>/results.json.

Rule (scripts/experiments/mudd_recipe_arm.sh, fixed before the runs): the variant with the lowest mean final
validation loss over the two seeds becomes the default if it beats `default` by at least 0.01.
    python scripts/experiments/mudd_recipe_report.py [DOCS_FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOCS = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/mudd-recipe")
VARIANTS = ("default", "gen-lr-0.25", "prepost", "cap10")
MARGIN = 0.01


def finals(variant: str) -> list[float] | None:
    path = DOCS / variant / "results.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["connections"]["mudd"]["final_val_loss"]


def main() -> None:
    rows = {v: finals(v) for v in VARIANTS}
    print("| variant | seed 0 | seed 1 | mean |\n|---|---:|---:|---:|")
    for variant, values in rows.items():
        cells = [f"{x:.4f}" for x in values] + [f"{sum(values) / len(values):.4f}"] if values else ["-"] * 3
        print(f"| {variant} | " + " | ".join(cells) + " |")
    if any(v is None for v in rows.values()):
        print("\nundecided: not every variant has finished")
        return
    means = {v: sum(x) / len(x) for v, x in rows.items()}
    best = min(means, key=means.__getitem__)
    wins = best != "default" and means["default"] - means[best] >= MARGIN
    chosen = best if wins else "default"
    print(f"\ndecided: {chosen} (lowest mean: {best} {means[best]:.4f}; default {means['default']:.4f})")


if __name__ == "__main__":
    main()
