"""`mudd prepare`: text, .jsonl or .parquet files (plain or compressed) tokenised into memory-mapped token shards."""

from __future__ import annotations

import argparse

from muddformer.data.shards import TOKENIZER_SAMPLE_CHARS, prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        help=".txt/.md (a document each), .jsonl or .parquet files, optionally .gz/.bz2/.xz/.zst; or folders of them",
    )
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument(
        "--field", default="text", help="text field of .jsonl records, column of .parquet files (default text)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of the documents held out (from the end) for validation"
    )
    p.add_argument("--val-documents", type=int, help="hold out this many documents from the end instead of a share")
    p.add_argument("--val", nargs="+", help="validation files instead of held-out documents")
    p.add_argument(
        "--tokenizer-sample-chars",
        type=int,
        default=TOKENIZER_SAMPLE_CHARS,
        help="train the BPE on the first training documents up to this many characters (default 1e9)",
    )
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
        val_documents=args.val_documents,
        tokenizer_sample_chars=args.tokenizer_sample_chars,
    )
    splits = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in meta["splits"].items())
    print(f"{args.out}: vocabulary {meta['vocab_size']:,} ({meta['dtype']}); {splits}")
    return 0
