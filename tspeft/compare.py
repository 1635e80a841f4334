"""Dense vs token-selective over methods and seeds: the layout of the paper's Tables 1-3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import atomic_write
from .recipes import load_recipe
from .sweep import cached_record
from .train import RunConfig, train

RECORD_KEYS = ("task", "model", "method", "selective", "seed", "metric", "score", "sparsity")


def run_dir_name(method: str, selective: bool, seed: int) -> str:
    """Return the sub-directory name of one run of a comparison."""
    return f"{method}-{'ts' if selective else 'dense'}-seed{seed}"


def compare(
    base: RunConfig,
    methods: list[str],
    seeds: list[int],
    output: Path,
    recipe: str = "small",
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train dense and TS runs for each method and seed, print the table, write results.json; return records."""
    from .analysis import compare_table

    overrides = dict(overrides or {})
    records = []
    plan = [(m, sel, seed) for m in methods for sel in (False, True) for seed in seeds]
    configs = []  # every run's settings first: a bad method or value fails before anything trains
    for method, selective, seed in plan:
        run_dir = output / run_dir_name(method, selective, seed)
        settings = {**load_recipe(recipe, task=base.task, method=method), **overrides,
                    "method": method, "selective": selective, "seed": seed, "output_dir": str(run_dir)}
        configs.append(RunConfig.from_dict(settings))
    for i, cfg in enumerate(configs, start=1):
        run_dir, seed = Path(cfg.output_dir), cfg.seed
        record = cached_record(cfg)
        tag = f"[{i}/{len(plan)}] {cfg.label} seed {seed}"
        if record is None:
            print(f"{tag}: training -> {run_dir}", flush=True)
            record = train(cfg, overwrite=True)  # this comparison's own directory, other settings
        else:
            print(f"{tag}: already done, reusing {run_dir}", flush=True)
        sp = "" if record["sparsity"] is None else f", sparsity {100 * record['sparsity']:.1f}%"
        print(f"{tag}: {record['metric']} {record['score']:.2f}{sp}", flush=True)
        records.append({k: record[k] for k in RECORD_KEYS} | {"run_dir": str(run_dir), "note": record["note"]})
    text = json.dumps(records, indent=2) + "\n"
    atomic_write(output / "results.json", lambda tmp: Path(tmp).write_text(text))
    print()
    print(compare_table(records, fmt="text"))
    print(f"\ndata: {records[0]['note']}")
    print(f"results: {output / 'results.json'}  (run directories under {output})")
    return records
