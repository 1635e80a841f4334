"""The verdicts of ``tspeft reproduce``: each claim of the paper judged from our numbers by a stated rule.

The rules are the constants below (points are accuracy points, sparsity in percent); the report restates
them beside each verdict. :func:`choose_setting` is the rule that picks lambda and s from the tuning grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not reproduced"
UNTESTED = "not tested"  # what the claim needs did not run (e.g. --methods without dora): no verdict either way
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "adapter": "Adapter"}

# Verdict rules (points are accuracy points, sparsity in percent). See the judge_* functions.
TABLE_GAP = 1.5  # TS may trail dense by at most this (mean over seeds) ...
TABLE_GAP_PARTLY = 3.0
SPARSITY_RANGE = (30.0, 80.0)  # ... with sparsity in the range the paper's Tables 1-3 span (33.9-76.0)
SPARSITY_MIN_PARTLY = 10.0
SELECT_MARGIN = 1.0  # S_low must beat S_high by this ...
SELECT_TOLERANCE = 0.5  # ... and be within this of the best other strategy
CURVE_DROP = 0.5  # all modules must score this much below the peak of the curve
ABLATION_DROP = 1.0  # plain must trail Adam-style by this ...
ABLATION_FACTOR = 2.0  # ... and its thresholds must oscillate or range this many times more
POLAR_FACTOR = 2.0  # TS-DoRA's std over modules against the larger of TS-LoRA's and TS-AdaLoRA's
TUNE_TOLERANCE = 1.0  # choose_setting: the sparsest setting within this of the best validation score
CHANCE_MARGIN = 0.5  # judge_tables: a dense accuracy within this of the majority-label rate learned nothing


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict (reproduced / partly / not reproduced) and the numbers that decided it."""

    label: str
    why: str



def judge_tables(dense: Sequence[float], ts: Sequence[float], sparsity: Sequence[float],
                 majority: float | None = None) -> Verdict:
    """Return the verdict on "TS matches dense while skipping many tokens" for one task and method.

    majority: the accuracy of always answering the test split's most frequent label; a dense method that
    does no better learned nothing, and a TS twin that matches it shows nothing: the cell is not tested.
    """
    if majority is not None and float(np.mean(dense)) <= majority + CHANCE_MARGIN:
        return Verdict(UNTESTED, f"dense {float(np.mean(dense)):.1f} is no better than always answering the "
                                 f"majority label ({majority:.1f}): nothing was learned to keep")
    gap = float(np.mean(ts) - np.mean(dense))
    sp = 100.0 * float(np.mean(sparsity))
    low, high = SPARSITY_RANGE
    why = f"TS - dense = {gap:+.1f} points at {sp:.0f}% sparsity"
    in_range = low <= sp <= high
    if gap >= -TABLE_GAP and in_range:
        return Verdict(REPRODUCED, why)
    if (gap >= -TABLE_GAP and sp > SPARSITY_MIN_PARTLY) or (gap >= -TABLE_GAP_PARTLY and in_range):
        return Verdict(PARTLY, why)
    return Verdict(NOT, why)


def judge_selection(scores: dict[str, Sequence[float]], dense_all: float | None = None) -> Verdict:
    """Return the verdict on "S_low beats S_high and the other selections at the same budget" (Table 4)."""
    means = {k: float(np.mean(v)) for k, v in scores.items() if len(v)}
    if "s_low" not in means or "s_high" not in means:
        return Verdict(UNTESTED, "S_low or S_high missing")
    low = means["s_low"]
    others = {k: v for k, v in means.items() if k != "s_low"}
    best_name = max(others, key=others.__getitem__)
    beats_high = low - means["s_high"] >= SELECT_MARGIN
    near_best = low >= others[best_name] - SELECT_TOLERANCE
    why = f"S_low - S_high = {low - means['s_high']:+.1f}; S_low - best other ({best_name}) = {low - others[best_name]:+.1f}"
    if dense_all is not None:
        why += f"; S_low - dense on all modules = {low - dense_all:+.1f}"
    if beats_high and near_best:
        return Verdict(REPRODUCED, why)
    if low > means["s_high"] or near_best:
        return Verdict(PARTLY, why)
    return Verdict(NOT, why)


def judge_curve(points: dict[float, Sequence[float]]) -> Verdict:
    """Return the verdict on "adding the sparsest modules hurts: the score peaks below 100%" (Figure 2)."""
    means = {f: float(np.mean(v)) for f, v in sorted(points.items()) if len(v)}
    if len(means) < 2:
        return Verdict(UNTESTED, "fewer than two fractions")
    top = max(means.values())
    peak = min(f for f, v in means.items() if v == top)
    full = max(means)
    why = f"peak {top:.1f} at {100 * peak:.0f}%; {100 * full:.0f}% of the modules: {means[full]:.1f}"
    if means[full] <= top - CURVE_DROP:
        return Verdict(REPRODUCED, why)
    if means[full] < top:
        return Verdict(PARTLY, why)
    return Verdict(NOT, why)  # training every module is (one of) the best


def judge_ablation(adam: Sequence[float], plain: Sequence[float], adam_tau: dict[str, float],
                   plain_tau: dict[str, float]) -> Verdict:
    """Return the verdict on "plain threshold updates oscillate and cost accuracy" (Appendix A.2).

    ``*_tau`` hold ``oscillation`` (total variation / largest |tau|, 1 for a monotone path; None without
    logged thresholds) and ``range`` (median over modules of the largest |tau|), from :func:`threshold_summary`.
    """
    drop = float(np.mean(adam) - np.mean(plain))
    ratios = {}
    for key in ("oscillation", "range"):
        a, p = adam_tau.get(key), plain_tau.get(key)
        if a is not None and p is not None and a > 0:
            ratios[key] = p / a
    unstable = any(r >= ABLATION_FACTOR for r in ratios.values())
    shown = ", ".join(f"{k} x{v:.1f}" for k, v in ratios.items()) or "no thresholds to compare"
    why = f"Adam - plain = {drop:+.1f} points; plain/Adam threshold {shown}"
    if drop >= ABLATION_DROP and unstable:
        return Verdict(REPRODUCED, why)
    if drop >= ABLATION_DROP or unstable:
        return Verdict(PARTLY, why)
    return Verdict(NOT, why)


def judge_polarization(stds: dict[str, float]) -> Verdict:
    """Return the verdict on "TS-DoRA's module sparsity is far more polarized than TS-LoRA's/TS-AdaLoRA's"."""
    others = {k: v for k, v in stds.items() if k in ("lora", "adalora")}
    if "dora" not in stds or not others:
        return Verdict(UNTESTED, "TS-DoRA and TS-LoRA/TS-AdaLoRA needed")
    ratio = stds["dora"] / max(max(others.values()), 1e-12)
    why = "std over q, k, v modules: " + ", ".join(f"{METHOD_NAMES[k]} {v:.1f}" for k, v in stds.items())
    why += f"; DoRA / max(others) = {ratio:.1f}"
    if ratio >= POLAR_FACTOR:
        return Verdict(REPRODUCED, why)
    if ratio > 1.0:
        return Verdict(PARTLY, why)
    return Verdict(NOT, why)


def combine(verdicts: Iterable[Verdict]) -> str:
    """Return one label for a claim judged in several cells: all reproduced, none at all, or partly (cells
    not tested do not count; with none tested, "not tested")."""
    labels = [v.label for v in verdicts if v.label != UNTESTED]
    if not labels:
        return UNTESTED
    if all(label == REPRODUCED for label in labels):
        return REPRODUCED
    if all(label == NOT for label in labels):
        return NOT
    return PARTLY


def choose_setting(points: Sequence[dict[str, Any]], tolerance: float = TUNE_TOLERANCE) -> dict[str, Any]:
    """Return the grid point (s, lam, score, sparsity) with the most sparsity among those within
    ``tolerance`` of the best validation score (ties: the smaller lam, then the smaller s)."""
    if not points:
        raise ValueError("no tuning results to choose from")
    best = max(p["score"] for p in points)
    near = [p for p in points if p["score"] >= best - tolerance]
    return max(near, key=lambda p: (p["sparsity"] or 0.0, -p["lam"], -p["s"]))


def threshold_summary(logs: Iterable[list[dict[str, Any]]],
                      finals: Iterable[dict[str, float | None]] = ()) -> dict[str, float | None]:
    """Return {oscillation, range} of the logged thresholds of some runs (means over runs of module medians).

    Runs without log lines count through ``finals`` (their final thresholds per module) for the range only;
    oscillation is None when no run logged a threshold.
    """
    osc, rng = [], []
    for final in finals:
        values = [abs(v) for v in final.values() if v is not None]
        if values:
            rng.append(float(np.median(values)))
    logs = list(logs)
    if any(rec.get("modules") for log in logs for rec in log):
        rng = []  # logged paths say more than final values
    for log in logs:
        series: dict[str, list[float]] = {}
        for rec in log:
            for name, m in (rec.get("modules") or {}).items():
                if m.get("threshold") is not None:
                    series.setdefault(name, []).append(float(m["threshold"]))
        per_osc, per_rng = [], []
        for values in series.values():
            tau = np.asarray([0.0, *values])  # every threshold starts at 0
            top = float(np.max(np.abs(tau)))
            if top > 0:
                per_osc.append(float(np.sum(np.abs(np.diff(tau)))) / top)
                per_rng.append(top)
        if per_osc:
            osc.append(float(np.median(per_osc)))
            rng.append(float(np.median(per_rng)))
    return {"oscillation": float(np.mean(osc)) if osc else None, "range": float(np.mean(rng)) if rng else None}
