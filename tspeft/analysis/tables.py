"""The paper's tables: module-wise sparsity (Table 5), method comparison (Tables 1–3), selection (Table 4).

Standard deviation convention (checked against the paper's Table 5 in ``tests/test_analysis.py``): the
values quoted in §4.3 / A.3 (41.3 for TS-DoRA, 11.4 for TS-AdaLoRA) are the *population* standard
deviation over all module sparsities of the table ("–" excluded). The population (or sample) standard
deviation of the per-layer "avg" column gives 25.8 / 4.9 instead, so ``SparsityTable.std`` follows the
paper and ``SparsityTable.layer_std`` keeps the across-layer spread of the per-layer averages. (For
TS-LoRA the table's own numbers give 9.6 where the text quotes 9.8; its "avg" row does not match its
columns either, so that block of the paper is internally inconsistent.)
"""

from __future__ import annotations

import csv
import html
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .runs import Run, method_label, parse_module_name, type_sort_key
from .select import STRATEGIES

DASH = "–"
METHOD_ORDER = ("lora", "dora", "adalora", "adapter")
STRATEGY_LABELS = {"s_low": "S_low", "s_high": "S_high"}


@dataclass
class Grid:
    """A rendered table: header, rows of strings, an optional caption and notes printed below it."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """Returns the table as GitHub-flavoured Markdown (caption in bold above, notes below)."""

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        out = [f"**{self.caption}**", ""] if self.caption else []
        out += [line(self.header), "|" + "|".join("---" for _ in self.header) + "|"]
        out += [line(r) for r in self.rows]
        for note in self.notes:  # one paragraph each: consecutive lines would merge into one
            out += ["", note]
        return "\n".join(out) + "\n"

    def to_text(self) -> str:
        """Returns the table as aligned plain text for a terminal."""
        widths = [max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))]
        lines = [self.caption] if self.caption else []
        for i, row in enumerate([self.header, *self.rows]):
            lines.append(
                "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines + self.notes) + "\n"

    def to_html(self) -> str:
        """Returns the table as an HTML ``<table>`` (escaped; caption and notes included)."""
        cap = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in self.notes)
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"

    def to_csv(self, path: str | Path) -> Path:
        """Returns the path of the CSV file written with the header and rows (notes left out)."""
        path = Path(path)
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([self.header, *self.rows])
        return path

    def __str__(self) -> str:
        return self.to_text()


@dataclass
class SparsityTable:
    """Module-wise sparsity in percent (Table 5): cells[(layer, type)] is None for a rank-0 module ("–")."""

    title: str
    module_types: list[str]
    layers: list[int]
    cells: dict[tuple[int, str], float | None]
    layer_avg: dict[int, float | None]
    column_avg: dict[str, float | None]
    mean: float | None  # mean over layers of the per-layer average (bottom-right cell)
    std: float | None  # population std over all module sparsities, "–" excluded (the paper's convention)
    layer_std: float | None  # population std over layers of the per-layer average
    unlayered: dict[str, float | None] = field(default_factory=dict)

    def grid(self) -> Grid:
        """Returns the table laid out as in the paper: one row per layer, then the "avg" row."""
        header = ["Layer", *self.module_types, "avg"]
        rows = []
        for layer in self.layers:
            cells = [_cell(self.cells, (layer, t)) for t in self.module_types]
            rows.append([str(layer), *cells, _fmt(self.layer_avg[layer])])
        rows.append(["avg", *(_fmt(self.column_avg[t]) for t in self.module_types), _fmt(self.mean)])
        notes = [
            f"std over modules (population, paper §4.3 convention): {_fmt(self.std)}",
            f"std over layers of the per-layer avg (population): {_fmt(self.layer_std)}",
        ]
        if any(v is None for v in self.cells.values()):
            notes.append(f"{DASH} denotes rank 0 (the module was pruned; no sparsity).")
        notes += [f"{name} (outside the layer stack): {_fmt(v)}" for name, v in self.unlayered.items()]
        return Grid(header, rows, caption=self.title, notes=notes)

    def to_markdown(self) -> str:
        """Returns the table as Markdown, with the standard deviations below it."""
        return self.grid().to_markdown()

    def to_text(self) -> str:
        """Returns the table as aligned plain text."""
        return self.grid().to_text()

    def to_html(self) -> str:
        """Returns the table as an HTML fragment."""
        return self.grid().to_html()

    def to_csv(self, path: str | Path) -> Path:
        """Returns the path of the CSV written: the grid, then rows "std" and "layer_std" in the avg column."""
        grid = self.grid()
        pad = [""] * len(self.module_types)
        grid.rows += [["std", *pad, _fmt(self.std)], ["layer_std", *pad, _fmt(self.layer_std)]]
        return grid.to_csv(path)

    def __str__(self) -> str:
        return self.to_text()


def sparsity_table(
    run: Run, module_types: Sequence[str] | None = None, contains: str | None = None
) -> SparsityTable:
    """Returns the Table 5 layout of a token-selective run; ``contains`` keeps only module names with that text."""
    if not run.selective and all(m.sparsity is None for m in run.modules.values()):
        raise ValueError(
            f"{run.name} is a dense run: it has no sparsity; use a token-selective run (selective=true)"
        )
    cells: dict[tuple[int, str], float | None] = {}
    owners: dict[tuple[int, str], str] = {}
    unlayered: dict[str, float | None] = {}
    for name, stats in run.modules.items():
        if contains is not None and contains not in name:
            continue
        layer, mtype = parse_module_name(name)
        value = None if stats.sparsity is None else 100.0 * stats.sparsity
        if layer is None:
            unlayered[name] = value
            continue
        if (layer, mtype) in owners:
            raise ValueError(
                f"modules {owners[layer, mtype]!r} and {name!r} both map to layer {layer}, type {mtype!r}; "
                "pass contains=... to tabulate one stack at a time"
            )
        owners[layer, mtype], cells[layer, mtype] = name, value
    present = sorted({t for _, t in cells}, key=type_sort_key)
    types = list(module_types) if module_types is not None else present
    unknown = [t for t in types if t not in present]
    if unknown:
        raise ValueError(f"module types {unknown} are not in {run.name}; it has {present}")
    cells = {k: v for k, v in cells.items() if k[1] in types}
    layers = sorted({layer for layer, _ in cells})
    if not layers:
        raise ValueError(f"{run.name} has no modules inside a layer stack to tabulate")
    layer_avg = {la: _mean(cells.get((la, t)) for t in types) for la in layers}
    column_avg = {t: _mean(cells.get((la, t)) for la in layers) for t in types}
    per_layer = [v for v in layer_avg.values() if v is not None]
    values = [v for v in cells.values() if v is not None]
    return SparsityTable(
        title=f"Module-wise sparsity (%) — {run.name}",
        module_types=types,
        layers=layers,
        cells=cells,
        layer_avg=layer_avg,
        column_avg=column_avg,
        mean=_mean(per_layer),
        std=float(np.std(values)) if values else None,
        layer_std=float(np.std(per_layer)) if per_layer else None,
        unlayered=unlayered,
    )


def compare_grid(records: Iterable[dict[str, Any]]) -> Grid:
    """Returns the Tables 1–3 layout: per method a dense row, a TS row and the TS "Sparsity(%)" row."""
    recs = [_check_record(r, i) for i, r in enumerate(records)]
    if not recs:
        raise ValueError("compare_grid needs at least one result record")
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    models = list(dict.fromkeys(str(r.get("model", "")) for r in recs))
    methods = sorted({r["method"] for r in recs}, key=lambda m: (_index(METHOD_ORDER, m), m))
    cells: list[tuple[str, list[dict[str, Any]], dict[str, list[float]]]] = []
    for model in models:
        prefix = f"{model}: " if len(models) > 1 else ""
        for method in methods:
            for selective in (False, True):
                group = [r for r in recs if str(r.get("model", "")) == model and r["method"] == method]
                group = [r for r in group if bool(r["selective"]) == selective]
                if group:
                    scores = {t: [float(r["score"]) for r in group if r["task"] == t] for t in tasks}
                    cells.append((prefix + method_label(method, selective), group, scores))
    # the seed count most cells have; a cell with another count says so, so that unequal cells are not compared blind
    counts = Counter(len(v) for _, _, scores in cells for v in scores.values() if v)
    usual = counts.most_common(1)[0][0] if counts else 0
    rows: list[list[str]] = []
    partial = uneven = False
    for label, group, scores in cells:
        row, missing = _score_row(scores, tasks)
        for i, t in enumerate(tasks):
            if scores[t] and len(scores[t]) != usual:
                row[i] += f" (n={len(scores[t])})"
                uneven = True
        partial |= missing
        rows.append([label, *row])
        if bool(group[0]["selective"]):
            rows.append(_sparsity_row(group, tasks))
    metrics = {r["task"]: r.get("metric") for r in recs if r.get("metric")}
    notes = [f"Scores: mean ± sample std over {usual} seed{'s' * (usual != 1)} per cell"
             + (", or the n given" if uneven else "") + "; Avg: mean of the task means."]
    if metrics:
        notes.append("Metrics: " + ", ".join(f"{t}: {m}" for t, m in metrics.items()) + ".")
    if partial:
        notes.append("* average over the tasks present in that row only.")
    return Grid(
        ["Method", *tasks, "Avg"], rows, caption="Evaluation scores (dense vs token-selective)", notes=notes
    )


def compare_table(records: Iterable[dict[str, Any]], fmt: str = "markdown") -> str:
    """Returns the comparison table of ``compare_grid`` rendered as ``"markdown"``, ``"text"`` or ``"html"``."""
    grid = compare_grid(records)
    renderers = {"markdown": grid.to_markdown, "text": grid.to_text, "html": grid.to_html}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(renderers)}")
    return renderers[fmt]()


def table4_grid(entries: Iterable[dict[str, Any]]) -> Grid:
    """Returns the Table 4 layout from sweep entries {strategy, fraction, score, seed[, task]}."""
    entries = list(entries)
    for i, e in enumerate(entries):
        missing = [k for k in ("strategy", "fraction", "score") if k not in e]
        if missing:
            raise ValueError(
                f"table4 entry {i} lacks {missing}; each needs strategy, fraction, score (and seed)"
            )
    if not entries:
        raise ValueError("table4 has no entries")
    tasks = list(dict.fromkeys(e["task"] for e in entries if "task" in e))
    keys = sorted({(e["strategy"], float(e["fraction"])) for e in entries},
                  key=lambda k: (_index(STRATEGIES, k[0]), k[0], k[1]))  # fmt: skip
    rows = []
    for strategy, fraction in keys:
        group = [e for e in entries if e["strategy"] == strategy and float(e["fraction"]) == fraction]
        label = f"{STRATEGY_LABELS.get(strategy, strategy)}_{round(100 * fraction)}%"
        if tasks:
            row, _ = _score_row(
                {t: [float(e["score"]) for e in group if e.get("task") == t] for t in tasks}, tasks
            )
        else:
            row = [_mean_std([float(e["score"]) for e in group]), str(len(group))]
        rows.append([label, *row])
    header = ["Selection", *tasks, "Avg"] if tasks else ["Selection", "Score", "Runs"]
    note = "Scores: mean ± sample std over seeds; random_: over its seeded draws of modules as well."
    return Grid(header, rows, caption="Module selection strategies (Table 4)", notes=[note])


def _score_row(scores: dict[str, list[float]], tasks: list[str]) -> tuple[list[str], bool]:
    cells = [_mean_std(scores[t]) for t in tasks]
    means = [float(np.mean(scores[t])) if scores[t] else None for t in tasks]
    missing = any(m is None for m in means)
    avg = _mean(means)
    return [*cells, (_fmt(avg) + ("*" if missing else "")) if avg is not None else ""], missing


def _sparsity_row(group: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """The "Sparsity(%)" row under a TS row: mean overall test sparsity over seeds, per task."""
    means = []
    for task in tasks:
        values = [
            100 * float(r["sparsity"]) for r in group if r["task"] == task and r.get("sparsity") is not None
        ]
        means.append(float(np.mean(values)) if values else None)
    return ["Sparsity(%)", *(_fmt(m) if m is not None else "" for m in means), _fmt(_mean(means))]


def _check_record(record: dict[str, Any], i: int) -> dict[str, Any]:
    missing = [k for k in ("task", "method", "selective", "score") if k not in record]
    if missing:
        raise ValueError(f"result record {i} lacks {missing}; records need task, method, selective, score")
    return record


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return _fmt(values[0])
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _fmt(value: float | None) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:.1f}"


def _cell(cells: dict[tuple[int, str], float | None], key: tuple[int, str]) -> str:
    return _fmt(cells[key]) if key in cells else ""


def _index(order: Sequence[str], item: str) -> int:
    return order.index(item) if item in order else len(order)
