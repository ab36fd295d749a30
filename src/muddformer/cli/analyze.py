"""`mudd analyze`: its flags and the command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from muddformer._utils import resolve_device, write_json_atomic
from muddformer.adapters.folders import load_model, read_folder_config
from muddformer.cli.flags import add_load_arguments
from muddformer.data.tokenizers import load_tokenizer, tokenizer_file
from muddformer.errors import InputError
from muddformer.experiments.analyze.plots import plot_telemetry, write_plots
from muddformer.experiments.analyze.probes import DEFAULT_SINK_TOKENS, analyze_model
from muddformer.experiments.analyze.tokens import cut_sequences, parse_sink_tokens, sink_tokens, text_tokens
from muddformer.training.metrics import read_metrics


def analyze_folder(folder: str, args: argparse.Namespace, device: str) -> dict:
    """Load one model folder, read its text and measure it; the report with the folder and text added."""
    cfg = read_folder_config(folder)
    tok_path = tokenizer_file(folder, args.tokenizer)
    tok = load_tokenizer(tok_path)
    seq_len = args.seq_len or min(cfg.block_size, 512)
    if not args.sink_positions < seq_len <= cfg.block_size:
        raise InputError(
            f"--seq-len {seq_len} must be above --sink-positions ({args.sink_positions}) and at most "
            f"the context length block_size={cfg.block_size} of {folder}"
        )
    ids, source = text_tokens(tok, tok_path, args.text, args.max_tokens, folder)
    sequences = cut_sequences(ids, seq_len, args.sink_positions)
    sinks = sink_tokens(tok, tok_path, parse_sink_tokens(args.sink_tokens))
    model = load_model(folder, dtype=args.dtype, device=device)
    batches = (sequences[i : i + args.batch_size] for i in range(0, len(sequences), args.batch_size))
    report = analyze_model(model, batches, sinks.values(), args.sink_positions)
    return {
        "folder": str(folder),
        "text": source,
        "seq_len": sequences.shape[1],
        "sink_tokens": [{"text": s, "id": i} for s, i in sinks.items()],
        **report,
    }


def check_arguments(args: argparse.Namespace) -> None:
    if args.max_tokens < 1 or args.batch_size < 1 or args.sink_positions < 0:
        raise InputError("--max-tokens and --batch-size must be at least 1 and --sink-positions at least 0")
    if args.seq_len is not None and args.seq_len < 1:
        raise InputError(f"--seq-len must be at least 1, got {args.seq_len}")
    if args.model is None and args.run is None:
        raise InputError("nothing to analyze: give a model folder, or --run RUN_FOLDER for a run's telemetry")
    for folder in filter(None, (args.model, args.compare)):
        if not Path(folder).is_dir():
            raise InputError(f"model folder {folder} does not exist")


def run_telemetry(run: Path, out: Path) -> dict:
    """telemetry.png of a training run folder and, per block, the largest |dense weight| it reached."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"--run {run} is not a run folder (no metrics.jsonl); pass the --out folder of `mudd train`")
    records = read_metrics(path)
    if not any(k.startswith("grad_norm/") for r in records for k in r):
        raise InputError(
            f"--run {run} has no telemetry in metrics.jsonl (trained with --no-telemetry or by an "
            f"older muddformer); train it again to record it"
        )
    plot_telemetry(records, out / "telemetry.png", f"Training telemetry of {run}")
    peaks: dict[str, dict] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("dense/") and key.endswith("/max_abs"):
                layer = key.split("/")[1]
                if value > peaks.get(layer, {}).get("max_abs", -1.0):
                    peaks[layer] = {"max_abs": value, "step": r["step"], "stream": key.split("/")[2]}
    return {"run": str(run), "steps": max(r["step"] for r in records), "largest_dense_weight_per_block": peaks}


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    out = Path(args.out)
    if args.model is None:  # a run's telemetry only
        out.mkdir(parents=True, exist_ok=True)
        result = {"telemetry": run_telemetry(Path(args.run), out), "plots": ["telemetry.png"]}
        write_json_atomic(str(out / "analysis.json"), result)
        print(json.dumps(result, indent=2))
        return 0
    device = resolve_device(args.device)
    models = [analyze_folder(f, args, device) for f in filter(None, (args.model, args.compare))]
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "settings": {
            "max_tokens": args.max_tokens,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "sink_positions": args.sink_positions,
            "sink_tokens": parse_sink_tokens(args.sink_tokens),
            "device": device,
            "dtype": args.dtype or "float32",
        },
        "models": models,
    }
    result["plots"] = write_plots(models, out)
    if args.run:
        result["telemetry"] = run_telemetry(Path(args.run), out)
        result["plots"].append("telemetry.png")
    write_json_atomic(str(out / "analysis.json"), result)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    print(f"wrote {out / 'analysis.json'} and {', '.join(result['plots'])}", file=sys.stderr)
    return 0


def summary(result: dict) -> str:
    """Per model and layer: head activation ratio and cosine similarity of adjacent block inputs."""
    lines = []
    for m in result["models"]:
        lines.append(f"{m['folder']}: {m['connection']}, {m['n_layer']} layers, {m['tokens']:,} tokens ({m['text']})")
        streams = m["cosine_similarity"]["streams"]
        lines.append("  layer  active heads  " + "  ".join(f"cos {s} (l, l+1)" for s in streams))
        for layer, ratio in enumerate(m["head_activation"]["ratio"]):
            cos = [m["cosine_similarity"]["mean"][s][layer] if layer < m["n_layer"] - 1 else None for s in streams]
            cells = "  ".join(f"{'-' if c is None else f'{c:.3f}':>16}" for c in cos)
            lines.append(f"  {layer:>5}  {'-' if ratio is None else f'{ratio:.3f}':>12}  {cells}")
        dense = m["dense_weights"]
        lines.append("  dense weights: " + ("see dense_weights.png" if "mean" in dense else dense["note"]))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model folder (ours or published)")
    p.add_argument(
        "--run",
        help="a `mudd train` run folder: plot its telemetry (dense weights, gradient norms per "
        "group) over the steps as telemetry.png",
    )
    p.add_argument("--out", required=True, help="folder for analysis.json and the plots")
    p.add_argument(
        "--text",
        help="text file to run (default: the bundled corpus's validation split, for models with the bundled tokenizer)",
    )
    p.add_argument("--compare", help="a second model folder, measured on the same text and drawn on the same plots")
    p.add_argument("--tokenizer", help="tokenizer.json for the models instead of the folders' own")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens of text to run (default 32768)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: min(block_size, 512))")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument(
        "--sink-positions",
        type=int,
        default=2,
        help="the first N positions are attention sinks; queries before them are not counted (default 2)",
    )
    p.add_argument(
        "--sink-tokens",
        default=DEFAULT_SINK_TOKENS,
        help="comma-separated sink token strings, \\n for newline (default '.,\\n'); the bos token is added",
    )
    add_load_arguments(p)
    p.add_argument("--json", action="store_true", help="print analysis.json instead of the summary table")
