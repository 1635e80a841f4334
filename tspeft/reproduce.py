"""Reproduce the paper's findings at small scale on the bundled MiniLM and write ``docs/results.md``.

Stages, each resumable (a run whose ``run.json`` holds the same settings is reused, never retrained):

1. ``tune``: lambda and s for each method's TS run on a validation part of the train split
   (``val_fraction``, ``eval_on="val"``), never on test; the rule that picks one is :func:`choose_setting`.
   The paper tunes lambda per task and method (AdaLoRA's, for one, is far smaller than LoRA's).
2. ``train``: dense vs TS for every method, task and seed (Tables 1–3), and TS-LoRA with the plain threshold
   rule (Appendix A.2).
3. ``select``: Table 4 (six strategies at 50%) and Figure 2 (cumulative fractions), trained from the seed-0
   TS-LoRA and TS-DoRA runs of the first task with :mod:`tspeft.sweep`.

Then Table 5 (module-wise sparsity) is read from the stage-2 runs, every claim gets a verdict computed
from the numbers (``judge_*``; the rules are in the constants below and restated in the report), and the
report is written with the paper's numbers beside ours. ``--shard K/N`` lets N processes share the runs of
each stage (they wait for each other between stages); a final call without ``--shard`` writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import STRATEGIES
from .compare import run_dir_name
from .recipes import load_recipe
from .reproduce_report import (
    Results,
    ablation_section,
    commit_of,
    device_name,
    fmt_num,
    git_commit,
    render,
    selection_sections,
    table5_section,
    tables_section,
)
from .sweep import cached_record, plan_sweep, run_or_reuse, sweep
from .train import RunConfig
from .verdicts import METHOD_NAMES, choose_setting

PARTS = ("tables", "ablation", "table4", "figure2", "table5")


@dataclass(frozen=True)
class Mode:
    """How much to run: tasks, methods, seeds, the lambda/s grid and the per-task data and training sizes."""

    name: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int
    grid_s: tuple[float, ...]
    grid_lam: tuple[float, ...]
    tune_each_task: bool  # False: tune on the first task, use its choice everywhere
    val_fraction: float
    task_settings: dict[str, dict[str, Any]]
    fractions: tuple[float, ...]
    selection_seeds: int
    ablation_tasks: tuple[str, ...]
    seconds_per_run: dict[str, float]  # rough, idle 2-core CPU (for the plan printed before running)
    fraction: float = 0.5
    common: dict[str, Any] = field(default_factory=lambda: {"logging_steps": 5, "save_steps": 100_000})

    def tuned_tasks(self) -> list[str]:
        """Return the tasks lambda and s are tuned on (each task, or only the first)."""
        return list(self.tasks) if self.tune_each_task else list(self.tasks[:1])


MODES = {
    "smoke": Mode(
        "smoke", ("sst2", "boolq"), ("lora", "dora"), 1, (1e-3,), (1e-5, 1e-4), False, 0.25,
        {"sst2": {"max_train": 32, "max_test": 32, "epochs": 1},
         "boolq": {"max_train": 32, "max_test": 32, "epochs": 1, "max_length": 128}},
        (0.5, 1.0), 1, ("sst2",), {"sst2": 12, "boolq": 20},
        common={"logging_steps": 1, "save_steps": 100_000}),
    "quick": Mode(
        "quick", ("sst2", "boolq"), ("lora", "dora", "adalora", "adapter"), 3, (3e-4, 1e-3, 3e-3), (1e-5, 1e-4), False,
        0.25,
        {"sst2": {"max_train": 600, "max_test": 272, "epochs": 3, "batch_size": 16, "max_length": 64},
         # BoolQ passages fill max_length: about 0.1 s per example and epoch on 2 idle cores at 128 tokens
         "boolq": {"max_train": 160, "max_test": 200, "epochs": 2, "batch_size": 8, "max_length": 128}},
        (0.25, 0.5, 0.75, 1.0), 1, ("sst2",), {"sst2": 45, "boolq": 45}),
    "full": Mode(
        "full", ("sst2", "boolq"), ("lora", "dora", "adalora", "adapter"), 3, (3e-4, 1e-3, 3e-3), (1e-5, 1e-4),
        True, 0.25,
        {"sst2": {"max_train": None, "max_test": None, "epochs": 10, "batch_size": 16, "max_length": 64},
         "boolq": {"max_train": None, "max_test": None, "epochs": 3, "batch_size": 16, "max_length": 256}},
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), 3, ("sst2", "boolq"), {"sst2": 300, "boolq": 1500}),
}  # fmt: skip



@dataclass
class Job:
    """One training run of the plan: its stage, a label for the log and its settings."""

    stage: str
    tag: str
    config: RunConfig
    role: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- plan


def _settings(mode: Mode, task: str, method: str, **fixed: Any) -> dict[str, Any]:
    settings = load_recipe("small", task=task, method=method)
    settings.update(mode.common)
    settings.update(mode.task_settings.get(task, {}))
    settings.update(task=task, method=method, **fixed)
    return settings


def _config(settings: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(settings)


def tuning_jobs(mode: Mode, runs: Path) -> list[Job]:
    """Return stage 1: per tuned task and method, the dense run and the TS (s, lam) grid, seed 0, scored on
    validation."""
    jobs = []
    for task in mode.tuned_tasks():
        val = {"val_fraction": mode.val_fraction, "eval_on": "val", "seed": 0}
        where = runs / "tune" / task
        for method in mode.methods:
            name = METHOD_NAMES[method]
            jobs.append(Job("tune", f"tune {task} {name} (dense)", _config(_settings(
                mode, task, method, selective=False, output_dir=str(where / f"{method}-dense"), **val)),
                {"task": task, "method": method, "dense": True}))
            for s in mode.grid_s:
                for lam in mode.grid_lam:
                    cfg = _config(_settings(mode, task, method, selective=True, s=s, lam=lam, **val,
                                            output_dir=str(where / f"{method}-s{fmt_num(s)}-lam{fmt_num(lam)}")))
                    jobs.append(Job("tune", f"tune {task} TS-{name} s={fmt_num(s)} lam={fmt_num(lam)}", cfg,
                                    {"task": task, "method": method, "dense": False, "s": s, "lam": lam}))
    return jobs


def chosen_settings(mode: Mode, records: dict[str, dict[str, Any]],
                    jobs: list[Job]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return per task and method the chosen grid point {s, lam, score, sparsity, source, grid, dense_val};
    a task that is not tuned takes the first task's choices."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in mode.tuned_tasks():
        out[task] = {}
        for method in mode.methods:
            mine = [j for j in jobs if j.role["task"] == task and j.role["method"] == method]
            grid = [{"s": j.role["s"], "lam": j.role["lam"], "score": records[j.config.output_dir]["score"],
                     "sparsity": records[j.config.output_dir]["sparsity"]} for j in mine if not j.role["dense"]]
            dense = [records[j.config.output_dir]["score"] for j in mine if j.role["dense"]]
            out[task][method] = {**choose_setting(grid), "source": task, "grid": grid,
                                 "dense_val": dense[0] if dense else None}
    first = mode.tuned_tasks()[0]
    for task in mode.tasks:
        out.setdefault(task, {m: {**c, "source": first} for m, c in out[first].items()})
    return out


def training_jobs(mode: Mode, runs: Path, chosen: dict[str, dict[str, dict[str, Any]]],
                  parts: Sequence[str]) -> list[Job]:
    """Return stage 2: dense and TS runs per task, method and seed; TS-LoRA with the plain rule (A.2)."""
    jobs = []
    for task in mode.tasks:
        for method in mode.methods:
            ts = {"lam": chosen[task][method]["lam"], "s": chosen[task][method]["s"]}
            for seed in range(mode.seeds):
                for selective in (False, True):
                    extra = ts if selective else {}
                    where = runs / "tables" / task / run_dir_name(method, selective, seed)
                    cfg = _config(_settings(mode, task, method, selective=selective, seed=seed,
                                            output_dir=str(where), **extra))
                    jobs.append(Job("train", f"{task} {cfg.label} seed {seed}", cfg,
                                    {"part": "tables", "task": task, "method": method, "selective": selective,
                                     "seed": seed}))
    if "ablation" in parts and "lora" in mode.methods:
        for task in (t for t in mode.ablation_tasks if t in mode.tasks):
            ts = {"lam": chosen[task]["lora"]["lam"], "s": chosen[task]["lora"]["s"]}
            for seed in range(mode.seeds):
                where = runs / "ablation" / task / f"lora-plain-seed{seed}"
                cfg = _config(_settings(mode, task, "lora", selective=True, rule="plain", seed=seed,
                                        output_dir=str(where), **ts))
                jobs.append(Job("train", f"{task} TS-LoRA (plain rule) seed {seed}", cfg,
                                {"part": "ablation", "task": task, "method": "lora", "seed": seed}))
    return jobs


def selection_sources(mode: Mode, runs: Path, parts: Sequence[str]) -> dict[str, Path]:
    """Return {method: run dir} of the seed-0 TS runs that Table 4 / Figure 2 select modules from."""
    if not {"table4", "figure2"} & set(parts):
        return {}
    task = mode.tasks[0]
    return {m: runs / "tables" / task / run_dir_name(m, True, 0) for m in ("dora", "lora") if m in mode.methods}


def selection_jobs(mode: Mode, runs: Path, parts: Sequence[str]) -> list[Job]:
    """Return stage 3: the sweep points (Table 4 and/or Figure 2) of each selection source."""
    jobs, seen = [], set()
    for method, source in selection_sources(mode, runs, parts).items():
        for point in plan_sweep(source, runs / "select" / method, **_sweep_args(mode, parts)):
            if point.config.output_dir in seen:
                continue
            seen.add(point.config.output_dir)
            jobs.append(Job("select", f"select {method} {point.strategy} {100 * point.fraction:.0f}% "
                            f"seed {point.seed}", point.config, {"part": point.part}))
    return jobs


def _sweep_args(mode: Mode, parts: Sequence[str]) -> dict[str, Any]:
    return {"fraction": mode.fraction, "fractions": mode.fractions if "figure2" in parts else (),
            "seeds": list(range(mode.selection_seeds)),
            "strategies": STRATEGIES if "table4" in parts else ()}


def execute(jobs: list[Job], shard: tuple[int, int] | None, wait_s: float) -> dict[str, dict[str, Any]]:
    """Return {run dir: record} of every job: this process's share is trained or reused, the rest waited for."""
    mine = [j for i, j in enumerate(jobs) if shard is None or i % shard[1] == shard[0]]
    records: dict[str, dict[str, Any]] = {}
    for i, job in enumerate(mine, start=1):
        if job.config.output_dir in records:
            continue
        record, seconds = run_or_reuse(job.config, f"[{job.stage} {i}/{len(mine)}] {job.tag}: ")
        if seconds is not None:
            _write_timing(Path(job.config.output_dir), seconds)
        records[job.config.output_dir] = record
    deadline = time.monotonic() + wait_s
    while True:
        missing = [j for j in jobs if j.config.output_dir not in records]
        for job in missing:
            record = cached_record(job.config)
            if record is not None:
                records[job.config.output_dir] = record
        missing = [j for j in jobs if j.config.output_dir not in records]
        if not missing:
            return records
        if time.monotonic() > deadline:
            raise RuntimeError(f"stage {jobs[0].stage}: {len(missing)} runs of other shards are not finished "
                               f"after {wait_s:.0f} s (e.g. {missing[0].config.output_dir}); run again to resume")
        time.sleep(5)


def _write_timing(run_dir: Path, seconds: float) -> None:
    (run_dir / "timing.json").write_text(json.dumps({"seconds": seconds, "device": device_name()}) + "\n")


def count_plan(mode: Mode, parts: Sequence[str]) -> dict[str, int]:
    """Return the number of runs per stage (before anything is known about the tuning's outcome)."""
    grid = (len(mode.grid_s) * len(mode.grid_lam) + 1) * len(mode.methods)
    train = len(mode.tasks) * len(mode.methods) * mode.seeds * 2
    if "ablation" in parts and "lora" in mode.methods:
        train += mode.seeds * len([t for t in mode.ablation_tasks if t in mode.tasks])
    sources = len([m for m in ("dora", "lora") if m in mode.methods])
    per_seed = (8 if "table4" in parts else 0) + len(mode.fractions if "figure2" in parts else ())
    if "table4" in parts and mode.fraction in mode.fractions and "figure2" in parts:
        per_seed -= 1  # Figure 2 at 50% is Table 4's S_low_50%
    select = sources * mode.selection_seeds * per_seed if {"table4", "figure2"} & set(parts) else 0
    return {"tune": grid * len(mode.tuned_tasks()), "train": train, "select": select}


def _record(record: dict[str, Any], run_dir: str) -> dict[str, Any]:
    keys = ("task", "model", "method", "selective", "seed", "metric", "score", "sparsity", "note")
    return {k: record.get(k) for k in keys} | {"run_dir": run_dir, "rule": record["config"].get("rule")}


def _run_seconds(run_dirs: Iterable[str]) -> tuple[float, int]:
    total, count = 0.0, 0
    for d in dict.fromkeys(run_dirs):
        count += 1
        path = Path(d) / "timing.json"
        if path.is_file():
            total += float(json.loads(path.read_text()).get("seconds", 0.0))
    return total, count


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``tspeft reproduce`` / ``experiments/reproduce.py``."""
    p = argparse.ArgumentParser(prog="tspeft reproduce", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="the CPU budget: about 75-100 minutes of training on 2 idle cores (--plan estimates)")
    group.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                       help="an end-to-end check of a few minutes (32 examples, 1 epoch, 1 seed, LoRA and DoRA)")
    group.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="all data, more epochs and a larger grid: for a GPU")
    p.set_defaults(mode="quick")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu hides any GPU; cuda fails without one (the Trainer uses a visible GPU by itself)")
    p.add_argument("--tasks", nargs="+", default=None, help="override the mode's tasks (first = selection task)")
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(METHOD_NAMES), help="override the methods")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds (0..N-1)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="what to reproduce (Tables 1-3 runs are always made: the rest builds on them)")
    p.add_argument("--runs", default=None, help="run directories (default: runs/reproduce-<mode>)" + NO_AUTO_DEFAULT)
    p.add_argument("--output", default="docs/results.md", help="the report")
    p.add_argument("--figures", default=None, help="PNGs and results.json (default: <output dir>/results)" + NO_AUTO_DEFAULT)
    p.add_argument("--shard", default=None, metavar="K/N", help="train only every N-th run from K (0-based)")
    p.add_argument("--wait", type=float, default=3600.0, help="with --shard: seconds to wait for other shards")
    p.add_argument("--plan", action="store_true", help="print the plan and the estimated time, train nothing")
    p.add_argument("--generated-by", default=None, help="the command to name in the report (default: this one)" + NO_AUTO_DEFAULT)
    return p


def _command_line(argv: Sequence[str]) -> str:
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog == "tspeft" or "reproduce" in sys.argv[1:2]:
        head = "tspeft reproduce"
    elif sys.argv and sys.argv[0].endswith(os.path.join("experiments", "reproduce.py")):
        head = "python experiments/reproduce.py"
    else:
        head = "python -m tspeft.reproduce"
    return " ".join([head, *map(shlex.quote, argv)])


def _mode(ns: argparse.Namespace) -> Mode:
    mode = MODES[ns.mode]
    changes: dict[str, Any] = {}
    if ns.tasks:
        changes["tasks"] = tuple(ns.tasks)
    if ns.methods:
        changes["methods"] = tuple(ns.methods)
    if ns.seeds:
        changes["seeds"] = ns.seeds
    return dataclasses.replace(mode, **changes)


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N, e.g. 0/4; got {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


NO_AUTO_DEFAULT = "%(default).0s"
"""Ends a help text that states its own default: prints nothing, and keeps argparse's default-showing formatter
from adding "(default: None)" for an option whose None means "worked out at run time"."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reproduction (or print its plan) and write the report; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `tspeft reproduce -- --quick`
    if ns.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TSPEFT_QUIET", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mode, shard, parts = _mode(ns), _shard(ns.shard), tuple(ns.parts)
    if ns.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no GPU")
    runs = Path(ns.runs or f"runs/reproduce-{mode.name}")
    report = Path(ns.output)
    figures = Path(ns.figures) if ns.figures else report.parent / "results"
    counts = count_plan(mode, parts)
    estimate = sum(counts.values()) * float(np.mean(list(mode.seconds_per_run.values()))) / 60
    print(f"reproduce ({mode.name}): runs per stage {counts}, {sum(counts.values())} in all; about {estimate:.0f} "
          f"min on an idle 2-core CPU if nothing is done yet; run directories under {runs}", flush=True)
    if ns.plan:
        return 0
    started, commit = time.time(), git_commit()  # before the report and figures are rewritten
    tune = tuning_jobs(mode, runs)
    records = execute(tune, shard, ns.wait)
    chosen = chosen_settings(mode, records, tune)
    for task, per_method in chosen.items():
        for method, c in per_method.items():
            print(f"chosen for {task} {METHOD_NAMES[method]} (on {c['source']} validation): s={fmt_num(c['s'])} "
                  f"lam={fmt_num(c['lam'])}")
    train_jobs = training_jobs(mode, runs, chosen, parts)
    records.update(execute(train_jobs, shard, ns.wait))
    select = selection_jobs(mode, runs, parts)
    records.update(execute(select, shard, ns.wait))
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]} done; run again without --shard to write the report")
        return 0
    res = Results(mode, parts, chosen)
    for job in train_jobs:
        target = res.tables if job.role["part"] == "tables" else res.ablation
        target.append(_record(records[job.config.output_dir], job.config.output_dir))
    for method, source in selection_sources(mode, runs, parts).items():
        res.sweeps[method] = sweep(source, runs / "select" / method, **_sweep_args(mode, parts))
    figures.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    res.sections.append(tables_section(res))
    res.sections.append(selection_sections(res, figures, report.parent))
    if "ablation" in parts:
        res.sections.append(ablation_section(res, figures, report.parent))
    if "table5" in parts:
        res.sections.append(table5_section(res, figures, report.parent))
    res.sections = [s for s in res.sections if s]
    all_dirs = [j.config.output_dir for j in (*tune, *train_jobs, *select)]
    res.run_seconds, res.run_count = _run_seconds(all_dirs)
    res.run_commits = dict(Counter(commit_of(records[d]) for d in dict.fromkeys(all_dirs) if d in records))
    notes = {r["task"]: r["note"] for r in res.tables}
    report.write_text(render(res, ns.generated_by or _command_line(argv), started, notes, commit))
    summary = {"mode": dataclasses.asdict(mode), "chosen": chosen, "tables": res.tables, "ablation": res.ablation,
               "sweeps": res.sweeps, "verdicts": res.verdicts, "figures": res.figures,
               "run_seconds": res.run_seconds, "runs": res.run_count}
    (figures / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nreport: {report}\nfigures and results.json: {figures}")
    for v in res.verdicts:
        print(f"  {v['verdict']:>15}: {v['claim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
