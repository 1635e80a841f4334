"""One table from adapter layer types to the function that computes their gated output.

Each entry takes ``(layer, x, base, gate)`` — the layer, its input, the frozen output ``base = W0 x + b``
and the keyword arguments of the gate (threshold, lam, real tokens, statistics) — and returns the gated
output. LoRA, AdaLoRA and the parallel adapter are low rank and run in rank space
(:func:`tspeft.lowrank.low_rank_gate`); DoRA rescales columns and has its own fused gate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.adalora.layer import SVDLinear
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .adapter import ParallelAdapter
from .lowrank import dora_gate, dora_weight_norm, linear_dora_gate, linear_low_rank_gate, low_rank_gate

GatedForward = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]

KEEP_Z = "_ts_keep_z"
"""Instance attribute of a gated layer: False if its z is computed again in backward (TSConfig.recompute_z)."""


def _active(layer: nn.Module) -> str:
    names = layer.active_adapters
    if len(names) != 1:
        raise RuntimeError(
            f"token selection needs exactly one active adapter, {type(layer).__name__} has {list(names)}; "
            "call model.set_adapter(name) with a single adapter"
        )
    gated = layer._ts_ctrl.adapter_name
    if gated is not None and names[0] != gated:
        if not any(gated in getattr(layer, a, {}) for a in getattr(layer, "adapter_layer_names", ())):
            raise RuntimeError(
                f"token selection was enabled for adapter {gated!r}, which has been deleted: call "
                "tspeft.disable(model), then tspeft.enable(model, ...) to gate the adapter that is active now"
            )
        raise RuntimeError(
            f"token selection was enabled for adapter {gated!r}, but {names[0]!r} is active: the thresholds "
            f"belong to {gated!r}. Call model.set_adapter({gated!r}), or tspeft.disable(model) and then "
            "tspeft.enable(model, ...) with the other adapter active."
        )
    return names[0]


def _dropped(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return (dropout(x), whether dropout actually changed x)."""
    if isinstance(dropout, nn.Identity) or not dropout.training or getattr(dropout, "p", 0.0) == 0.0:
        return x, False
    return dropout(x), True


def _plain_dropout_p(dropout: nn.Module) -> float | None:
    """Return the probability the fused gate applies for `dropout` (0.0: none), or None for another module."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is not nn.Dropout or dropout.inplace or not 0.0 <= dropout.p < 1.0:
        return None
    return float(dropout.p) if dropout.training else 0.0


def _bias(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer.get_base_layer(), "bias", None)


def _frozen_linear(layer: nn.Module) -> nn.Linear | None:
    """Return the base nn.Linear if its output is W0 x + b with neither trained (x's gradient can be fused), else None.

    Not when a hook or a forward set on the instance (accelerate's offloading, a user's hook) may change the
    output: the fused backward computes x's gradient as g W0, which holds only for the plain product.
    """
    lin = layer.get_base_layer()
    if type(lin).forward is not nn.Linear.forward or "forward" in lin.__dict__ or lin.weight.requires_grad:
        return None
    if lin._forward_hooks or lin._forward_pre_hooks or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]:
        return None
    return lin if lin.bias is None or not lin.bias.requires_grad else None


_GLOBAL_HOOKS = (torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks)


def _rank_space(
    layer: nn.Module, x: torch.Tensor, base: torch.Tensor, dropout: nn.Module, A: torch.Tensor, B: torch.Tensor,
    scale: float | torch.Tensor, gate: dict[str, Any],
) -> torch.Tensor:
    """Return base + mask * c B A dropout(x): fused with the frozen base's backward when it can be."""
    x = x.to(base.dtype)
    lin = _frozen_linear(layer)
    p = _plain_dropout_p(dropout)
    if lin is not None and p is not None:  # dropout drawn inside the fused gate, dropout(x) not kept
        keep_z = layer.__dict__.get(KEEP_Z, True)
        return linear_low_rank_gate(base, x, p, lin.weight, A, B, scale, bias=lin.bias, keep_z=keep_z, **gate)
    xd, _ = _dropped(dropout, x)
    z = F.linear(xd, A.to(xd.dtype))  # (..., r)
    return low_rank_gate(base, z, B, scale, bias=_bias(layer), **gate)


def lora_forward(layer: LoraLinear, x: torch.Tensor, base: torch.Tensor, gate: dict[str, Any]) -> torch.Tensor:
    """Return the gated output of a peft LoRA (or DoRA, if the adapter uses it) Linear layer."""
    name = _active(layer)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, d_in), (d_out, r)
    scale = layer.scaling[name]
    if not layer.use_dora.get(name, False):
        return _rank_space(layer, x, base, layer.lora_dropout[name], A, B, scale, gate)
    x = x.to(base.dtype)
    weight = layer.get_base_layer().weight
    weight_norm = dora_weight_norm(weight, _weight_sq(layer, weight), A, B, scale).to(base.dtype)
    magnitude = layer.lora_magnitude_vector[name].weight
    lin = _frozen_linear(layer)
    p = _plain_dropout_p(layer.lora_dropout[name])
    if lin is not None and p is not None:  # dropout drawn inside the fused gate, dropout(x) not kept
        return linear_dora_gate(base, x, p, weight, A, B, magnitude, weight_norm, scale, bias=lin.bias, **gate)
    xd, dropped = _dropped(layer.lora_dropout[name], x)
    z = F.linear(xd, A.to(xd.dtype))  # (..., r)
    base_drop = F.linear(xd, weight.to(xd.dtype)) if dropped else None
    return dora_gate(base, base_drop, z, B, magnitude, weight_norm, scale, bias=_bias(layer), **gate)


def _weight_sq(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Return ||w_j||^2 per output row, cached: W0 is frozen (recomputed if it is ever changed)."""
    key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
    cached = getattr(layer, "_ts_weight_sq", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.promote_types(weight.dtype, torch.float32)).square()
        cached = (key, sq)
        layer._ts_weight_sq = cached
    return cached[1]


def adalora_forward(layer: SVDLinear, x: torch.Tensor, base: torch.Tensor, gate: dict[str, Any]) -> torch.Tensor:
    """Return the gated output of a peft AdaLoRA SVDLinear layer: A' = E * A, c = scaling / ranknum."""
    name = _active(layer)
    A, E, B = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]  # (r, d_in), (r, 1), (d_out, r)
    scale = layer.scaling[name] / (layer.ranknum[name] + 1e-5)
    return _rank_space(layer, x, base, layer.lora_dropout[name], A * E, B, scale, gate)


def adapter_forward(layer: ParallelAdapter, x: torch.Tensor, base: torch.Tensor, gate: dict[str, Any]) -> torch.Tensor:
    """Return the gated output of a parallel adapter: delta = scale * up(act(down(dropout(x))))."""
    z = layer.hidden_states(x.to(base.dtype))
    return low_rank_gate(base, z, layer.adapter_up.weight, layer.scale, bias=layer.base_layer.bias, **gate)


UPDATES: dict[type, GatedForward] = {
    LoraLinear: lora_forward,
    SVDLinear: adalora_forward,
    ParallelAdapter: adapter_forward,
}
"""The table: exact adapter layer type -> gated forward."""

SUPPORTED = "peft LoRA/DoRA on nn.Linear (lora.Linear), peft AdaLoRA (adalora.SVDLinear), tspeft.ParallelAdapter"


def gated_forward_for(layer: nn.Module) -> GatedForward | None:
    """Return the gated forward for `layer`'s type (looked up along its MRO), or None."""
    for cls in type(layer).__mro__:
        if cls in UPDATES:
            return UPDATES[cls]
    return None


def unsupported_reason(layer: nn.Module) -> str | None:
    """Return why a supported layer type still cannot be gated (e.g. Conv1D weights), or None."""
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (GPT-2 Conv1D weights) is not supported"
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", None)
    if base is not None and not isinstance(base, nn.Linear):
        return f"its base layer is {type(base).__name__}, not nn.Linear"
    if isinstance(layer, LoraLinear):
        name = layer.active_adapters[0] if layer.active_adapters else None
        if name is not None and getattr(layer, "lora_bias", {}).get(name, False):
            return "lora_bias=True is not supported"
        if name is not None and name in getattr(layer, "lora_variant", {}) and not layer.use_dora.get(name, False):
            return f"LoRA variant {type(layer.lora_variant[name]).__name__} is not supported"
    return None


def recomputable_rank(layer: nn.Module) -> int:
    """Return the width r of the z a layer's gate can compute again in backward (LoRA, AdaLoRA), else 0."""
    if not isinstance(layer, (LoraLinear, SVDLinear)) or _frozen_linear(layer) is None:
        return 0
    name = layer.active_adapters[0]
    if isinstance(layer, LoraLinear) and layer.use_dora.get(name, False):
        return 0
    return int(layer.lora_A[name].weight.shape[0] if isinstance(layer, LoraLinear) else layer.lora_A[name].shape[0])


def layer_rank(layer: nn.Module) -> int:
    """Return the current rank of an adapter layer (AdaLoRA: the count of unpruned singular values)."""
    if isinstance(layer, ParallelAdapter):
        return layer.hidden
    name = layer.active_adapters[0]
    if isinstance(layer, SVDLinear):
        return int((layer.lora_E[name] != 0).sum().item())
    return int(layer.r[name])


def adapter_param_count(layer: nn.Module) -> int:
    """Return the trainable parameter count of an adapter layer, threshold excluded."""
    return sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and not n.endswith("ts_threshold"))


FIXED_PARAMS = "lora_magnitude_vector"
"""Trainable parameters of a LoRA layer whose size does not depend on the rank: DoRA's magnitudes (d_out)."""


def fixed_param_count(layer: nn.Module) -> int:
    """Return the trainable parameters of an adapter layer that do not scale with its rank (DoRA's magnitude)."""
    return sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and FIXED_PARAMS in n)
