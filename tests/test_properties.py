"""Property tests of the gates over shapes, dtypes, thresholds (±inf included), token masks and padding.

Reference (the paper's Eq. 2, 3, 9, 15), written out here in float64 from the very values the gate sees:
mask_i = ||delta_i|| >= tau ||base_i|| (all true for tau <= 0); out_i = base_i + mask_i delta_i;
threshold.grad = -g_k with g_k = sum_{i real} [(mu_i >= 0) == mask_i] mu_i + lambda * #(active real tokens).
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tspeft

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
THRESHOLDS = st.one_of(
    st.sampled_from([float("-inf"), -1.0, 0.0, float("inf")]),
    st.floats(min_value=-0.5, max_value=3.0, allow_nan=False, allow_infinity=False),
)
LAMBDAS = st.sampled_from([0.0, 1e-3, 0.3])
PADDING = st.sampled_from(["none", "all_real", "random", "right", "left", "all_pad"])


def _lead_shape(draw) -> tuple[int, ...]:
    if draw(st.booleans()):
        return (draw(st.integers(1, 12)),)
    return (draw(st.integers(1, 3)), draw(st.integers(1, 6)))


def _token_mask(kind: str, lead: tuple[int, ...], g: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_real":
        return torch.ones(lead, dtype=torch.bool)
    if kind == "all_pad":
        return torch.zeros(lead, dtype=torch.bool)
    if kind == "random":
        return torch.rand(lead, generator=g) > 0.4
    seq = lead[-1]
    lengths = torch.randint(0, seq + 1, lead[:-1] or (1,), generator=g)
    pos = torch.arange(seq)
    mask = pos < lengths[..., None] if kind == "right" else pos >= (seq - lengths[..., None])
    return mask.reshape(lead)


def _reference(base, delta, g, tau: float, lam: float, real):
    """Return (mask, out, -g_k) of Eq. 2, 3, 9, 15 in float64 from the given tensors."""
    b64, d64, g64 = (t.double().reshape(-1, t.shape[-1]) for t in (base, delta, g))
    bn, dn = b64.norm(dim=-1), d64.norm(dim=-1)
    mask = torch.ones_like(bn, dtype=torch.bool) if tau <= 0 else dn >= tau * bn
    real = torch.ones_like(mask) if real is None else real.reshape(-1)
    mu = (g64 * d64).sum(-1)
    g_k = torch.where(((mu >= 0) == mask) & real, mu, torch.zeros_like(mu)).sum() + lam * (mask & real).sum()
    return mask, -g_k, mu, real


def _near_threshold(base, delta, tau: float, rel: float) -> bool:
    """True if a token's ratio is within `rel` of tau: rounding may flip its mask either way."""
    if not (0 < tau < math.inf):
        return False
    bn = base.double().reshape(-1, base.shape[-1]).norm(dim=-1)
    dn = delta.double().reshape(-1, delta.shape[-1]).norm(dim=-1)
    return bool(((dn - tau * bn).abs() <= rel * (dn + tau * bn) + 1e-30).any())


def _tensors(g: torch.Generator, shape, dtype, scale: float = 1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(DTYPES)), tau=THRESHOLDS, lam=LAMBDAS, padding=PADDING,
       seed=st.integers(0, 2**31 - 1))
def test_token_gate_matches_the_equations(data, dtype, tau, lam, padding, seed):
    dt = DTYPES[dtype]
    lead = _lead_shape(data.draw)
    d = data.draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(seed)
    base = _tensors(gen, (*lead, d), dt)
    if data.draw(st.booleans()):  # some zero base rows: ratio +inf, active for every tau < inf
        base[torch.rand(lead, generator=gen) < 0.3] = 0
    delta = _tensors(gen, (*lead, d), dt, scale=data.draw(st.sampled_from([0.1, 1.0, 3.0])))
    grad_out = _tensors(gen, (*lead, d), dt)
    real = _token_mask(padding, lead, gen)
    assume(not _near_threshold(base, delta, tau, 1e-4))
    threshold = torch.nn.Parameter(torch.tensor([tau], dtype=torch.float32))
    stats = torch.zeros(4, dtype=torch.float64)
    b, dl = base.clone().requires_grad_(), delta.clone().requires_grad_()
    out = tspeft.token_gate(b, dl, threshold, lam, real, stats=stats)
    out.backward(grad_out)
    mask, neg_g_k, mu, real_flat = _reference(base, delta, grad_out, tau, lam, real)
    # inactive tokens equal base exactly; active ones are base + delta in the input dtype
    flat_out, flat_base = out.detach().reshape(-1, d), base.reshape(-1, d)
    assert torch.equal(flat_out[~mask], flat_base[~mask])
    assert torch.equal(flat_out[mask], (base + delta).reshape(-1, d)[mask])
    if tau <= 0:
        assert bool(mask.all())  # every token, real or not, is active
    # padding counts neither in g_k nor in the statistics
    assert stats[0].item() == int((mask & real_flat).sum()) and stats[1].item() == int(real_flat.sum())
    tol = (1e-6 if dt == torch.float64 else 1e-5) * (float(mu.abs().sum()) + lam * mask.numel() + 1.0)
    assert abs(threshold.grad.item() - neg_g_k.item()) <= tol, (threshold.grad.item(), neg_g_k.item())
    # the adapter's gradient flows through active tokens only; base always gets the full gradient
    assert torch.equal(b.grad, grad_out)
    assert torch.equal(dl.grad.reshape(-1, d)[~mask], torch.zeros_like(flat_base[~mask]))
    assert torch.equal(dl.grad.reshape(-1, d)[mask], grad_out.reshape(-1, d)[mask])


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(DTYPES)), tau=THRESHOLDS, lam=LAMBDAS, padding=PADDING,
       with_bias=st.booleans(), tensor_scale=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_low_rank_gate_equals_token_gate_with_its_delta(data, dtype, tau, lam, padding, with_bias, tensor_scale, seed):
    dt = DTYPES[dtype]
    lead = _lead_shape(data.draw)
    d_out, r = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 4))
    c = data.draw(st.sampled_from([0.25, 1.0, 2.0]))
    gen = torch.Generator().manual_seed(seed)
    w0x = _tensors(gen, (*lead, d_out), dt)  # W0 x: the base output without its bias
    if data.draw(st.booleans()):  # W0 x = 0 but base = bias != 0: the ratio must still be +inf
        w0x[torch.rand(lead, generator=gen) < 0.3] = 0
    z = _tensors(gen, (*lead, r), dt)
    B = _tensors(gen, (d_out, r), dt, scale=0.5)
    bias = _tensors(gen, (d_out,), dt, scale=2.0) if with_bias else None
    grad_out = _tensors(gen, (*lead, d_out), dt)
    real = _token_mask(padding, lead, gen)
    delta = c * z @ B.t()  # the update the rank-space gate must reproduce
    assume(not _near_threshold(w0x, delta, tau, 5e-2 if dt == torch.bfloat16 else 1e-4))
    results = []
    for fast in (True, False):
        tau_p = torch.nn.Parameter(torch.tensor([tau], dtype=torch.float32))
        zz, BB = z.clone().requires_grad_(), B.clone().requires_grad_()
        base_leaf = w0x.clone().requires_grad_()
        stats = torch.zeros(4, dtype=torch.float64)
        if fast:
            scale = torch.tensor(c, dtype=torch.float32) if tensor_scale else c
            base = base_leaf + bias if bias is not None else base_leaf * 1  # non-leaf: updated in place
            flat_real = None if real is None else real.reshape(-1)
            out = tspeft.low_rank_gate(base, zz, BB, scale, tau_p, lam, flat_real, bias=bias, stats=stats)
        else:  # the ratio uses W0 x without bias: gate W0 x, then add the bias
            out = tspeft.token_gate(base_leaf, c * zz @ BB.t(), tau_p, lam, real, stats=stats)
            out = out + bias if bias is not None else out
        out.backward(grad_out)
        results.append((out.detach().double(), tau_p.grad.double(), zz.grad.double(), BB.grad.double(),
                        base_leaf.grad.double(), stats))
    (out1, tau1, z1, B1, base1, stats1), (out2, tau2, z2, B2, base2, stats2) = results
    assert torch.equal(stats1[:2], stats2[:2])  # the same tokens active, the same real tokens
    _, _, mu, _ = _reference(w0x, delta, grad_out, tau, lam, real)
    if dt == torch.bfloat16:
        rtol, g_tol = 3e-2, 3e-2 * (float(mu.abs().sum()) + 1.0)
    else:
        rtol = 1e-9 if dt == torch.float64 else 1e-5
        g_tol = max(rtol, 1e-6) * (float(mu.abs().sum()) + lam * mu.numel() + 1.0)
    scale_out = float(out2.abs().max()) + 1.0
    torch.testing.assert_close(out1, out2, rtol=rtol, atol=rtol * scale_out)
    assert abs(tau1.item() - tau2.item()) <= g_tol, (tau1.item(), tau2.item())
    for a, b in ((z1, z2), (B1, B2), (base1, base2)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * (float(b.abs().max()) + 1.0))
