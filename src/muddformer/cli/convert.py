"""`mudd convert`: a model folder rewritten in our format or the published one; a transformers checkpoint
(Llama, Qwen2, Qwen3, GPT-NeoX/Pythia) converted into our model, with MUDD or any connection added."""

from __future__ import annotations

import argparse
import glob
import os
import shutil

from muddformer.adapters.folders import GENERATION_CONFIG_NAME, load_model, read_folder_raw_config, save_model
from muddformer.adapters.transformers_checkpoints import (
    FAMILIES,
    is_transformers_checkpoint,
    load_transformers_model,
    save_transformers_model,
)
from muddformer.config import CONNECTIONS
from muddformer.errors import InputError
from muddformer.options import DTYPES
from muddformer.training.config import parse_set

# Files that travel with the weights: the tokenizer's, and the generation settings (their end-of-text ids included).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    GENERATION_CONFIG_NAME,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help=f"model folder to read: ours, published, or a transformers {'/'.join(FAMILIES)} one")
    p.add_argument("dst", help="folder to write")
    p.add_argument("--published-format", action="store_true", help="write the layout the reference code reads")
    p.add_argument(
        "--transformers-format",
        action="store_true",
        help="write a residual model as the transformers checkpoint (Llama, Qwen2, Qwen3 or GPT-NeoX) that "
        "AutoModelForCausalLM loads without muddformer",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights dtype to write (default: as stored; bfloat16 for --published-format, float32 for "
        "--transformers-format)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split weights into shards above this size (default 5GB)")
    p.add_argument(
        "--connection",
        choices=CONNECTIONS,
        default=None,
        help="transformers checkpoints: the connection to add (default residual); it starts at the identity, "
        "so the converted model computes the original's logits (AttnRes excepted: it starts as a mean of its sources)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="transformers checkpoints: MuddConfig fields of the added connection, e.g. dense_layers=-2",
    )


def run(args: argparse.Namespace) -> int:
    raw = read_folder_raw_config(args.src)
    overrides = parse_set(args.set)
    if args.connection:
        overrides["connection"] = args.connection
    if args.published_format and args.transformers_format:
        raise InputError("--published-format and --transformers-format exclude each other; pass one")
    if is_transformers_checkpoint(raw):
        if args.published_format or args.transformers_format:
            raise InputError(
                f"{args.src} is a transformers checkpoint, which converts to our format; drop the format flag "
                "(or convert the result again)"
            )
        model = load_transformers_model(args.src, **overrides)
        stored = raw.get("dtype") or raw.get("torch_dtype")  # transformers names it `dtype` since 5.0
        dtype = args.dtype or (stored if stored in DTYPES else None)
        save_model(model, args.dst, max_shard_size=args.max_shard_size, dtype=dtype)
        copy_side_files(args.src, args.dst)
        print(f"wrote {args.dst} ({raw['model_type']} -> muddformer, connection {model.config.connection})")
        if model.config.connection in ("attnres", "attnres-block"):
            print(
                "note: AttnRes starts as a mean of its sources, so the converted model does not compute the "
                "original's logits until it is trained"
            )
        return 0
    if overrides:
        raise InputError("--connection and --set apply to transformers checkpoints; this folder is a MUDD model")
    model = load_model(args.src, dtype="auto")
    if args.transformers_format:
        family = save_transformers_model(model, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype)
        fmt = f"transformers {family}"
    else:
        save_model(
            model,
            args.dst,
            published_format=args.published_format,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
        )
        fmt = "published" if args.published_format else "muddformer"
    copy_side_files(args.src, args.dst)
    print(f"wrote {args.dst} ({fmt} format)")
    return 0


def copy_side_files(src: str, dst: str) -> None:
    """The tokenizer and generation files beside the weights, so that the new folder tokenizes and stops as the
    original did."""
    for name in SIDE_FILES:
        for path in glob.glob(os.path.join(src, name)):
            shutil.copy(path, dst)
