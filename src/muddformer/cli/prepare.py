"""`mudd prepare`: text or .jsonl tokenised into memory-mapped token shards."""

from __future__ import annotations

import argparse

from muddformer.data.shards import prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text files, .jsonl files or folders of them")
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default text)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--val", nargs="+", help="validation files instead of a held-out share")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")


def run(args: argparse.Namespace) -> int:
    meta = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        field=args.field,
        val_fraction=args.val_fraction,
        val_inputs=args.val,
        shard_tokens=args.shard_tokens,
        progress=True,
    )
    splits = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in meta["splits"].items())
    print(f"{args.out}: vocabulary {meta['vocab_size']:,} ({meta['dtype']}); {splits}")
    return 0
