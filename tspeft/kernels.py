r"""Optional Triton kernels for the rank-space gate (CUDA), fusing what eager PyTorch runs as many small ops.

Forward, per token (one pass over ``z``, N x r): :math:`\|delta_i\| = |c| \sqrt{z_i^T G z_i}` from ``zG = z G``
(G = B^T B, one r x r product done by cuBLAS), the mask of Eq. 3, the masked scaled ``zw = mask c z`` (the
operand of the update's ``addmm``) and the statistics of :func:`tspeft.gate.record_stats`.
Backward, per token: :math:`<B^T g_i, z_i>`, mu (Eq. 9), the consistency mask and the sums of Eq. 15,
the masked rank-space gradient ``dz = mask c B^T g`` and ``zw`` again (dB's operand).
Per-block partial sums are written to a buffer and summed by torch: no atomics, deterministic.

The PyTorch functions in :mod:`tspeft.lowrank` are the reference and the CPU implementation; these
kernels are used automatically for CUDA tensors (fp16, bf16, fp32) when ``triton`` imports, unless
``TSPEFT_KERNELS=0``. Triton is imported lazily and is not a dependency. With ``TRITON_INTERPRET=1``
the kernels run on CPU tensors (numpy), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

_KERNELS: SimpleNamespace | None = None
_IMPORT_ERROR: str | None = None
_FORCE: bool | None = None  # tests: None = automatic, True = always (CPU needs TRITON_INTERPRET=1), False = never
BLOCK_N = 64
MAX_RANK = 256
triton: Any = None  # imported by _build() on first use
tl: Any = None


def _build() -> SimpleNamespace | None:
    """Return the compiled (or interpreted) kernels, or None if triton cannot be imported."""
    # triton and tl become module globals: the JIT resolves a kernel's names through its __globals__
    global _KERNELS, _IMPORT_ERROR, triton, tl
    if _KERNELS is not None or _IMPORT_ERROR is not None:
        return _KERNELS
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # ImportError, or a broken install
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        return None

    @triton.jit
    def gate_fwd(
        z_ptr, zg_ptr, bn_ptr, tau_ptr, c_ptr, real_ptr, zw_ptr, mask_ptr, part_ptr,
        N, R, stride_z, stride_zg, stride_zw, c_val, tiny, fmax,
        HAS_REAL: tl.constexpr, C_PTR: tl.constexpr, STATS: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_R)
        rin = rows < N
        m2 = rin[:, None] & (cols[None, :] < R)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        zg = tl.load(zg_ptr + rows[:, None] * stride_zg + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if C_PTR:
            c = tl.load(c_ptr).to(tl.float32)
        else:
            c = c_val
        # ||delta_i||, IEEE sqrt; a NaN in z stays NaN (tl.maximum drops it by default), as the reference's clamp
        dn = tl.sqrt_rn(tl.maximum(tl.sum(z * zg, axis=1), 0.0, propagate_nan=tl.PropagateNan.ALL)) * tl.abs(c)
        bn = tl.load(bn_ptr + rows, mask=rin, other=1.0)  # ||W0 x_i||
        tau = tl.load(tau_ptr).to(tl.float32)
        thr = tl.zeros_like(bn) + tau  # (BLOCK,): broadcast before comparing (the interpreter needs it)
        active = (dn >= thr * bn) | (thr <= 0.0)  # Eq. 3; thr <= 0: every token, even with a zero base
        w = tl.where(active, 1.0, 0.0) * c  # mask * c: 0 * nan/inf is nan, as in the reference
        tl.store(zw_ptr + rows[:, None] * stride_zw + cols[None, :], (z * w[:, None]).to(zw_ptr.dtype.element_ty), mask=m2)
        tl.store(mask_ptr + rows, active.to(tl.uint8), mask=rin)
        if STATS:
            if HAS_REAL:
                wr = tl.where(rin, tl.load(real_ptr + rows, mask=rin, other=0).to(tl.float32), 0.0)
            else:
                wr = tl.where(rin, 1.0, 0.0)
            ratio = dn / tl.maximum(bn, tiny, propagate_nan=tl.PropagateNan.ALL)  # a NaN norm: ratio NaN -> 0
            ratio = tl.where(ratio != ratio, 0.0, tl.minimum(ratio, fmax))  # nan_to_num(nan=0, posinf=max)
            tl.store(part_ptr + pid * 4 + 0, tl.sum(tl.where(active, wr, 0.0), axis=0))
            tl.store(part_ptr + pid * 4 + 1, tl.sum(wr, axis=0))
            tl.store(part_ptr + pid * 4 + 2, tl.sum(ratio * wr, axis=0))
            tl.store(part_ptr + pid * 4 + 3, tl.sum(dn * wr, axis=0))

    @triton.jit
    def gate_bwd(
        gb_ptr, z_ptr, mask_ptr, real_ptr, c_ptr, gz_ptr, zw_ptr, part_ptr,
        N, R, stride_gb, stride_z, stride_gz, stride_zw, c_val,
        HAS_REAL: tl.constexpr, C_PTR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_R)
        rin = rows < N
        m2 = rin[:, None] & (cols[None, :] < R)
        gb = tl.load(gb_ptr + rows[:, None] * stride_gb + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        active = tl.load(mask_ptr + rows, mask=rin, other=0) != 0
        if C_PTR:
            c = tl.load(c_ptr).to(tl.float32)
        else:
            c = c_val
        dot = tl.sum(gb * z, axis=1)  # <B^T g_i, z_i>
        mu = dot * c  # Eq. 9
        w = tl.where(active, 1.0, 0.0) * c  # mask * c: 0 * nan/inf is nan, as in the reference
        tl.store(gz_ptr + rows[:, None] * stride_gz + cols[None, :], (gb * w[:, None]).to(gz_ptr.dtype.element_ty), mask=m2)
        tl.store(zw_ptr + rows[:, None] * stride_zw + cols[None, :], (z * w[:, None]).to(zw_ptr.dtype.element_ty), mask=m2)
        # sum of consistent mu as a product with a 0/1 weight, as tspeft.gate.threshold_grad: a non-finite
        # mu of a real token gives nan (0 * inf, 0 * nan), so that a nan/inf loss reaches g_k
        consistent = (mu >= 0.0) == active
        counted = active & rin
        mu = tl.where(rin, mu, 0.0)
        if HAS_REAL:
            real = tl.load(real_ptr + rows, mask=rin, other=0) != 0
            consistent = consistent & real
            counted = counted & real
            mu = tl.where(real, mu, 0.0)
        tl.store(part_ptr + pid * 3 + 0, tl.sum(tl.where(consistent, 1.0, 0.0) * mu, axis=0))
        tl.store(part_ptr + pid * 3 + 1, tl.sum(tl.where(counted, 1.0, 0.0), axis=0))
        tl.store(part_ptr + pid * 3 + 2, tl.sum(tl.where(active & rin, dot, 0.0), axis=0))

    _KERNELS = SimpleNamespace(gate_fwd=gate_fwd, gate_bwd=gate_bwd, triton=triton)
    return _KERNELS


def interpreter() -> bool:
    """Return True if Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str | None:
    """Return why the kernels cannot run here (no triton, disabled), or None if they can."""
    if os.environ.get("TSPEFT_KERNELS", "1") == "0":
        return "disabled by TSPEFT_KERNELS=0"
    if _build() is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    return None


def enabled(t: torch.Tensor) -> bool:
    """Return True if the gate should use the kernels for tensor `t` (CUDA, fp16/bf16/fp32, triton present)."""
    if _FORCE is False or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if _FORCE is None and not t.is_cuda:
        return False
    if t.shape[-1] > MAX_RANK:
        return False
    return unavailable_reason() is None


@contextlib.contextmanager
def use(flag: bool | None) -> Iterator[None]:
    """Within the block, force the kernels on (True; CPU tensors need TRITON_INTERPRET=1), off (False), or auto."""
    global _FORCE
    old, _FORCE = _FORCE, flag
    try:
        yield
    finally:
        _FORCE = old


def _scale_args(c: float | torch.Tensor, device: torch.device) -> tuple[Any, float, bool]:
    if isinstance(c, torch.Tensor):
        return c.detach().to(device=device, dtype=torch.float32).reshape(1), 0.0, True
    return None, float(c), False


def gate_forward(
    z2: torch.Tensor,
    zg: torch.Tensor,
    base_norm: torch.Tensor,
    threshold: torch.Tensor,
    c: float | torch.Tensor,
    real: torch.Tensor | None,
    stats: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (zw = mask * c * z (N, r) in z's dtype, mask (N,) bool); add the statistics to `stats` if given.

    z2 (N, r); zg = z2 @ (B^T B) in fp32 (N, r); base_norm (N,) fp32; threshold (1,); c the update's scale.
    """
    k = _build()
    assert k is not None, unavailable_reason()
    n, r = z2.shape
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    zg = zg.to(torch.float32)
    zg = zg if zg.stride(-1) == 1 else zg.contiguous()
    zw = torch.empty_like(z2, memory_format=torch.contiguous_format)
    mask = torch.empty(n, dtype=torch.bool, device=z2.device)
    blocks = max(1, -(-n // BLOCK_N))
    part = torch.empty(blocks, 4, dtype=torch.float32, device=z2.device) if stats is not None else zw
    c_t, c_v, c_ptr = _scale_args(c, z2.device)
    fin = torch.finfo(torch.float32)
    k.gate_fwd[(blocks,)](
        z2, zg, base_norm.to(torch.float32).contiguous(), threshold.detach(), c_t if c_ptr else zw,
        real.contiguous().view(torch.uint8) if real is not None else mask, zw, mask.view(torch.uint8), part,
        n, r, z2.stride(0), zg.stride(0), zw.stride(0), c_v, fin.tiny, fin.max,
        HAS_REAL=real is not None, C_PTR=c_ptr, STATS=stats is not None,
        BLOCK=BLOCK_N, BLOCK_R=max(triton_next_pow2(r), 2),
    )
    if stats is not None:
        stats.add_(part.sum(0).to(stats.dtype))
    return zw, mask


def gate_backward(
    gB: torch.Tensor,
    z2: torch.Tensor,
    mask: torch.Tensor,
    real: torch.Tensor | None,
    c: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (dz = mask c B^T g (N, r), zw = mask c z (N, r), sums (3,) fp32).

    gB = g @ B (N, r); sums = [sum of consistent mu over real tokens, active real tokens, sum over active
    tokens of <B^T g_i, z_i>] (Eq. 15's two sums, and the gradient of a tensor scale c).
    """
    k = _build()
    assert k is not None, unavailable_reason()
    n, r = z2.shape
    gB = gB if gB.stride(-1) == 1 else gB.contiguous()
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    gz = torch.empty_like(gB, memory_format=torch.contiguous_format)
    zw = torch.empty(z2.shape, dtype=gB.dtype, device=z2.device)
    blocks = max(1, -(-n // BLOCK_N))
    part = torch.empty(blocks, 3, dtype=torch.float32, device=z2.device)
    c_t, c_v, c_ptr = _scale_args(c, z2.device)
    flags = mask.contiguous().view(torch.uint8)  # read with stride 1
    k.gate_bwd[(blocks,)](
        gB, z2, flags, real.contiguous().view(torch.uint8) if real is not None else flags,
        c_t if c_ptr else gz, gz, zw, part,
        n, r, gB.stride(0), z2.stride(0), gz.stride(0), zw.stride(0), c_v,
        HAS_REAL=real is not None, C_PTR=c_ptr, BLOCK=BLOCK_N, BLOCK_R=max(triton_next_pow2(r), 2),
    )
    return gz, zw, part.sum(0)


def triton_next_pow2(n: int) -> int:
    """Return the smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())
