"""`mudd train`: the training loop, from one CPU to many GPUs under torchrun.

    mudd train --preset tiny --max-steps 30                      # bundled corpus, CPU
    torchrun --nproc_per_node=8 -m muddformer train --preset muddformer-405m --data DIR --parallel fsdp

How it trains comes from a recipe (`mudd recipes`): the preset's default, or --recipe NAME, with any of
its fields overridden by a flag. Re-running the same command resumes from the newest readable
checkpoint in --out. The flags are TrainConfig's fields (muddformer.training.config).
"""

from __future__ import annotations

import argparse

from muddformer.cli.flags import add_flags, config_from_args
from muddformer.training.config import TrainConfig
from muddformer.training.recipes import OVERRIDABLE
from muddformer.training.trainer import train

RECIPE_FLAGS = ("recipe", *OVERRIDABLE)


def add_recipe_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--recipe and one override flag per Recipe field (default None: the recipe's value). `mudd compare`
    shares them, less the fields in `skip` that it declares itself."""
    group = p.add_argument_group(
        "recipe",
        "how the run trains: a named recipe (`mudd recipes`; default: the preset's) and overrides of its fields",
    )
    add_flags(group, TrainConfig, only=RECIPE_FLAGS, skip=skip)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, TrainConfig, skip=RECIPE_FLAGS)
    add_recipe_arguments(p)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(TrainConfig, args))
    return 0
