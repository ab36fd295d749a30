"""Evaluation: perplexity and bits per byte of a text file (sliding window), and the
lm-evaluation-harness bridge used by `mudd eval`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from muddformer.errors import InputError
from muddformer.model import MuddModel, next_token_loss


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
