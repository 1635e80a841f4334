r"""The token gate (Eq. 2-3) and the threshold's surrogate gradient (Eq. 9, 15), for any PEFT update.

For token :math:`i` with frozen output :math:`base_i = W_0 x_i` and update :math:`delta_i = M(x_i)`:

.. math::
    ratio_i = \|delta_i\| / \|base_i\|, \quad mask_i = [ratio_i \ge \tau], \quad
    out_i = base_i + mask_i \, delta_i

The comparison is made as :math:`\|delta_i\| \ge \tau \|base_i\|`, so a token whose base output is zero is
active for every finite :math:`\tau` (its ratio is :math:`+\infty`), and every token is active when
:math:`\tau \le 0`. Backward: the mask is a constant, and with :math:`g_i = \partial L / \partial out_i`,

.. math::
    mu_i = \langle g_i, delta_i \rangle, \qquad
    g_k = \sum_{i\,real} [\,(mu_i \ge 0) = mask_i\,]\, mu_i + \lambda \sum_{i\,real} mask_i

and ``threshold.grad`` receives :math:`-g_k`, so that a descent step is the paper's
:math:`\tau \leftarrow \tau + \alpha s\, g_k`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

LamFactor = Callable[[], "float | torch.Tensor"] | None


def gate_mask(delta_norm: torch.Tensor, base_norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Return mask_i = ||delta_i|| >= threshold * ||base_i|| (Eq. 3), all true where threshold <= 0."""
    # (N,) fp32 norms; threshold (1,). `threshold <= 0` also covers -inf * 0 = nan for zero base rows.
    return (delta_norm >= threshold * base_norm).logical_or_(threshold <= 0)


def threshold_grad(
    mu: torch.Tensor,
    mask: torch.Tensor,
    real: torch.Tensor | None,
    lam: float,
    lam_factor: LamFactor = None,
) -> torch.Tensor:
    """Return -g_k of Eq. 15 (a 0-d fp32 tensor) from per-token mu (N,), mask (N,) and real (N,) or None."""
    # The sum is a dot product with the consistency mask as 0/1, so that a non-finite mu (NaN/inf loss or
    # gradient) reaches g_k and the optimizer skips the step: 0 * NaN and 0 * inf are NaN, where a
    # select (mu where consistent, else 0) would drop an active token with mu = NaN silently (NaN >= 0
    # is false). Padding is zeroed first: its outputs may be anything, and it never counts.
    consistent = (mu >= 0).eq_(mask)
    active = mask
    if real is not None:
        consistent.logical_and_(real)
        active = active & real
        mu = torch.where(real, mu, 0.0)
    g_k = torch.dot(as_float(consistent, mu.dtype), mu)
    if lam != 0.0:
        factor = 1.0 if lam_factor is None else lam_factor()
        count = active.sum(dtype=mu.dtype)
        if isinstance(factor, torch.Tensor):
            g_k = g_k + (lam * factor) * count
        else:
            g_k.add_(count, alpha=lam * factor)
    return g_k.neg_()


def inside_backward() -> bool:
    """Return True while autograd is running a backward pass (e.g. a checkpointed forward's recompute)."""
    return torch._C._current_graph_task_id() != -1


def record_stats(
    stats: torch.Tensor | None,
    mask: torch.Tensor,
    real: torch.Tensor | None,
    delta_norm: torch.Tensor,
    base_norm: torch.Tensor,
) -> None:
    """Add [active, real, sum ratio, sum ||delta||] of real tokens to `stats` (4,) in place, on device."""
    if stats is None or inside_backward():
        return  # a checkpoint's recompute must not count the same tokens twice
    # ratio for statistics: a zero base row gives +inf in Eq. 3; clamp so that means stay finite
    ratio = delta_norm / base_norm.clamp_min(torch.finfo(base_norm.dtype).tiny)
    ratio = torch.nan_to_num_(ratio, nan=0.0, posinf=torch.finfo(ratio.dtype).max)
    dtype = delta_norm.dtype
    if real is None:  # [active, N, sum ratio, sum ||delta||]: one (4, N) row sum
        ones = torch.ones_like(delta_norm)
        stats.add_(torch.stack([as_float(mask, dtype), ones, ratio, delta_norm]).sum(-1))
        return
    w = as_float(real, dtype)  # one (4, N) @ (N,) product: [sum mask w, sum w (w is 0/1), sum ratio w, sum ||delta|| w]
    stats.add_(torch.stack([as_float(mask, dtype), w, ratio, delta_norm]) @ w)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype norms and mu are accumulated in: fp32, or fp64 for fp64 inputs."""
    return _ACC.get(dtype) or torch.promote_types(dtype, torch.float32)  # a lookup: this runs per call


def as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return a bool tensor as 0/1 in dtype. Through uint8: on CPU ~8x faster than ``mask.to(dtype)``, and
    a float mask multiplies ~5x faster than a bool one."""
    return mask.view(torch.uint8).to(dtype)


class TokenGate(torch.autograd.Function):
    """Eq. 2-3 forward and Eq. 9/15 backward for an explicit `delta` (the generic, d_out-sized path)."""

    @staticmethod
    def forward(ctx, base, delta, threshold, real, lam, lam_factor, stats):
        base2, delta2 = _flat(base), _flat(delta)  # (N, d)
        acc = acc_dtype(base.dtype)
        base_norm = torch.linalg.vector_norm(base2, dim=-1, dtype=acc)
        delta_norm = torch.linalg.vector_norm(delta2, dim=-1, dtype=acc)
        mask = gate_mask(delta_norm, base_norm, threshold.to(acc))  # (N,); in forward: nothing to detach from
        record_stats(stats, mask, real, delta_norm, base_norm)
        # where, not base + mask * delta: an inactive token equals base exactly even if delta is inf/nan
        out = torch.where(mask.unsqueeze(-1), base2 + delta2, base2)
        ctx.save_for_backward(delta2, mask, real)
        ctx.lam, ctx.lam_factor = lam, lam_factor
        ctx.shape, ctx.tau_dtype = base.shape, threshold.dtype
        return out.view(base.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        delta2, mask, real = ctx.saved_tensors
        g = _flat(grad_out)
        grad_base = grad_delta = grad_tau = None
        if ctx.needs_input_grad[0]:
            grad_base = grad_out
        if ctx.needs_input_grad[1]:
            grad_delta = torch.where(mask.unsqueeze(-1), g, torch.zeros_like(g)).view(ctx.shape)
        if ctx.needs_input_grad[2]:
            acc = acc_dtype(g.dtype)
            mu = (g.to(acc) * delta2.to(acc)).sum(-1)  # Eq. 9, (N,)
            grad_tau = threshold_grad(mu, mask, real, ctx.lam, ctx.lam_factor).reshape(1).to(ctx.tau_dtype)
        return grad_base, grad_delta, grad_tau, None, None, None, None


def _real_tokens(token_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Return token_mask flattened to (N,) bool, or None; raise if its size does not match."""
    if token_mask is None:
        return None
    real = token_mask.reshape(-1)
    if real.numel() != n:
        raise ValueError(
            f"token_mask has {real.numel()} entries but the input has {n} tokens; "
            "pass a mask with the input's leading shape (..., ) (true for real tokens)"
        )
    return real if real.dtype == torch.bool else real != 0


def _check_threshold(threshold: torch.Tensor) -> None:
    if not isinstance(threshold, torch.Tensor) or threshold.numel() != 1:
        raise ValueError("threshold must be a one-element tensor (a torch.nn.Parameter of shape (1,))")


def token_gate(
    base: torch.Tensor,
    delta: torch.Tensor,
    threshold: torch.Tensor,
    lam: float,
    token_mask: torch.Tensor | None = None,
    *,
    stats: torch.Tensor | None = None,
    lam_factor: LamFactor = None,
) -> torch.Tensor:
    """Return base + mask * delta (Eq. 2-3); backward gives threshold.grad = -g_k (Eq. 15).

    base, delta: (..., d). threshold: a one-element tensor. token_mask: (...,) true for real tokens
    (padding counts neither in g_k nor in statistics); None means every position is real.
    stats: optional (4,) float64 tensor accumulating [active, real, sum ratio, sum ||delta||].
    lam_factor: optional callable giving the factor applied to lambda at backward time (loss scale x
    world size), so that lambda's term is scaled like the loss's.
    """
    if base.shape != delta.shape:
        raise ValueError(f"base {tuple(base.shape)} and delta {tuple(delta.shape)} must have the same shape")
    _check_threshold(threshold)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    real = _real_tokens(token_mask, base.numel() // max(base.shape[-1], 1))
    return TokenGate.apply(base, delta, threshold, real, float(lam), lam_factor, stats)
