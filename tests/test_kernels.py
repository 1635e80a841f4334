"""Triton kernels of the rank-space gate against the PyTorch reference (CUDA, or Triton's CPU interpreter)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tspeft import kernels
from tspeft.lowrank import _rank_backward, _rank_forward

CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the PyTorch path is used everywhere", allow_module_level=True)
INTERPRET = kernels.interpreter()
# Without CUDA the kernels run in Triton's interpreter, which must be on before triton is first imported
# (peft imports it): this file then runs itself again in a child process with TRITON_INTERPRET=1.
IN_CHILD = CUDA or INTERPRET
in_child = pytest.mark.skipif(not IN_CHILD, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(IN_CHILD, reason="already on CUDA or in the interpreter")
def test_kernels_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider", "-x"]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}


def _away_from_boundary(ratio: torch.Tensor) -> float:
    """Return a threshold midway between the two sorted ratios around the median: no token sits on it."""
    s = ratio.double().sort().values
    k = len(s) // 2
    return float((s[k - 1] + s[k]) / 2)


def _case(n: int, r: int, dtype: torch.dtype, tensor_scale: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, r, generator=g).to(DEVICE, dtype)
    B = (torch.randn(48, r, generator=g) * 0.1).to(DEVICE, dtype)
    base_norm = (torch.rand(n, generator=g) + 0.5).to(DEVICE)
    real = (torch.rand(n, generator=g) > 0.3).to(DEVICE)
    c = torch.tensor([1.7], device=DEVICE) if tensor_scale else 1.7
    zf = z.float()
    ratio = (zf @ (B.float().t() @ B.float()) * zf).sum(-1).sqrt() * 1.7 / base_norm
    tau = torch.tensor([_away_from_boundary(ratio)], device=DEVICE)
    return z, B, base_norm, real, c, tau


@in_child
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,r", [(1, 4), (130, 16), (257, 32), (64, 7)])
@pytest.mark.parametrize("tensor_scale", [False, True])
@pytest.mark.parametrize("with_real", [False, True])
def test_forward_kernel_matches_reference(dtype, n, r, tensor_scale, with_real):
    z, B, base_norm, real, c, tau = _case(n, r, dtype, tensor_scale)
    real = real if with_real else None
    cval = c.reshape(()) if tensor_scale else c
    out = {}
    for use in (False, True):
        stats = torch.zeros(4, dtype=torch.float64, device=DEVICE)
        with kernels.use(use):
            zw, mask = _rank_forward(z, B, cval, base_norm, tau, real, stats)
        out[use] = (zw, mask, stats)
    (zw0, m0, s0), (zw1, m1, s1) = out[False], out[True]
    assert m1.dtype == torch.bool and torch.equal(m0, m1)
    assert zw1.dtype == z.dtype
    torch.testing.assert_close(zw1.float(), zw0.float(), **_tol(dtype))
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)


@in_child
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernel_edge_thresholds(dtype):
    z, B, base_norm, real, c, _ = _case(50, 8, dtype, False)
    base_norm[:5] = 0.0  # zero base output: ratio +inf, active for every finite threshold
    for tau_value in (float("-inf"), 0.0, 1e30, float("inf")):
        tau = torch.tensor([tau_value], device=DEVICE)
        masks = []
        for use in (False, True):
            stats = torch.zeros(4, dtype=torch.float64, device=DEVICE)
            with kernels.use(use):
                _, mask = _rank_forward(z, B, c, base_norm, tau, real, stats)
            masks.append((mask, stats))
        assert torch.equal(masks[0][0], masks[1][0]), tau_value
        torch.testing.assert_close(masks[0][1], masks[1][1], rtol=1e-5, atol=1e-5)


@in_child
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,r", [(3, 4), (200, 16), (129, 33)])
@pytest.mark.parametrize("tensor_scale", [False, True])
@pytest.mark.parametrize("with_real", [False, True])
@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_backward_kernel_matches_reference(dtype, n, r, tensor_scale, with_real, lam):
    g = torch.Generator().manual_seed(1)
    gB = torch.randn(n, r, generator=g).to(DEVICE, dtype)
    z = torch.randn(n, r, generator=g).to(DEVICE, dtype)
    mask = (torch.rand(n, generator=g) > 0.5).to(DEVICE)
    real = (torch.rand(n, generator=g) > 0.2).to(DEVICE) if with_real else None
    c = torch.tensor(0.8, device=DEVICE) if tensor_scale else 0.8
    out = {}
    for use in (False, True):
        with kernels.use(use):
            out[use] = _rank_backward(gB, z, mask, real, c, lam, lambda: 2.0, (True, True, True, True))
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b.float(), a.float(), **_tol(dtype))


@in_child
def test_kernels_read_a_strided_padding_mask_as_torch_does():
    """A bool attention mask's view (e.g. mask[:, ::2]) reaches the gate as a strided `real`."""
    z, B, base_norm, real, c, tau = _case(40, 8, torch.float32, False)
    strided = real.repeat_interleave(2)[::2]
    assert strided.stride(0) == 2 and torch.equal(strided, real)
    gB = torch.randn(40, 8, device=DEVICE)
    out = {}
    for use in (False, True):
        stats = torch.zeros(4, dtype=torch.float64, device=DEVICE)
        with kernels.use(use):
            _, mask = _rank_forward(z, B, c, base_norm, tau, strided, stats)
            grads = _rank_backward(gB, z, mask, strided, c, 1e-2, None, (True, True, True, True))
        out[use] = (stats, grads[2])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)


@in_child
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_backward_kernel_non_finite_mu_reaches_g_k(bad):
    gB = torch.randn(70, 8, device=DEVICE)
    z = torch.randn(70, 8, device=DEVICE)
    gB[3, 2] = bad
    mask = torch.rand(70, device=DEVICE) > 0.5
    out = {}
    for use in (False, True):
        with kernels.use(use):
            out[use] = _rank_backward(gB, z, mask, None, 1.3, 1e-3, None, (True, True, True, True))
    ref, got = out[False][2], out[True][2]
    assert not torch.isfinite(ref) and not torch.isfinite(got)
    assert torch.isnan(ref) == torch.isnan(got)


def _tiny_models():
    from conftest import tiny_llama, with_adapter

    import tspeft

    for method in ("lora", "adalora", "adapter"):
        dense = with_adapter(tiny_llama(dtype=torch.float32), "llama", method).to(DEVICE)
        gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(lam=1e-2))
        yield method, gated


@in_child
def test_gated_models_same_with_and_without_kernels():
    from conftest import batch

    import tspeft

    for method, model in _tiny_models():
        taus = tspeft.threshold_parameters(model)
        results = []
        for use in (False, True):
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for i, t in enumerate(taus.values()):
                    t.fill_(0.0 if i % 3 == 0 else 0.05 * (i % 5))
            tspeft.reset_stats(model)
            data = {k: v.to(DEVICE) for k, v in batch("llama").items()}
            with kernels.use(use):
                out = model(**data)
                out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.logits.detach(), grads, tspeft.sparsity(model)))
        (l0, g0, s0), (l1, g1, s1) = results
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5, msg=method)
        assert g0.keys() == g1.keys() and any(n.endswith("ts_threshold") for n in g0), method
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=f"{method} {n}")
        assert s0 == pytest.approx(s1, nan_ok=True), method


@in_child
def test_automatic_choice():
    cpu = torch.zeros(2, 4)
    with kernels.use(None):
        assert kernels.enabled(cpu) is False  # CPU tensors always take the PyTorch path unless forced
        if CUDA:
            assert kernels.enabled(cpu.cuda()) is (kernels.unavailable_reason() is None)
            assert kernels.enabled(cpu.cuda().double()) is False
    with kernels.use(False):
        assert kernels.enabled(cpu) is False


def _same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True)


@in_child
@pytest.mark.parametrize("where", ["z", "base_norm", "scale"])
def test_non_finite_values_reach_the_same_places_as_in_the_reference(where):
    """A NaN in z, in a base norm or in the scale: the kernels keep it where the reference does (the
    statistics, an inactive token's zw, the loss) instead of dropping it (maxnum) or selecting around it."""
    z, B, base_norm, real, c, tau = _case(70, 8, torch.float32, tensor_scale=True)
    if where == "z":
        z[10, 2] = float("nan")
        base_norm[1], z[1, 0] = 0.0, float("nan")  # a zero base too: the reference leaves this token inactive
    elif where == "base_norm":
        base_norm[20] = float("nan")
    else:
        c = torch.tensor([float("nan")], device=DEVICE)
    gB = torch.randn(70, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = {}
    for use in (False, True):
        stats = torch.zeros(4, dtype=torch.float64, device=DEVICE)
        with kernels.use(use):
            zw, mask = _rank_forward(z, B, c.reshape(()), base_norm, tau, real, stats)
            back = _rank_backward(gB, z, mask, real, c.reshape(()), 0.1, None, (True, True, True, True))
        out[use] = (zw, mask, stats, back)
    (zw0, mask0, stats0, back0), (zw1, mask1, stats1, back1) = out[False], out[True]
    assert torch.equal(mask0, mask1)
    _same_or_both_nan(zw0, zw1)
    _same_or_both_nan(stats0, stats1)
    for ref, ker in zip(back0, back1):
        _same_or_both_nan(ref.reshape(-1), ker.reshape(-1))


@in_child
def test_a_strided_mask_is_read_as_the_reference_reads_it():
    z, B, base_norm, real, c, tau = _case(70, 8, torch.float32, tensor_scale=False)
    mask = (torch.rand(140, generator=torch.Generator().manual_seed(5)) > 0.5).to(DEVICE)[::2]  # stride 2
    gB = torch.randn(70, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = {}
    for use in (False, True):
        with kernels.use(use):
            out[use] = _rank_backward(gB, z, mask, real, c, 0.1, None, (True, True, True, False))
    for ref, ker in zip(out[False][:3], out[True][:3]):
        torch.testing.assert_close(ker, ref, rtol=1e-5, atol=1e-6)
