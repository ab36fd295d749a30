"""Cost of the training telemetry: one training step (forward, backward, AdamW) of a preset with the
dense-weight statistics and per-group gradient norms collected, against the same step without, timed
interleaved (medians of --repeats); the trainer collects them at log steps only (every --log-every).

    python scripts/experiments/telemetry_overhead.py --preset tiny --repeats 15
"""

import argparse
import statistics
import time

import torch

from muddformer import MuddConfig, MuddModel
from muddformer.model import next_token_loss
from muddformer.telemetry import group_grad_norms
from muddformer.training.recipes import get_recipe, param_groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    model = MuddModel(MuddConfig.from_preset(args.preset))
    optimizer = torch.optim.AdamW(param_groups(model, get_recipe("cpu")), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1))

    def step(telemetry: bool) -> float:
        start = time.perf_counter()
        model.connection.telemetry = {} if telemetry else None
        next_token_loss(model(x[:, :-1]).logits, x[:, 1:]).backward()
        model.connection.telemetry = None
        if telemetry:
            group_grad_norms(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (False, True):
            times[on].append(step(on))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{args.preset}: step {off * 1e3:.1f} ms without telemetry, {on * 1e3:.1f} ms with "
        f"(ratio {on / off:.4f} on a log step)"
    )


if __name__ == "__main__":
    main()
