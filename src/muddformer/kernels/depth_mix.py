"""depth_mix: stream c = sum_j w[..., c, j] * X_j, the weighted sum over stored states (architecture §2.6).

Weights have shape (B, T, C, N), or (1, 1, C, N) for static weights; states are N tensors (B, T, D).

- `depth_mix_reference` is the plain version every faster one is compared against. It sums in
  order j = 0..N-1 in the states' dtype, as the reference implementation's `layer_mix` does, which
  is what bit-parity with the published checkpoints needs. Under torch.compile it is also the fast
  path: inductor fuses the sum into one kernel per stream group.
- `DepthBuffer` + `depth_mix_buffered` is the eager fast path: every state is written once into one
  preallocated (B, T, N_max, D) buffer, and the mix reads the first n slots in place, with a
  hand-written backward, through one of three implementations (`mix_backend`):
  - `CompiledMix`, the CPU's: the forward and both gradients as formulas that inductor compiles once
    for every depth (depth_mix_compiled); "auto" takes it where one state has 2^18 elements or more;
  - `TritonMix`, CUDA's with triton installed: fused kernels that read the states once (depth_mix_triton);
  - `MatmulMix`, everywhere else: one batched matmul per direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import muddformer.kernels.depth_mix_compiled as compiled
from muddformer.config import MIX_IMPLS as IMPLS
from muddformer.errors import ConfigError
from muddformer.layers import Streams


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
        # Decided once: inside the autograd Functions that write and read it, grad mode is always off.
        self.for_autograd = torch.is_grad_enabled()

    def _alias(self) -> torch.Tensor:
        # A buffer made without gradients has nothing saved for backward: no alias needed, one operation less.
        return self.data.data if self.for_autograd else self.data

    def view(self, n: int | None = None) -> torch.Tensor:
        """The first n slots (B, T, n, D); in a buffer made for autograd, an alias that later writes do not
        version-bump."""
        return self._alias()[..., : self.n if n is None else n, :]

    def store(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == self.data.shape[-2]:
            raise ValueError(f"DepthBuffer is full ({self.n} states)")
        if torch.is_grad_enabled() and x.requires_grad:
            return _Store.apply(x, self)
        return self._write(x)

    def _write(self, x: torch.Tensor) -> torch.Tensor:
        slot = self._alias()[..., self.n, :]  # an alias of its own: later writes do not touch its version
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


def _flat_tokens(X: torch.Tensor) -> torch.Tensor:
    # (B, T, n, D) slice of a (B, T, N_max, D) buffer -> (B*T, n, D) without a copy (token stride N_max*D).
    return X.flatten(0, 1)


class MatmulMix:
    """One batched matmul per direction: (C x n) @ (n x D) for every token."""

    @staticmethod
    def forward(w: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = w.to(X.dtype)
        if w.shape[:2] != X.shape[:2]:  # static weights, broadcast over the tokens
            return Streams(torch.matmul(w, X))
        # Per-token weights: one bmm over the flattened tokens, without matmul's broadcasting expands.
        mixed = torch.bmm(w.reshape(-1, *w.shape[2:]), _flat_tokens(X))
        return Streams(mixed.view(*X.shape[:2], *mixed.shape[1:]))

    @staticmethod
    def backward(w: torch.Tensor, X: torch.Tensor, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # In the gradient's dtype: under autocast the forward ran in a lower precision than X.
        g = torch.stack(list(grads), -2)
        return torch.matmul(w.to(g.dtype).transpose(-1, -2), g), torch.matmul(g, X.to(g.dtype).transpose(-1, -2))


class TritonMix:
    """The fused kernels of depth_mix_triton: each state read once, float32 accumulation."""

    @staticmethod
    def forward(w: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from muddformer.kernels.depth_mix_triton import mix_forward

        B, T, n, D = X.shape
        w = w.expand(B, T, *w.shape[2:])
        return mix_forward(_flat_tokens(X), w.reshape(B * T, *w.shape[2:])).view(B, T, -1, D).unbind(-2)

    @staticmethod
    def backward(w: torch.Tensor, X: torch.Tensor, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from muddformer.kernels.depth_mix_triton import mix_backward

        B, T, n, D = X.shape
        full = w.expand(B, T, *w.shape[2:]).reshape(B * T, *w.shape[2:])
        g = torch.stack(list(grads), -2).reshape(B * T, -1, D)
        gX, gW = mix_backward(_flat_tokens(X), full, g)
        return gX.view(B, T, n, D), gW.view(B, T, *w.shape[2:])


class CompiledMix:
    """The formulas of depth_mix_compiled, one compiled graph each for every depth."""

    @staticmethod
    def forward(w: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return compiled.call(compiled.mix_streams, w.to(X.dtype), X)

    @staticmethod
    def backward(w: torch.Tensor, X: torch.Tensor, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = grads[0].dtype  # under autocast the forward ran in a lower precision than X
        return compiled.call(compiled.mix_grads, w.to(dtype), X.to(dtype), [g.contiguous() for g in grads])


# "auto" compiles the mix on the CPU only where one state holds this many elements: below it the
# matmul is as fast and a compile (seconds) would not pay for itself (decode steps, tests' models).
COMPILE_MIN_ELEMENTS = 1 << 18
Backend = type[MatmulMix] | type[TritonMix] | type[CompiledMix]


def mix_backend(impl: str, buffer: torch.Tensor) -> Backend:
    """The implementation a buffered mix runs for `impl` on this (B, T, N_max, D) buffer."""
    from muddformer.kernels.depth_mix_triton import triton_available

    if impl == "triton":
        if not triton_available(buffer.device):
            raise ConfigError(
                "mix_impl='triton' needs the triton package and a CUDA device "
                "(or TRITON_INTERPRET=1 on the CPU); use mix_impl='auto'"
            )
        return TritonMix
    if impl == "compiled":
        return CompiledMix if compiled.usable() else MatmulMix
    if impl == "auto" and buffer.device.type == "cuda" and triton_available(buffer.device):
        return TritonMix
    per_state = buffer.numel() // max(buffer.shape[-2], 1)
    if impl == "auto" and buffer.device.type == "cpu" and per_state >= COMPILE_MIN_ELEMENTS and compiled.usable():
        return CompiledMix
    return MatmulMix


class _BufferedMix(torch.autograd.Function):
    """C outputs (B, T, D) = w @ X[:n]; the states are inputs only to route each one's gradient."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, buffer: DepthBuffer, backend: Backend, *states: torch.Tensor):
        X = buffer.view(len(states))
        ctx.backend = backend
        ctx.save_for_backward(w, X)
        return backend.forward(w, X)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        w, X = ctx.saved_tensors
        gX, gW = ctx.backend.backward(w, X, grads)
        if w.shape[:2] != gW.shape[:2]:  # static weights were broadcast over tokens
            gW = gW.sum((0, 1), keepdim=True)
        gX = gX.to(X.dtype)
        states = [gX[..., j, :] if ctx.needs_input_grad[3 + j] else None for j in range(X.shape[-2])]
        return (gW.to(w.dtype) if ctx.needs_input_grad[0] else None), None, None, *states


def depth_mix_buffered(
    buffer: DepthBuffer, states: Sequence[torch.Tensor], weights: torch.Tensor, impl: str = "auto"
) -> Sequence[torch.Tensor]:
    """The mix over the buffer's first len(states) slots (`states` are the tensors `store` returned)."""
    _check(len(states), weights)
    backend = mix_backend(impl, buffer.data)
    if torch.is_grad_enabled() and (weights.requires_grad or any(s.requires_grad for s in states)):
        return list(_BufferedMix.apply(weights, buffer, backend, *states))
    return backend.forward(weights, buffer.view(len(states)))  # the matmul's Streams keep their stacked tensor


def depth_mix(states: Sequence[torch.Tensor], weights: torch.Tensor, impl: str = "reference") -> Sequence[torch.Tensor]:
    """Mix a list of states by name of implementation: "reference", or a buffered one ("matmul", "compiled",
    "triton", "auto")."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depth_mix implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "reference":
        return depth_mix_reference(states, weights)
    _check(len(states), weights)
    buffer = DepthBuffer(states[0], len(states))
    stored = [buffer.store(s) for s in states]
    return depth_mix_buffered(buffer, stored, weights, impl)
