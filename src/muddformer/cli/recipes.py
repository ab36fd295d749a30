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
        per_step = f"{r.global_batch} sequences" if r.global_batch else f"{r.batch_size} x ranks x --grad-accum"
        print(
            f"{name:<24} lr={r.lr:<8g} {r.max_steps:,} steps, warmup={r.warmup:g} {r.schedule} to {r.min_lr_ratio:g}x  "
            f"{optimizer_text(r)} betas=({r.beta1:g}, {r.beta2:g}) eps={r.eps:g} wd={r.weight_decay:g} "
            f"on {r.weight_decay_on} clip={r.grad_clip:g} {r.dtype}"
        )
        print(
            f"{'':<24} batch: {per_step} of {r.seq_len or 'min(256, block_size)'} tokens a step, "
            f"{r.batch_size} per rank per micro-batch"
        )
        print(
            f"{'':<24} connection's parameters: lr x{r.generator_lr_mult:g}, betas ({r.generator_betas[0]:g}, "
            f"{r.generator_betas[1]:g}), eps {r.generator_adam_eps:g}, wd {r.generator_decay:g}"
            f"{', Muon for the matrices' if r.generator_optimizer == 'muon' else ''}; "
            f"priors lr x{r.prior_lr_mult:g}"
        )
        print(f"{'':<24} follows: {r.follows}")
        print(f"{'':<24} default of: {', '.join(presets) or '-'}")
    return 0


def optimizer_text(r) -> str:
    return "AdamW" if r.optimizer == "adamw" else f"Muon (momentum {r.muon_momentum:g}) for the blocks' matrices, AdamW"
