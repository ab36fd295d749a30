"""Batches from token shards: seeded training batches that any rank can recompute, fixed validation windows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from muddformer.data.shards import TokenSplit


def sample_batch(
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    rank: int = 0,
    world: int = 1,
    micro: int = 0,
    accum: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) rows of one rank for one micro-batch of one step: random windows.

    The step's global batch (batch_size x world x accum windows) depends only on (seed, step), so a
    resumed run reads exactly what an uninterrupted one would, and N ranks (or N micro-batches) of
    batch b read the same rows as one rank of batch N*b.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, split.tokens - seq_len, (batch_size * world * accum,), generator=g)
    first = (micro * world + rank) * batch_size
    rows = starts[first : first + batch_size]
    x = torch.from_numpy(np.stack([split.window(int(s), seq_len + 1).astype(np.int64) for s in rows]))
    return x[:, :-1], x[:, 1:]


def eval_windows(split: TokenSplit, seq_len: int, max_windows: int) -> list[int]:
    """Fixed, evenly spaced window starts covering the split for validation."""
    n = max(1, min(max_windows, (split.tokens - 1) // seq_len))
    last = split.tokens - seq_len - 1
    return [round(i * last / max(1, n - 1)) if n > 1 else 0 for i in range(n)]


def iter_eval_batches(
    split: TokenSplit, seq_len: int, batch_size: int, starts: list[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(starts), batch_size):
        x = torch.from_numpy(
            np.stack([split.window(s, seq_len + 1).astype(np.int64) for s in starts[i : i + batch_size]])
        )
        yield x[:, :-1], x[:, 1:]
