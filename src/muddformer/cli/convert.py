"""`mudd convert`: a model folder rewritten in our format or the published one."""

from __future__ import annotations

import argparse

from muddformer.adapters.folders import load_model, save_model
from muddformer.options import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="model folder to read (ours or published)")
    p.add_argument("dst", help="folder to write")
    p.add_argument("--published-format", action="store_true", help="write the layout the reference code reads")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights dtype to write (default: as stored; bfloat16 for --published-format)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split weights into shards above this size (default 5GB)")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.src, dtype="auto")
    save_model(
        model, args.dst, published_format=args.published_format, max_shard_size=args.max_shard_size, dtype=args.dtype
    )
    fmt = "published" if args.published_format else "muddformer"
    print(f"wrote {args.dst} ({fmt} format)")
    return 0
