"""depth_mix: stream c = sum_j w[..., c, j] * X_j, the weighted sum over stored states (architecture §2.6).

Weights have shape (B, T, C, N), or (1, 1, C, N) for static weights; states are N tensors (B, T, D).

- `depth_mix_reference` is the plain version every faster one is compared against. It sums in
  order j = 0..N-1 in the states' dtype, as the reference implementation's `layer_mix` does, which
  is what bit-parity with the published checkpoints needs. Under torch.compile it is also the fast
  path: inductor fuses the sum into one kernel per stream group.
- `DepthBuffer` + `depth_mix_buffered` is the eager fast path: every state is written once into one
  preallocated (B, T, N_max, D) buffer, so the mix is one batched matmul over the first N slots
  (no O(L^2) stacking or temporaries), with a hand-written backward (two batched matmuls).
- On CUDA, with triton installed, the same buffered path runs the fused Triton kernels
  (`depth_mix_triton`), which read the states once and accumulate in float32.
- `depth_mix_compiled` is the reference formula compiled on its own, for eager models: inductor
  fuses each mix and its backward into one loop over the states, the fastest path on the CPU. It
  compiles one graph per number of states (about 10 s each on a CPU), so it is opt-in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muddformer.compat import dynamo_recompile_limit
from muddformer.config import MIX_IMPLS as IMPLS


def _check(n_states: int, weights: torch.Tensor) -> None:
    if weights.shape[-1] != n_states:
        raise ValueError(f"depth_mix: {weights.shape[-1]} weights per stream for {n_states} states")


def depth_mix_reference(states: Sequence[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """Mix N states (each (B, T, D)) with weights (B, T, C, N) or (1, 1, C, N); returns C tensors (B, T, D)."""
    _check(len(states), weights)
    mixed = []
    for c in range(weights.shape[-2]):
        acc = weights[..., c, 0, None] * states[0]
        for j in range(1, len(states)):
            acc = acc + weights[..., c, j, None] * states[j]
        mixed.append(acc)
    return mixed


_compiled_mix = None


def depth_mix_compiled(states: Sequence[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """`depth_mix_reference` through torch.compile; inside an already compiled model, the plain formula."""
    global _compiled_mix
    if torch.compiler.is_compiling():
        return depth_mix_reference(states, weights)
    if _compiled_mix is None:
        _compiled_mix = torch.compile(depth_mix_reference)
    # One graph per number of states: a deep model needs more graphs than dynamo's default limit of 8.
    with dynamo_recompile_limit(max(64, 2 * len(states))):
        return _compiled_mix(states, weights)


class DepthBuffer:
    """The stored states X_0..X_{n-1} of one forward pass in one preallocated (B, T, capacity, D) tensor.

    `store(x)` copies x into the next slot and returns that slot, which stands for x in the autograd
    graph (its gradient flows to x), so x itself need not be kept. Slots are read through aliases
    with their own version counter: a slot is never written again once stored, so the in-place
    writes of later slots cannot invalidate what earlier mixes saved for backward.
    """

    def __init__(self, like: torch.Tensor, capacity: int):
        self.data = like.new_empty(*like.shape[:-1], capacity, like.shape[-1])
        self.n = 0

    def view(self, n: int | None = None) -> torch.Tensor:
        """The first n slots (B, T, n, D), as an alias that later writes do not version-bump."""
        return self.data.data[..., : self.n if n is None else n, :]

    def store(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == self.data.shape[-2]:
            raise ValueError(f"DepthBuffer is full ({self.n} states)")
        if torch.is_grad_enabled() and x.requires_grad:
            return _Store.apply(x, self)
        return self._write(x)

    def _write(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.data.data[..., self.n, :]  # an alias of its own: later writes do not touch its version
        slot.copy_(x)
        self.n += 1
        return slot


class _Store(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, buffer: DepthBuffer) -> torch.Tensor:
        return buffer._write(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _use_triton(impl: str, x: torch.Tensor) -> bool:
    if impl not in ("auto", "triton") or (impl == "auto" and x.device.type != "cuda"):
        return False
    from muddformer.kernels.depth_mix_triton import triton_available

    if impl == "triton":
        if not triton_available(x.device):
            raise ValueError(
                "mix_impl='triton' needs the triton package and a CUDA device "
                "(or TRITON_INTERPRET=1 on the CPU); use mix_impl='auto'"
            )
        return True
    return triton_available(x.device)


def _forward(w: torch.Tensor, X: torch.Tensor, triton: bool) -> torch.Tensor:
    if triton:
        from muddformer.kernels.depth_mix_triton import mix_forward

        B, T, n, D = X.shape
        w = w.expand(B, T, *w.shape[2:])
        return mix_forward(_flat_tokens(X), w.reshape(B * T, *w.shape[2:])).view(B, T, -1, D)
    return torch.matmul(w.to(X.dtype), X)


def _flat_tokens(X: torch.Tensor) -> torch.Tensor:
    # (B, T, n, D) slice of a (B, T, N_max, D) buffer -> (B*T, n, D) without a copy (token stride N_max*D).
    return X.flatten(0, 1)


def _backward(w: torch.Tensor, X: torch.Tensor, g: torch.Tensor, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if triton:
        from muddformer.kernels.depth_mix_triton import mix_backward

        B, T, n, D = X.shape
        full = w.expand(B, T, *w.shape[2:])
        gX, gW = mix_backward(_flat_tokens(X), full.reshape(B * T, *w.shape[2:]), g.reshape(B * T, -1, D))
        gX, gW = gX.view(B, T, n, D), gW.view(B, T, *w.shape[2:])
    else:  # in the gradient's dtype: under autocast the forward ran in a lower precision than X
        gX = torch.matmul(w.to(g.dtype).transpose(-1, -2), g).to(X.dtype)
        gW = torch.matmul(g, X.to(g.dtype).transpose(-1, -2))
    if w.shape[:2] != gW.shape[:2]:  # static weights were broadcast over tokens
        gW = gW.sum((0, 1), keepdim=True)
    return gX, gW.to(w.dtype)


UNBUFFERED = {"reference": depth_mix_reference, "compiled": depth_mix_compiled}


class _BufferedMix(torch.autograd.Function):
    """out (B, T, C, D) = w @ X[:n]; the states are inputs only to route each one's gradient."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, buffer: DepthBuffer, triton: bool, *states: torch.Tensor) -> torch.Tensor:
        X = buffer.view(len(states))
        ctx.triton = triton
        ctx.save_for_backward(w, X)
        return _forward(w, X, triton)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, X = ctx.saved_tensors
        gX, gW = _backward(w, X, g.contiguous(), ctx.triton)
        grads = [gX[..., j, :] if ctx.needs_input_grad[3 + j] else None for j in range(X.shape[-2])]
        return (gW if ctx.needs_input_grad[0] else None), None, None, *grads


def depth_mix_buffered(
    buffer: DepthBuffer, states: Sequence[torch.Tensor], weights: torch.Tensor, impl: str = "auto"
) -> list[torch.Tensor]:
    """The mix over the buffer's first len(states) slots (`states` are the tensors `store` returned)."""
    _check(len(states), weights)
    triton = _use_triton(impl, buffer.data)
    if torch.is_grad_enabled() and (weights.requires_grad or any(s.requires_grad for s in states)):
        out = _BufferedMix.apply(weights, buffer, triton, *states)
    else:
        out = _forward(weights, buffer.view(len(states)), triton)
    return list(out.unbind(-2))


def depth_mix(states: Sequence[torch.Tensor], weights: torch.Tensor, impl: str = "reference") -> list[torch.Tensor]:
    """Mix a list of states by name of implementation: "reference", "compiled", or a buffered one
    ("matmul", "triton", "auto")."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depth_mix implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl in UNBUFFERED:
        return UNBUFFERED[impl](states, weights)
    _check(len(states), weights)
    buffer = DepthBuffer(states[0], len(states))
    stored = [buffer.store(s) for s in states]
    return depth_mix_buffered(buffer, stored, weights, impl)
