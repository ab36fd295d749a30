"""The `mudd` command: one table of subcommands, each a thin module of this package.

Every module `muddformer.cli.<name>` holds `HELP`, `add_arguments(parser)` and `run(args) -> int`; it is
imported only when its command runs (training, transformers and lm-eval load slowly). A user mistake
(a MuddError) ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from muddformer.cli.flags import FlagValueError
from muddformer.errors import MuddError

COMMANDS = (
    ("info", "print a model's config and parameter counts"),
    ("presets", "list the named configurations"),
    ("recipes", "list the training recipes and the presets they are the default of"),
    ("convert", "rewrite a model folder in our format or the published one"),
    ("prepare", "tokenise text or .jsonl into memory-mapped token shards"),
    ("train", "train a model (bundled corpus by default); re-running resumes"),
    ("generate", "continue prompts with a model, streaming the text"),
    ("eval", "perplexity on a text file and lm-evaluation-harness tasks"),
    ("bench", "speed and memory of MUDD against Transformer++ of the same shape, as ratios"),
    ("analyze", "representation collapse, head activity and dense-weight maps of one or two models"),
    ("compare", "train several connections on the same data and seeds; table, plots, t-tests, compute multiplier"),
)


def command_module(name: str):
    return importlib.import_module(f"muddformer.cli.{name}")


def make_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the module of the command being run is imported, for its options."""
    parser = argparse.ArgumentParser(prog="mudd", description="MUDD models: inspect, convert, train, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # a flag's parser (--set, --lr-for, --connections) may raise a MuddError too
        args = make_parser(argv).parse_args(argv)
        return command_module(args.command).run(args)
    except (MuddError, FlagValueError) as e:
        print(f"mudd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
