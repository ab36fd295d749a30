"""`mudd eval`: perplexity on a text file and lm-evaluation-harness tasks."""

from __future__ import annotations

import json
import sys

from muddformer._utils import resolve_device, write_json_atomic
from muddformer.adapters.hf import MuddForCausalLM
from muddformer.cli.flags import add_load_arguments
from muddformer.errors import InputError
from muddformer.evaluation.harness import hf_tokenizer, results_json, results_table, run_tasks
from muddformer.evaluation.perplexity import text_perplexity


def run(args) -> int:
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


def add_arguments(p) -> None:
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
    add_load_arguments(p)
