"""`mudd presets`: the named configurations."""

from __future__ import annotations

import argparse

from muddformer.config import MuddConfig
from muddformer.model import parameter_breakdown
from muddformer.presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass  # no options


def run(args: argparse.Namespace) -> int:
    for name in PRESETS:
        cfg = MuddConfig.from_preset(name)
        counts = parameter_breakdown(cfg)
        print(
            f"{name:<28} {cfg.block:<7} {cfg.connection:<12} L={cfg.n_layer:<3} D={cfg.dim:<5} "
            f"params={counts['total'] / 1e6:9.2f}M  dense={counts['dense_pct']:.3f}%"
        )
    return 0
