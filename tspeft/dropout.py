r"""Dropout inside the fused gate, without keeping ``dropout(x)`` for backward.

peft's LoRA layer runs ``lora_A(dropout(x))``, so autograd keeps, per adapted module, ``dropout(x)`` for
A's gradient and the dropout mask (on CPU ``F.dropout`` keeps a float noise tensor, on CUDA a byte mask):
q, k and v, which read the same ``x``, keep three copies. The fused gate keeps ``x`` instead (one
storage, shared by every module that reads it) and either

- ``"mask"``: the keep mask, one byte per element (the default on CPU, where drawing random numbers
  again would cost more than the byte), or
- ``"replay"``: nothing but the random generator's state before the draw; backward draws the same mask
  again, as ``torch.utils.checkpoint`` does (the default on CUDA, where the draw is cheap).

Either way the forward draws exactly the random numbers ``F.dropout(x, p, training=True)`` draws, so a
gated layer and peft's layer agree under the same seed. ``TSPEFT_DROPOUT=mask`` or ``replay`` overrides
the default.
"""

from __future__ import annotations

import os

import torch

MODES = ("mask", "replay")


def mode(x: torch.Tensor) -> str:
    """Return how backward gets the mask for input x: ``TSPEFT_DROPOUT``, else replay on CUDA, mask elsewhere."""
    chosen = os.environ.get("TSPEFT_DROPOUT", "")
    if chosen:
        if chosen not in MODES:
            raise ValueError(f"TSPEFT_DROPOUT={chosen!r} is not one of {MODES}; unset it for the default")
        return chosen
    return "replay" if x.is_cuda else "mask"


def _fused(x: torch.Tensor) -> bool:
    """Whether ``F.dropout`` runs the fused native kernel for x (as ATen decides; p is checked by the caller)."""
    return x.device.type in ("cuda", "xpu") and x.numel() > 0


def dropout_with_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (dropout(x), keep) for 0 < p < 1, drawing what ``F.dropout(x, p, training=True)`` draws.

    keep is a bool tensor of x's shape; dropout(x) = x * keep / (1 - p), bit for bit F.dropout's value.
    """
    if _fused(x):
        return torch.native_dropout(x, p, True)  # what F.dropout calls on CUDA: (output, bool mask)
    noise = torch.empty_like(x).bernoulli_(1 - p)  # F.dropout's CPU path: a 0/1 noise tensor, scaled
    keep = noise.bool()  # exactly 0 or 1; .bool() is ~10x faster than `!= 0` on CPU
    return x * noise.div_(1 - p), keep


def rng_state(x: torch.Tensor) -> torch.Tensor:
    """Return the state of the generator dropout on x's device draws from (a host tensor; no device sync)."""
    if x.is_cuda:
        return torch.cuda.get_rng_state(x.device)
    if x.device.type != "cpu":
        raise RuntimeError(f"dropout replay supports CPU and CUDA tensors, not {x.device.type}; set TSPEFT_DROPOUT=mask")
    return torch.get_rng_state()


def replay(x: torch.Tensor, p: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (dropout(x), keep) as :func:`dropout_with_keep` drew them for x from generator `state`.

    The generator is set to `state` for the draw and restored afterwards, so the caller's random stream
    is left as it was. x must be the same tensor as in forward (the fused kernel's layout depends on it).
    """
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if x.is_cuda else "cpu"):
        if x.is_cuda:
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return dropout_with_keep(x, p)
