r"""The gate in rank space, for updates of the form :math:`delta_i = c\, B z_i` (DESIGN.md §2).

LoRA: :math:`z_i = A\,dropout(x_i)`; AdaLoRA: :math:`z_i = (E \odot A)\,dropout(x_i)`, :math:`c` = scaling / ranknum;
parallel adapter: :math:`z_i = act(down(dropout(x_i)))`, :math:`B` = up. Then

.. math::
    \|delta_i\|^2 = c^2 z_i^T (B^T B) z_i, \qquad mask_i\, delta_i = c B (mask_i z_i), \qquad
    mu_i = c \langle B^T g_i, z_i \rangle

so nothing d_out-sized is formed for the gate or saved for backward: the mask is applied to ``z`` and
the update is one ``addmm`` into the base output. DoRA (:class:`DoraGate`) rescales columns, which is not
low rank; its column norm :math:`\|W_0 + c B A\|_{row}` is computed without forming :math:`BA`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .gate import LamFactor, acc_dtype, gate_mask, record_stats, threshold_grad


def _base_norm(base2: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """Return ||W0 x_i|| per token: the base output without its bias (N,)."""
    if bias is None:
        return torch.linalg.vector_norm(base2, dim=-1, dtype=acc)
    return torch.linalg.vector_norm(base2 - bias.to(base2.dtype), dim=-1, dtype=acc)


def _scale_value(scale: float | torch.Tensor, acc: torch.dtype) -> float | torch.Tensor:
    return scale.to(acc).reshape(()) if isinstance(scale, torch.Tensor) else float(scale)


class LowRankGate(torch.autograd.Function):
    """out = base + c * B (mask * z), with mu and -g_k in backward; `base` is updated in place."""

    @staticmethod
    def forward(ctx, base, z, B, scale, bias, threshold, real, lam, lam_factor, stats):
        dtype, acc = base.dtype, acc_dtype(base.dtype)
        base2, z2 = base.view(-1, base.shape[-1]), z.reshape(-1, z.shape[-1])  # (N, d_out), (N, r)
        c = _scale_value(scale, acc)
        Bc = B.to(dtype)
        Ba, za = B.to(acc), z2.to(acc)
        gram = Ba.t() @ Ba  # (r, r)
        delta_norm = ((za @ gram) * za).sum(-1).clamp_min(0).sqrt() * abs(c)  # (N,)
        base_norm = _base_norm(base2, bias, acc)
        mask = gate_mask(delta_norm, base_norm, threshold.detach().to(acc))
        record_stats(stats, mask, real, delta_norm, base_norm)
        w = (mask.to(acc) * c).to(dtype)  # (N,) mask and scaling in one vector
        base2.addmm_(z2 * w.unsqueeze(-1), Bc.t())
        ctx.mark_dirty(base)
        ctx.save_for_backward(z2, B, w, mask, real, scale if isinstance(scale, torch.Tensor) else None)
        ctx.c, ctx.lam, ctx.lam_factor = c, lam, lam_factor
        ctx.z_shape, ctx.tau_dtype = z.shape, threshold.dtype
        return base

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z2, B, w, mask, real, _ = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        acc = acc_dtype(g.dtype)
        gB = g @ B.to(g.dtype)  # (N, r): B^T g_i, needed by LoRA's backward anyway
        grad_z = grad_B = grad_tau = grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_z = (gB * w.unsqueeze(-1).to(gB.dtype)).view(ctx.z_shape)
        if ctx.needs_input_grad[2]:
            grad_B = (g.t() @ (z2.to(g.dtype) * w.unsqueeze(-1).to(g.dtype))).to(B.dtype)
        if ctx.needs_input_grad[5] or ctx.needs_input_grad[3]:
            gz = (gB.to(acc) * z2.to(acc)).sum(-1)  # <B^T g_i, z_i>, (N,)
            if ctx.needs_input_grad[5]:
                mu = gz * ctx.c  # Eq. 9 in rank space
                grad_tau = threshold_grad(mu, mask, real, ctx.lam, ctx.lam_factor).reshape(1).to(ctx.tau_dtype)
            if ctx.needs_input_grad[3]:  # a tensor scale (AdaLoRA's scaling / ranknum) in the graph
                scale = ctx.saved_tensors[5]
                grad_scale = torch.where(mask, gz, torch.zeros_like(gz)).sum().reshape(scale.shape).to(scale.dtype)
        return grad_out, grad_z, grad_B, grad_scale, None, grad_tau, None, None, None, None


def low_rank_gate(
    base: torch.Tensor,
    z: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
    threshold: torch.Tensor,
    lam: float,
    real: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    lam_factor: LamFactor = None,
) -> torch.Tensor:
    """Return base + mask * c * B z for base (..., d_out) with bias, z (..., r), B (d_out, r)."""
    base = base if base.is_contiguous() else base.contiguous()  # updated in place through a view
    return LowRankGate.apply(base, z, B, scale, bias, threshold, real, float(lam), lam_factor, stats)


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    weight_sq: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    r"""Return :math:`\|w_j + c (BA)_j\|` per output row without forming BA (detached, as in DoRA §4.3).

    :math:`\|w_j\|^2 + 2c\, B_j (A w_j) + c^2 B_j (A A^T) B_j^T`; weight (d_out, d_in), weight_sq (d_out,)
    precomputed once since W0 is frozen, A (r, d_in), B (d_out, r).
    """
    acc = acc_dtype(A.dtype)
    Aa, Ba = A.to(acc), B.to(acc)
    aw = Aa @ weight.to(acc).t()  # (r, d_out)
    cross = (Ba * aw.t()).sum(-1)  # (d_out,)
    quad = ((Ba @ (Aa @ Aa.t())) * Ba).sum(-1)  # (d_out,)
    return (weight_sq.to(acc) + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()


class DoraGate(torch.autograd.Function):
    r"""DoRA's update :math:`delta = (m/\|W'\| - 1) \odot b' + (m/\|W'\|) \odot c B z`, gated per token.

    b' is W0 dropout(x) without bias (`base_drop`), or base - bias when there is no dropout. Saved for
    backward: b' (or base), z, the mask; c B z is recomputed (N r d_out flops) instead of being stored.
    """

    @staticmethod
    def forward(ctx, base, base_drop, z, B, magnitude, weight_norm, scale, bias, threshold, real, lam, lam_factor, stats):
        dtype, acc = base.dtype, acc_dtype(base.dtype)
        d_out = base.shape[-1]
        base2, z2 = base.reshape(-1, d_out), z.reshape(-1, z.shape[-1])
        bprime = _bprime(base2, base_drop, bias)
        sv = (magnitude.to(acc) / weight_norm.to(acc)).to(dtype)  # (d_out,)
        lz = (z2 @ B.to(dtype).t()) * scale  # (N, d_out)
        delta = (sv - 1) * bprime + sv * lz
        delta_norm = torch.linalg.vector_norm(delta, dim=-1, dtype=acc)
        base_norm = _base_norm(base2, bias, acc)
        mask = gate_mask(delta_norm, base_norm, threshold.detach().to(acc))
        record_stats(stats, mask, real, delta_norm, base_norm)
        out = torch.where(mask.unsqueeze(-1), base2 + delta, base2)
        ctx.save_for_backward(base2 if base_drop is None else base_drop.reshape(-1, d_out), z2, B, sv, weight_norm, mask, real, bias)
        ctx.has_drop, ctx.scale, ctx.lam, ctx.lam_factor = base_drop is not None, float(scale), lam, lam_factor
        ctx.shapes, ctx.tau_dtype, ctx.mag_dtype = (base.shape, z.shape), threshold.dtype, magnitude.dtype
        return out.view(base.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved, z2, B, sv, weight_norm, mask, real, bias = ctx.saved_tensors
        base_shape, z_shape = ctx.shapes
        g = grad_out.reshape(-1, grad_out.shape[-1])
        acc, c = acc_dtype(g.dtype), ctx.scale
        bprime = saved if ctx.has_drop else _bprime(saved, None, bias)
        gm = torch.where(mask.unsqueeze(-1), g, torch.zeros_like(g))  # masked incoming gradient
        lz = (z2 @ B.to(g.dtype).t()) * c
        gs = g * sv  # (N, d_out)
        gB = gs @ B.to(g.dtype)  # (N, r)
        grads = [None] * 13
        if ctx.needs_input_grad[0]:
            grads[0] = grad_out if ctx.has_drop else (g + gm * (sv - 1)).view(base_shape)
        if ctx.needs_input_grad[1]:
            grads[1] = (gm * (sv - 1)).view(base_shape)
        if ctx.needs_input_grad[2]:
            grads[2] = (gB * (mask.to(gB.dtype) * c).unsqueeze(-1)).view(z_shape)
        if ctx.needs_input_grad[3]:
            grads[3] = (c * (gm * sv).t() @ z2.to(g.dtype)).to(B.dtype)
        if ctx.needs_input_grad[4]:
            grads[4] = ((gm.to(acc) * (bprime + lz).to(acc)).sum(0) / weight_norm.to(acc)).to(ctx.mag_dtype)
        if ctx.needs_input_grad[8]:
            # mu_i = <g_i, (sv - 1) b'_i + sv c B z_i> = <g_i, (sv - 1) b'_i> + c <(g_i sv) B, z_i>   (Eq. 9)
            mu = (g.to(acc) * ((sv - 1) * bprime).to(acc)).sum(-1) + c * (gB.to(acc) * z2.to(acc)).sum(-1)
            grads[8] = threshold_grad(mu, mask, real, ctx.lam, ctx.lam_factor).reshape(1).to(ctx.tau_dtype)
        return tuple(grads)


def _bprime(base2: torch.Tensor, base_drop: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Return b' = W0 dropout(x) without bias: base_drop if given, else base - bias."""
    if base_drop is not None:
        return base_drop.reshape(base2.shape)
    return base2 if bias is None else base2 - bias.to(base2.dtype)


def dora_gate(
    base: torch.Tensor,
    base_drop: torch.Tensor | None,
    z: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scale: float,
    threshold: torch.Tensor,
    lam: float,
    real: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    lam_factor: LamFactor = None,
) -> torch.Tensor:
    """Return base + mask * delta_DoRA; see :class:`DoraGate`."""
    return DoraGate.apply(
        base, base_drop, z, B, magnitude, weight_norm, scale, bias, threshold, real, float(lam), lam_factor, stats
    )
