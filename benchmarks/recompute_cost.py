"""What recompute_mix costs and saves: one training step of Transformer++, MUDD and MUDD with recompute_mix.

    python benchmarks/recompute_cost.py [--preset tiny] [--layers 4,12] [--reps 7]

The three models are timed interleaved in one process (medians after warm-up, as `mudd bench` does);
saved activations are the exact bytes autograd keeps for backward. Prints one line per depth with the
step times, their ratios to Transformer++ and the saved-activation ratios.
"""

from __future__ import annotations

import argparse
import json

import torch

from muddformer.config import MuddConfig
from muddformer.experiments.bench import interleaved_medians, train_step_fn, training_activation_bytes
from muddformer.model import MuddModel

VARIANTS = {
    "residual": dict(connection="residual"),
    "mudd": dict(connection="mudd", recompute_mix=False),
    "mudd+recompute": dict(connection="mudd", recompute_mix=True),
}


def measure(preset: str, n_layer: int, reps: int, batch: int) -> dict:
    base = MuddConfig.from_preset(preset).replace(n_layer=n_layer)
    ids = torch.randint(0, base.vocab_size, (batch, base.block_size), generator=torch.Generator().manual_seed(0))
    steps, saved = {}, {}
    for name, options in VARIANTS.items():
        torch.manual_seed(0)
        model = MuddModel(base.replace(**options))
        saved[name] = training_activation_bytes(model, ids)
        steps[name] = train_step_fn(model, ids)
    times = interleaved_medians(steps, reps, 2, torch.device("cpu"))
    return {
        "n_layer": n_layer,
        "step_ms": {k: round(v * 1e3, 1) for k, v in times.items()},
        "step_ratio": {k: round(times[k] / times["residual"], 3) for k in times},
        "saved_ratio": {k: round(saved[k] / saved["residual"], 3) for k in saved},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", default="4,12")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    for n_layer in (int(n) for n in args.layers.split(",")):
        print(json.dumps(measure(args.preset, n_layer, args.reps, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
