"""One training step of Transformer++ and MUDD under execution variants, timed against Transformer++.

    python benchmarks/train_step_variants.py [--preset tiny] [--layers 4,12] [--reps 9] [--variants a,b,...]

Variants (all by default): `residual`; `mudd` (recompute_mix off); `mudd+recompute` (the default
model); and `residual/autograd-norm`, `mudd+recompute/autograd-norm`, which run the float32 RMSNorms
through torch's composite autograd instead of their own backward (layers._Float32RMSNorm). The models
run interleaved in one process; a time ratio is the median over rounds of that round's ratio to
`residual`, with its quartiles (as `mudd bench`). Saved activations are the exact bytes autograd keeps
for backward. Prints one JSON line per depth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import muddformer.layers
from muddformer.config import MuddConfig
from muddformer.experiments.bench import interleaved_times, paired_ratio, train_step_fn, training_activation_bytes
from muddformer.model import MuddModel

VARIANTS = {
    "residual": dict(connection="residual"),
    "residual/autograd-norm": dict(connection="residual"),
    "mudd": dict(connection="mudd", recompute_mix=False),
    "mudd+recompute": dict(connection="mudd", recompute_mix=True),
    "mudd+recompute/autograd-norm": dict(connection="mudd", recompute_mix=True),
}


def autograd_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@contextlib.contextmanager
def norm_backward(name: str):
    """Float32 RMSNorms through their own backward, or (a variant ending in /autograd-norm) torch's composite one."""
    if not name.endswith("/autograd-norm"):
        yield
        return
    ours = muddformer.layers.float32_rms_norm
    muddformer.layers.float32_rms_norm = autograd_rms_norm
    try:
        yield
    finally:
        muddformer.layers.float32_rms_norm = ours


def in_variant(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with norm_backward(name):
            fn()

    return run


def measure(preset: str, n_layer: int, reps: int, batch: int, variants: list[str]) -> dict:
    base = MuddConfig.from_preset(preset).replace(n_layer=n_layer)
    ids = torch.randint(0, base.vocab_size, (batch, base.block_size), generator=torch.Generator().manual_seed(0))
    steps, saved = {}, {}
    for name in variants:
        torch.manual_seed(0)
        model = MuddModel(base.replace(**VARIANTS[name]))
        with norm_backward(name):
            saved[name] = training_activation_bytes(model, ids)
        steps[name] = in_variant(name, train_step_fn(model, ids))
    times = interleaved_times(steps, reps, 2, torch.device("cpu"))
    ratios = {name: paired_ratio(times[name], times["residual"]) for name in variants}
    return {
        "n_layer": n_layer,
        "step_ms": {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()},
        "step_ratio": {k: round(r[0], 3) for k, r in ratios.items()},
        "step_ratio_iqr": {k: [round(q, 3) for q in r[1]] for k, r in ratios.items()},
        "saved_ratio": {k: round(saved[k] / saved["residual"], 3) for k in saved},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", default="4,12")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "residual" not in variants:
        parser.error(f"--variants must include residual and name only {', '.join(VARIANTS)} (got {args.variants})")
    for n_layer in (int(n) for n in args.layers.split(",")):
        print(json.dumps(measure(args.preset, n_layer, args.reps, args.batch_size, variants)), flush=True)


if __name__ == "__main__":
    main()
