"""`mudd compare`: its flags and the command."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

from muddformer.cli.flags import add_flags, config_from_args
from muddformer.cli.train import add_recipe_arguments
from muddformer.errors import InputError
from muddformer.experiments.compare.report import finite_or_none, markdown_table
from muddformer.experiments.compare.runner import report_compare, run_compare
from muddformer.experiments.compare.settings import (
    COMPARE_OWN,
    CompareConfig,
    parse_seed_list,
)
from muddformer.training.recipes import OVERRIDABLE


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, CompareConfig)
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", dest="seed_count", type=int, default=3, help="train seeds 0..S-1 of each connection (default 3)"
    )
    seeds.add_argument("--seed-list", help="explicit comma-separated seeds instead, e.g. 0,1,2")
    p.add_argument("--out", help="compare folder (default runs/compare-PRESET); re-running resumes it")
    add_recipe_arguments(p, skip=COMPARE_OWN)
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: recompute the results of --out from its compare.json and each run's "
        "metrics.jsonl and run.json (no checkpoints needed), e.g. a folder under docs/results",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bars")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")


def compare_config(args: argparse.Namespace) -> CompareConfig:
    if args.seed_list is not None:
        seeds = parse_seed_list(args.seed_list)
    elif args.seed_count < 1:
        raise InputError(f"--seeds must be at least 1, got {args.seed_count}")
    else:
        seeds = list(range(args.seed_count))
    overrides = {k: getattr(args, k) for k in OVERRIDABLE if k not in COMPARE_OWN and getattr(args, k) is not None}
    return config_from_args(CompareConfig, args, seeds=seeds, recipe_overrides=overrides)


def run(args: argparse.Namespace) -> int:
    cc = compare_config(args)
    out = Path(args.out or f"runs/compare-{cc.preset}")
    # With --json, stdout carries the JSON alone: progress lines go to stderr.
    with redirect_stdout(sys.stderr) if args.json else nullcontext():
        results = report_compare(out) if args.report else run_compare(cc, out, progress=args.progress)
    if args.json:
        print(json.dumps(finite_or_none(results), indent=2))
    else:
        print(markdown_table(results))
        print(
            f"{results['runs']['trained']} runs trained, {results['runs']['skipped']} skipped; "
            f"results in {out / 'results.md'}, {out / 'results.json'}, {out / 'loss_vs_step.png'}, "
            f"{out / 'loss_vs_flops.png'}"
        )
    return 0
