"""`mudd recipes`: the training recipes."""

from __future__ import annotations

import argparse
import dataclasses
import json

from muddformer.presets import PRESET_RECIPES
from muddformer.training.recipes import RECIPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print every field as JSON")


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({name: dataclasses.asdict(r) for name, r in RECIPES.items()}, indent=2))
        return 0
    for name, r in RECIPES.items():
        presets = [p for p, recipe in PRESET_RECIPES.items() if recipe == name]
        print(
            f"{name:<24} lr={r.lr:<8g} warmup={r.warmup:g} {r.schedule} to {r.min_lr_ratio:g}x  "
            f"betas=({r.beta1:g}, {r.beta2:g}) wd={r.weight_decay:g} clip={r.grad_clip:g} "
            f"batch={r.batch_size}x{r.seq_len or 'auto'} {r.dtype} generator lr x{r.generator_lr_mult:g}"
        )
        print(f"{'':<24} follows: {r.follows}")
        print(f"{'':<24} default of: {', '.join(presets) or '-'}")
    return 0
