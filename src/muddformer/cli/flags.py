"""Command-line flags generated from config dataclass fields (`muddformer.options.option`)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from muddformer.options import LOAD_DTYPES

T = TypeVar("T")


def _base_type(hint: Any) -> Any:
    """int for `int | None`, list for `list[str]`, the type itself otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


class FlagValueError(Exception):
    """A flag's value refused by its parser. Not a ValueError, which argparse would replace by its own
    message: `mudd` prints this one as its one-line error."""


def _reader(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` with its error message kept for `mudd`'s one-line error."""

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:  # MuddError is a ValueError
            raise FlagValueError(str(e)) from None

    read.__name__ = getattr(parse, "__name__", "value")
    return read


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """One flag per field of `cls` (those in `only`, less those in `skip`), with the field's default."""
    hints = typing.get_type_hints(cls)
    only, skip = (set(only) if only is not None else None), set(skip)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help")}
        name = meta.get("flag") or "--" + f.name.replace("_", "-")
        if kind is bool:
            if default:
                name = meta.get("flag") or "--no-" + f.name.replace("_", "-")
            kw.update(action="store_false" if default else "store_true", default=default)
        elif kind in (list, dict) and meta.get("repeat", True):
            # Repeatable; a dict field's flag reads KEY=VALUE pairs. The default stays out of argparse
            # (which would append to it): config_from_args fills it in.
            kw.update(action="append", default=None, type=_reader(meta["parse"]) if meta.get("parse") else str)
        else:
            kw.update(type=_reader(meta["parse"]) if meta.get("parse") else kind, default=default)
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        parser.add_argument(name, **kw)


def config_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The config of `cls` from the parsed flags (fields without a flag keep their defaults), plus `extra`."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if f.name in extra or (value is None and _base_type(hints[f.name]) in (list, dict)):
            continue  # not given: the field's default
        if f.name in vars(args):
            values[f.name] = dict(value) if _base_type(hints[f.name]) is dict else value
    return cls(**values, **extra)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype and --device of the commands that load a model folder (generate, eval, analyze)."""
    p.add_argument(
        "--dtype", choices=LOAD_DTYPES, default=None, help="weights dtype (default float32; auto: as stored)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
