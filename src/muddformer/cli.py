"""The `mudd` command: `mudd info`, `mudd presets`, `mudd recipes`, `mudd convert`, and the lazily imported ones."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from .config import MuddConfig
from .errors import MuddError
from .model import MuddModel, count_parameters


def build_meta(cfg: MuddConfig) -> MuddModel:
    """The model on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return MuddModel(cfg)


def parameter_breakdown(cfg: MuddConfig) -> dict:
    model = build_meta(cfg)
    counts = count_parameters(model)
    blocks = sum(p.numel() for p in model.layers.parameters())
    counts.update(
        embedding=model.tok_embeddings.weight.numel(),
        head=0 if cfg.tie_word_embeddings else model.output.weight.numel(),
        blocks=blocks,
        non_embedding=counts["total"] - model.tok_embeddings.weight.numel(),
    )
    return counts


def cmd_info(args: argparse.Namespace) -> int:
    cfg = MuddConfig.load(args.model)
    counts = parameter_breakdown(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "parameters": counts}, indent=2))
        return 0
    print(f"{args.model}")
    width = max(len(k) for k in cfg.to_dict())
    for key, value in cfg.to_dict().items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'head_dim':<{width}}  {cfg.head_dim}")
    print(f"  {'ffn_widths':<{width}}  {_compact(cfg.ffn_widths)}")
    print("parameters")
    print(f"  total            {counts['total']:>15,}")
    print(f"  embedding        {counts['embedding']:>15,}")
    print(f"  blocks           {counts['blocks']:>15,}")
    print(f"  head             {counts['head']:>15,}")
    print(f"  dense connection {counts['dense']:>15,}  ({counts['dense_pct']:.3f} % of total)")
    return 0


def _compact(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else " ".join(str(v) for v in values)


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    for name in PRESETS:
        cfg = MuddConfig.from_preset(name)
        counts = parameter_breakdown(cfg)
        print(
            f"{name:<28} {cfg.block:<7} {cfg.connection:<12} L={cfg.n_layer:<3} D={cfg.dim:<5} "
            f"params={counts['total'] / 1e6:9.2f}M  dense={counts['dense_pct']:.3f}%"
        )
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .presets import PRESET_RECIPES
    from .recipes import RECIPES

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


def cmd_convert(args: argparse.Namespace) -> int:
    from . import checkpoints

    model = checkpoints.load_model(args.src, dtype="auto")
    checkpoints.save_model(
        model, args.dst, published_format=args.published_format, max_shard_size=args.max_shard_size, dtype=args.dtype
    )
    fmt = "published" if args.published_format else "muddformer"
    print(f"wrote {args.dst} ({fmt} format)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mudd", description="MUDD models: inspect, convert, train, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a model's config and parameter counts")
    p.add_argument("model", help="a preset name, a config JSON file or a model folder (ours or published)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("presets", help="list the named configurations")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("recipes", help="list the training recipes and the presets they are the default of")
    p.add_argument("--json", action="store_true", help="print every field as JSON")
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("convert", help="rewrite a model folder in our format or the published one")
    p.add_argument("src", help="model folder to read (ours or published)")
    p.add_argument("dst", help="folder to write")
    p.add_argument("--published-format", action="store_true", help="write the layout the reference code reads")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights dtype to write (default: as stored; bfloat16 for --published-format)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split weights into shards above this size (default 5GB)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("prepare", help="tokenise text or .jsonl into memory-mapped token shards")
    p.add_argument("inputs", nargs="+", help="text files, .jsonl files or folders of them")
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default text)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--val", nargs="+", help="validation files instead of a held-out share")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.set_defaults(func=cmd_prepare)
    # Subcommands whose modules pull in more (training, transformers, lm-eval) import lazily.
    for name, module, help_text in (
        ("train", "train", "train a model (bundled corpus by default); re-running resumes"),
        ("generate", "textgen", "continue prompts with a model, streaming the text"),
        ("eval", "evaluate", "perplexity on a text file and lm-evaluation-harness tasks"),
        ("bench", "bench", "speed and memory of MUDD against Transformer++ of the same shape, as ratios"),
        ("analyze", "analyze", "representation collapse, head activity and dense-weight maps of one or two models"),
        (
            "compare",
            "compare",
            "train several connections on the same data and seeds; table, plots, t-tests, compute multiplier",
        ),
    ):
        mod = importlib.import_module(f".{module}", __package__)
        p = sub.add_parser(name, help=help_text)
        getattr(mod, f"add_{name}_arguments")(p)
        p.set_defaults(func=getattr(mod, f"cmd_{name}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except MuddError as e:
        print(f"mudd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
