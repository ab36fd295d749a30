"""`mudd analyze`: what a connection does inside a model (paper Fig. 6 and §5 analysis).

Three measurements over a text, all read by forward hooks, so the model computes exactly what it
always computes:
- representation collapse: cosine similarity of the inputs of adjacent blocks, per token and stream;
- attention-head activity: the share of (head, query) pairs whose strongest attention is not on a sink
  (one of the first positions, or a token such as "." or "\\n");
- dense-connection weights: the mean weight of each (aggregation, stream, source state) over the tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .layers import ValueAdded

STREAMS = ("q", "k", "v", "r")
SINGLE = "x"  # the name of the one input of a block that reads a single state
DEFAULT_SINK_TOKENS = ".,\\n"
CHUNK_ELEMENTS = 1 << 22  # attention probabilities computed at once: 16 MiB of float32


# ---- measuring a model ----------------------------------------------------------------------------
def causal_probs(q: torch.Tensor, k: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with the causal mask, float32, for query rows [start, stop): (B, H, rows, T)."""
    scores = (q[:, :, start:stop].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    rows = torch.arange(start, stop, device=q.device)[:, None]
    future = torch.arange(k.shape[-2], device=q.device)[None, :] > rows
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def sink_mask(tokens: torch.Tensor, sink_token_ids: Iterable[int], sink_positions: int) -> torch.Tensor:
    """(B, T) True at key positions that count as sinks: the first `sink_positions` and the sink tokens."""
    ids = torch.tensor(sorted(set(sink_token_ids)), dtype=tokens.dtype, device=tokens.device)
    mask = torch.isin(tokens, ids)
    mask[:, :sink_positions] = True
    return mask


def head_activity(
    q: torch.Tensor, k: torch.Tensor, is_sink: torch.Tensor, sink_positions: int
) -> tuple[torch.Tensor, int]:
    """Active (head, query) pairs per head (H,) and the pairs counted per head; query positions below
    `sink_positions` are left out. A pair is active when its largest attention weight is not on a sink."""
    B, H, T, _ = q.shape
    q, k = q.float(), k.float()
    active = torch.zeros(H, dtype=torch.float64, device=q.device)
    rows = max(1, CHUNK_ELEMENTS // (B * H * T))  # query rows per chunk keep the probabilities small
    sinks = is_sink[:, None, :].expand(B, H, T)
    for start in range(sink_positions, T, rows):
        stop = min(T, start + rows)
        top = causal_probs(q, k, start, stop).argmax(-1)  # (B, H, rows); ties go to the earliest key
        active += (~torch.gather(sinks, 2, top)).sum((0, 2)).double()
    return active, B * max(0, T - sink_positions)


def _stream(x: torch.Tensor | tuple, index: int) -> torch.Tensor:
    """Stream `index` of a block input; a single tensor stands for every stream."""
    return x[index] if isinstance(x, tuple) else x


def _around(args: tuple, kwargs: dict):
    """The `around` argument of a Block call: the connection that runs the block itself, or None."""
    return kwargs.get("around", args[2] if len(args) > 2 else None)


def _token_cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).double().sum().item()


class _Recorder:
    """Forward hooks on every block and attention module that accumulate the three measurements."""

    def __init__(self, model, sink_token_ids: Iterable[int], sink_positions: int):
        from .connections import DenseConnection

        cfg = model.config
        self.model, self.L, self.H = model, cfg.n_layer, cfg.n_head
        self.sink_ids, self.sink_positions = list(sink_token_ids), sink_positions
        self.dense = isinstance(model.connection, DenseConnection)
        self.tokens: torch.Tensor | None = None
        self.previous: tuple | torch.Tensor | None = None  # the last block's input in this forward
        self.pending: int | None = None  # a block run by its connection: its input is read at its attention norm
        self.multiway = False
        self.cos = np.zeros((len(STREAMS), max(0, self.L - 1)))
        self.token_count = 0
        self.active = torch.zeros(self.L, self.H, dtype=torch.float64)
        self.counted = np.zeros(self.L)
        self.weights: dict[int, dict] = {}  # layer -> {"streams", "sources", "sum"}
        self.handles = []
        for layer, block in enumerate(model.layers):
            self.handles.append(block.register_forward_pre_hook(self._block_pre(layer), with_kwargs=True))
            self.handles.append(block.attention.register_forward_pre_hook(self._attention_pre(layer)))
            if hasattr(block, "attention_norm"):
                self.handles.append(block.attention_norm.register_forward_pre_hook(self._norm_pre(layer)))
            if self.dense:
                self.handles.append(block.register_forward_hook(self._block_post(layer), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def begin(self, tokens: torch.Tensor) -> None:
        self.tokens, self.previous, self.pending = tokens, None, None
        self.token_count += tokens.numel()

    # Block inputs: what the connection hands to each block (hc, mhc and attnres pass their own state
    # and form the block's input inside the call; for them it is what reaches the attention norm).
    def _block_pre(self, layer: int):
        def hook(module, args, kwargs):
            if _around(args, kwargs) is not None:
                self.pending = layer
            else:
                self._record_input(layer, args[0])

        return hook

    def _norm_pre(self, layer: int):
        def hook(module, args):
            if self.pending == layer:
                self.pending = None
                self._record_input(layer, args[0])

        return hook

    def _record_input(self, layer: int, x) -> None:
        if isinstance(x, ValueAdded):  # the input q, k, v and the residual read; the V mix joins after W_v
            x = x.x
        x = tuple(t.detach().clone() for t in x) if isinstance(x, tuple) else x.detach().clone()
        self.multiway |= isinstance(x, tuple)
        if self.previous is not None and layer > 0:
            if isinstance(x, tuple) or isinstance(self.previous, tuple):
                for s in range(len(STREAMS)):
                    self.cos[s, layer - 1] += _token_cosine_sum(_stream(self.previous, s), _stream(x, s))
            else:
                self.cos[:, layer - 1] += _token_cosine_sum(self.previous, x)
        self.previous = x

    def _attention_pre(self, layer: int):
        def hook(module, args):
            xq, xk, _, ctx = args
            q, k = module.queries_and_keys(xq, xk, ctx.rope)
            is_sink = sink_mask(self.tokens, self.sink_ids, self.sink_positions)
            active, counted = head_activity(q, k, is_sink, self.sink_positions)
            self.active[layer] += active.cpu()
            self.counted[layer] += counted

        return hook

    # Dense weights from the block output, through the connection's own public method.
    def _block_post(self, layer: int):
        def hook(module, args, kwargs, out):
            if _around(args, kwargs) is not None:
                return
            conn = self.model.connection
            plan = getattr(conn, "plan", None)  # sparse dense connections skip some aggregations
            if plan is not None and plan[layer] is None:
                return
            w = conn.dense_weights(layer, out)
            B, T = out.shape[:2]
            total = w.double().expand(B, T, *w.shape[2:]).sum((0, 1)).cpu()
            if layer not in self.weights:
                positions = plan[layer].streams if plan is not None else range(w.shape[2])
                sources = plan[layer].sources if plan is not None else range(w.shape[3])
                self.weights[layer] = {
                    "streams": self._stream_names(layer, positions),
                    "sources": list(sources),
                    "sum": torch.zeros_like(total),
                }
            self.weights[layer]["sum"] += total

        return hook

    def _stream_names(self, layer: int, positions: Iterable[int]) -> list[str]:
        conn = self.model.connection
        if conn.n_streams == 4 and layer < self.L - 1:
            return [STREAMS[c] for c in positions]
        return ["r" if conn.n_streams == 4 else SINGLE]  # the last aggregation makes the R stream only

    # ---- the report ----
    def report(self) -> dict:
        n = max(self.token_count, 1)
        names = STREAMS if self.multiway else (SINGLE,)
        cosine = {name: [float(v) for v in self.cos[s] / n] for s, name in enumerate(names)}
        per_head = [[float(a / c) if c else None for a in row.tolist()] for row, c in zip(self.active, self.counted)]
        ratio = [float(row.sum() / (c * self.H)) if c else None for row, c in zip(self.active, self.counted)]
        return {
            "cosine_similarity": {
                "streams": list(names),
                "pairs": [[l, l + 1] for l in range(self.L - 1)],
                "mean": cosine,
            },
            "head_activation": {
                "ratio": ratio,
                "per_head": per_head,
                "query_positions": [int(c) for c in self.counted],
            },
            "dense_weights": self._dense_report(n),
        }

    def _dense_report(self, n: int) -> dict:
        conn = self.model.connection
        if not self.dense:
            name = self.model.config.connection
            why = (
                "a residual model mixes no earlier states"
                if name == "residual"
                else f"connection {name!r} is not a dense connection; its mixing has no (layer, source) weights"
            )
            return {"note": why}
        names = STREAMS if conn.n_streams == 4 else (SINGLE,)
        grid = {name: [[None] * (self.L + 1) for _ in range(self.L)] for name in names}
        for layer, entry in self.weights.items():
            mean = (entry["sum"] / n).tolist()
            for c, name in enumerate(entry["streams"]):
                for j, source in enumerate(entry["sources"]):
                    grid[name][layer][source] = mean[c][j]
        report = {
            "streams": list(names),
            "rows": "layer l: the aggregation after block l",
            "columns": "source j: 0 = embedding, j = output of block j-1",
            "mean": grid,
        }
        if getattr(conn, "prepost", False):
            report["note"] = (
                "PrePostDANorm: the weights mix normalised states; the R stream's sum is normalised "
                "again and every stream adds the newest state"
            )
        return report


@torch.no_grad()
def analyze_model(
    model, token_batches: Iterable[torch.Tensor], sink_token_ids: Iterable[int], sink_positions: int = 2
) -> dict:
    """Cosine similarity of adjacent block inputs, head activation ratios and mean dense weights of
    `model` (a MuddModel) over `token_batches` (each (B, T) token ids).

    Returns a JSON-ready dict; see the module docstring for the definitions."""
    if sink_positions < 0:
        raise InputError(f"sink_positions must be >= 0, got {sink_positions}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, sink_token_ids, sink_positions)
    sequences = 0
    try:
        for batch in token_batches:
            batch = batch.to(device)
            recorder.begin(batch)
            model(batch)
            sequences += batch.shape[0]
    finally:
        recorder.remove()
        model.train(was_training)
    cfg = model.config
    return {
        "connection": cfg.connection,
        "block": cfg.block,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "tokens": recorder.token_count,
        "sequences": sequences,
        **recorder.report(),
    }


# ---- text and tokens --------------------------------------------------------------------------------
def bundled_validation_tokens(tokenizer_path: Path, folder: str, max_tokens: int) -> list[int] | None:
    """The first tokens of the bundled corpus's validation split, when `tokenizer_path` is the tokenizer
    the bundled corpus was prepared with (as training does); None otherwise.

    The prepared corpus is compared when it is cached; it is prepared (a BPE training) only for a
    checkpoint whose run says it trained on the bundled corpus, not for every tokenizer that might be it.
    """
    from .data import BUNDLED, META_NAME, TokenData, bundled_data_dir, cache_dir, eot_id, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if eot_id(tok) != 0:  # a tokenizer trained on the bundled corpus has <|endoftext|> as id 0
        return None
    vocab = tok.get_vocab_size()
    prepared = cache_dir() / "data" / f"{BUNDLED}-bpe{vocab}"  # where bundled_data_dir keeps it
    if not (prepared / META_NAME).is_file():
        if not trained_on_bundled(folder):
            return None
        prepared = bundled_data_dir(vocab)
    data = TokenData(prepared)
    if json.loads(data.tokenizer_path.read_text()) != json.loads(Path(tokenizer_path).read_text()):
        return None
    val = data.splits["val"]
    return val.window(0, min(max_tokens, val.tokens)).astype(np.int64).tolist()


def trained_on_bundled(folder: str) -> bool:
    """True when the run that wrote this checkpoint (run.json of RUN/checkpoints/step_N) used the bundled corpus."""
    from .data import BUNDLED

    run = Path(folder).resolve().parent.parent / "run.json"
    try:
        source = json.loads(run.read_text()).get("data_meta", {}).get("source", "")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return source == f"bundled:{BUNDLED}"


def text_tokens(
    tokenizer, tokenizer_path: Path, text: str | None, max_tokens: int, folder: str
) -> tuple[list[int], str]:
    """Token ids (at most max_tokens) of the text file, or of the bundled validation split; and a source label."""
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise InputError(f"text file {path} does not exist")
        ids = tokenizer.encode(path.read_text(encoding="utf-8")).ids[:max_tokens]
        if not ids:
            raise InputError(f"text file {path} encodes to no tokens")
        return ids, str(path)
    ids = bundled_validation_tokens(tokenizer_path, folder, max_tokens)
    if ids is None:
        raise InputError(
            f"{folder} does not use the bundled corpus's tokenizer, so there is no default text; pass --text FILE"
        )
    return ids, "bundled corpus, validation split"


def cut_sequences(ids: list[int], seq_len: int, sink_positions: int) -> torch.Tensor:
    """Consecutive sequences of seq_len tokens (N, seq_len); a text shorter than one is a single sequence."""
    n = len(ids) // seq_len
    if n == 0:
        if len(ids) <= sink_positions:
            raise InputError(f"the text has {len(ids)} tokens, too few beyond the {sink_positions} sink positions")
        return torch.tensor([ids], dtype=torch.long)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def parse_sink_tokens(spec: str) -> list[str]:
    """Comma-separated strings; \\n and \\t stand for newline and tab."""
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in spec.split(",") if s]


def sink_tokens(tokenizer, tokenizer_path: Path, strings: list[str]) -> dict[str, int]:
    """Token ids of the strings that are one token each, plus the tokenizer's bos token when it has one."""
    found = {}
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False).ids
        if len(ids) == 1:
            found[s] = ids[0]
    bos = _bos_token(tokenizer_path)
    if bos is not None and tokenizer.token_to_id(bos) is not None:
        found[bos] = tokenizer.token_to_id(bos)
    return found


def _bos_token(tokenizer_path: Path) -> str | None:
    """The bos token named by tokenizer_config.json beside the tokenizer, else <|endoftext|>."""
    from .data import EOT

    config = tokenizer_path.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            bos = json.loads(config.read_text()).get("bos_token")
        except json.JSONDecodeError:
            bos = None
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str):
            return bos
    return EOT


# ---- `mudd analyze` -------------------------------------------------------------------------------------
def analyze_folder(folder: str, args: argparse.Namespace, device: str) -> dict:
    """Load one model folder, read its text and measure it; the report with the folder and text added."""
    from .checkpoints import load_model, read_folder_config
    from .data import load_tokenizer
    from .textgen import tokenizer_file

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
    from .analyze_plots import plot_telemetry

    path = run / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"--run {run} is not a run folder (no metrics.jsonl); pass the --out folder of `mudd train`")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze_plots import write_plots
    from .checkpoints import write_json_atomic
    from .textgen import resolve_device

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


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default=None,
        help="weights dtype (default float32; auto: as stored)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print analysis.json instead of the summary table")
