"""Pictures of a run: sparsity heat map, threshold trajectories (Figure 3), ratio histogram, selection curves.

Every function draws on its own ``Figure`` with the Agg canvas (no pyplot, no global state, no display
needed), writes one PNG of ``FIGSIZE`` inches at ``DPI`` and returns its path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runs import METHOD_NAMES, Run, parse_module_name, resolve_module, strip_prefix
from .tables import sparsity_table

FIGSIZE = (8.0, 5.0)
DPI = 100
LOSS_COLOR = "tab:blue"
THRESHOLD_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def sparsity_heatmap(run: Run, path: str | Path, module_types: Sequence[str] | None = None) -> Path:
    """Returns the path of a PNG heat map of sparsity (%) over layers × module types; "–" cells are grey."""
    table = sparsity_table(run, module_types)
    data = np.full((len(table.module_types), len(table.layers)), np.nan)
    for (layer, mtype), value in table.cells.items():
        if value is not None:
            data[table.module_types.index(mtype), table.layers.index(layer)] = value
    fig, ax = _figure()
    cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0")
    image = ax.imshow(
        np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto", interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label="sparsity (%)")
    ax.set_xticks(
        range(len(table.layers)), [str(la) for la in table.layers], fontsize=_fontsize(len(table.layers), 9)
    )
    ax.set_yticks(range(len(table.module_types)), table.module_types)
    ax.set_xlabel("layer")
    ax.set_title(f"Token sparsity per module — {run.name}", fontsize=10)
    size = _fontsize(len(table.layers), 8)
    rotation = 90 if len(table.layers) > 16 else 0
    for (layer, mtype), value in table.cells.items():
        x, y = table.layers.index(layer), table.module_types.index(mtype)
        text = "–" if value is None else f"{value:.1f}"
        color = "black" if value is None or value >= 50 else "white"
        ax.text(x, y, text, ha="center", va="center", fontsize=size, color=color, rotation=rotation)
    return _save(fig, path)


def threshold_trajectories(run: Run, path: str | Path, modules: Sequence[str] | None = None) -> Path:
    """Returns the path of a PNG with the loss (left axis) and module thresholds (right axis) against step."""
    steps, loss = _loss_series(run)
    names = [resolve_module(run, m) for m in modules] if modules is not None else default_modules(run)
    fig, ax = _figure()
    lines = ax.plot(steps, loss, color=LOSS_COLOR, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color=LOSS_COLOR)
    series = [(_module_label(run, n), *_threshold_series(run, n)) for n in names]
    mean = [
        (float(r["step"]), float(r["threshold_mean"])) for r in run.log if r.get("threshold_mean") is not None
    ]
    if not series and mean:  # the log has no per-module thresholds: show their mean instead
        series = [("mean threshold", [p[0] for p in mean], [p[1] for p in mean])]
    if series:
        right = ax.twinx()
        for color, (label, t_steps, values) in zip(_cycle(THRESHOLD_COLORS, len(series)), series):
            lines += right.plot(t_steps, values, "--", color=color, label=label)
        right.set_ylabel("threshold τ")
    title = run.name if series else f"{run.name} (dense run: no thresholds)"
    ax.set_title(title, fontsize=10)
    # on the top axes (the twin, when there is one), so that the threshold lines are not drawn over the box
    (right if series else ax).legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best", framealpha=0.9)
    return _save(fig, path)


def ratio_distribution(run: Run, path: str | Path, module: str | None = None) -> Path:
    """Returns the path of a PNG histogram of one module's token ratios with its threshold as a vertical line."""
    if run.ratios is None:
        where = run.path / "ratios.npz" if run.path is not None else "ratios.npz"
        raise FileNotFoundError(
            f"{where} is absent: training writes it at the end of a run (token ratios sampled per module); "
            "rerun training with ratio sampling on, or plot a run that has it"
        )
    name = resolve_module(run, module) if module is not None else representative_module(run)
    ratios = _ratios_of(run, name)
    threshold = run.modules[name].threshold
    fig, ax = _figure()
    positive = ratios[ratios > 0]
    log_x = positive.size > 1 and positive.max() / positive.min() > 1e3
    bins = np.geomspace(positive.min(), positive.max(), 60) if log_x else 60
    ax.hist(positive if log_x else ratios, bins=bins, color="tab:gray", edgecolor="white", linewidth=0.3)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("ratio ‖M(x)‖ / ‖W₀x‖" + (" (log scale, zeros left out)" if log_x else ""))
    ax.set_ylabel("tokens")
    if threshold is not None:
        below = float(np.mean(ratios < threshold))
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold τ = {threshold:.4g}")
        ax.legend(
            fontsize=8, title=f"below τ: {100 * below:.1f}% of {ratios.size} sampled tokens", title_fontsize=8
        )
    ax.set_title(f"{_module_label(run, name)} — {run.name}", fontsize=10)
    return _save(fig, path)


def selection_curve(results: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Returns the path of a PNG of score against the fraction of modules selected, one line per method (Figure 2)."""
    results = list(results)
    bad = [i for i, r in enumerate(results) if not {"method", "fraction", "score"} <= set(r)]
    if bad or not results:
        raise ValueError(
            f"selection results need method, fraction and score in every entry (bad entries: {bad[:5]})"
        )
    fig, ax = _figure()
    for method in dict.fromkeys(str(r["method"]) for r in results):
        fractions = sorted({float(r["fraction"]) for r in results if str(r["method"]) == method})
        scores = [
            [float(r["score"]) for r in results if str(r["method"]) == method and float(r["fraction"]) == f]
            for f in fractions
        ]
        x = [100 * f for f in fractions]
        spread = [float(np.std(s, ddof=1)) if len(s) > 1 else 0.0 for s in scores]
        label = METHOD_NAMES.get(method.lower(), method)
        ax.errorbar(x, [float(np.mean(s)) for s in scores], yerr=spread, marker="o", capsize=3, label=label)
    ax.set_xlabel("modules selected (%), added from least to most sparse")
    ax.set_ylabel("score")
    ax.set_title("Score against the fraction of selected modules", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def ablation_plot(
    runs_adam: Run | Sequence[Run],
    runs_plain: Run | Sequence[Run],
    path: str | Path,
    module: str | None = None,
) -> Path:
    """Returns the path of a PNG comparing one module's threshold and the loss under Adam-style vs plain updates (A.2)."""
    adam, plain = _as_list(runs_adam, "runs_adam"), _as_list(runs_plain, "runs_plain")
    name = resolve_module(adam[0], module) if module is not None else _ablation_module(adam[0], plain[0])
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    rights = []
    for ax, runs, title in (
        (axes[0], adam, "(a) Adam-style τ update"),
        (axes[1], plain, "(b) plain τ update"),
    ):
        run = runs[0]
        steps, loss = _loss_series(run)
        t_steps, values = _threshold_series(run, resolve_module(run, name))
        lines = ax.plot(steps, loss, color=LOSS_COLOR, label="loss")
        right = ax.twinx()
        lines += right.plot(t_steps, values, "--", color="tab:red", label="threshold τ")
        rights.append(right)
        scores = [r.score for r in runs]
        spread = f" ± {np.std(scores, ddof=1):.1f}" if len(scores) > 1 else ""
        ax.set_title(
            f"{title}\nscore {np.mean(scores):.1f}{spread} ({len(scores)} run{'s' * (len(scores) > 1)})",
            fontsize=9,
        )
        ax.set_xlabel("step")
        right.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best", framealpha=0.9)  # on top
    axes[0].set_ylabel("loss", color=LOSS_COLOR)
    rights[1].set_ylabel("threshold τ")
    top = max(r.get_ylim()[1] for r in rights)
    bottom = min(r.get_ylim()[0] for r in rights)
    for right in rights:
        right.set_ylim(bottom, top)
    rights[0].tick_params(labelright=False)  # shared threshold scale: labelled once, on panel (b)
    fig.suptitle(f"{_module_label(adam[0], name)} — {adam[0].task}", fontsize=10)
    return _save(fig, path)


def default_modules(run: Run, count: int = 3) -> list[str]:
    """Returns up to ``count`` module names to plot: the least sparse, the most sparse, then the median."""
    logged = {m for r in run.log for m in (r.get("modules") or {})}
    ranked = sorted(
        (n for n, s in run.modules.items() if s.sparsity is not None and n in logged),
        key=lambda n: run.modules[n].sparsity,
    )
    if not ranked:
        return []
    picks = [ranked[0], ranked[-1], ranked[len(ranked) // 2]]
    return list(dict.fromkeys(picks))[:count]


def representative_module(run: Run) -> str:
    """Returns the module with sampled ratios whose sparsity is closest to the run's overall sparsity."""
    names = [n for n in run.modules if run.ratios is not None and _ratio_key(run, n) is not None]
    if not names:
        raise ValueError(f"ratios.npz of {run.name} holds no array named after a module of run.json")
    target = run.sparsity
    if target is None:
        return names[0]
    return min(
        names,
        key=lambda n: abs((run.modules[n].sparsity if run.modules[n].sparsity is not None else 1.0) - target),
    )


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _loss_series(run: Run) -> tuple[list[float], list[float]]:
    records = [r for r in run.log if r.get("loss") is not None]
    if not records:
        where = run.path / "log.jsonl" if run.path is not None else "the run's log"
        raise ValueError(f"{where} has no records with a loss; training appends one per logging step")
    return [float(r["step"]) for r in records], [float(r["loss"]) for r in records]


def _threshold_series(run: Run, name: str) -> tuple[list[float], list[float]]:
    points = [
        (float(r["step"]), float(m[name]["threshold"]))
        for r in run.log
        if (m := r.get("modules") or {}).get(name, {}).get("threshold") is not None
    ]
    if not points:
        raise ValueError(
            f"log.jsonl of {run.name} has no threshold for module {name!r}; is it a token-selective run?"
        )
    steps, values = zip(*points)
    return list(steps), list(values)


def _ratio_key(run: Run, name: str) -> str | None:
    assert run.ratios is not None
    for key in (name, strip_prefix(name)):
        if key in run.ratios:
            return key
    return None


def _ratios_of(run: Run, name: str) -> np.ndarray:
    assert run.ratios is not None
    key = _ratio_key(run, name)
    if key is None:
        raise KeyError(
            f"ratios.npz of {run.name} has no array for module {name!r}; it has {sorted(run.ratios)[:4]}"
        )
    ratios = np.asarray(run.ratios[key], dtype=float)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        raise ValueError(f"ratios.npz of {run.name}: the array for {name!r} holds no finite values")
    return ratios


def _module_label(run: Run, name: str) -> str:
    layer, mtype = parse_module_name(name)
    sparsity = run.modules[name].sparsity if name in run.modules else None
    where = f"layer {layer} {mtype}" if layer is not None else mtype
    return where + (f" (sparsity {100 * sparsity:.0f}%)" if sparsity is not None else "")


def _ablation_module(adam: Run, plain: Run) -> str:
    common = [n for n in adam.modules if n in plain.modules]
    logged = [
        n
        for n in common
        if any((r.get("modules") or {}).get(n, {}).get("threshold") is not None for r in adam.log)
    ]
    if not logged:
        raise ValueError(
            f"{adam.name} and {plain.name} share no module with logged thresholds; pass module=..."
        )
    return max(logged, key=lambda n: _threshold_series(adam, n)[1][-1])


def _as_list(runs: Run | Sequence[Run], what: str) -> list[Run]:
    result = [runs] if isinstance(runs, Run) else list(runs)
    if not result:
        raise ValueError(f"{what} is empty; pass at least one run")
    return result


def _cycle(colors: Sequence[str], n: int) -> list[str]:
    return [colors[i % len(colors)] for i in range(n)]


def _fontsize(count: int, largest: float) -> float:
    return max(5.0, min(largest, 240.0 / max(count, 1)))
