"""`mudd bench`: its flags and the command."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from muddformer._utils import write_json_atomic
from muddformer.cli.flags import add_flags, config_from_args
from muddformer.experiments.bench import BenchConfig, format_report, run_bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, BenchConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", help="also write the JSON report to this file")


def run(args: argparse.Namespace) -> int:
    bc = config_from_args(BenchConfig, args)
    report = run_bench(bc)
    report["bench_config"] = asdict(bc)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.out:
        write_json_atomic(args.out, report)
    return 0
