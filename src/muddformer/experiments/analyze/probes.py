"""`mudd analyze`: what a connection does inside a model (paper Fig. 6 and §5 analysis).

Three measurements over a text, all read by forward hooks, so the model computes exactly what it
always computes:
- representation collapse: cosine similarity of the inputs of adjacent blocks, per token and stream;
- attention-head activity: the share of (head, query) pairs whose strongest attention is not on a sink
  (one of the first positions, or a token such as "." or "\\n");
- dense-connection weights: the mean weight of each (aggregation, stream, source state) over the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from muddformer.connections.dense import DenseConnection
from muddformer.errors import InputError
from muddformer.layers import ValueAdded, repeat_kv, window_band

STREAMS = ("q", "k", "v", "r")
SINGLE = "x"  # the name of the one input of a block that reads a single state
DEFAULT_SINK_TOKENS = ".,\\n"
CHUNK_ELEMENTS = 1 << 22  # attention probabilities computed at once: 16 MiB of float32


# ---- measuring a model ----------------------------------------------------------------------------
def causal_probs(q: torch.Tensor, k: torch.Tensor, start: int, stop: int, window: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with the causal mask (and the layer's attention window, 0: none), float32,
    for query rows [start, stop): (B, H, rows, T)."""
    scores = (q[:, :, start:stop].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    rows = torch.arange(start, stop, device=q.device)
    visible = window_band(rows, torch.arange(k.shape[-2], device=q.device), window or k.shape[-2])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def sink_mask(tokens: torch.Tensor, sink_token_ids: Iterable[int], sink_positions: int) -> torch.Tensor:
    """(B, T) True at key positions that count as sinks: the first `sink_positions` and the sink tokens."""
    ids = torch.tensor(sorted(set(sink_token_ids)), dtype=tokens.dtype, device=tokens.device)
    mask = torch.isin(tokens, ids)
    mask[:, :sink_positions] = True
    return mask


def head_activity(
    q: torch.Tensor, k: torch.Tensor, is_sink: torch.Tensor, sink_positions: int, window: int = 0
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
        top = causal_probs(q, k, start, stop, window).argmax(-1)  # (B, H, rows); ties go to the earliest key
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
            k = repeat_kv(k, q.shape[1])
            is_sink = sink_mask(self.tokens, self.sink_ids, self.sink_positions)
            active, counted = head_activity(q, k, is_sink, self.sink_positions, module.window)
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
