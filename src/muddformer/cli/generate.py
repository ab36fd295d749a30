"""`mudd generate`: prompts in, streamed text out, tokens/s at the end."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from muddformer._utils import resolve_device
from muddformer.adapters.folders import load_model
from muddformer.cli.flags import add_load_arguments
from muddformer.data.tokenizers import eot_id, load_tokenizer, tokenizer_file
from muddformer.errors import InputError
from muddformer.inference.generation import generate
from muddformer.options import KV_CACHES


class TextStream:
    """Prints the text of a growing id sequence as it comes (decoding the whole tail keeps multi-byte tokens whole)."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout is looked up now, not at import: it may have been replaced since (capture, redirect).
        self.tok, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], 0

    def __call__(self, new_ids: torch.Tensor) -> None:
        self.ids.append(int(new_ids[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise InputError(f"prompt file {path} does not exist")
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt given; pass --prompt TEXT or --prompt-file FILE (one prompt per line)")
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    tok = load_tokenizer(tokenizer_file(args.model, args.tokenizer))
    device = resolve_device(args.device)
    model = load_model(args.model, dtype=args.dtype, device=device)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else eot_id(tok)
    total_tokens, total_time = 0, 0.0
    for prompt in prompts:
        ids = tok.encode(prompt).ids
        if not ids:
            raise InputError(f"prompt {prompt!r} encodes to no tokens")
        budget = args.max_new_tokens
        if len(ids) + budget > model.config.block_size:
            raise InputError(
                f"prompt of {len(ids)} tokens plus --max-new-tokens {budget} exceeds the context "
                f"block_size={model.config.block_size}; shorten the prompt or lower --max-new-tokens"
            )
        sys.stdout.write(prompt)
        stream = TextStream(tok)
        start = time.perf_counter()
        out = generate(
            model,
            torch.tensor([ids], device=device),
            budget,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=None if args.ignore_eos else eos,
            seed=args.seed,
            streamer=stream,
            cache=args.cache,
            compile=args.compile,
        )
        total_time += time.perf_counter() - start
        total_tokens += out.shape[1] - len(ids)
        sys.stdout.write("\n")
    print(
        f"[{total_tokens} tokens in {total_time:.2f} s: {total_tokens / max(total_time, 1e-9):.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (ours or published) holding tokenizer.json")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="file of prompts, one per line (\\n inside a line becomes a newline)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the folder's")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--cache", choices=KV_CACHES, default="dynamic", help="KV cache kind")
    p.add_argument("--compile", action="store_true", help="compile the decode step (needs --cache static)")
    add_load_arguments(p)
