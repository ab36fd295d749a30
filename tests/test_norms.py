"""The float32 RMSNorm's own backward: the values autograd gives for the reference formula."""

import pytest
import torch

from muddformer import layers
from muddformer.layers import RMSNorm, _Float32RMSNorm, float32_rms_norm, rms_norm_no_scale


def reference(x, weight, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


@pytest.mark.parametrize("with_weight", [True, False])
def test_backward_is_the_formulas_derivative_in_float64(with_weight):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 16, dtype=torch.float64) * 3).requires_grad_()
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True) if with_weight else None
    inputs = (x, weight, 1e-6)
    assert torch.autograd.gradcheck(_Float32RMSNorm.apply, inputs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "older-torch"])
@pytest.mark.parametrize("frozen", ["none", "weight", "input"])
def test_float32_values_and_gradients_equal_autograd_of_the_formula(frozen, fused, monkeypatch):
    monkeypatch.setattr(layers, "HAS_FUSED_RMS_NORM", fused)
    torch.manual_seed(1)
    x = (torch.randn(4, 5, 64) * 2).requires_grad_(frozen != "input")
    weight = torch.randn(64).requires_grad_(frozen != "weight")
    ours = float32_rms_norm(x, weight, 1e-6)
    expected = reference(x, weight, 1e-6)
    assert ours.grad_fn is not None and "Float32RMSNorm" in type(ours.grad_fn).__name__
    assert torch.equal(ours, expected)
    g = torch.randn_like(ours)
    inputs = [t for t in (x, weight) if t.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_module_and_generator_norm_take_it_only_where_eager_autograd_runs():
    torch.manual_seed(2)
    norm = RMSNorm(32, 1e-5)
    x = torch.randn(3, 32, requires_grad=True)
    assert "Float32RMSNorm" in type(norm(x).grad_fn).__name__
    assert "Float32RMSNorm" in type(rms_norm_no_scale(x, 1e-5).grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(norm(x), reference(x, norm.weight, 1e-5))
    half = x.detach().to(torch.bfloat16).requires_grad_()
    assert "Float32RMSNorm" not in type(rms_norm_no_scale(half, 1e-5).grad_fn).__name__


def test_second_derivative_is_refused_loudly():
    x = torch.randn(2, 8, requires_grad=True)
    (g,) = torch.autograd.grad(float32_rms_norm(x, None, 1e-6).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
