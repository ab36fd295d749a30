"""Fused Triton kernels for the depth mix over a buffer of stored states, forward and backward.

With M tokens, N stored states X[:, j] of width D and C output streams:

    out[m, c, :] = sum_j W[m, c, j] * X[m, j, :]

X is (M, N, D) with unit stride along D and stride D between states, but any stride between tokens,
so the first N slots of a preallocated (M, N_max, D) buffer are read in place. Every program owns
a (BLOCK_M tokens, BLOCK_D features) tile: it reads each state's tile once, keeps the C streams in
one float32 accumulator and writes each output once, so the states are read exactly once.

`triton` is optional: it is imported on first use, and the kernels are decorated then, because
triton decides at decoration time whether a kernel is compiled or run by its CPU interpreter
(TRITON_INTERPRET=1). For the interpreter the variable must be set before triton is imported.
"""

from __future__ import annotations

import functools
import os

import torch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Accumulator budget per program, in float32 elements (BLOCK_M * C_PAD * BLOCK_D): 16 KiB of
# registers spread over the program's threads, so C=4 gets a narrower D block than C=1.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_M = 4


@functools.lru_cache(maxsize=None)
def _import_triton():
    try:
        import triton
    except Exception:  # not installed, or installed without a usable backend
        return None
    return triton


def _interpret_mode() -> bool:
    triton = _import_triton()
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4 parses the variable itself (1/true/on/yes)
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_ready(triton) -> bool:
    # Triton's own helpers (tl.zeros, tl.sum) are decorated when triton itself is imported, so the
    # interpreter runs the kernels only if TRITON_INTERPRET=1 was already set then, not just now.
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(triton.language, "zeros", None), JITFunction)


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels can run for tensors on `device`: CUDA, or the CPU under TRITON_INTERPRET=1."""
    triton = _import_triton()
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpret_mode() and _interpreter_ready(triton)


def _kernels():
    # Keyed by the interpreter setting in force now: a kernel decorated in one mode cannot run in the other.
    return _build_kernels(_interpret_mode())


@functools.lru_cache(maxsize=None)
def _build_kernels(interpret: bool):
    global tl
    triton = _import_triton()
    if triton is None:
        raise RuntimeError("depth_mix_triton needs the triton package")
    import triton.language as language

    # Bound as a module global, not a local: the kernels read `tl` from their module's globals,
    # which is where the interpreter looks for it too.
    tl = language
    return triton.jit(_mix_forward_kernel), triton.jit(_mix_backward_kernel)


# triton.language once _build_kernels has imported it. The kernels below are plain functions
# until then: _build_kernels wraps them with triton.jit for the interpreter setting in force.
tl = None


def _mix_forward_kernel(
    X,
    W,
    OUT,
    M,
    N,
    D,
    stride_xm,
    stride_xn,
    stride_wm,
    stride_wc,
    stride_wn,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 token offsets: M * N_max * D passes 2**31 for long sequences of wide models.
    tokens = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    streams = tl.arange(0, C_PAD)  # C padded to a power of two, the extra streams masked off
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < M
    x_ptrs = X + tokens[:, None] * stride_xm + cols[None, :]
    x_mask = token_ok[:, None] & (cols < D)[None, :]
    w_ptrs = W + tokens[:, None] * stride_wm + streams[None, :] * stride_wc
    w_mask = token_ok[:, None] & (streams < C)[None, :]

    acc = tl.zeros((BLOCK_M, C_PAD, BLOCK_D), dtype=tl.float32)
    for j in range(N):
        # One contiguous row of D per token (coalesced); the C weights of state j are a few
        # bytes per token, loaded beside it and served from cache.
        x = tl.load(x_ptrs + j * stride_xn, mask=x_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + j * stride_wn, mask=w_mask, other=0.0).to(tl.float32)
        acc += w[:, :, None] * x[:, None, :]

    out_ptrs = OUT + tokens[:, None, None] * (C * D) + streams[None, :, None] * D + cols[None, None, :]
    out_mask = w_mask[:, :, None] & (cols < D)[None, None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=out_mask)


def _mix_backward_kernel(
    X,
    W,
    G,
    GX,
    GW_PARTIAL,
    M,
    N,
    D,
    stride_xm,
    stride_xn,
    stride_wm,
    stride_wc,
    stride_wn,
    stride_gm,
    stride_gc,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(1)
    tokens = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    streams = tl.arange(0, C_PAD)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < M
    col_ok = cols < D
    x_ptrs = X + tokens[:, None] * stride_xm + cols[None, :]
    x_mask = token_ok[:, None] & col_ok[None, :]
    w_ptrs = W + tokens[:, None] * stride_wm + streams[None, :] * stride_wc
    w_mask = token_ok[:, None] & (streams < C)[None, :]

    # The output gradient tile is read once and reused for every state.
    g_ptrs = G + tokens[:, None, None] * stride_gm + streams[None, :, None] * stride_gc + cols[None, None, :]
    g_mask = w_mask[:, :, None] & col_ok[None, None, :]
    g = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)

    gx_ptrs = GX + tokens[:, None] * (N * D) + cols[None, :]
    # This D block's share of gW, summed over the D blocks afterwards: a fixed order, so
    # the result is deterministic (atomics would not be) and any D fits.
    gw_ptrs = GW_PARTIAL + ((pid_d * M + tokens[:, None]) * C + streams[None, :]) * N
    for j in range(N):
        x = tl.load(x_ptrs + j * stride_xn, mask=x_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + j * stride_wn, mask=w_mask, other=0.0).to(tl.float32)
        gx = tl.sum(w[:, :, None] * g, axis=1)
        tl.store(gx_ptrs + j * D, gx.to(GX.dtype.element_ty), mask=x_mask)
        gw = tl.sum(g * x[:, None, :], axis=2)
        tl.store(gw_ptrs + j, gw, mask=w_mask)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(M: int, C: int, D: int) -> tuple[int, int, int]:
    """(C_PAD, BLOCK_M, BLOCK_D): power-of-two tile sizes (tl.arange needs them), masked at the edges."""
    c_pad = _next_power_of_2(C)
    block_m = min(_MAX_BLOCK_M, _next_power_of_2(M))
    block_d = min(_next_power_of_2(D), max(64, _TILE_ELEMENTS // (_MAX_BLOCK_M * c_pad)))
    return c_pad, block_m, block_d


def _check_inputs(X: torch.Tensor, W: torch.Tensor) -> None:
    if X.dim() != 3 or W.dim() != 3:
        raise ValueError(f"depth mix: X must be (M, N, D) and W (M, C, N), got {tuple(X.shape)} and {tuple(W.shape)}")
    M, N, _ = X.shape
    if W.shape[0] != M or W.shape[2] != N or W.shape[1] < 1:
        raise ValueError(f"depth mix: W {tuple(W.shape)} does not fit X {tuple(X.shape)}; expected ({M}, C, {N})")
    if X.dtype not in _DTYPES or W.dtype not in _DTYPES:
        raise ValueError(f"depth mix: unsupported dtypes X {X.dtype}, W {W.dtype}")
    if X.device != W.device:
        raise ValueError(f"depth mix: X on {X.device} but W on {W.device}")


def _states_layout(X: torch.Tensor) -> torch.Tensor:
    # The kernels step through features with unit stride: only the token stride may be arbitrary.
    if X.stride(2) != 1 and X.shape[2] > 1:
        return X.contiguous()
    return X


def mix_forward(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """out (M, C, D) with out[m, c] = sum_j W[m, c, j] * X[m, j], summed in float32, in X's dtype."""
    _check_inputs(X, W)
    X = _states_layout(X)
    M, N, D = X.shape
    C = W.shape[1]
    out = torch.empty((M, C, D), dtype=X.dtype, device=X.device)
    if M == 0 or D == 0:
        return out
    forward_kernel, _ = _kernels()
    c_pad, block_m, block_d = _blocks(M, C, D)
    grid = (_cdiv(M, block_m), _cdiv(D, block_d))
    # W's strides are passed as they are: weights broadcast over tokens (stride 0) need no copy.
    forward_kernel[grid](
        X,
        W,
        out,
        M,
        N,
        D,
        X.stride(0),
        X.stride(1),
        W.stride(0),
        W.stride(1),
        W.stride(2),
        C=C,
        C_PAD=c_pad,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    return out


def mix_backward(X: torch.Tensor, W: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of mix_forward for output gradient G (M, C, D): gX (M, N, D) in X's dtype, gW (M, C, N) in W's."""
    _check_inputs(X, W)
    M, N, D = X.shape
    C = W.shape[1]
    if tuple(G.shape) != (M, C, D):
        raise ValueError(f"depth mix backward: G {tuple(G.shape)} does not match the output shape {(M, C, D)}")
    if G.dtype not in _DTYPES or G.device != X.device:
        raise ValueError(f"depth mix backward: G must be a float tensor on {X.device}, got {G.dtype} on {G.device}")
    X = _states_layout(X)
    if G.stride(2) != 1 and D > 1:
        G = G.contiguous()
    gX = torch.empty((M, N, D), dtype=X.dtype, device=X.device)
    if M == 0 or D == 0:
        return gX.zero_(), torch.zeros((M, C, N), dtype=W.dtype, device=W.device)
    _, backward_kernel = _kernels()
    c_pad, block_m, block_d = _blocks(M, C, D)
    grid = (_cdiv(M, block_m), _cdiv(D, block_d))
    gW_partial = torch.empty((grid[1], M, C, N), dtype=torch.float32, device=X.device)
    backward_kernel[grid](
        X,
        W,
        G,
        gX,
        gW_partial,
        M,
        N,
        D,
        X.stride(0),
        X.stride(1),
        W.stride(0),
        W.stride(1),
        W.stride(2),
        G.stride(0),
        G.stride(1),
        C=C,
        C_PAD=c_pad,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    gW = gW_partial.sum(0) if grid[1] > 1 else gW_partial[0]
    return gX, gW.to(W.dtype)
