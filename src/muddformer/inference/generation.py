"""Text generation with the core model: KV cache, greedy and sampled decoding, batches with left
padding, streaming, and a static-cache decode step that compiles once (gpt-fast style)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from muddformer.config import id_list
from muddformer.errors import InputError
from muddformer.inference.kv_cache import KVCache, StaticKVCache
from muddformer.model import MuddModel


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy decoding")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise InputError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def process_logits(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Float32 logits (B, V) after repetition penalty, temperature, top-k and top-p (filtered ones are -inf).

    Repetition penalty as in CTRL: a seen token's logit is divided by the penalty if positive,
    multiplied if negative. `seen` (B, V) bool marks tokens already in each row.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keeps the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def _emit(streamer: Any, ids: torch.Tensor) -> None:
    """Hand one step's ids (B,) on; transformers' BaseStreamer (put/end) gets them as its generate does, after the
    prompt (`start_stream`)."""
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(ids.cpu())
    else:
        streamer(ids)


def start_stream(streamer: Any, input_ids: torch.Tensor) -> None:
    """A put()/end() streamer takes the prompt first (TextStreamer(skip_prompt=True) drops that first put) and,
    as with transformers' generate, one row only: its steps' ids would read as one text."""
    if streamer is None or not hasattr(streamer, "put"):
        return
    if input_ids.shape[0] != 1:
        raise InputError(
            f"a put()/end() streamer such as transformers' TextStreamer takes one row, got {input_ids.shape[0]}; "
            "generate one prompt at a time, or pass a callable streamer, which gets each step's ids (batch,)"
        )
    streamer.put(input_ids.cpu())


@torch.no_grad()
def generate(
    model: MuddModel,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable | Any = None,
    cache: str = "dynamic",
    compile: bool = False,
) -> torch.Tensor:
    """Prompt ids (B, P), left-padded where rows differ in length (attention_mask 0 on padding),
    followed by up to max_new_tokens generated ids per row.

    Greedy by default; with do_sample, temperature / top_k / top_p / repetition_penalty shape the
    distribution and `seed` (or `generator`) makes it reproducible. A row that emits an EOS id is
    finished and gets pad_token_id (default: the first EOS id) after it; generation stops once all
    rows are. `streamer` receives each step's new ids (B,): a callable, or an object with
    put()/end() such as transformers' TextStreamer (one row; it gets the prompt first, as from
    transformers' generate). cache="static" preallocates the KV cache;
    with compile=True its decode step is compiled once with torch.compile.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample:
        check_sampling(temperature, top_k, top_p, repetition_penalty)
    if cache not in ("dynamic", "static"):
        raise InputError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    if compile and cache != "static":  # a dynamic cache grows every token: there is no one graph to compile
        raise InputError("compile=True compiles the static cache's decode step; pass cache='static' (--cache static)")
    model.check_inputs(input_ids)
    B, P = input_ids.shape
    total = P + max_new_tokens
    if total > model.config.block_size:
        raise InputError(
            f"prompt of {P} tokens plus {max_new_tokens} new ones exceeds the context "
            f"block_size={model.config.block_size}; shorten the prompt or ask for fewer tokens"
        )
    device = input_ids.device
    eos = id_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not bool(attention_mask[:, -1].all()):  # each row continues from its last position: a pad there is read
        raise InputError(
            "attention_mask has padding at the end of a row; generation continues from each row's last position, "
            "so pad on the left (a transformers tokenizer: padding_side='left')"
        )
    start_stream(streamer, input_ids)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    if cache == "static":
        dtype = next(model.parameters()).dtype
        kv: Any = StaticKVCache(
            cfg.n_layer, B, cfg.n_kv_head, cfg.head_dim, total, dtype, device, windows=cfg.attn_windows
        )
        mask_buf = torch.zeros(B, total, dtype=torch.long, device=device)
        mask_buf[:, :P] = attention_mask
    else:
        kv = KVCache(cfg.n_layer, cfg.attn_windows)
    was_training = model.training
    model.eval()
    logits = model(
        input_ids, attention_mask=attention_mask, cache=kv, cache_position=torch.arange(P, device=device)
    ).logits[:, -1]
    step = _decode_step(model, compile)
    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device) if repetition_penalty != 1.0 else None
    if seen is not None:
        seen.scatter_(1, input_ids.long(), attention_mask.bool())
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [input_ids]
    for i in range(max_new_tokens):
        nxt = choose(
            process_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
            if do_sample or seen is not None
            else logits,
            do_sample,
            generator,
        )
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        if eos:
            done |= torch.isin(nxt, torch.tensor(eos, device=device))
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        out.append(nxt[:, None].to(input_ids.dtype))
        _emit(streamer, nxt)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        pos = torch.tensor([P + i], device=device)
        if cache == "static":
            mask_buf[:, P + i] = 1
            logits = step(nxt[:, None], mask_buf, kv, pos)
        else:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            logits = step(nxt[:, None], attention_mask, kv, pos)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    model.train(was_training)
    return torch.cat(out, dim=1)


def _decode_step(model: MuddModel, compile: bool) -> Callable:
    def step(token: torch.Tensor, mask: torch.Tensor, kv: Any, pos: torch.Tensor) -> torch.Tensor:
        return model(token, attention_mask=mask, cache=kv, cache_position=pos).logits[:, -1]

    if not compile:
        return step
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
    return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)


def greedy_generate(
    model: MuddModel, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None
) -> torch.Tensor:
    """Prompt + up to max_new_tokens greedy ids (KV-cached)."""
    return generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id)


def sample_generate(
    model: MuddModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt + max_new_tokens sampled ids (temperature, top-k), KV-cached."""
    return generate(
        model, input_ids, max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k, generator=generator
    )
