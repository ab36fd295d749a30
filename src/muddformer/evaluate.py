"""Evaluation: perplexity and bits per byte of a text file (sliding window), and the
lm-evaluation-harness bridge used by `mudd eval`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .model import MuddModel, next_token_loss


@dataclass
class Perplexity:
    tokens: int
    bytes: int
    nll: float  # summed negative log-likelihood in nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll": self.nll,
            "loss": self.nll / self.tokens,
            "perplexity": self.ppl,
            "bits_per_byte": self.bits_per_byte,
        }


@torch.no_grad()
def perplexity(
    model: MuddModel,
    ids: list[int],
    n_bytes: int,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Score every token after the first exactly once, each with up to `window` tokens of context.

    Windows of `window` tokens (default: the context length) advance by `stride` (default window/2);
    each window scores only the tokens not scored by the previous one, so most tokens see at least
    window - stride tokens of context.
    """
    from tqdm import tqdm

    window = window or model.config.block_size
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window <= model.config.block_size:
        raise InputError(f"need 0 < stride ({stride}) <= window ({window}) <= block_size ({model.config.block_size})")
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens; nothing to score")
    device = next(model.parameters()).device
    model.eval()
    nll, scored, start = 0.0, 1, 0  # token 0 has no context and is not scored
    starts = list(range(0, max(1, len(ids) - 1), stride))
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(start + window, len(ids))
        chunk = torch.tensor([ids[start:end]], device=device)
        logits = model(chunk[:, :-1]).logits
        targets = chunk[:, 1:].clone()
        fresh = end - scored  # tokens in this window not scored yet
        if fresh <= 0:
            continue
        targets[:, : targets.shape[1] - fresh] = -100
        nll += next_token_loss(logits, targets).item() * fresh
        scored = end
        if end == len(ids):
            break
    return Perplexity(tokens=scored - 1, bytes=n_bytes, nll=nll)


def text_perplexity(
    model: MuddModel,
    tokenizer,
    path: str | Path,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> Perplexity:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"text file {path} is empty")
    ids = tokenizer.encode(text).ids
    return perplexity(model, ids, len(text.encode("utf-8")), window, stride, progress)


# ---- `mudd eval` ------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import json
    import sys

    from .checkpoints import write_json_atomic
    from .eval_tasks import hf_tokenizer, results_json, results_table, run_tasks
    from .hf import MuddForCausalLM
    from .textgen import resolve_device

    if not args.ppl and not args.tasks:
        raise InputError("nothing to evaluate; pass --ppl FILE and/or --tasks NAME[,NAME...]")
    tokenizer = hf_tokenizer(args.model, args.tokenizer)  # checks the tokenizer before loading weights
    device = resolve_device(args.device)
    model = MuddForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=device)
    report: dict = {"model": str(args.model)}
    if args.ppl:
        result = text_perplexity(
            model.model, tokenizer.backend_tokenizer, args.ppl, args.window, args.stride, progress=True
        )
        report["perplexity"] = {"file": str(args.ppl), **result.as_dict()}
        print(
            f"{args.ppl}: {result.tokens:,} tokens, loss {result.nll / result.tokens:.4f} nats/token, "
            f"perplexity {result.ppl:.3f}, {result.bits_per_byte:.4f} bits/byte"
        )
    if args.tasks:
        tasks = [t for t in args.tasks.split(",") if t]
        results = run_tasks(
            model,
            tokenizer,
            tasks,
            include_path=args.include_path,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        print(results_table(results))
        report["lm_eval"] = json.loads(results_json(results))
    if args.output:
        write_json_atomic(str(args.output), report)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _limit(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 else value


def add_eval_arguments(p) -> None:
    p.add_argument("model", help="model folder (ours or published) holding tokenizer.json")
    p.add_argument("--ppl", help="text file: perplexity and bits per byte (sliding window)")
    p.add_argument("--window", type=int, help="tokens per window for --ppl (default: the context length)")
    p.add_argument("--stride", type=int, help="window step for --ppl (default: half the window)")
    p.add_argument(
        "--tasks",
        help="comma-separated lm-eval tasks, e.g. shakespeare_next_line (ships with "
        "muddformer) or hellaswag,piqa,arc_easy when their datasets are reachable",
    )
    p.add_argument("--include-path", action="append", help="folder of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=_limit, help="evaluate only the first N items of each task (or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per item (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the folder's")
    p.add_argument("--output", help="write the perplexity and lm-eval results to this JSON file")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default=None,
        help="weights dtype (default float32; auto: as stored)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
