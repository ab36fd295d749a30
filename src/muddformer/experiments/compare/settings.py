"""What a compare computes: its options (CompareConfig), their checks, and DIR/compare.json."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from muddformer._utils import LOCK_NAME, write_json_atomic
from muddformer.config import CONNECTIONS
from muddformer.errors import InputError
from muddformer.options import PRECISIONS, option

DEFAULT_CONNECTIONS = ("residual", "denseformer", "ddformer", "mudd", "hc", "mhc", "attnres")


SETTINGS_NAME = "compare.json"


COMPARE_OWN = ("batch_size", "seq_len", "lr", "dtype")  # recipe fields compare declares itself


EXTENSIBLE = ("baseline_steps",)  # settings a later command may change: they add runs, never alter finished ones


FORMAT = "mudd-compare"


FORMAT_VERSION = 1


def parse_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise InputError(f"{option} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))  # drop repeats, keep the order


def parse_seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in parse_list(text, "--seed-list")]
    except ValueError:
        raise InputError(f"--seed-list {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise InputError(f"--seed-list {text!r} holds a negative seed")
    return seeds


def parse_lr_item(item: str) -> tuple[str, float]:
    name, _, value = item.partition("=")
    try:
        lr = float(value)
    except ValueError:
        raise InputError(f"--lr-for {item!r} must look like CONNECTION=LR, e.g. mudd=1e-3") from None
    if not lr > 0:
        raise InputError(f"--lr-for {item!r}: the learning rate must be positive")
    return name.strip(), lr


@dataclass
class CompareConfig:
    """Every option that decides what the runs compute (stored in DIR/compare.json); the fields with a flag
    are `mudd compare`'s flags (muddformer.options), the recipe overrides are `mudd train`'s."""

    preset: str = option("tiny", help="model shape shared by every connection (default tiny)")
    init_from: str | None = option(
        None,
        help="start every run from a model folder (ours or a transformers Llama/Qwen/GPT-NeoX one); each "
        "connection is added at the identity, so all runs start from the same function",
    )
    connections: list[str] = option(
        factory=lambda: list(DEFAULT_CONNECTIONS),
        repeat=False,
        parse=lambda text: parse_list(text, "--connections"),
        help=f"comma-separated connections (default {','.join(DEFAULT_CONNECTIONS)}); "
        f"choices: {', '.join(CONNECTIONS)}",
    )
    seeds: list[int] = option(factory=lambda: [0, 1, 2], cli=False)  # --seeds N or --seed-list (cli/compare.py)
    steps: int = option(450, help="optimizer steps of every run (default 450)")
    data: str | None = option(
        None, help="prepared data folder (`mudd prepare`); default: the bundled Shakespeare corpus"
    )
    batch_size: int = option(
        8, help="sequences per micro-batch (replaces the recipe's; its --global-batch sets the accumulation)"
    )
    seq_len: int | None = option(None, help="tokens per sequence (default min(256, block_size))")
    lr: float | None = option(None, help="peak learning rate (default as `mudd train`)")
    lr_for: dict[str, float] = option(  # per-connection peak LR (each at its own best)
        factory=dict,
        parse=parse_lr_item,
        metavar="CONNECTION=LR",
        help="peak learning rate of one connection, e.g. mudd=1e-3 (repeatable; the others take --lr)",
    )
    recipe: str | None = option(None, cli=False)  # None: the preset's (the --recipe flag of `mudd train`)
    # Other Recipe fields, e.g. {"generator_lr_mult": 0.25} (the recipe flags of `mudd train`).
    recipe_overrides: dict = option(factory=dict, cli=False)
    eval_every: int | None = option(None, help="steps between validation points (default max(1, steps // 10))")
    eval_windows: int = option(64, help="validation sequences per evaluation")
    set: list[str] = option(
        factory=list, metavar="FIELD=VALUE", help="MuddConfig override for every connection (repeatable)"
    )
    device: str = option("auto", help="auto, cpu or cuda")
    compile: bool = option(False, help="torch.compile every model")
    dtype: str = option("float32", choices=PRECISIONS, help="compute dtype")
    baseline: str = option("residual", help="connection the others are tested against (default residual)")
    # Longer baseline runs (same seeds) whose curve the compute multiplier reads: a connection that
    # beats the baseline's equal-steps run can then be placed on a curve that reaches its loss.
    baseline_steps: int | None = option(
        None,
        help="also train the baseline this many steps (same seeds); the compute multiplier reads that "
        "longer curve (added to an existing compare without retraining the rest)",
    )

    def resolved(self) -> CompareConfig:
        """A copy with eval_every filled in."""
        every = max(1, self.steps // 10) if self.eval_every is None else self.eval_every
        return CompareConfig(**{**asdict(self), "eval_every": every})


def check_options(cc: CompareConfig) -> None:
    """The options compare itself owns; the training options are checked by train's own validation."""
    for name in cc.connections:
        if name not in CONNECTIONS:
            raise InputError(f"unknown connection {name!r} in --connections; choose from {', '.join(CONNECTIONS)}")
    for name in cc.lr_for:
        if name not in cc.connections:
            raise InputError(f"--lr-for names {name!r}, which is not among --connections {','.join(cc.connections)}")
    if cc.baseline not in cc.connections:
        raise InputError(f"--baseline {cc.baseline!r} is not among --connections {','.join(cc.connections)}; add it")
    if not cc.seeds:
        raise InputError("--seeds must be at least 1")
    if cc.steps <= 0:
        raise InputError(f"--steps must be positive, got {cc.steps}")
    if cc.baseline_steps is not None and cc.baseline_steps <= cc.steps:
        raise InputError(
            f"--baseline-steps {cc.baseline_steps} must exceed --steps {cc.steps} (it extends the "
            "baseline's curve for the compute multiplier)"
        )


def settings_record(cc: CompareConfig) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "settings": asdict(cc)}


def read_settings(path: Path, fix: str) -> dict:
    """The settings stored in a compare.json, a setting added since then at its default; `fix` ends the error."""
    try:
        stored = json.loads(path.read_text())["settings"]
        return {**asdict(CompareConfig()), **stored}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} is unreadable ({e}); {fix}") from None


def check_or_write_settings(out: Path, cc: CompareConfig) -> None:
    """Write DIR/compare.json for a new compare; refuse a DIR that holds another compare or anything else."""
    path = out / SETTINGS_NAME
    if path.is_file():
        stored = read_settings(path, "remove it or use another --out")
        current = asdict(cc)
        diffs = [
            f"{k} {current.get(k)!r} here, {stored.get(k)!r} there"
            for k in sorted(set(current) | set(stored))
            if current.get(k) != stored.get(k) and k not in EXTENSIBLE
        ]
        if diffs:
            raise InputError(
                f"{out} holds a compare with different settings ({'; '.join(diffs)}); "
                "use another --out or the same options"
            )
        if any(current.get(k) != stored.get(k) for k in EXTENSIBLE):  # only adds runs: record the new value
            write_json_atomic(str(path), settings_record(cc))
        return
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_NAME for p in out.iterdir())):
        raise InputError(f"{out} exists and holds no {SETTINGS_NAME}; use a new or empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), settings_record(cc))


def command_line(cc: CompareConfig, out: Path) -> str:
    """The command that reproduces (or resumes) this compare."""
    args = ["mudd", "compare", "--preset", cc.preset, "--connections", ",".join(cc.connections)]
    if cc.seeds == list(range(len(cc.seeds))):
        args += ["--seeds", str(len(cc.seeds))]
    else:
        args += ["--seed-list", ",".join(map(str, cc.seeds))]
    args += ["--steps", str(cc.steps), "--out", str(out)]
    if cc.init_from:
        args += ["--init-from", cc.init_from]
    if cc.data:
        args += ["--data", cc.data]
    args += ["--batch-size", str(cc.batch_size)]
    if cc.seq_len:
        args += ["--seq-len", str(cc.seq_len)]
    if cc.lr is not None:
        args += ["--lr", repr(cc.lr)]
    for name, lr in cc.lr_for.items():
        args += ["--lr-for", f"{name}={lr!r}"]
    if cc.recipe:
        args += ["--recipe", cc.recipe]
    for name, value in cc.recipe_overrides.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    args += ["--eval-every", str(cc.eval_every), "--eval-windows", str(cc.eval_windows)]
    for item in cc.set:
        args += ["--set", item]
    args += ["--device", cc.device, "--dtype", cc.dtype, "--baseline", cc.baseline]
    if cc.baseline_steps:
        args += ["--baseline-steps", str(cc.baseline_steps)]
    if cc.compile:
        args.append("--compile")
    return shlex.join(args)


def stored_settings(out: Path) -> CompareConfig:
    """The CompareConfig recorded in DIR/compare.json (settings added since then take their defaults)."""
    path = out / SETTINGS_NAME
    if not path.is_file():
        raise InputError(f"{out} holds no {SETTINGS_NAME}: --report reads a folder written by `mudd compare`")
    stored = read_settings(path, "restore it from the compare that wrote it")
    try:
        return CompareConfig(**stored)
    except TypeError as e:
        raise InputError(f"{path} is unreadable ({e}); restore it from the compare that wrote it") from None
