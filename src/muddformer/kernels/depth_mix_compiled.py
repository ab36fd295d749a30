"""The depth mix for the CPU: its forward and both gradients as two formulas, each compiled once.

The batched matmul runs one tiny GEMM per token ((C x n) @ (n x D)), too small for a BLAS to pay off,
and unbinding its output costs a copy in backward. Inductor instead writes each formula below as one
loop over the tokens that reads every state once and keeps the token's n x D block in cache. Every
size is dynamic, so one graph per formula serves every depth: the compile cost (seconds, once per
process and dtype) does not grow with the number of layers. A graph is added only for another stream
count C (4 and 1 in MUDD), weights shared by every token, or another dtype.

Where inductor cannot compile (no C++ compiler, an unsupported platform), the first call warns once
and every later mix takes the batched matmul.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from muddformer.compat import dynamo_recompile_limit, without_duck_sizing

# Graphs per formula: stream counts x shared-or-per-token weights x dtypes, with room to spare.
_RECOMPILE_LIMIT = 64


def mix_streams(w: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """out_c (B, T, D) = sum_j w[..., c, j] X[..., j, :]; w (B, T, C, n) or (1, 1, C, n), X (B, T, n, D)."""
    return tuple((w[..., c, :, None] * X).sum(-2) for c in range(w.shape[-2]))


def mix_grads(w: torch.Tensor, X: torch.Tensor, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `mix_streams` for the streams' gradients g_c (B, T, D), in one graph so that inductor
    reads each token's g and X once for both: dX (B, T, n, D) = sum_c w[..., c, :, None] g_c[..., None, :]
    and dw (B, T, C, n) = <g_c, X_j> over D."""
    gX = w[..., 0, :, None] * grads[0][..., None, :]
    for c in range(1, len(grads)):
        gX = gX + w[..., c, :, None] * grads[c][..., None, :]
    return gX, torch.stack([(g[..., None, :] * X).sum(-1) for g in grads], -2)


_compiled: dict[Callable, Callable] = {}
_failed: list[str] = []  # the first compile error; once set, callers take another path


def usable() -> bool:
    return not _failed


def call(formula: Callable, *args):
    """`formula(*args)` through its compiled graph; the plain formula where inductor fails."""
    if _failed:
        return formula(*args)
    if formula not in _compiled:
        _compiled[formula] = torch.compile(formula, dynamic=True)
    try:
        with dynamo_recompile_limit(_RECOMPILE_LIMIT), without_duck_sizing():
            return _compiled[formula](*args)
    except Exception as err:  # inductor raises its own error types, which vary across releases
        _failed.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        warnings.warn(
            f"the compiled depth mix failed ({_failed[0]}); using the batched matmul "
            "(set mix_impl='matmul' to skip the attempt)",
            stacklevel=2,
        )
        return formula(*args)
