"""Module selection from a finished run (§4.3, Table 4, Figure 2): which modules to fine-tune next."""

from __future__ import annotations

import math
import numbers
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .runs import ModuleStats, Run, parse_module_name, strip_prefix, type_sort_key

RANK_PATTERN_METHODS = ("lora", "dora")  # half_rank needs per-module ranks, which only LoraConfig takes
STRATEGIES = ("s_low", "s_high", "norm_relative", "norm_abs", "random", "half_rank")


@dataclass
class Selection:
    """Modules chosen by a strategy: names relative to the base model, optional per-module ranks, budget."""

    strategy: str
    fraction: float
    modules: list[str]
    rank_pattern: dict[str, int] | None
    rank: int | None
    params: int
    note: str


def select_modules(run: Run, strategy: str, fraction: float, seed: int = 0) -> Selection:
    """Returns the ``Selection`` of ``fraction * modules`` modules (rounded half up, at least 1) by ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    if not (isinstance(fraction, numbers.Real) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1] (e.g. 0.5 for 50% of the modules), got {fraction!r}")
    if not run.modules:
        raise ValueError(f"{run.name} lists no modules in run.json; nothing to select from")
    names = natural_order(run)
    count = max(1, math.floor(fraction * len(names) + 0.5))
    if strategy == "half_rank":
        return _half_rank(run, names, fraction)
    if strategy == "random":
        picked = sorted(np.random.default_rng(seed).choice(len(names), size=count, replace=False))
        chosen = [names[i] for i in picked]
        note = f"random choice of {count} of {len(names)} modules (seed {seed}); average several seeds"
    else:
        ranked = _ORDERINGS[strategy](run, names)
        chosen = sorted(ranked[:count], key=names.index)
        note = f"{count} of {len(names)} modules by {strategy}"
    params = sum(run.modules[n].params for n in chosen)
    return Selection(strategy, float(fraction), [strip_prefix(n) for n in chosen], None, None, params, note)


def cumulative_order(run: Run) -> list[str]:
    """Returns all module names (relative to the base model) from least to most sparse (Figure 2's order)."""
    return [strip_prefix(n) for n in _by_sparsity(run, natural_order(run))]


def natural_order(run: Run) -> list[str]:
    """Returns the run's full module names sorted by layer, then module type (modules outside layers last)."""

    def key(name: str) -> tuple[int, int, tuple[int, str], str]:
        layer, mtype = parse_module_name(name)
        return (layer is None, layer or 0, type_sort_key(mtype), name)

    return sorted(run.modules, key=key)


def selection_command(selection: Selection, base_command: str) -> str:
    """Returns ``base_command`` with ``--target-modules`` (and ``--rank-pattern`` for half_rank) appended."""
    for flag in ("--target-modules", "--rank-pattern"):
        if flag in shlex.split(base_command):
            raise ValueError(f"base_command already has {flag}; remove it, the selection supplies it")
    parts = [base_command.rstrip(), "--target-modules", shlex.quote(",".join(selection.modules))]
    if selection.rank_pattern is not None:  # one KEY=VALUE argument per module, as the flag reads them
        parts += ["--rank-pattern", *(shlex.quote(f"{k}={v}") for k, v in selection.rank_pattern.items())]
    return " ".join(parts)


def selection_config(selection: Selection) -> dict[str, Any]:
    """Returns a JSON-ready dict: peft-style ``target_modules`` / ``r`` / ``rank_pattern`` plus provenance."""
    config: dict[str, Any] = {"target_modules": list(selection.modules)}
    if selection.rank_pattern is not None:
        config["r"] = selection.rank
        config["rank_pattern"] = dict(selection.rank_pattern)
    config["selection"] = {
        "strategy": selection.strategy,
        "fraction": selection.fraction,
        "params": selection.params,
        "note": selection.note,
    }
    return config


def _by_sparsity(run: Run, names: list[str], descending: bool = False) -> list[str]:
    if all(run.modules[n].sparsity is None for n in names):
        raise ValueError(
            f"{run.name} has no module sparsity (a dense run?); a token-selective run is needed "
            "to rank modules by sparsity: train with selective=true first"
        )

    def sparsity(name: str) -> float:
        value = run.modules[name].sparsity
        return 1.0 if value is None else value  # rank 0 (pruned by AdaLoRA) counts as fully sparse

    return sorted(names, key=lambda n: -sparsity(n) if descending else sparsity(n))


def _by_stat(stat: str) -> Callable[[Run, list[str]], list[str]]:
    def order(run: Run, names: list[str]) -> list[str]:
        values = {n: getattr(run.modules[n], stat) for n in names}
        if all(v is None for v in values.values()):
            why = ("it is a dense run, and only token-selective runs record them (train with selective=true)"
                   if not run.selective else "training writes them per module; this run.json lacks them")
            raise ValueError(f"{run.name} has no '{stat}' statistics in run.json: {why}")
        return sorted(names, key=lambda n: -(values[n] if values[n] is not None else -math.inf))

    return order


_ORDERINGS: dict[str, Callable[[Run, list[str]], list[str]]] = {
    "s_low": lambda run, names: _by_sparsity(run, names),
    "s_high": lambda run, names: _by_sparsity(run, names, descending=True),
    "norm_relative": _by_stat("ratio_mean"),
    "norm_abs": _by_stat("delta_norm_mean"),
}


def _half_rank(run: Run, names: list[str], fraction: float) -> Selection:
    """All modules with integer ranks scaled so the trainable parameters total ``fraction`` of the run's."""
    if run.method not in RANK_PATTERN_METHODS:
        raise ValueError(
            f"half_rank needs per-module ranks, which only LoRA and DoRA take (peft's rank_pattern); "
            f"{run.name} is a {run.method} run"
        )
    base = {n: _base_rank(run, n) for n in names}
    fixed = _fixed_params(run, names)  # DoRA's magnitudes (d_out per module): there at any rank
    per_rank = {n: (run.modules[n].params - fixed[n]) / base[n] for n in names}  # d_in + d_out per unit of rank
    budget = fraction * sum(run.modules[n].params for n in names)
    ranks = {n: max(1, math.floor(fraction * base[n])) for n in names}
    total = sum(ranks[n] * per_rank[n] + fixed[n] for n in names)
    # Hand out single ranks (or, above the budget, take them back: DoRA's magnitudes stay at any rank), largest
    # rounding loss first, while each one brings the total closer to the budget.
    moved = True
    while moved:
        moved = False
        for n in sorted(names, key=lambda n: -(fraction * base[n] - ranks[n])):
            step = 1 if total < budget else -1
            if 1 <= ranks[n] + step <= base[n] and abs(total + step * per_rank[n] - budget) < abs(total - budget):
                ranks[n] += step
                total += step * per_rank[n]
                moved = True
    error = (total - budget) / budget if budget else 0.0
    rank = Counter(ranks.values()).most_common(1)[0][0]
    note = (
        f"all {len(names)} modules, ranks scaled by {fraction:g}: {round(total)} trainable parameters "
        f"for a budget of {round(budget)} ({100 * error:+.2f}%)"
    )
    if abs(error) > 0.01:
        note += "; integer ranks cannot match the budget within 1% for this run"
    pattern = {strip_prefix(n): ranks[n] for n in names}
    return Selection("half_rank", float(fraction), list(pattern), pattern, rank, round(total), note)


def _fixed_params(run: Run, names: list[str]) -> dict[str, int]:
    """Return per module the trainable parameters that do not scale with the rank: DoRA's magnitude vector.

    run.json records them (``fixed_params``); for a DoRA run saved before it did, they are read from the
    shapes in the run's saved adapter. LoRA has none.
    """
    if run.method != "dora":
        return dict.fromkeys(names, 0)
    recorded = {n: run.modules[n].fixed_params for n in names}
    if all(v is not None for v in recorded.values()):
        return {n: int(v) for n, v in recorded.items()}
    path = None if run.path is None else run.path / "adapter" / "adapter_model.safetensors"
    if path is None or not path.is_file():
        raise ValueError(
            f"{run.name} is a DoRA run whose run.json does not record the magnitude vectors' size (fixed_params) "
            f"and has no saved adapter ({path}) to read it from; half_rank needs it to match the parameter budget"
        )
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if "lora_magnitude_vector" in k}
    sizes = {strip_prefix(k.split(".lora_magnitude_vector")[0]): int(np.prod(v)) for k, v in shapes.items()}
    missing = [n for n in names if strip_prefix(n) not in sizes]
    if missing:
        raise ValueError(f"{path} has no DoRA magnitude vector for {missing[:3]}; half_rank needs their size")
    return {n: sizes[strip_prefix(n)] for n in names}


def _base_rank(run: Run, name: str) -> int:
    stats: ModuleStats = run.modules[name]
    for value in (stats.rank, run.config.get("rank")):
        if value:
            if stats.params <= 0:
                raise ValueError(
                    f"module {name!r} of {run.name} has params={stats.params}; half_rank needs its parameter count"
                )
            return int(value)
    raise ValueError(
        f"module {name!r} of {run.name} has no rank and run.json config has no 'rank'; half_rank needs one"
    )
