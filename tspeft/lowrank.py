r"""The gate in rank space, for updates of the form :math:`delta_i = c\, B z_i` (docs/performance.md).

LoRA: :math:`z_i = A\,dropout(x_i)`; AdaLoRA: :math:`z_i = (E \odot A)\,dropout(x_i)`, :math:`c` = scaling / ranknum;
parallel adapter: :math:`z_i = act(down(dropout(x_i)))`, :math:`B` = up. Then

.. math::
    \|delta_i\|^2 = c^2 z_i^T (B^T B) z_i, \qquad mask_i\, delta_i = c B (mask_i z_i), \qquad
    mu_i = c \langle B^T g_i, z_i \rangle

so nothing d_out-sized is formed for the gate or saved for backward: the mask is applied to ``z`` and
the update is one ``addmm`` into the base output. DoRA (:class:`DoraGate`) rescales columns, which is not
low rank; its column norm :math:`\|W_0 + c B A\|_{row}` is computed without forming :math:`BA`.

For a frozen ``nn.Linear`` base (peft's case) :class:`LinearLowRankGate` and :class:`LinearDoraGate` also
take ``x`` and ``W0``, so that x's input gradients through ``W0`` and ``A`` share one buffer. The per-token
rank-space work (:func:`_rank_forward`, :func:`_rank_backward`) runs as Triton kernels on CUDA when they
are available (:mod:`tspeft.kernels`); these PyTorch functions are the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from . import dropout, kernels
from .gate import LamFactor, acc_dtype, as_float, gate_mask, inside_backward, record_stats, threshold_grad


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return t in dtype; t itself when it already is (``Tensor.to`` costs a dispatch even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def _base_norm(base2: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """Return ||W0 x_i|| per token: the base output without its bias (N,)."""
    if bias is None:
        return torch.linalg.vector_norm(base2, dim=-1, dtype=acc)
    return torch.linalg.vector_norm(base2 - bias.to(base2.dtype), dim=-1, dtype=acc)


def _scale_value(scale: float | torch.Tensor, acc: torch.dtype) -> float | torch.Tensor:
    return _cast(scale, acc).reshape(()) if isinstance(scale, torch.Tensor) else float(scale)


def _rank_forward(
    z2: torch.Tensor,
    B: torch.Tensor,
    c: float | torch.Tensor,
    base_norm: torch.Tensor,
    threshold: torch.Tensor,
    real: torch.Tensor | None,
    stats: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (zw = mask * c * z (N, r) in z's dtype, mask (N,)) and record statistics (Eq. 3 in rank space).

    ||delta_i|| = |c| sqrt(z_i^T (B^T B) z_i); a Triton kernel fuses the per-token part on CUDA.
    """
    acc = acc_dtype(z2.dtype)
    Ba, za = _cast(B, acc), _cast(z2, acc)
    zg = za @ (Ba.t() @ Ba)  # (N, r): z_i^T B^T B, an (r, r) Gram matrix instead of anything d_out-sized
    if kernels.enabled(z2):
        return kernels.gate_forward(z2, zg, base_norm, threshold, c, real, None if inside_backward() else stats)
    delta_norm = torch.linalg.vecdot(zg, za).clamp_min_(0).sqrt_().mul_(abs(c))  # (N,)
    mask = gate_mask(delta_norm, base_norm, _cast(threshold, acc))  # in forward: no autograd to detach from
    record_stats(stats, mask, real, delta_norm, base_norm)
    w = as_float(mask, z2.dtype).mul_(c).unsqueeze_(-1)  # (N, 1): mask and scaling in one vector
    return z2 * w, mask


def _rank_backward(
    gB: torch.Tensor,
    z2: torch.Tensor,
    mask: torch.Tensor,
    real: torch.Tensor | None,
    c: float | torch.Tensor,
    lam: float,
    lam_factor: LamFactor,
    need: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return (dz, zw, -g_k, d scale) for gB = g @ B (N, r); `need` says which of the four to compute.

    dz = mask c B^T g (zero on inactive tokens), zw = mask c z (dB = g^T zw), -g_k of Eq. 15 with
    mu_i = c <B^T g_i, z_i> (Eq. 9), and sum over active tokens of <B^T g_i, z_i> (a tensor scale's gradient).
    """
    need_gz, need_zw, need_tau, need_scale = need
    grad_tau = grad_scale = None
    if kernels.enabled(gB):
        gz, zw, sums = kernels.gate_backward(gB, z2, mask, real, c)
        if need_tau:
            g_k = sums[0]
            if lam != 0.0:
                factor = 1.0 if lam_factor is None else lam_factor()
                g_k = g_k + (lam * factor) * sums[1]
            grad_tau = -g_k
        return gz, zw, grad_tau, sums[2] if need_scale else None
    dtype, acc = gB.dtype, acc_dtype(gB.dtype)
    w = as_float(mask, dtype).mul_(c).unsqueeze_(-1)  # (N, 1)
    gz = gB * w if need_gz else None
    zw = _cast(z2, dtype) * w if need_zw else None
    if need_tau or need_scale:
        dot = torch.linalg.vecdot(_cast(gB, acc), _cast(z2, acc))  # (N,): <B^T g_i, z_i> = mu_i / c
        if need_scale:  # a tensor scale (AdaLoRA's scaling / ranknum) in the graph
            grad_scale = torch.where(mask, dot, 0.0).sum()
        if need_tau:
            grad_tau = threshold_grad(dot.mul_(c), mask, real, lam, lam_factor)  # mu, Eq. 9
    return gz, zw, grad_tau, grad_scale


class LowRankGate(torch.autograd.Function):
    """out = base + c * B (mask * z), with mu and -g_k in backward; `base` is updated in place."""

    @staticmethod
    def forward(ctx, base, z, B, scale, bias, threshold, real, lam, lam_factor, stats):
        dtype, acc = base.dtype, acc_dtype(base.dtype)
        base2, z2 = base.view(-1, base.shape[-1]), z.reshape(-1, z.shape[-1])  # (N, d_out), (N, r)
        c = _scale_value(scale, acc)
        zw, mask = _rank_forward(z2, B, c, _base_norm(base2, bias, acc), threshold, real, stats)
        base2.addmm_(_cast(zw, dtype), _cast(B, dtype).t())
        ctx.mark_dirty(base)
        ctx.save_for_backward(z2, B, mask, real, scale if isinstance(scale, torch.Tensor) else None)
        ctx.c, ctx.lam, ctx.lam_factor = c, lam, lam_factor
        ctx.z_shape, ctx.tau_dtype = z.shape, threshold.dtype
        return base

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z2, B, mask, real, scale = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        gB = g @ B.to(g.dtype)  # (N, r): B^T g_i, needed by LoRA's backward anyway
        need = ctx.needs_input_grad
        gz, zw, grad_tau, grad_scale = _rank_backward(
            gB, z2, mask, real, ctx.c, ctx.lam, ctx.lam_factor, (need[1], need[2], need[5], need[3])
        )
        grad_z = None if gz is None else gz.view(ctx.z_shape)
        grad_B = None if zw is None else (zw.t() @ g).t().to(B.dtype)  # (r, N) @ (N, d_out): the faster order
        if grad_tau is not None:
            grad_tau = grad_tau.reshape(1).to(ctx.tau_dtype)
        if grad_scale is not None:
            grad_scale = grad_scale.reshape(scale.shape).to(scale.dtype)
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


def _fused_base(base: torch.Tensor, p: float) -> torch.Tensor:
    """Return the frozen output a fused gate updates in place (detached, contiguous); check the dropout p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    base = base.detach()
    return base if base.is_contiguous() else base.contiguous()


def _drop(x2: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return (dropout(x2), keep mask to save or None, generator state to replay or None) for p >= 0."""
    if p == 0.0:
        return x2, None, None
    replay = dropout.mode(x2) == "replay"
    state = dropout.rng_state(x2) if replay else None
    xd2, keep = dropout.dropout_with_keep(x2, p)
    return xd2, None if replay else keep, state


def _input_grads(
    ctx, x2: torch.Tensor, keep: torch.Tensor | None, g: torch.Tensor, W: torch.Tensor, gz: torch.Tensor,
    Ad: torch.Tensor, need_x: bool, need_A: bool, through: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r"""Return (x's gradient (N, d_in), A's gradient (r, d_in)), each None unless needed, for a fused gate on
    ``base = W0 x + b`` and ``z = A dropout(x)``:

    .. math::
        dx = g W_0 + D \odot (gz\, A + through\, W_0), \qquad dA = gz^T dropout(x)

    with :math:`D` = keep / (1 - p) (1 without dropout); `through` is a gradient that also reaches x
    through dropout and W0 (DoRA's b' under dropout). The large product ``g W0`` comes last, accumulated
    (``addmm_``, beta = 1) into the buffer the rank-r terms filled: no separate sum of two d_in-sized
    products, and on CPU the large GEMM writes into memory already touched (a fresh output costs a page
    fault per 4 KiB inside it). Under dropout, the buffer of ``x * keep`` (for dA) is reused for dx.
    """
    p = ctx.p
    if p == 0.0:
        grad_A = gz.t() @ x2 if need_A else None
        if not need_x:
            return None, grad_A
        return (gz @ Ad).addmm_(g, W), grad_A
    xd2, keepf = _dropped_again(ctx, x2, keep)
    s = 1.0 / (1.0 - p)
    buf = grad_A = None
    if need_A:
        if xd2 is None:  # from the saved mask: dropout(x) = s * (x * keep)
            buf = torch.mul(x2, keepf)
            grad_A = (gz.t() @ buf).mul_(s)
        else:  # drawn again: already dropout(x)
            buf = xd2
            grad_A = gz.t() @ buf
    if not need_x:
        return None, grad_A
    gzs = gz * s  # dropout's scale on the (N, r) factor
    buf = gzs @ Ad if buf is None else torch.mm(gzs, Ad, out=buf)
    if through is not None:
        buf.addmm_(through, W, alpha=s)
    return buf.mul_(keepf).addmm_(g, W), grad_A


def _dropped_again(ctx, x2: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Return (dropout(x) or None, keep as 0/1 in x's dtype) in backward: from the saved keep mask (then
    None), or drawn again from the saved generator state."""
    if keep is None:
        xd2, keep = dropout.replay(x2, ctx.p, ctx.rng)
        return xd2, as_float(keep, x2.dtype)
    return None, as_float(keep, x2.dtype)


class LinearLowRankGate(torch.autograd.Function):
    r""":class:`LowRankGate` with ``z = A dropout(x)`` inside, for a frozen ``nn.Linear`` base: x's gradient fused.

    Same numerics contract as ``LowRankGate`` applied to ``base = W0 x + b`` and ``z = A dropout(x)``, but
    the frozen base's and A's input gradients are one buffer: ``dx = g W0`` then ``dx += dz A`` in place
    (``addmm_``), instead of two d_in-sized products that autograd then adds. ``base`` is the detached
    value of ``W0 x + b`` (its autograd node is bypassed: W0 and b must not require grad) and is updated
    in place. ``p`` is the dropout probability (0: none); the mask is drawn as ``F.dropout`` draws it.
    Saved for backward: x (shared with every other module that reads it), z, the token mask, and under
    dropout either the keep mask (one byte per element) or only the generator state to draw it again
    (:mod:`tspeft.dropout`); never ``dropout(x)`` and nothing d_out-sized. With ``keep_z=False`` and no
    dropout, z is not saved but computed again in backward from x (one (N, d_in) x (d_in, r) product):
    r elements per token less to keep (see ``TSConfig.recompute_z``).
    """

    @staticmethod
    def forward(ctx, base, x, p, weight, A, B, scale, bias, threshold, real, lam, lam_factor, stats, keep_z):
        dtype, acc = base.dtype, acc_dtype(base.dtype)
        base2 = base.view(-1, base.shape[-1])  # (N, d_out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        xd2, keep, state = _drop(x2, p)
        z2 = xd2 @ _cast(A, dtype).t()  # (N, r)
        del xd2
        c = _scale_value(scale, acc)
        zw, mask = _rank_forward(z2, B, c, _base_norm(base2, bias, acc), threshold, real, stats)
        base2.addmm_(zw, _cast(B, dtype).t())
        ctx.mark_dirty(base)
        ctx.save_for_backward(x2, z2 if keep_z or p != 0.0 else None, A, B, weight, mask, real, keep)
        ctx.c, ctx.lam, ctx.lam_factor, ctx.p, ctx.rng = c, lam, lam_factor, p, state
        ctx.x_shape, ctx.tau_dtype = x.shape, threshold.dtype
        if isinstance(scale, torch.Tensor):
            ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return base

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, z2, A, B, weight, mask, real, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        dtype = g.dtype
        need = ctx.needs_input_grad
        gB = g @ _cast(B, dtype)  # (N, r): B^T g_i, for dz and mu
        if z2 is None:  # not kept (keep_z=False, no dropout): the forward's product again
            z2 = x2 @ _cast(A, dtype).t()
        gz, zw, grad_tau, grad_scale = _rank_backward(
            gB, z2, mask, real, ctx.c, ctx.lam, ctx.lam_factor,
            (need[1] or need[4], need[5], need[8], need[6]),
        )
        grads: list[torch.Tensor | None] = [None] * 14
        if need[1] or need[4]:
            grad_x, grad_A = _input_grads(ctx, x2, keep, g, _cast(weight, dtype), gz, _cast(A, dtype), need[1], need[4])
            grads[1] = None if grad_x is None else grad_x.view(ctx.x_shape)
            grads[4] = None if grad_A is None else _cast(grad_A, A.dtype)
        if need[5]:
            grads[5] = _cast((zw.t() @ g).t(), B.dtype)  # (d_out, r), as (r, N) @ (N, d_out): the faster order
        if grad_scale is not None:  # a tensor scale that trains (AdaLoRA's ranknum in some peft versions)
            grads[6] = _cast(grad_scale.reshape(ctx.scale_shape), ctx.scale_dtype)
        if grad_tau is not None:
            grads[8] = _cast(grad_tau.reshape(1), ctx.tau_dtype)
        return tuple(grads)


def linear_low_rank_gate(
    base: torch.Tensor,
    x: torch.Tensor,
    p: float,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
    threshold: torch.Tensor,
    lam: float,
    real: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    lam_factor: LamFactor = None,
    keep_z: bool = True,
) -> torch.Tensor:
    """Return W0 x + b + mask * c * B A dropout_p(x) given base = W0 x + b (frozen W0, b): see LinearLowRankGate.

    keep_z=False: without dropout, z = A x is computed again in backward instead of being kept.
    """
    base = _fused_base(base, p)
    return LinearLowRankGate.apply(
        base, x, float(p), weight, A, B, scale, bias, threshold, real, float(lam), lam_factor, stats, bool(keep_z)
    )


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
    Aa, Ba = _cast(A, acc), _cast(B, acc)
    aw = Aa @ _cast(weight, acc).t()  # (r, d_out)
    cross = (Ba * aw.t()).sum(-1)  # (d_out,)
    quad = ((Ba @ (Aa @ Aa.t())) * Ba).sum(-1)  # (d_out,)
    return (_cast(weight_sq, acc) + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()


def _dora_forward(
    base2: torch.Tensor,
    bprime: torch.Tensor,
    z2: torch.Tensor,
    B: torch.Tensor,
    sv: torch.Tensor,
    c: float,
    base_norm: torch.Tensor,
    threshold: torch.Tensor,
    real: torch.Tensor | None,
    stats: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out = base + mask * delta (N, d_out), mask (N,)) for DoRA; see :class:`DoraGate`."""
    dtype, acc = base2.dtype, acc_dtype(base2.dtype)
    Bs = (_cast(B, acc) * (c * sv).unsqueeze(-1)).to(dtype)  # (d_out, r): c s B
    delta = bprime * (sv - 1).to(dtype)  # (N, d_out), the one d_out-sized buffer of the forward
    delta.addmm_(_cast(z2, dtype), Bs.t())  # + s c B z
    delta_norm = torch.linalg.vector_norm(delta, dim=-1, dtype=acc)
    mask = gate_mask(delta_norm, base_norm, _cast(threshold, acc))
    record_stats(stats, mask, real, delta_norm, base_norm)
    # out = base + mask * delta, one pass into delta's buffer (a bool-masked where/masked_fill is several
    # times slower on CPU). As in the rank-space gates, a non-finite delta of an inactive token gives nan.
    return torch.addcmul(base2, delta, as_float(mask, dtype).unsqueeze(-1), out=delta), mask


def _dora_backward(
    g: torch.Tensor,
    bprime: Callable[[], torch.Tensor],
    z2: torch.Tensor,
    B: torch.Tensor,
    sv: torch.Tensor,
    weight_norm: torch.Tensor,
    mask: torch.Tensor,
    real: torch.Tensor | None,
    c: float,
    lam: float,
    lam_factor: LamFactor,
    need: dict[str, bool],
) -> dict[str, torch.Tensor]:
    """Return DoRA's gradients named in `need`: base (b' = base - bias), bprime (dropout's b'), z, B, magnitude, tau.

    g (N, d_out); bprime() gives b' when the magnitude or mu need it. base's gradient here includes its
    pass-through g; bprime's is only the update's, m (s - 1) g.
    """
    dtype, acc = g.dtype, acc_dtype(g.dtype)
    mf = as_float(mask, dtype).unsqueeze(-1)  # (N, 1): products with a float mask, not bool-masked where (slow on CPU)
    Bs = (_cast(B, acc) * (c * sv).unsqueeze(-1)).to(dtype)  # (d_out, r): c s B
    gB = g @ Bs  # (N, r): c B^T (s g_i)
    out: dict[str, torch.Tensor] = {}
    if need.get("z"):
        out["z"] = gB * mf
    G = None
    if need.get("B") or need.get("magnitude"):
        G = ((_cast(z2, dtype) * mf).t() @ g).t().to(acc)  # (d_out, r): sum_i m_i g_i z_i^T
    if need.get("B"):
        out["B"] = G * (c * sv).unsqueeze(-1)
    gb = None
    if need.get("magnitude") or need.get("tau"):
        bp = bprime()
        gb = _cast(g, acc) * _cast(bp, acc)  # (N, d_out): g_i * b'_i, once for the magnitude and for mu
        if need.get("magnitude"):
            mag = as_float(mask, acc) @ gb + c * (_cast(B, acc) * G).sum(-1)  # sum_i m_i g_i * (b'_i + c B z_i)
            out["magnitude"] = mag / _cast(weight_norm, acc)
        if need.get("tau"):
            # mu_i = <g_i, (s - 1) b'_i> + <g_i, s c B z_i> = (g_i * b'_i) . (s - 1) + (c B^T (s g_i)) . z_i  (Eq. 9)
            mu = gb @ (sv - 1) + torch.linalg.vecdot(_cast(gB, acc), _cast(z2, acc))
            out["tau"] = threshold_grad(mu, mask, real, lam, lam_factor)
    if need.get("base") or need.get("bprime"):
        # (s - 1) g, written into g * b''s buffer once that is used up: one (N, d_out) allocation, not three
        buf = gb if gb is not None and gb.dtype == dtype else None
        gm1 = torch.mul(g, (sv - 1).to(dtype), out=buf) if buf is not None else g * (sv - 1).to(dtype)
        if need.get("base"):  # g + m (s - 1) g, in place unless b''s gradient still needs (s - 1) g
            out["base"] = torch.addcmul(g, gm1, mf, out=None if need.get("bprime") else gm1)
        if need.get("bprime"):
            out["bprime"] = gm1.mul_(mf)
    return out


class DoraGate(torch.autograd.Function):
    r"""DoRA's update :math:`delta = (m/\|W'\| - 1) \odot b' + (m/\|W'\|) \odot c B z`, gated per token.

    b' is W0 dropout(x) without bias (`base_drop`), or base - bias when there is no dropout. Saved for
    backward: b' (or base), z, the mask; nothing else d_out-sized. With :math:`s = m/\|W'\|` (d_out,) folded
    into B's rows (:math:`B_s = c\, s \odot B`, d_out x r), every per-token product that involves B stays
    in rank space: :math:`delta = (s - 1) \odot b' + B_s z`, :math:`dz = B_s^T g`,
    :math:`dB = c\, s \odot G`, and the magnitude's gradient :math:`(\sum_i mask_i\, g_i \odot b'_i + c
    \sum_k B_{jk} G_{jk}) / \|W'\|` with :math:`G = g^T (mask \odot z)` (d_out x r); the products
    :math:`g_i \odot b'_i` are formed once for the magnitude and mu.
    """

    @staticmethod
    def forward(ctx, base, base_drop, z, B, magnitude, weight_norm, scale, bias, threshold, real, lam, lam_factor, stats):
        acc = acc_dtype(base.dtype)
        d_out = base.shape[-1]
        base2, z2 = base.reshape(-1, d_out), z.reshape(-1, z.shape[-1])
        bprime = _bprime(base2, base_drop, bias)
        sv = _cast(magnitude, acc) / _cast(weight_norm, acc)  # (d_out,)
        base_norm = (
            torch.linalg.vector_norm(bprime, dim=-1, dtype=acc) if base_drop is None else _base_norm(base2, bias, acc)
        )
        out, mask = _dora_forward(base2, bprime, z2, B, sv, float(scale), base_norm, threshold, real, stats)
        ctx.save_for_backward(base2 if base_drop is None else bprime, z2, B, sv, weight_norm, mask, real, bias)
        ctx.has_drop, ctx.scale, ctx.lam, ctx.lam_factor = base_drop is not None, float(scale), lam, lam_factor
        ctx.shapes, ctx.tau_dtype, ctx.mag_dtype = (base.shape, z.shape), threshold.dtype, magnitude.dtype
        return out.view(base.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved, z2, B, sv, weight_norm, mask, real, bias = ctx.saved_tensors
        base_shape, z_shape = ctx.shapes
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        need = ctx.needs_input_grad
        r = _dora_backward(
            g, lambda: saved if ctx.has_drop else _bprime(saved, None, bias), z2, B, sv, weight_norm, mask, real,
            ctx.scale, ctx.lam, ctx.lam_factor,
            {"base": need[0] and not ctx.has_drop, "bprime": need[1], "z": need[2], "B": need[3],
             "magnitude": need[4], "tau": need[8]},
        )
        grads: list[torch.Tensor | None] = [None] * 13
        if need[0]:
            grads[0] = grad_out if ctx.has_drop else r["base"].view(base_shape)
        if need[1]:
            grads[1] = r["bprime"].view(base_shape)
        if need[2]:
            grads[2] = r["z"].view(z_shape)
        if need[3]:
            grads[3] = r["B"].to(B.dtype)
        if need[4]:
            grads[4] = r["magnitude"].to(ctx.mag_dtype)
        if need[7] and not ctx.has_drop:
            # b' = base - bias here, so a trainable bias (peft's bias="all"/"lora_only") reaches the output
            # through base (g + m (s - 1) g, returned above) and through b' (-m (s - 1) g): net g
            mf = as_float(mask, g.dtype)
            grads[7] = ((mf @ g) * (sv - 1).to(g.dtype)).neg_().to(bias.dtype)
        if need[8]:
            grads[8] = r["tau"].reshape(1).to(ctx.tau_dtype)
        return tuple(grads)


class LinearDoraGate(torch.autograd.Function):
    """:class:`DoraGate` with ``z = A dropout(x)`` (and ``b' = W0 dropout(x)`` under dropout) inside, for a frozen ``nn.Linear``.

    As :class:`LinearLowRankGate`, x's input gradients through W0 and A share one buffer (``addmm_``);
    ``base`` is the detached value of ``W0 x + b`` (W0 and b must not require grad). ``p`` is the dropout
    probability (0: none); as there, x is kept for backward, not dropout(x).
    """

    @staticmethod
    def forward(ctx, base, x, p, weight, A, B, magnitude, weight_norm, scale, bias, threshold, real, lam, lam_factor, stats):
        dtype, acc = base.dtype, acc_dtype(base.dtype)
        base2 = base.view(-1, base.shape[-1])  # (N, d_out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        xd2, keep, state = _drop(x2, p)
        z2 = xd2 @ _cast(A, dtype).t()  # (N, r)
        if p == 0.0:
            bprime = _bprime(base2, None, bias)
            base_norm = torch.linalg.vector_norm(bprime, dim=-1, dtype=acc)
        else:
            bprime = xd2 @ _cast(weight, dtype).t()  # W0 dropout(x), as peft's DoRA computes it
            base_norm = _base_norm(base2, bias, acc)
        del xd2
        sv = _cast(magnitude, acc) / _cast(weight_norm, acc)  # (d_out,)
        out, mask = _dora_forward(base2, bprime, z2, B, sv, float(scale), base_norm, threshold, real, stats)
        ctx.save_for_backward(base2 if p == 0.0 else bprime, x2, z2, A, B, weight, sv, weight_norm, mask, real, bias, keep)
        ctx.p, ctx.rng, ctx.scale, ctx.lam, ctx.lam_factor = p, state, float(scale), lam, lam_factor
        ctx.x_shape, ctx.tau_dtype, ctx.mag_dtype = x.shape, threshold.dtype, magnitude.dtype
        return out.view(base.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved, x2, z2, A, B, weight, sv, weight_norm, mask, real, bias, keep = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        dtype, need, drop = g.dtype, ctx.needs_input_grad, ctx.p > 0.0
        r = _dora_backward(
            g, lambda: saved if drop else _bprime(saved, None, bias), z2, B, sv, weight_norm, mask, real,
            ctx.scale, ctx.lam, ctx.lam_factor,
            {"base": need[1] and not drop, "bprime": need[1] and drop, "z": need[1] or need[4],
             "B": need[5], "magnitude": need[6], "tau": need[10]},
        )
        grads: list[torch.Tensor | None] = [None] * 15
        if need[1] or need[4]:
            grad_x, grad_A = _input_grads(
                ctx, x2, keep, g if drop else r.get("base"), _cast(weight, dtype), r["z"], _cast(A, dtype),
                need[1], need[4], through=r.get("bprime"),
            )
            grads[1] = None if grad_x is None else grad_x.view(ctx.x_shape)
            grads[4] = None if grad_A is None else _cast(grad_A, A.dtype)
        if need[5]:
            grads[5] = _cast(r["B"], B.dtype)
        if need[6]:
            grads[6] = _cast(r["magnitude"], ctx.mag_dtype)
        if need[10]:
            grads[10] = _cast(r["tau"].reshape(1), ctx.tau_dtype)
        return tuple(grads)


def linear_dora_gate(
    base: torch.Tensor,
    x: torch.Tensor,
    p: float,
    weight: torch.Tensor,
    A: torch.Tensor,
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
    """Return base + mask * delta_DoRA given base = W0 x + b (frozen W0, b): see LinearDoraGate."""
    base = _fused_base(base, p)
    return LinearDoraGate.apply(
        base, x, float(p), weight, A, B, magnitude, weight_norm, scale, bias, threshold, real, float(lam), lam_factor, stats
    )


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
