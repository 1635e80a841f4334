"""Module selection from a finished token-selective run (§4.3): Table 4's strategies and Figure 2's sweep.

A token-selective run ranks its modules by sparsity; each point of the sweep trains the run's own method
*densely* (``selective=False``, as the paper's "fine-tunes only the 50% of modules with the lowest sparsity")
on the modules a strategy selects:

- Table 4: every strategy at one ``fraction`` (``random`` averaged over three seeded draws; ``half_rank``
  trains all modules with a ``rank_pattern`` that matches the budget);
- Figure 2: ``fractions`` of the modules added from the least to the most sparse (``cumulative_order``).

Every point gets its own run directory under ``output`` and is reused when its ``run.json`` exists with the
same settings, so an interrupted sweep resumes where it stopped. ``output/sweep.json`` holds the results in
the format ``tspeft report`` reads; ``output/figure2.png`` draws the curve.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import (
    STRATEGIES,
    Run,
    Selection,
    cumulative_order,
    load_run,
    select_modules,
    selection_curve,
    table4_grid,
)
from .analysis.runs import strip_prefix
from .analysis.select import RANK_PATTERN_METHODS, natural_order
from .io import atomic_write
from .train import RunConfig, train

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RANDOM_DRAWS = 3  # the paper's random_50% is "averaged over three runs"


@dataclass
class SweepPoint:
    """One training of a sweep: which table it feeds, how its modules were chosen and its run settings."""

    part: str  # "table4" | "figure2"
    strategy: str  # a Table 4 strategy, or "cumulative" for Figure 2
    fraction: float
    seed: int
    draw: int | None  # the random draw (0..2) for strategy "random"
    selection: Selection
    config: RunConfig


def config_key(cfg: RunConfig) -> str:
    """Return the run's settings without its output directory, as a JSON string (equal settings, equal key)."""
    settings = dataclasses.asdict(cfg)
    settings.pop("output_dir")
    return json.dumps(settings, sort_keys=True)


def cached_record(cfg: RunConfig) -> dict[str, Any] | None:
    """Return the finished run's record in ``cfg.output_dir`` if its settings equal ``cfg``, else None."""
    path = Path(cfg.output_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # an unreadable result counts as unfinished: train again
    try:  # through RunConfig: a run saved before a setting existed has that setting's default
        saved = RunConfig.from_dict(record.get("config") or {})
    except (TypeError, ValueError):
        return None
    # the folder is the one found above: how its path was spelt (relative, absolute, a trailing slash) is no setting
    return record if config_key(saved) == config_key(cfg) else None


def run_or_reuse(cfg: RunConfig, tag: str = "") -> tuple[dict[str, Any], float | None]:
    """Return (record, seconds spent training): the cached run's record (None seconds) or a fresh train(cfg)."""
    record = cached_record(cfg)
    if record is not None:
        print(f"{tag}already done, reusing {cfg.output_dir}", flush=True)
        return record, None
    print(f"{tag}training -> {cfg.output_dir}", flush=True)
    start = time.perf_counter()
    record = train(cfg, overwrite=True)  # the point's own directory: other settings or unfinished
    return record, time.perf_counter() - start


def plan_sweep(
    run_dir: str | Path,
    output: str | Path,
    fraction: float = 0.5,
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0,),
    strategies: Sequence[str] = STRATEGIES,
    overrides: dict[str, Any] | None = None,
) -> list[SweepPoint]:
    """Return the sweep's points (Table 4 first, then Figure 2); points with equal settings share a directory."""
    run = load_run(run_dir)
    if not run.selective:
        raise ValueError(f"{run_dir} is a dense run: the sweep ranks modules by the sparsity of a token-selective run")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; valid strategies: {', '.join(STRATEGIES)}")
    base = _base_settings(run.config, overrides)
    output = Path(output)
    natural = [strip_prefix(n) for n in natural_order(run)]
    points: list[SweepPoint] = []
    for seed in seeds:
        for strategy in strategies:
            if strategy == "half_rank" and base["method"] not in RANK_PATTERN_METHODS:
                print(f"half_rank skipped: {base['method']} takes no per-module ranks (only lora and dora do)")
                continue
            draws = range(RANDOM_DRAWS) if strategy == "random" else [None]
            for draw in draws:
                sel = select_modules(run, strategy, fraction, seed=_draw_seed(seed, draw))
                name = f"{strategy}-{_pct(fraction)}-seed{seed}" + ("" if draw is None else f"-draw{draw}")
                cfg = _point_config(base, sel, seed, output / "table4" / name)
                points.append(SweepPoint("table4", strategy, float(fraction), seed, draw, sel, cfg))
        order = cumulative_order(run)
        for f in fractions:
            if not 0 < f <= 1:
                raise ValueError(f"fractions must be in (0, 1], got {f}")
            count = max(1, int(f * len(order) + 0.5))  # rounded half up, as select_modules counts
            chosen = sorted(order[:count], key=natural.index)  # listed as select_modules lists them
            sel = Selection("cumulative", float(f), chosen, None, None, _params(run, chosen),
                            f"the {count} least sparse of {len(order)} modules")
            cfg = _point_config(base, sel, seed, output / "figure2" / f"{_pct(f)}-seed{seed}")
            points.append(SweepPoint("figure2", "cumulative", float(f), seed, None, sel, cfg))
    return _share_equal_settings(points)


def sweep(
    run_dir: str | Path,
    output: str | Path,
    fraction: float = 0.5,
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0,),
    strategies: Sequence[str] = STRATEGIES,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) every point, print Table 4, draw Figure 2, write ``output/sweep.json``; return its dict."""
    output = Path(output)
    points = plan_sweep(run_dir, output, fraction, fractions, seeds, strategies, overrides)
    source = load_run(run_dir)
    records: dict[str, dict[str, Any]] = {}
    for i, point in enumerate(points, start=1):
        where = point.config.output_dir
        if where not in records:
            tag = f"[{i}/{len(points)}] {point.strategy} {_pct(point.fraction)} seed {point.seed}: "
            records[where] = run_or_reuse(point.config, tag)[0]
    result: dict[str, Any] = {
        "source": str(run_dir), "task": source.task, "model": source.meta.get("model"), "method": source.method,
        "source_score": source.score, "source_sparsity": source.sparsity, "fraction": float(fraction),
        "metric": source.meta.get("metric"), "table4": [], "figure2": [],
    }
    for point in points:
        record = records[point.config.output_dir]
        entry = {"task": source.task, "fraction": point.fraction, "score": record["score"], "seed": point.seed,
                 "modules": len(point.selection.modules), "params": point.selection.params,
                 "run_dir": point.config.output_dir}
        if point.part == "table4":
            entry = {"strategy": point.strategy, **entry}
            if point.draw is not None:
                entry["draw"] = point.draw
        else:
            entry = {"method": source.method, **entry}
        result[point.part].append(entry)
    if result["figure2"]:
        result["figure2_png"] = str(selection_curve(result["figure2"], output / "figure2.png"))
    text = json.dumps(result, indent=2) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / "sweep.json", lambda tmp: Path(tmp).write_text(text))
    if result["table4"]:
        print()
        print(table4_grid(result["table4"]).to_text())
    print(f"source: {source.name} ({source.meta.get('metric')} {source.score:.2f})")
    print(f"sweep: {output / 'sweep.json'}" + (f", figure: {result['figure2_png']}" if result["figure2"] else ""))
    return result


def _base_settings(config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Return the source run's settings for a dense, fresh, test-scored run, with ``overrides`` applied."""
    if not config:
        raise ValueError("the source run.json has no 'config': it was not written by tspeft's training")
    settings = {**config, "eval_on": "test", **(overrides or {})}
    settings.update(selective=False, resume=False, target_modules=None, rank_pattern=None)
    return settings


def _point_config(base: dict[str, Any], sel: Selection, seed: int, run_dir: Path) -> RunConfig:
    settings = {**base, "seed": seed, "output_dir": str(run_dir), "target_modules": list(sel.modules)}
    if sel.rank_pattern is not None:  # half_rank: smaller ranks, the same scale alpha / rank (Table 6: 0.5)
        settings["rank_pattern"] = dict(sel.rank_pattern)
        rank = sel.rank or settings["rank"]
        settings["alpha"] = settings["alpha"] * rank / settings["rank"]
        settings["rank"] = rank
    return RunConfig.from_dict(settings)


def _share_equal_settings(points: list[SweepPoint]) -> list[SweepPoint]:
    """Return the points with one directory per distinct settings (Figure 2 at 50% is Table 4's S_low_50%)."""
    first: dict[str, str] = {}
    for point in points:
        key = config_key(point.config)
        if key in first:
            point.config = dataclasses.replace(point.config, output_dir=first[key])
        else:
            first[key] = point.config.output_dir
    return points


def _draw_seed(seed: int, draw: int | None) -> int:
    return seed if draw is None else RANDOM_DRAWS * seed + draw


def _params(run: Run, names: list[str]) -> int:
    by_name = {strip_prefix(n): s.params for n, s in run.modules.items()}
    return sum(by_name.get(n, 0) for n in names)


def _pct(fraction: float) -> str:
    return f"{round(100 * fraction)}pct"
