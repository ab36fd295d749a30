"""The learning-rate schedule: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

from muddformer.training.config import TrainConfig


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up over warmup*max_steps steps, then the schedule from the peak to min_lr_ratio*peak
    (cosine or linear), or the peak (constant). `tc` is resolved (TrainConfig.resolved)."""
    peak = tc.lr
    warmup = max(1, round(tc.warmup * tc.max_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, tc.max_steps - warmup))
    if tc.schedule == "constant":
        return peak
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return peak * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * shape)
