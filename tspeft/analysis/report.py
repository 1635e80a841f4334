"""One self-contained report (HTML with embedded PNGs, and a Markdown twin) over run and sweep directories."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plots
from .runs import PEFT_PREFIX, Run, load_run
from .tables import Grid, compare_grid, sparsity_table, table4_grid

TITLE = "TS-PEFT analysis report"
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; } caption { font-weight: bold; text-align: left; padding: 0.3em 0; }
img { max-width: 100%; display: block; margin: 1em 0; } .note { color: #555; font-size: 0.85em; margin: 0.2em 0; }
"""
CONFIG_KEYS = ("lam", "s", "rank", "target_modules", "lr", "epochs", "batch_size")


@dataclass
class Block:
    """One piece of the report: a heading, a paragraph, a table or an image."""

    kind: str  # "h1" | "h2" | "h3" | "p" | "grid" | "img"
    text: str = ""
    grid: Grid | None = None
    image: Path | None = None


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path, title: str = TITLE) -> Path:
    """Returns the path of ``report.html`` written to ``out_dir`` (``report.md`` and its PNGs beside it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, sweeps, unfinished = _collect(run_dirs)
    blocks = [Block("h1", title)]
    if unfinished:  # left out: a comparison cell would average fewer seeds with no sign of it
        names = ", ".join(str(p) for p in unfinished[:8]) + (", ..." if len(unfinished) > 8 else "")
        warning = (f"Warning: {len(unfinished)} folder(s) hold a training log but no run.json (unfinished or "
                   f"stopped runs) and are left out of every table: {names}")
        print(warning, file=sys.stderr)
        blocks.append(Block("p", warning))
    names = _run_names(runs)
    if runs:
        blocks += _overview(runs, names)
    for i, (run, name) in enumerate(zip(runs, names), start=1):
        blocks += _run_section(run, out, f"run{i:02d}", name)
    for i, (where, sweep) in enumerate(sweeps, start=1):
        blocks += _sweep_section(where, sweep, out, f"sweep{i:02d}")
    before = _images_of(out / "report.md")  # what a previous report in this folder wrote
    (out / "report.md").write_text(render_markdown(blocks))
    path = out / "report.html"
    path.write_text(render_html(blocks, title))
    for name in before - _images_of(out / "report.md"):  # its pictures this report does not use: stale
        (out / name).unlink(missing_ok=True)
    return path


def _images_of(report_md: Path) -> set[str]:
    """Return the PNG file names a report.md links (written beside it by write_report)."""
    if not report_md.is_file():
        return set()
    return {m for m in re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", report_md.read_text())}


def render_html(blocks: list[Block], title: str = TITLE) -> str:
    """Returns a standalone HTML page: inline CSS, images as base64 data URIs, no scripts."""
    body = []
    for b in blocks:
        if b.kind == "grid" and b.grid is not None:
            body.append(b.grid.to_html())
        elif b.kind == "img" and b.image is not None:
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">')
        else:
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style>'
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def render_markdown(blocks: list[Block]) -> str:
    """Returns the report as Markdown; images are linked by file name (they lie beside ``report.md``)."""
    prefixes = {"h1": "# ", "h2": "## ", "h3": "### ", "p": ""}
    parts = []
    for b in blocks:
        if b.kind == "grid" and b.grid is not None:
            parts.append(b.grid.to_markdown())
        elif b.kind == "img" and b.image is not None:
            parts.append(f"![{b.text}]({b.image.name})")
        else:
            parts.append(prefixes[b.kind] + b.text)
    return "\n\n".join(parts) + "\n"


def _collect(run_dirs: Iterable[str | Path]) -> tuple[list[Run], list[tuple[Path, dict[str, Any]]], list[Path]]:
    """Return (finished runs, sweeps, folders with a training log but no run.json) under `run_dirs`."""
    runs: list[Run] = []
    sweeps: list[tuple[Path, dict[str, Any]]] = []
    unfinished: list[Path] = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d} is not a directory; pass run directories (with run.json) or their parent"
            )
        found = [d] if (d / "run.json").is_file() else sorted(p.parent for p in d.glob("*/run.json"))
        if not (d / "run.json").is_file():
            unfinished += sorted(p.parent for p in d.glob("*/log.jsonl") if not (p.parent / "run.json").is_file())
        runs += [load_run(p) for p in found if p.resolve() not in {r.path.resolve() for r in runs if r.path}]
        if (d / "sweep.json").is_file():
            sweeps.append((d, _read_sweep(d / "sweep.json")))
        elif not found:
            raise FileNotFoundError(
                f"{d} holds no run.json, no */run.json and no sweep.json; is it a run directory?"
            )
    return runs, sweeps, unfinished


def _read_sweep(path: Path) -> dict[str, Any]:
    try:
        sweep = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it from the sweep's results") from err
    if not isinstance(sweep, dict) or not ({"table4", "figure2"} & set(sweep)):
        raise ValueError(f"{path} must be an object with 'table4' and/or 'figure2' lists")
    return sweep


def _overview(runs: list[Run], names: list[str]) -> list[Block]:
    rows = []
    for run, name in zip(runs, names):
        sparsity = "" if run.sparsity is None else f"{100 * run.sparsity:.1f}"
        rows.append([name, run.task, str(run.meta["model"]), run.label, str(run.meta["seed"]),
                     f"{run.meta['metric']} {run.score:.1f}", sparsity, str(run.meta.get("note", ""))])  # fmt: skip
    header = ["Run", "Task", "Model", "Method", "Seed", "Score", "Sparsity (%)", "Data"]
    blocks = [
        Block("h2", "Runs"),
        Block("grid", grid=Grid(header, rows, notes=["Sparsity: overall, on the test set."])),
    ]
    if any(n > 1 for n in Counter(r.task for r in runs).values()):
        grid = compare_grid([r.record() for r in runs])
        grid.notes.extend(_pooling_notes(runs))
        blocks += [Block("h2", "Comparison"), Block("grid", grid=grid)]
    return blocks


def _pooling_notes(runs: list[Run]) -> list[str]:
    """Return a warning per comparison cell whose runs differ in more than their seed (not like with like)."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        key = (run.task, str(run.meta.get("model")), run.label)
        cells.setdefault(key, []).append({k: v for k, v in run.config.items() if k not in ("seed", "output_dir", "resume")})
    notes = []
    for (task, _, label), configs in cells.items():
        differ = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
        if differ:
            notes.append(f"Warning: {label} on {task} pools runs whose settings differ in {', '.join(differ)}, "
                         "not only in the seed: compare like with like.")
    return notes


def _run_section(run: Run, out: Path, stem: str, name: str) -> list[Block]:
    blocks = [Block("h2", f"{run.name} ({name})")]
    sparsity = "–" if run.sparsity is None else f"{100 * run.sparsity:.1f}%"
    summary = f"{run.meta['metric']}: {run.score:.2f} · token sparsity (test): {sparsity}"
    blocks.append(Block("p", f"{summary} · {run.meta.get('note', '')}"))
    config = run.config
    settings = ", ".join(f"{k}={config[k]}" for k in CONFIG_KEYS if k in config)
    if settings:
        blocks.append(Block("p", f"Settings: {settings}"))
    if any(m.sparsity is not None for m in run.modules.values()):
        blocks += [Block("h3", "Module-wise sparsity"), Block("grid", grid=sparsity_table(run).grid())]
        blocks.append(
            Block("img", "sparsity heat map", image=plots.sparsity_heatmap(run, out / f"{stem}_heatmap.png"))
        )
    else:
        blocks.append(Block("p", "Dense run: no token sparsity to tabulate."))
    if any(r.get("loss") is not None for r in run.log):
        image = plots.threshold_trajectories(run, out / f"{stem}_trajectories.png")
        blocks += [
            Block("h3", "Loss and thresholds"),
            Block("img", "loss and threshold trajectories", image=image),
        ]
    else:
        blocks.append(Block("p", "No log.jsonl records: no trajectories."))
    if run.ratios and any(k in run.modules or PEFT_PREFIX + k in run.modules for k in run.ratios):
        image = plots.ratio_distribution(run, out / f"{stem}_ratios.png")
        blocks += [
            Block("h3", "Token ratio distribution"),
            Block("img", "token ratio histogram", image=image),
        ]
    return blocks


def _sweep_section(where: Path, sweep: dict[str, Any], out: Path, stem: str) -> list[Block]:
    blocks = [Block("h2", f"Module selection ({where.resolve().name})")]
    if sweep.get("table4"):
        blocks.append(Block("grid", grid=table4_grid(sweep["table4"])))
    if sweep.get("figure2"):
        image = plots.selection_curve(sweep["figure2"], out / f"{stem}_selection_curve.png")
        blocks.append(Block("img", "score against the fraction of selected modules", image=image))
    return blocks


def _run_names(runs: list[Run]) -> list[str]:
    """Return how the report names each run: its folder's name (``.`` resolved), or, where two runs share that
    name (the same seed in two sweeps), its path relative to the folder that holds them all."""
    paths = [None if r.path is None else r.path.resolve() for r in runs]
    names = ["" if p is None else p.name for p in paths]
    known = [p for p in paths if p is not None]
    if len(set(names)) < len(names) and len(known) > 1:
        root = Path(os.path.commonpath(known))
        names = ["" if p is None else str(p.relative_to(root)) for p in paths]
    return names
