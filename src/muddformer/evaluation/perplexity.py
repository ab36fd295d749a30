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
    """Score every token after the first exactly once, each with up to `window` tokens of context;
    `n_bytes` is the length of the text those tokens cover (for bits per byte).

    Windows of `window` tokens (default: the context length) advance by `stride` (default window/2);
    each window scores only the tokens not scored by the previous one, so most tokens see at least
    window - stride tokens of context. A window starts no later than the token before the first one
    it scores (with stride = window each window then scores window - 1 tokens).
    """
    block = model.config.block_size
    window = block if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    if not (2 <= window <= block and 0 < stride <= window):
        raise InputError(f"need 2 <= window ({window}) <= block_size ({block}) and 0 < stride ({stride}) <= window")
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens; nothing to score")
    device = next(model.parameters()).device
    model.eval()
    nll, scored, start = 0.0, 1, 0  # scored: the next token to score (token 0 has no context)
    with tqdm(total=len(ids) - 1, desc="perplexity", unit="token", disable=not progress) as bar:
        while scored < len(ids):
            start = min(start, scored - 1)
            end = min(start + window, len(ids))
            chunk = torch.tensor([ids[start:end]], device=device)
            targets = chunk[:, 1:].clone()
            fresh = end - scored  # 1 <= fresh <= targets: the window holds scored - 1
            targets[:, : targets.shape[1] - fresh] = -100
            nll += next_token_loss(model(chunk[:, :-1]).logits, targets).item() * fresh
            scored, start = end, start + stride
            bar.update(fresh)
    return Perplexity(tokens=len(ids) - 1, bytes=n_bytes, nll=nll)


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
    encoding = tokenizer.encode(text)
    # Bits per byte over what is scored: the first token has no context, so its bytes are left out too.
    scored_text = text[encoding.offsets[0][1] :] if encoding.ids else text
    return perplexity(model, encoding.ids, len(scored_text.encode("utf-8")), window, stride, progress)
