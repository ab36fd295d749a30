"""Operations per cached decode step: Transformer++ against MUDD, counted rather than timed.

    python benchmarks/decode_ops.py [--preset tiny] [--layers 4,12] [--connection mudd] [--out FILE]

At one token per step every operation costs a fixed dispatch, so on the CPU the decode ratio follows
the number of operations more than their arithmetic. The count is exact and does not depend on the
machine (it may change with the torch release: decompositions move), so it tracks decode's fixed
cost where timings on a shared machine are noise. Prints, per depth, the ATen operations of one
decode step of each model and MUDD's extra operations per layer, with the ten commonest extras.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from muddformer._utils import write_json_atomic
from muddformer.config import MuddConfig
from muddformer.inference.kv_cache import KVCache
from muddformer.model import MuddModel


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(cfg: MuddConfig, prompt_len: int = 8) -> collections.Counter[str]:
    """The operations of one cached decode step (after a prompt of prompt_len tokens), without gradients."""
    torch.manual_seed(0)
    model = MuddModel(cfg).eval()
    with torch.no_grad():
        cache = KVCache(cfg.n_layer, cfg.attn_windows)
        model(torch.randint(0, cfg.vocab_size, (1, prompt_len)), cache=cache)
        with OpCounter() as counter:
            model(torch.randint(0, cfg.vocab_size, (1, 1)), cache=cache)
    return counter.counts


def measure(preset: str, n_layer: int, connection: str) -> dict:
    base = MuddConfig.from_preset(preset).replace(n_layer=n_layer)
    baseline, ours = (
        decode_step_ops(base.replace(connection="residual")),
        decode_step_ops(base.replace(connection=connection)),
    )
    baseline_total, our_total = sum(baseline.values()), sum(ours.values())
    return {
        "n_layer": n_layer,
        "residual_ops": baseline_total,
        f"{connection}_ops": our_total,
        "extra_ops_per_layer": (our_total - baseline_total) / n_layer,
        "commonest_extra": dict((ours - baseline).most_common(10)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", default="4,12", help="comma-separated depths")
    parser.add_argument("--connection", default="mudd")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    rows = [measure(args.preset, int(n), args.connection) for n in args.layers.split(",")]
    for row in rows:
        print(
            f"{row['n_layer']:>3} layers: residual {row['residual_ops']} ops/step, {args.connection} "
            f"{row[f'{args.connection}_ops']}, extra {row['extra_ops_per_layer']:.1f} per layer; "
            f"commonest extra: {row['commonest_extra']}"
        )
    if args.out:
        write_json_atomic(args.out, {"preset": args.preset, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
