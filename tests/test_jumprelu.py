"""JumpReLU: forward values and the rectangle-kernel pseudo-gradients, checked against their formulas."""

from __future__ import annotations

import pytest
import torch

from cltlab import jumprelu as jumprelu_module
from cltlab.jumprelu import JumpReLU, dense_penalties, jumprelu, rectangle

EPS = 0.1


def expected_threshold_grad(
    x: torch.Tensor, theta: torch.Tensor, grad_out: torch.Tensor, eps: float
) -> torch.Tensor:
    """dL/dθ = Σ over broadcast elements of grad_out · (−(θ/ε) · 1[|x − θ|/ε < ½])."""
    window = ((x - theta).abs() / eps < 0.5).to(x.dtype)
    per_element = grad_out * (-(theta / eps) * window)
    return per_element.sum_to_size(theta.shape)


def inputs_around(theta: torch.Tensor, batch: int, seed: int = 0) -> torch.Tensor:
    """``(batch, F)`` inputs, many inside the kernel window (|x − θ| < ε/2), many outside, some below zero."""
    generator = torch.Generator().manual_seed(seed)
    return theta + (torch.rand(batch, theta.shape[-1], generator=generator) - 0.5) * 4 * EPS


def test_rectangle_kernel():
    u = torch.tensor([-1.0, -0.5, -0.49, 0.0, 0.49, 0.5, 2.0])
    assert rectangle(u).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_forward_zero_at_and_below_threshold():
    theta = torch.tensor(0.5)
    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.5001, 0.75, 3.0])
    y = jumprelu(x, theta, EPS)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.5001, 0.75, 3.0])
    assert torch.equal(y, x * (x > theta))


def test_forward_per_feature_thresholds_broadcast():
    theta = torch.tensor([0.1, 1.0, 2.0])
    x = torch.tensor([[0.5, 0.5, 0.5], [1.5, 1.5, 1.5], [3.0, 1.0, 2.0]])
    y = jumprelu(x, theta, EPS)
    expected = torch.tensor([[0.5, 0.0, 0.0], [1.5, 1.5, 0.0], [3.0, 0.0, 0.0]])
    assert torch.equal(y, expected)


def test_threshold_pseudo_gradient_matches_formula():
    theta = torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    x = inputs_around(theta.detach(), batch=64).requires_grad_(True)
    grad_out = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    jumprelu(x, theta, EPS).backward(grad_out)

    expected = expected_threshold_grad(x.detach(), theta.detach(), grad_out, EPS)
    assert theta.grad.shape == theta.shape
    assert torch.allclose(theta.grad, expected, rtol=1e-12, atol=1e-12)
    # The window must actually have caught some elements, or the check above would be vacuous.
    assert (expected != 0).all()


def test_threshold_pseudo_gradient_explicit_numbers():
    # θ = 0.5, ε = 0.1: only x in (0.45, 0.55) contribute, each with −(θ/ε)·grad_out = −5·grad_out.
    theta = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([0.30, 0.46, 0.50, 0.54, 0.56, 0.90])
    grad_out = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    jumprelu(x, theta, EPS).backward(grad_out)
    assert theta.grad.item() == pytest.approx(-5.0 * (2.0 + 3.0 + 4.0))


def test_input_gradient_is_step_function():
    theta = torch.tensor([0.2, 0.4, 0.6])
    x = inputs_around(theta, batch=32).requires_grad_(True)
    grad_out = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    jumprelu(x, theta, EPS).backward(grad_out)
    above = x.detach() > theta
    assert torch.equal(x.grad, grad_out * above)
    assert (x.grad[~above] == 0).all() and (~above).any()


@pytest.mark.parametrize("theta_shape", [(), (1, 5), (3, 5)])
def test_threshold_gradient_reduces_to_threshold_shape(theta_shape):
    generator = torch.Generator().manual_seed(3)
    theta = (torch.rand(theta_shape, generator=generator) * 0.5 + 0.2).requires_grad_(True)
    x = theta.detach() + (torch.rand(7, 3, 5, generator=generator) - 0.5) * 4 * EPS  # (7, 3, 5)
    grad_out = torch.randn(7, 3, 5, generator=generator)
    jumprelu(x, theta, EPS).backward(grad_out)
    assert theta.grad.shape == theta.shape
    assert torch.allclose(theta.grad, expected_threshold_grad(x, theta.detach(), grad_out, EPS), atol=1e-5)


def test_module_threshold_is_exp_of_log_threshold():
    act = JumpReLU((2, 3), threshold_init=0.25, bandwidth=0.05)
    assert act.log_threshold.shape == (2, 3)
    assert torch.allclose(act.threshold, torch.full((2, 3), 0.25))
    assert act.bandwidth == 0.05
    assert "shape=(2, 3)" in repr(act) and "bandwidth=0.05" in repr(act)
    assert JumpReLU(4).log_threshold.shape == (4,)


def test_module_log_threshold_gradient_applies_chain_rule():
    act = JumpReLU(4, threshold_init=0.3, bandwidth=EPS)
    with torch.no_grad():
        act.log_threshold.copy_(torch.tensor([0.1, 0.3, 0.6, 1.2]).log())
    theta = act.threshold.detach()
    x = inputs_around(theta, batch=50, seed=4)
    grad_out = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    y = act(x)
    assert torch.equal(y, x * (x > theta))
    y.backward(grad_out)
    # dL/d(log θ) = θ · dL/dθ
    expected = theta * expected_threshold_grad(x, theta, grad_out, EPS)
    assert torch.allclose(act.log_threshold.grad, expected, rtol=1e-5, atol=1e-6)
    assert (expected != 0).all()


def test_gradient_support_and_preactivation_loss():
    act = JumpReLU((2, 3), threshold_init=0.3, bandwidth=0.2)
    pre = torch.tensor([[[0.1, 0.25, 0.5], [0.19, 0.21, -1.0]]])  # (batch 1, 2 layers, 3 features)
    support = act.gradient_support(pre, act(pre))  # above θ − ε/2 = 0.2
    assert support.tolist() == [[[False, True, True], [False, True, False]]]
    norms = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    expected = 0.2 * 1.0 + 0.05 * 2.0 + 0.11 + 0.09 + 1.3  # Σ relu(θ − h) · ‖W_dec‖
    assert act.preact_loss(pre, norms).item() == pytest.approx(expected)
    assert torch.equal(act.forward_layer(pre[0, 1], 1), torch.zeros(3))


def plain_penalties(pre, features, theta, norms, c):
    """The two penalties written with autograd's ops: Σ tanh(c · n · f) and Σ relu(θ − h) · n."""
    return torch.tanh(c * norms * features).sum(), (torch.relu(theta - pre) * norms).sum()


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 200])  # one block; blocks of a few rows
def test_dense_penalties_and_their_gradients_equal_autograds(chunk_bytes, monkeypatch):
    monkeypatch.setattr(jumprelu_module, "CHUNK_BYTES", chunk_bytes)
    generator = torch.Generator().manual_seed(6)
    theta = (torch.rand(3, 5, generator=generator, dtype=torch.float64) * 0.5 + 0.2).requires_grad_(True)
    norms = (torch.rand(3, 5, generator=generator, dtype=torch.float64) + 0.5).requires_grad_(True)
    pre = (theta.detach() + torch.randn(16, 3, 5, generator=generator, dtype=torch.float64)).requires_grad_(
        True
    )
    weights = torch.randn(2, generator=generator, dtype=torch.float64)  # the loss's coefficients

    def grads(penalties, backward_passes=1):
        sparsity, preact = penalties(pre, jumprelu(pre, theta, EPS), theta, norms, 4.0)
        for _ in range(backward_passes):  # the last pass's gradients
            for t in (pre, theta, norms):
                t.grad = None
            (weights[0] * sparsity + weights[1] * preact).backward(retain_graph=True)
        return [sparsity.item(), preact.item()] + [t.grad.clone() for t in (pre, theta, norms)]

    expected = grads(plain_penalties)
    for got in (
        grads(dense_penalties),
        grads(dense_penalties, backward_passes=2),
    ):  # a retained graph's 2nd too
        assert got[:2] == pytest.approx(expected[:2], rel=1e-12)
        for name, g, e in zip(["pre", "θ", "norms"], got[2:], expected[2:], strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"∂{name}")
    assert (expected[3] != 0).all() and ((pre < theta) & (pre > 0)).any()  # both terms reach every θ


def test_threshold_gradient_summed_in_row_blocks_matches_formula(monkeypatch):
    monkeypatch.setattr(jumprelu_module, "CHUNK_BYTES", 64)  # 4 rows of (2, 2) float32 per block
    generator = torch.Generator().manual_seed(7)
    theta = (torch.rand(2, 2, generator=generator) * 0.5 + 0.2).requires_grad_(True)
    x = theta.detach() + (torch.rand(9, 2, 2, generator=generator) - 0.5) * 4 * EPS
    grad_out = torch.randn(9, 2, 2, generator=generator)
    assert len(jumprelu_module.row_chunks(x)) == 3
    jumprelu(x, theta, EPS).backward(grad_out)
    torch.testing.assert_close(theta.grad, expected_threshold_grad(x, theta.detach(), grad_out, EPS))
