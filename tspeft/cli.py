"""The ``tspeft`` command: train, eval, compare, analyze, select, sweep, report, bench, reproduce.

Each sub-command is a typed function; its flags come from its signature or, for runs, from the fields of
:class:`tspeft.train.RunConfig`, so defaults are visible in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

from .recipes import RECIPE_HELP, load_recipe

# --------------------------------------------------------------------------------------------- run flags

_HELP = {
    "task": "task name (tspeft.data.list_tasks()) or 'local' with --data-files",
    "model": "'minilm' (bundled), 'smollm2-135m' (optional package), a hub id or a local path",
    "method": "lora | dora | adalora | adapter",
    "selective": "token-selective (TS-) run; --dense for the plain PEFT method",
    "gradient_checkpointing": "non-reentrant activation checkpointing (TS runs replay each forward's padding mask)",
    "lam": "lambda of Eq. 15: price of one active token (larger = sparser)",
    "s": "threshold step scale (Eq. 20); must fit the run's length",
    "rule": "adam (Eq. 16-20) or plain (Appendix A.2 ablation)",
    "targets": "target modules as the paper's letters Q,K,V,O,Up,Down,Gate,I",
    "target_modules": "explicit module names (suffixes), overriding --targets",
    "rank_pattern": "per-module ranks as name=r (LoRA/DoRA); each keeps the run's scale alpha / rank",
    "follow_schedule": "the thresholds' step follows the learning-rate schedule (alpha_k of Eq. 20); "
                       "--no-follow-schedule: alpha_k = 1",
    "data_files": "for --task local: train=path test=path (CSV or JSONL)",
    "text_fields": "for --task local: the text column(s), one or two",
    "label_field": "for --task local: the label column",
    "max_train": "cap on training examples after the seeded shuffle (0 = no cap)",
    "max_test": "cap on test examples after the seeded shuffle (0 = no cap)",
    "resume": "continue from the newest whole checkpoint in the output directory (with the run's own settings)",
}


def _is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _add_run_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), source_run: bool = False) -> None:
    """Add a flag per RunConfig field; its help shows the value a run gets without it: the default recipe's
    (small, which --recipe and the task and method may change) or, with `source_run`, the source run's."""
    from .train import RunConfig

    hints = typing.get_type_hints(RunConfig)
    recipe = load_recipe("small")
    for f in dataclasses.fields(RunConfig):
        if f.name in skip or f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if source_run:
            shown = "the source run's"
        elif f.name in recipe and recipe[f.name] != default:
            shown = f"{recipe[f.name]} from recipe small"
        else:
            shown = default
        help_text = _HELP.get(f.name, "") + f" (default: {shown})"
        if f.name == "selective":
            parser.add_argument("--selective", dest="selective", action="store_true", default=None, help=help_text)
            parser.add_argument("--dense", dest="selective", action="store_false", help="the dense PEFT method")
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in ("target_modules",):
            parser.add_argument(flag, default=None, help=help_text, type=lambda v: [x for x in v.split(",") if x])
        elif f.name in ("rank_pattern", "data_files"):
            parser.add_argument(flag, nargs="+", default=None, metavar="KEY=VALUE", help=help_text)
        elif f.name == "text_fields":
            parser.add_argument(flag, nargs="+", default=None, metavar="COLUMN", help=help_text)
        else:
            base = [a for a in typing.get_args(tp) if a is not type(None)][0] if _is_optional(tp) else tp
            parser.add_argument(flag, type=base, default=None, help=help_text)


def _pairs(values: list[str] | None, cast=str) -> dict[str, Any] | None:
    if values is None:
        return None
    out = {}
    for item in values:
        if "=" not in item:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = cast(v)
    return out


def _run_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    from .train import RunConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(ns, f.name, None)
        if value is None:
            continue
        if f.name == "rank_pattern":
            value = _pairs(value, int)
        elif f.name == "data_files":  # absolute: eval and analysis may run from another directory
            value = {k: os.path.abspath(v) for k, v in _pairs(value).items()}
        elif f.name in ("max_train", "max_test") and value == 0:
            value = None
        out[f.name] = value
    return out


def train_command(config: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Return the ``tspeft train`` arguments that rebuild a run's settings (run.json's ``config``).

    Every setting that differs from what ``tspeft train`` would use for that task and method (recipe
    small over RunConfig's defaults) becomes a flag, so that the command trains what the run trained;
    `skip` leaves fields out (the caller supplies them).
    """
    from .train import RunConfig

    task, method = config.get("task"), config.get("method")
    reference = dataclasses.asdict(RunConfig.from_dict({**load_recipe("small", task=task, method=method),
                                                        "task": task, "method": method}))
    args: list[str] = ["tspeft", "train"]
    for f in dataclasses.fields(RunConfig):
        name, value = f.name, config.get(f.name, reference[f.name])
        if name in skip or name in ("extra", "resume") or (value == reference[name] and name not in ("task", "method")):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "selective":
            args.append("--selective" if value else "--dense")
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif name in ("max_train", "max_test") and value is None:
            args += [flag, "0"]
        elif name == "target_modules":
            args += [flag, ",".join(value)]
        elif name in ("rank_pattern", "data_files"):
            args += [flag, *(f"{k}={v}" for k, v in value.items())]
        elif name == "text_fields":
            args += [flag, *value]
        elif value is not None:
            args += [flag, str(value)]
    return args


def _run_config(ns: argparse.Namespace, **fixed: Any):
    from .train import RunConfig

    settings = load_recipe(ns.recipe, task=getattr(ns, "task", None), method=getattr(ns, "method", None))
    settings.update(_run_overrides(ns))
    settings.update(fixed)
    try:
        return RunConfig.from_dict(settings)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


# ------------------------------------------------------------------------------------------- commands


def cmd_train(ns: argparse.Namespace) -> int:
    """Run one fine-tuning and print its score and sparsity."""
    from .train import RunConfig, train

    saved = Path(ns.output_dir or "") / "run_config.json"
    if ns.resume and ns.output_dir and saved.is_file():  # the run's own settings; flags given here on top
        settings = {**json.loads(saved.read_text()), **_run_overrides(ns), "resume": True}
        cfg = RunConfig.from_dict(settings)
    else:
        cfg = _run_config(ns)
    record = train(cfg, overwrite=ns.overwrite)
    if record:  # empty on data-parallel ranks other than 0
        _print_result(record, cfg.output_dir)
    return 0


def _print_result(record: dict[str, Any], run_dir: str) -> None:
    sparsity = record["sparsity"]
    sp = f", sparsity {100 * sparsity:.1f}%" if sparsity is not None else ""
    print(f"{record['label']} on {record['task']} (seed {record['seed']}): {record['metric']} "
          f"{record['score']:.2f}{sp}\n  data: {record['note']}\n  run directory: {run_dir}")


def cmd_eval(ns: argparse.Namespace) -> int:
    """Evaluate a saved run's adapter on its task's test split and compare with the reported score."""
    from .train import evaluate_saved

    record = evaluate_saved(ns.run_dir)
    reported = json.loads((Path(ns.run_dir) / "run.json").read_text())
    same = record["score"] == reported["score"]
    print(f"{record['label']} on {record['task']}: {record['metric']} {record['score']:.4f} "
          f"(reported {reported['score']:.4f}: {'identical' if same else 'DIFFERENT'})")
    if record["sparsity"] is not None:
        print(f"  test sparsity {100 * record['sparsity']:.2f}% (reported {100 * reported['sparsity']:.2f}%)")
    print(f"  data: {record['note']}")
    return 0 if same else 1


def cmd_compare(ns: argparse.Namespace) -> int:
    """Dense vs token-selective for each method over several seeds: a Table 1-3 style table + results.json."""
    from .compare import compare

    base = _run_config(ns, output_dir=ns.output)
    compare(base, methods=ns.methods, seeds=ns.seeds, output=Path(ns.output), recipe=ns.recipe,
            overrides=_run_overrides(ns))
    return 0


def cmd_analyze(ns: argparse.Namespace) -> int:
    """Print and write the Table 5 layout, the heat map and the threshold trajectories of a run."""
    from .analysis import (
        load_run,
        ratio_distribution,
        sparsity_heatmap,
        sparsity_table,
        threshold_trajectories,
    )

    run = load_run(ns.run_dir)
    table = sparsity_table(run)  # first: a run it cannot analyse (a dense one) gets its error before any folder
    out = Path(ns.output or ns.run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    print(table.to_text())
    (out / "sparsity.md").write_text(table.to_markdown() + "\n")
    table.to_csv(out / "sparsity.csv")
    written = [out / "sparsity.md", out / "sparsity.csv"]
    if run.selective:
        written.append(sparsity_heatmap(run, out / "sparsity_heatmap.png"))
        for name, plot in (("thresholds.png", threshold_trajectories), ("ratios.png", ratio_distribution)):
            try:
                written.append(plot(run, out / name))
            except (ValueError, FileNotFoundError) as exc:  # a short run without log lines, no ratios.npz
                print(f"skipped {name}: {exc}")
    print("\nwritten:\n  " + "\n  ".join(str(p) for p in written))
    return 0


def cmd_select(ns: argparse.Namespace) -> int:
    """Print the modules a selection strategy picks from a token-selective run, and a ready command line."""
    from .analysis import load_run, select_modules, selection_command, selection_config

    run = load_run(ns.run_dir)
    sel = select_modules(run, ns.strategy, ns.fraction, seed=ns.seed)
    print(f"{sel.strategy} at {100 * sel.fraction:.0f}%: {len(sel.modules)} modules, {sel.params} parameters")
    for m in sel.modules:
        print(f"  {m}")
    if sel.note:
        print(sel.note)
    config = run.config or {"task": run.task, "model": run.meta.get("model", "minilm"), "method": run.method}
    args = train_command({**config, "selective": False, "output_dir": f"runs/{sel.strategy}"},
                         skip=("target_modules", "rank_pattern"))
    print("\ncommand:\n  " + selection_command(sel, " ".join(shlex.quote(a) for a in args)))
    if ns.json:
        Path(ns.json).write_text(json.dumps(selection_config(sel), indent=2) + "\n")
        print(f"config written to {ns.json}")
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    """Table 4 (six strategies at one fraction) and Figure 2 (cumulative fractions) from a TS run."""
    from .sweep import sweep

    sweep(Path(ns.run_dir), Path(ns.output), fraction=ns.fraction, fractions=ns.fractions, seeds=ns.seeds,
          strategies=ns.strategies, overrides=_run_overrides(ns))
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """Write one self-contained HTML report (and Markdown) for the given runs."""
    from .analysis import write_report

    path = write_report(ns.run_dirs, ns.output)
    print(f"report written to {path}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    """Run the training-step benchmark (forwards its arguments)."""
    from . import bench

    return int(bench.main(ns.bench_args) or 0)


def cmd_reproduce(ns: argparse.Namespace) -> int:
    """Reproduce the paper's findings at small scale and write docs/results.md (forwards its arguments)."""
    from . import reproduce

    return int(reproduce.main(ns.reproduce_args) or 0)


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``tspeft`` command."""
    from .analysis import STRATEGIES

    parser = argparse.ArgumentParser(prog="tspeft", description="Token-Selective PEFT: train, compare, analyse.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    p.add_argument("--recipe", default="small", help=RECIPE_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in the output directory (without it, one is refused)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__, formatter_class=fmt)
    p.add_argument("run_dir", help="a run directory written by 'tspeft train' (holds run.json and adapter/)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help=cmd_compare.__doc__, description=cmd_compare.__doc__)
    p.add_argument("--recipe", default="small", help=RECIPE_HELP)
    p.add_argument("--methods", nargs="+", default=["lora"], help="methods to compare (default: lora)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--output", default="runs/compare", help="output directory (default: runs/compare)")
    _add_run_flags(p, skip=("method", "selective", "seed", "output_dir"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help=cmd_analyze.__doc__, description=cmd_analyze.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--output", default=None, help="where to write analysis/ (default: the run directory)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("select", help=cmd_select.__doc__, description=cmd_select.__doc__, formatter_class=fmt)
    p.add_argument("run_dir")
    p.add_argument("--strategy", choices=STRATEGIES, default="s_low", help="how modules are ranked or chosen")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of the modules (half_rank: of the parameters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    p.add_argument("--json", default=None, help="also write the selection as a JSON config here")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("sweep", help=cmd_sweep.__doc__, description=cmd_sweep.__doc__)
    p.add_argument("run_dir", help="a token-selective run whose statistics drive the selection")
    p.add_argument("--output", default="runs/sweep", help="the sweep's folder; rerunning reuses its finished points "
                   "(default: runs/sweep)")
    p.add_argument("--fraction", type=float, default=0.5, help="Table 4 fraction (default: 0.5)")
    p.add_argument("--fractions", nargs="*", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                   help="Figure 2 fractions (default: 0.1 ... 1.0; none to skip)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                   help="Table 4 strategies (default: all six)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds per point (random uses 3 draws) (default: 0)")
    # the points are dense, fresh runs of the selected modules: no threshold settings, no --targets
    _add_run_flags(p, skip=("selective", "output_dir", "target_modules", "targets", "rank_pattern", "seed", "task",
                            "model", "resume", "lam", "s", "rule", "follow_schedule"), source_run=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__, formatter_class=fmt)
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders of them (a sweep.json is picked up)")
    p.add_argument("--output", default="runs/report", help="folder for report.html, report.md and their PNGs, "
                   "relative to the current directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__, add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("reproduce", help=cmd_reproduce.__doc__, description=cmd_reproduce.__doc__, add_help=False)
    p.add_argument("reproduce_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``tspeft`` command and return its exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    forwarded = {"bench": "tspeft.bench", "reproduce": "tspeft.reproduce"}
    if argv and argv[0] in forwarded:  # their own parsers own every flag, --help included
        import importlib

        return int(importlib.import_module(forwarded[argv[0]]).main(argv[1:]) or 0)
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, RuntimeError) as exc:
        if os.environ.get("TSPEFT_DEBUG"):
            raise
        print(f"tspeft {ns.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
