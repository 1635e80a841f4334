"""Dropout inside the fused gate: the same random draws as F.dropout, and dropout(x) not kept for backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, forward_saved_bytes, tiny_llama, with_adapter

import tspeft
from tspeft import dropout
from tspeft.lowrank import dora_gate, linear_dora_gate, linear_low_rank_gate, low_rank_gate

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_with_keep_draws_what_f_dropout_draws(device, dtype, p):
    x = torch.randn(3, 7, 333, dtype=dtype, device=device)
    torch.manual_seed(5)
    want = F.dropout(x, p, training=True)
    after = torch.rand(4, device=device)  # the generator must be left where F.dropout leaves it
    torch.manual_seed(5)
    got, keep = dropout.dropout_with_keep(x, p)
    assert torch.equal(got, want)
    assert torch.equal(torch.rand(4, device=device), after)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert torch.equal(torch.where(keep, x * (1 / (1 - p)), 0).ne(0), want.ne(0))
    assert 0 < keep.sum() < keep.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_replay_draws_the_same_mask_and_restores_the_generator(device):
    x = torch.randn(64, 40, device=device)
    torch.manual_seed(9)
    state = dropout.rng_state(x)
    xd, keep = dropout.dropout_with_keep(x, 0.3)
    torch.rand(1000, device=device)  # the stream has moved on since
    next_draw = torch.rand(5, device=device)
    torch.manual_seed(9)
    dropout.dropout_with_keep(x, 0.3)
    torch.rand(1000, device=device)
    xd_again, keep_again = dropout.replay(x, 0.3, state)
    assert torch.equal(keep_again, keep) and torch.equal(xd_again, xd) and 0 < keep.sum() < keep.numel()
    assert torch.equal(torch.rand(5, device=device), next_draw)  # the caller's stream is as it was


def test_mode_override(monkeypatch):
    x = torch.zeros(2)
    assert dropout.mode(x) == "mask"  # CPU default
    monkeypatch.setenv("TSPEFT_DROPOUT", "replay")
    assert dropout.mode(x) == "replay"
    monkeypatch.setenv("TSPEFT_DROPOUT", "bits")
    with pytest.raises(ValueError, match="TSPEFT_DROPOUT='bits' is not one of"):
        dropout.mode(x)


def _inputs(seed=0, n=40, d_in=10, d_out=8, r=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.9], dtype=torch.float64, requires_grad=True)
    return w, x, A, B, tau


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("trains", ["x", "A", "xA"])
@pytest.mark.parametrize("mode", dropout.MODES)
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_dropout_equals_dropout_outside_the_gate(device, method, mode, trains, p, monkeypatch):
    """Both fused gates (dropout and W0 inside) against the plain gates fed F.dropout(x) and W0 x through
    autograd: outputs and every gradient, with only x, only A or both requiring grad (the buffer x * keep
    is reused for x's gradient when both do)."""
    monkeypatch.setenv("TSPEFT_DROPOUT", mode)
    monkeypatch.setenv("TSPEFT_KERNELS", "0")
    w, x, A, B, tau = (t.detach().to(device).requires_grad_(t.requires_grad) for t in _inputs(seed=2))
    x.requires_grad_("x" in trains)
    A.requires_grad_("A" in trains)
    magnitude = torch.linalg.vector_norm(w, dim=1) * 1.3
    weight_norm = torch.linalg.vector_norm(w + 0.7 * B.detach() @ A.detach(), dim=1)
    results = []
    for inside in (True, False):
        for t in (x, A, B, tau):
            t.grad = None
        torch.manual_seed(3)
        base = x.detach() @ w.t()
        if inside and method == "lora":
            out = linear_low_rank_gate(base, x, p, w, A, B, 0.7, tau, 1e-2)
        elif inside:
            out = linear_dora_gate(base, x, p, w, A, B, magnitude, weight_norm, 0.7, tau, 1e-2)
        else:
            xd = F.dropout(x, p, training=True)
            if method == "lora":
                out = low_rank_gate(x @ w.t(), xd @ A.t(), B, 0.7, tau, 1e-2)
            else:
                out = dora_gate(x @ w.t(), xd @ w.t() if p else None, xd @ A.t(), B, magnitude, weight_norm, 0.7,
                                tau, 1e-2)
        torch.manual_seed(11)
        out.backward(torch.randn_like(out))
        results.append((out.detach(), [None if t.grad is None else t.grad.clone() for t in (x, A, B, tau)]))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o0, o1, rtol=1e-12, atol=1e-12)
    for name, a, b in zip("xABt", g0, g1):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("mode", dropout.MODES)
def test_gradcheck_with_dropout(mode, monkeypatch):
    monkeypatch.setenv("TSPEFT_DROPOUT", mode)
    w, x, A, B, _ = _inputs(seed=1)
    tau = torch.tensor([-1.0], dtype=torch.float64)  # every token active: the output is smooth in x, A, B

    def f(x, A, B):
        torch.manual_seed(4)  # the same dropout mask on every call
        return linear_low_rank_gate(x.detach() @ w.t(), x, 0.3, w, A, B, 0.5, tau, 0.0)  # dx includes W0's

    assert torch.autograd.gradcheck(f, (x, A, B))


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_dropout_x_is_not_kept_for_backward(method, monkeypatch):
    """Saved activations with dropout: x once for q, k, v, and a byte mask each (or nothing), not dropout(x)."""
    dense = with_adapter(tiny_llama(), "llama", method, dropout=0.1)
    data = batch("llama")

    sizes = {"peft": forward_saved_bytes(dense, data)}
    for mode in dropout.MODES:
        monkeypatch.setenv("TSPEFT_DROPOUT", mode)
        sizes[mode] = forward_saved_bytes(tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig()), data)
    assert sizes["replay"] < sizes["mask"] < sizes["peft"]
