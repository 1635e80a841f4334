"""The gate against the paper's equations: a hand-worked example, gradcheck, rank space == generic."""

from __future__ import annotations

import pytest
import torch
from conftest import saved_bytes

import tspeft
from tspeft.lowrank import dora_gate, dora_weight_norm, linear_low_rank_gate, low_rank_gate


def test_hand_worked_example_eq_2_3_9_15():
    # tau = 0.5, lambda = 0.1; token 4 is padding. Per token (|base|, |delta|, ratio, mask, mu, consistent):
    # 0: 1, 0.6, 0.6,  on,  +0.6, yes  -> +0.6      2: 5, 3, 0.6, on,  -3, no -> 0
    # 1: 2, 0.5, 0.25, off, -1,   yes  -> -1        3: 1, .1, .1, off, +.2, no -> 0
    # 4: padding (active, mu = 5): ignored.  g_k = 0.6 - 1 + 0.1 * 2 active real tokens = -0.2
    base = torch.tensor([[1.0, 0], [0, 2], [3, 4], [1, 0], [1, 0]], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([[0.6, 0], [0, 0.5], [3, 0], [0.1, 0], [1, 0]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, 0], [0, -2], [-1, 0], [2, 0], [5, 0]], dtype=torch.float64)
    tau = torch.nn.Parameter(torch.tensor([0.5]))
    real = torch.tensor([True, True, True, True, False])
    stats = torch.zeros(4, dtype=torch.float64)
    out = tspeft.token_gate(base, delta, tau, 0.1, real, stats=stats)
    expected = torch.tensor([[1.6, 0], [0, 2], [6, 4], [1, 0], [2, 0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    out.backward(g)
    torch.testing.assert_close(base.grad, g)
    torch.testing.assert_close(delta.grad, g * torch.tensor([1.0, 0, 1, 0, 1], dtype=torch.float64)[:, None])
    torch.testing.assert_close(tau.grad, torch.tensor([0.2]))  # -g_k
    assert stats[:2].tolist() == [2.0, 4.0]  # active, real: sparsity 0.5 (Eq. 21)


def test_threshold_at_or_below_zero_activates_every_token_even_with_zero_base():
    base = torch.zeros(3, 4)
    delta = torch.zeros(3, 4)
    delta[0, 0] = 1.0
    for value in (0.0, -1.0, float("-inf")):
        stats = torch.zeros(4, dtype=torch.float64)
        tspeft.token_gate(base, delta, torch.tensor([value]), 0.0, stats=stats)
        assert stats[0].item() == 3
    stats = torch.zeros(4, dtype=torch.float64)
    out = tspeft.token_gate(base + 1, delta, torch.tensor([float("inf")]), 0.0, stats=stats)
    assert stats[0].item() == 0 and torch.equal(out, base + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_base_delta_away_from_threshold(seed):
    torch.manual_seed(seed)
    base = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        ratio = delta.norm(dim=-1) / base.norm(dim=-1)
    # a threshold in the largest gap between sorted ratios: small perturbations never flip a mask
    r = ratio.flatten().sort().values
    i = int((r[1:] - r[:-1]).argmax())
    tau = torch.tensor([(r[i] + r[i + 1]).item() / 2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda b, d: tspeft.token_gate(b, d, tau, 1e-3), (base, delta))


def _generic_low_rank(base, z, B, c, tau, lam, real, bias):
    delta = c * z @ B.t()
    if bias is None:
        return tspeft.token_gate(base, delta, tau, lam, real)
    return tspeft.token_gate(base - bias, delta, tau, lam, real) + bias  # ratio uses W0 x without bias


@pytest.mark.parametrize("with_bias", [False, True])
def test_rank_space_equals_generic_fp64(with_bias):
    torch.manual_seed(0)
    n, d_in, d_out, r = 24, 7, 9, 3
    x = torch.randn(n, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64) if with_bias else None
    A = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    real = torch.rand(n) > 0.2
    g = torch.randn(n, d_out, dtype=torch.float64)
    for tau_value in (-0.3, 0.0, 0.2, 0.45, 0.7, 5.0):
        grads = []
        for fast in (True, False):
            tau = torch.nn.Parameter(torch.tensor([tau_value]))
            A.grad = B.grad = None
            base = torch.nn.functional.linear(x, W, bias)
            z = x @ A.t()
            if fast:
                out = low_rank_gate(base, z, B, 0.7, tau, 1e-2, real, bias=bias)
            else:
                out = _generic_low_rank(base, z, B, 0.7, tau, 1e-2, real, bias)
            out.backward(g)
            grads.append((out.detach(), A.grad.clone(), B.grad.clone(), tau.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("keep_z", [True, False])
def test_linear_gate_equals_generic_fp64_whether_z_is_kept_or_computed_again(keep_z):
    torch.manual_seed(1)
    n, d_in, d_out, r = 20, 6, 8, 3
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    A = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    real = torch.rand(n) > 0.2
    g = torch.randn(n, d_out, dtype=torch.float64)
    for tau_value in (0.0, 0.3, 0.6):
        grads = []
        for fast in (True, False):
            tau = torch.nn.Parameter(torch.tensor([tau_value]))
            x.grad = A.grad = B.grad = None
            if fast:
                out = linear_low_rank_gate(x.detach() @ W.t(), x, 0.0, W, A, B, 0.7, tau, 1e-2, real, keep_z=keep_z)
            else:
                out = _generic_low_rank(x @ W.t(), x @ A.t(), B, 0.7, tau, 1e-2, real, None)
            out.backward(g)
            grads.append((out.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone(), tau.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linear_gate_without_z_keeps_r_elements_per_token_less(p):
    """keep_z=False saves z's N r elements (no dropout); under dropout z is kept either way."""
    torch.manual_seed(2)
    n, d_in, d_out, r = 16, 6, 8, 3
    x = torch.randn(n, d_in, requires_grad=True)
    W, A, B = torch.randn(d_out, d_in), torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r)
    tau = torch.nn.Parameter(torch.tensor([0.2]))
    sizes = {}
    for keep_z in (True, False):
        torch.manual_seed(3)
        _, sizes[keep_z] = saved_bytes(lambda k=keep_z: linear_low_rank_gate(x.detach() @ W.t(), x, p, W, A, B, 0.5,
                                                                              tau, 0.0, keep_z=k), (W, A, B, tau))
    assert sizes[True] - sizes[False] == (n * r * 4 if p == 0.0 else 0)


def test_dora_gate_equals_generic_fp64():
    """Every gradient, the trainable bias's and x's through W0 x + b included (peft's bias="all")."""
    torch.manual_seed(1)
    n, d_in, d_out, r, c = 20, 6, 8, 3, 0.5
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(d_out, dtype=torch.float64) + 0.5).requires_grad_()
    g = torch.randn(n, d_out, dtype=torch.float64)
    # DoRA's column norm without forming BA equals the direct one
    wn = dora_weight_norm(W, (W * W).sum(1), A.detach(), B.detach(), c)
    torch.testing.assert_close(wn, torch.linalg.norm(W + c * B.detach() @ A.detach(), dim=1))
    for tau_value in (0.0, 0.3, 1.0):
        results = []
        for fast in (True, False):
            tau = torch.nn.Parameter(torch.tensor([tau_value]))
            x.grad = bias.grad = A.grad = B.grad = m.grad = None
            base = torch.nn.functional.linear(x, W, bias)
            z = x @ A.t()
            if fast:
                out = dora_gate(base, None, z, B, m, wn, c, tau, 1e-2, None, bias=bias)
            else:
                s = (m / wn)[None]
                delta = (s - 1) * (x @ W.t()) + s * (c * z @ B.t())
                out = tspeft.token_gate(x @ W.t(), delta, tau, 1e-2) + bias
            out.backward(g)
            results.append((out.detach(), x.grad.clone(), bias.grad.clone(), A.grad.clone(), B.grad.clone(),
                            m.grad.clone(), tau.grad.clone()))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(results[0][2], g.sum(0))  # d out / d bias = 1 for any mask


def test_token_gate_errors():
    tau = torch.zeros(1)
    with pytest.raises(ValueError, match="same shape"):
        tspeft.token_gate(torch.zeros(2, 3), torch.zeros(2, 4), tau, 0.0)
    with pytest.raises(ValueError, match="one-element"):
        tspeft.token_gate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="lam"):
        tspeft.token_gate(torch.zeros(2, 3), torch.zeros(2, 3), tau, -1.0)
    with pytest.raises(ValueError, match="token_mask has 3 entries"):
        tspeft.token_gate(torch.zeros(2, 3), torch.zeros(2, 3), tau, 0.0, torch.ones(3, dtype=torch.bool))
