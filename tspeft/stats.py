"""Statistics of the gates: sparsity (Eq. 21), thresholds, and the norm statistics of Table 4."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import adapter_param_count, fixed_param_count, layer_rank
from .model import STATS, THRESHOLD, gated_modules


def _collect(model: nn.Module) -> tuple[list[str], list[nn.Module], torch.Tensor]:
    mods = gated_modules(model)
    if not mods:
        raise RuntimeError("token selection is not enabled on this model; call tspeft.enable(model, TSConfig(...))")
    names = list(mods)
    # one device-to-host copy for all modules: [active, real, sum ratio, sum ||delta||] per row
    table = torch.stack([getattr(m, STATS).to("cpu", torch.float64) for m in mods.values()])
    return names, list(mods.values()), table


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def reset_stats(model: nn.Module) -> None:
    """Zero every gate's token counts (call before measuring sparsity on a set of batches)."""
    for m in gated_modules(model).values():
        getattr(m, STATS).zero_()


def all_reduce_stats(model: nn.Module, group=None) -> None:
    """Sum every gate's token counts over the data-parallel ranks, in place, so that each rank sees the global counts.

    Statistics are per rank (each rank counts its own tokens); this is a collective: call it on every rank,
    e.g. before logging sparsity, then :func:`reset_stats` on every rank. A no-op outside torch.distributed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    mods = list(gated_modules(model).values())
    if not mods:
        raise RuntimeError("token selection is not enabled on this model; call tspeft.enable(model, TSConfig(...))")
    table = torch.stack([getattr(m, STATS) for m in mods])  # one collective for every module
    dist.all_reduce(table, group=group)
    for m, row in zip(mods, table):
        getattr(m, STATS).copy_(row)


def sparsity(model: nn.Module) -> dict[str, float]:
    """Return {module: 1 - active / real tokens} since the last reset_stats (Eq. 21); nan if no token seen."""
    names, _, t = _collect(model)
    return {n: 1.0 - _ratio(row[0].item(), row[1].item()) for n, row in zip(names, t)}


def overall_sparsity(model: nn.Module) -> float:
    """Return 1 - all active / all real tokens over every gated module since the last reset_stats."""
    _, _, t = _collect(model)
    return 1.0 - _ratio(t[:, 0].sum().item(), t[:, 1].sum().item())


def thresholds(model: nn.Module) -> dict[str, float]:
    """Return {module: threshold tau}."""
    return {n: float(getattr(m, THRESHOLD).detach().float().cpu()) for n, m in gated_modules(model).items()}


def module_stats(model: nn.Module) -> dict[str, dict[str, float | int | None]]:
    """Return per module: sparsity, threshold, mean ratio ||M(x)||/||W0 x|| (norm_relative), mean ||M(x)||
    (norm_abs), active and real token counts, current rank, trainable parameter count and, of it, the
    parameters that do not scale with the rank (DoRA's magnitude vector; 0 otherwise)."""
    names, mods, t = _collect(model)
    taus = thresholds(model)
    out: dict[str, dict[str, float | int | None]] = {}
    for name, mod, row in zip(names, mods, t):
        active, real, sum_ratio, sum_norm = (v.item() for v in row)
        rank = layer_rank(mod)
        out[name] = {
            "sparsity": None if rank == 0 or real == 0 else 1.0 - active / real,
            "threshold": taus[name],
            "ratio_mean": _ratio(sum_ratio, real) if real else None,
            "delta_norm_mean": _ratio(sum_norm, real) if real else None,
            "active": int(active),
            "tokens": int(real),
            "rank": rank,
            "params": adapter_param_count(mod),
            "fixed_params": fixed_param_count(mod),  # of params, those that do not scale with the rank
        }
    return out


@torch.no_grad()
def collect_ratios(model: nn.Module, batches, max_per_module: int = 20000) -> dict[str, torch.Tensor]:
    """Return per gated module the ratios ||M(x)|| / ||W0 x|| of the real tokens of `batches` (1-D fp32).

    Thresholds are set to -inf for the pass (every update applied, so out - base is M(x)) and restored
    after; statistics are saved and restored too, so this leaves the model as it was.
    """
    from .model import controller

    ctrl = controller(model)
    mods = gated_modules(model)
    saved_tau = {n: getattr(m, THRESHOLD).detach().clone() for n, m in mods.items()}
    saved_stats = {n: getattr(m, STATS).clone() for n, m in mods.items()}
    found: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    handles = []

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            base_layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
            base = base_layer(x)
            bias = getattr(base_layer, "bias", None)
            delta = (output - base).reshape(-1, output.shape[-1]).float()
            plain = (base if bias is None else base - bias).reshape(-1, output.shape[-1]).float()
            ratio = delta.norm(dim=-1) / plain.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            real = ctrl.real_tokens(x, module)
            found[name].append((ratio if real is None else ratio[real]).cpu())
        return hook

    try:
        for name, mod in mods.items():
            getattr(mod, THRESHOLD).fill_(float("-inf"))
            handles.append(mod.register_forward_hook(hook_for(name)))
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        for name, mod in mods.items():
            getattr(mod, THRESHOLD).copy_(saved_tau[name])
            getattr(mod, STATS).copy_(saved_stats[name])
    return {n: torch.cat(v)[:max_per_module] if v else torch.zeros(0) for n, v in found.items()}
