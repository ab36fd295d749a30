"""Options declared once: a config dataclass field carries its command-line flag's help, choices and spelling.

`mudd train`, `mudd compare` and `mudd bench` generate their flags from the fields of TrainConfig,
CompareConfig and BenchConfig (`muddformer.cli.flags`), so a flag cannot drift from its option. The
choice lists that several commands share live here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")  # weights, and inference compute
LOAD_DTYPES = (*DTYPES, "auto")  # loading a folder: "auto" keeps the stored dtype
PRECISIONS = ("float32", "bfloat16")  # training compute (bfloat16: autocast, or FSDP mixed precision)
PARALLELISMS = ("none", "ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the 2-D matrices it takes, AdamW for the rest (training/optimizers.py)
DECAY_SCOPES = ("matrices", "all")  # what weight decay applies to
KV_CACHES = ("dynamic", "static")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    factory: Callable[[], Any] | None = None,
    repeat: bool = True,
    cli: bool = True,
) -> Any:
    """A dataclass field with what its flag needs. `flag` replaces the default spelling (--field-name, or
    --no-field-name for a field that defaults to True); `parse` reads the flag's text (default: the field's
    type). A list or dict field's flag is repeatable (a dict's reads KEY=VALUE items through `parse`) unless
    `repeat=False`, where `parse` reads the whole list from one value. `cli=False` for fields that a command
    fills in another way."""
    meta = {
        "help": help,
        "choices": choices,
        "flag": flag,
        "metavar": metavar,
        "parse": parse,
        "repeat": repeat,
        "cli": cli,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
