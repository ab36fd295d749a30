"""`mudd info`: a model's config and parameter counts."""

from __future__ import annotations

import argparse
import json

from muddformer.adapters.folders import load_config
from muddformer.model import parameter_breakdown


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset name, a config JSON file or a model folder (ours or published)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    counts = parameter_breakdown(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "parameters": counts}, indent=2))
        return 0
    print(f"{args.model}")
    width = max(len(k) for k in cfg.to_dict())
    for key, value in cfg.to_dict().items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'head_dim':<{width}}  {cfg.head_dim}")
    dense_widths = [w for w, moe in zip(cfg.ffn_widths, cfg.moe_flags) if not moe]
    if dense_widths:
        print(f"  {'ffn_widths':<{width}}  {_compact(dense_widths)}{'  (dense layers)' if any(cfg.moe_flags) else ''}")
    if any(cfg.moe_flags):
        experts = f"{cfg.moe_experts} x {cfg.moe_expert_width}, top-{cfg.moe_top_k}"
        shared = f", {cfg.moe_shared_experts} shared" if cfg.moe_shared_experts else ""
        print(f"  {'experts':<{width}}  {experts}{shared} in layers {_compact_layers(cfg.moe_flags)}")
    print("parameters")
    print(f"  total            {counts['total']:>15,}")
    if counts["active"] != counts["total"]:
        print(f"  active per token {counts['active']:>15,}  (routed experts a token is not sent to left out)")
    print(f"  embedding        {counts['embedding']:>15,}")
    print(f"  blocks           {counts['blocks']:>15,}")
    print(f"  head             {counts['head']:>15,}")
    print(f"  dense connection {counts['dense']:>15,}  ({counts['dense_pct']:.3f} % of total)")
    return 0


def _compact_layers(flags: list[bool]) -> str:
    return "all" if all(flags) else ",".join(str(layer) for layer, on in enumerate(flags) if on)


def _compact(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else " ".join(str(v) for v in values)
