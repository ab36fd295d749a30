"""The fused Triton depth-mix kernels against einsum: compiled on a CUDA machine, else run on the
CPU by triton's interpreter."""

from __future__ import annotations

import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if sys.platform.startswith("linux"):
    import triton  # noqa: F401  a test dependency on Linux (pyproject's test extra): missing means a broken install
else:
    triton = pytest.importorskip("triton")

from muddformer.kernels.depth_mix_triton import mix_backward, mix_forward, triton_available  # noqa: E402

TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),  # one rounding of a float32 sum to 8 bits of mantissa
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _interpret_triton_helpers(patch: pytest.MonkeyPatch) -> None:
    """Swap triton's own jit helpers (tl.zeros, tl.sum, ...) for interpreted copies.

    Triton reads TRITON_INTERPRET when a function is decorated: ours are decorated on first use,
    but its helpers were decorated when triton was imported, and `import muddformer` imports it
    (transformers -> torch._dynamo -> triton) before this module can set the variable.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for namespace in (triton.language, triton.language.standard):
        for name, value in list(vars(namespace).items()):
            if isinstance(value, JITFunction):
                patch.setattr(namespace, name, InterpretedFunction(value.fn))


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """On the CPU, run the kernels in triton's interpreter while this module's tests run, then undo it."""
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        if not triton_available("cpu"):
            try:
                _interpret_triton_helpers(patch)
            except ImportError as err:
                pytest.skip(
                    f"triton was imported before TRITON_INTERPRET=1 was set and its helpers "
                    f"cannot be swapped for interpreted ones here ({err})"
                )
        if not triton_available("cpu"):
            pytest.skip(
                "triton's interpreter is not usable in this process; set TRITON_INTERPRET=1 before starting pytest"
            )
        yield


def states_slice(M: int, N: int, D: int, dtype: torch.dtype, spare: int = 0, seed: int = 0) -> torch.Tensor:
    """The first N slots of an (M, N + spare, D) buffer, as the buffered depth mix passes them."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(M, N + spare, D, generator=g).to(DEVICE, dtype)
    return buffer[:, :N, :]


def reference(X: torch.Tensor, W: torch.Tensor, G: torch.Tensor):
    X32 = X.float().requires_grad_()
    W32 = W.float().requires_grad_()
    out = torch.einsum("mcn,mnd->mcd", W32, X32)
    out.backward(G.float())
    return out.detach(), X32.grad, W32.grad


CASES = [  # (M, C, N, D, spare slots after the N used ones)
    (1, 1, 2, 24, 0),
    (7, 4, 5, 40, 3),
    (7, 1, 5, 24, 2),
    (1, 4, 2, 40, 1),
    (3, 4, 3, 300, 1),  # D spans two D blocks: gW is summed over blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,C,N,D,spare", CASES)
def test_matches_einsum(M, C, N, D, spare, dtype):
    X = states_slice(M, N, D, dtype, spare)
    assert X.stride(0) == (N + spare) * D
    g = torch.Generator().manual_seed(1)
    W = torch.randn(M, C, N, generator=g).to(DEVICE, dtype)
    G = torch.randn(M, C, D, generator=g).to(DEVICE, dtype)
    want_out, want_gX, want_gW = reference(X, W, G)

    out = mix_forward(X, W)
    gX, gW = mix_backward(X, W, G)

    assert out.shape == (M, C, D) and out.dtype == dtype and out.is_contiguous()
    assert gX.shape == (M, N, D) and gX.dtype == dtype and gX.is_contiguous()
    assert gW.shape == (M, C, N) and gW.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want_out, **tol)
    torch.testing.assert_close(gX.float(), want_gX, **tol)
    # gW sums D products: its error grows with D, so compare relative to the largest entry.
    torch.testing.assert_close(gW.float(), want_gW, rtol=tol["rtol"], atol=tol["atol"] * want_gW.abs().max().item())


def test_float32_weights_with_bfloat16_states_broadcast_over_tokens():
    M, C, N, D = 5, 4, 3, 24
    X = states_slice(M, N, D, torch.bfloat16, spare=2)
    W = torch.randn(1, C, N, device=DEVICE).expand(M, C, N)  # static weights: stride 0 over tokens, not copied
    G = torch.randn(M, C, D, device=DEVICE).to(torch.bfloat16)
    want_out, want_gX, want_gW = reference(X, W, G)

    out = mix_forward(X, W)
    gX, gW = mix_backward(X, W, G)

    assert out.dtype == torch.bfloat16 and gX.dtype == torch.bfloat16 and gW.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out, **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(gX.float(), want_gX, **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(gW, want_gW, rtol=1e-5, atol=1e-5)  # bf16 inputs, float32 products and sum


@pytest.mark.parametrize(
    "X_shape,W_shape,message",
    [
        ((3, 2, 8), (3, 1, 4), "does not fit"),  # W mixes 4 states, X holds 2
        ((3, 2, 8), (2, 1, 2), "does not fit"),  # token counts differ
        ((3, 2), (3, 1, 2), "must be"),
    ],
)
def test_shape_mismatch_raises(X_shape, W_shape, message):
    X, W = torch.zeros(X_shape), torch.zeros(W_shape)
    G = torch.zeros(W_shape[0], W_shape[1], 8)
    with pytest.raises(ValueError, match=message):
        mix_forward(X, W)
    with pytest.raises(ValueError, match=message):
        mix_backward(X, W, G)


def test_gradient_shape_mismatch_raises():
    X, W = torch.zeros(3, 2, 8), torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match="does not match"):
        mix_backward(X, W, torch.zeros(3, 1, 8))


@pytest.mark.parametrize("connection, dense_norm", [("mudd", "none"), ("denseformer", "none"), ("mudd", "prepost")])
def test_model_with_triton_mix_equals_matmul_mix(connection, dense_norm):
    # The whole model, values and gradients, through the autograd wrapper that dispatches to the kernels.
    from conftest import assert_grads_close, build, loss_and_grads, randomize_connection

    results = {}
    for impl in ("matmul", "triton"):
        model = build(seed=4, n_layer=2, connection=connection, dense_norm=dense_norm, mix_impl=impl)
        randomize_connection(model)
        results[impl] = loss_and_grads(model, torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3)))
    (loss, grads), (tloss, tgrads) = results["matmul"], results["triton"]
    torch.testing.assert_close(tloss, loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(tgrads, grads)
