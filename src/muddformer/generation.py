"""Text generation with the core model."""

from __future__ import annotations

import torch

from .errors import InputError
from .model import MuddModel


@torch.no_grad()
def greedy_generate(model: MuddModel, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Prompt + up to max_new_tokens greedy ids, recomputing the full sequence each step.

    Rows that emitted eos_token_id keep emitting it; generation stops once every row has.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.check_inputs(input_ids)
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.block_size:
        raise InputError(f"prompt of {input_ids.shape[1]} tokens plus {max_new_tokens} new ones exceeds the context "
                         f"block_size={model.config.block_size}; shorten the prompt or ask for fewer tokens")
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = model(ids).logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt[:, None].to(ids.dtype)], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids


@torch.no_grad()
def sample_generate(model: MuddModel, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt + max_new_tokens sampled ids (temperature, top-k), recomputing the full window each step.

    Past the context length the window slides, keeping the last block_size tokens.
    """
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}; use greedy_generate for temperature 0")
    model.check_inputs(input_ids)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.block_size:]).logits[:, -1].float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    return ids
