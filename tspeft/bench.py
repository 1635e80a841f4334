"""Benchmark of one training step (forward + backward): dense PEFT vs token selection, time and memory.

Rows, all in one process and one run, on copies of one random-init ``LlamaForCausalLM``:
the frozen base with no adapter (the floor), peft LoRA / DoRA / AdaLoRA, tspeft's parallel adapter,
and each of them token-selective (``tspeft.enable``), the latter at threshold 0 (every token active)
and at thresholds calibrated so that about half of the tokens are active. With ``control``, each dense
row is run a second time on its own copy (an A/A row), which shows the run's resolution. Every row has
its own model, the two settings of a TS method too (no row ever steps right after its own model).

- Every adapter gets a non-zero update (B, AdaLoRA's E, the adapter's up projection drawn at random, the
  same for a dense row and its TS twin); with B = 0 every ratio is 0 and no threshold could select.
- Every row feeds the same ``inputs_embeds`` leaf that requires grad, so every row (the floor too)
  backpropagates through the whole stack; loss = cross-entropy on random labels; no optimizer step.
- Time: ``warmup`` rounds, then ``repeats`` rounds; each round runs every row once (the order reversed
  every other round), so drift on a shared machine spreads over all rows. ``ms`` is the median; the
  ratios are medians over rounds of the ratio within a round (paired). On CPU the process CPU time is
  recorded too (``cpu_ms``): it leaves out the time other processes take from the cores.
- Memory, in separate passes: model weights + the peak of tensors allocated during the step (CUDA:
  the rise of ``torch.cuda.max_memory_allocated``; CPU: a dispatch-mode tracker counting the storages
  that torch ops allocate and free), and the activations saved for backward (saved-tensor hooks).
- Sparsity: that of the TS rows' timed steps. FLOP accounting per TS row at that sparsity (see
  :func:`tspeft.measure.flop_accounting`).

``python benchmarks/step.py --help`` or ``tspeft bench --help`` lists the options; docs/performance.md
has the measured tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import tspeft

from .bench_models import (
    KINDS,
    LABELS,
    PRESETS,
    Batch,
    Preset,
    build_base,
    build_variant,
    calibrate_thresholds,
    make_batch,
    set_thresholds,
)
from .config import RECOMPUTE
from .measure import (
    MEMORY_MEANING,
    base_linear_gflop,
    flop_accounting,
    memory_step,
    paired_ratio,
    paired_ratio_ci,
    timed_step,
    zero_grads,
)

# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Row:
    """One benchmark row: a model, its thresholds (TS rows) and its results."""

    name: str
    kind: str
    ts: bool
    setting: str
    model_key: str
    taus: dict[str, float] | float | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


DENSE_NAMES = {"lora": "peft LoRA", "dora": "peft DoRA", "adalora": "peft AdaLoRA", "adapter": "parallel adapter"}


def _rows(kinds: tuple[str, ...], ts_settings: tuple[str, ...], control: bool = False, active: float = 0.5) -> list[Row]:
    """Return the rows; each has its own model (a TS setting too: no row steps right after its own model)."""
    rows = [Row("frozen base (floor)", "floor", False, "no adapter", "floor")]
    for k in kinds:
        rows.append(Row(DENSE_NAMES[k], k, False, "dense", k))
        if control:  # the dense row again, on its own copy: its ratio to the dense row is what noise alone gives
            rows.append(Row(f"{DENSE_NAMES[k]}, second copy", k, False, "control", f"{k}-copy"))
        for s in ts_settings:
            label = "tau=0" if s == "tau0" else f"~{active:.0%} active"
            rows.append(Row(f"TS-{LABELS[k]} {label}", k, True, s, f"ts-{k}-{s}"))
    return rows


def run(
    preset: str | Preset = "cpu",
    device: str = "cpu",
    *,
    kinds: tuple[str, ...] = KINDS,
    repeats: int = 5,
    warmup: int = 2,
    active: float = 0.5,
    lam: float = 1e-5,
    seed: int = 0,
    memory: bool = True,
    calibration_iters: int = 12,
    dropout: float | None = None,
    recompute_z: str = "auto",
    control: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Return the benchmark rows (dicts: name, ms, peak_mib, ratio_to_dense, ...) for one preset.

    dropout: the adapters' dropout probability instead of the preset's (None: the preset's).
    recompute_z: the TS rows' ``TSConfig.recompute_z``.
    control: add, after each dense row, a second copy of it (same weights, its own copy of them): an A/A
    row whose ratio to the dense row shows how far apart two identical models measure in this run.
    """
    p, preset_name = _preset(preset, dropout)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if torch.device(device).type == "cuda":  # cuda:N: memory statistics, syncs and kernels follow the current device
        torch.cuda.set_device(torch.device(device))
    say = log or (lambda s: None)
    tokens = p.batch * p.seq
    say(f"building models ({preset_name}, {device}, {p.dtype})")
    base = build_base(p, device, seed)
    batch = make_batch(base, p, device, seed)
    rows = _rows(kinds, ("tau0", "half"), control, active)
    models: dict[str, nn.Module] = {}
    for row in rows:
        if row.model_key not in models:
            models[row.model_key] = build_variant(base, row.kind, p, ts=row.ts, lam=lam, seed=seed,
                                                  recompute_z=recompute_z)
    for k in kinds:
        say(f"calibrating TS-{LABELS[k]} thresholds to ~{active:.0%} active tokens")
        half = calibrate_thresholds(models[f"ts-{k}-half"], batch, active, calibration_iters)
        for row in rows:
            if row.ts and row.kind == k:
                row.taus = 0.0 if row.setting == "tau0" else half

    def prepare(row: Row) -> nn.Module:
        model = models[row.model_key]
        if row.taus is not None:
            set_thresholds(model, row.taus)
        return model

    for row in rows:
        if row.ts:  # the sparsity reported is that of the timed steps (their dropout draws included)
            tspeft.reset_stats(prepare(row))
    say(f"timing {len(rows)} rows: {warmup} warm-up + {repeats} timed rounds, each row once per round")
    for row, (times, cpu_times) in zip(rows, _timed_rounds([lambda r=row: prepare(r) for row in rows], batch, device,
                                                             warmup, repeats)):
        row.times, row.cpu_times = times, cpu_times
    for row in rows:
        zero_grads(models[row.model_key], batch)
        if row.ts:
            stats = tspeft.module_stats(models[row.model_key])
            row.result["sparsity"] = tspeft.overall_sparsity(models[row.model_key])
            row.result["threshold_mean"] = statistics.fmean(float(v["threshold"]) for v in stats.values())
            row.result["flops"] = flop_accounting(models[row.model_key], tokens, stats)
    if memory:
        say("memory passes")
        for row in rows:
            row.result.update(memory_step(prepare(row), batch, device))
    base_gflop = base_linear_gflop(base, tokens)
    for row in rows:
        if row.ts:
            row.result["flops"]["base_linear_gflop"] = base_gflop
    return _assemble(rows, p, preset_name, device, repeats, warmup, lam, active, recompute_z)


def _preset(preset: str | Preset, dropout: float | None) -> tuple[Preset, str]:
    """Return (the preset, its name), with the adapters' dropout replaced unless `dropout` is None."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if dropout is not None:
        p = dataclasses.replace(p, dropout=dropout)
    return p, preset if isinstance(preset, str) else "custom"


def _timed_rounds(models: list[Callable[[], nn.Module]], batch: Batch, device: str, warmup: int,
                  repeats: int, contexts: list[Callable[[], Any]] | None = None) -> list[tuple[list[float], list[float]]]:
    """Return (ms, cpu ms) per timed round for each model: every round steps each model once, in alternating
    order (no model always follows another), after `warmup` untimed rounds. `models` give the model to step;
    `contexts`, if given, one context manager factory per model, entered around each of its steps."""
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in models]
    order = list(range(len(models)))
    for rep in range(warmup + repeats):
        for i in order if rep % 2 == 0 else order[::-1]:
            with contexts[i]() if contexts is not None else contextlib.nullcontext():
                ms, cpu_ms = timed_step(models[i](), batch, device)
            if rep >= warmup:
                out[i][0].append(ms)
                out[i][1].append(cpu_ms)
    return out


def _ts_path(device: str, dtype: str) -> str:
    """Return which implementation the TS rows' rank-space gate used: Triton kernels or PyTorch (and why)."""
    from . import kernels

    probe = torch.empty(1, 1, device=device, dtype=getattr(torch, dtype))
    if kernels.enabled(probe):
        return "triton kernels (DoRA: pytorch)"
    why = kernels.unavailable_reason() if probe.is_cuda else "CPU"
    return f"pytorch ({why})" if why else "pytorch"


def _assemble(rows: list[Row], p: Preset, preset_name: str, device: str, repeats: int, warmup: int,
              lam: float, active: float, recompute_z: str) -> list[dict[str, Any]]:
    import peft
    import transformers

    ms = {row.name: statistics.median(row.times) for row in rows}
    cpu = not device.startswith("cuda")  # process CPU time: robust to other processes sharing the cores
    dense_rows = {row.kind: row for row in rows if row.setting == "dense"}
    env = {
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": p.dtype, "preset": preset_name, "shapes": asdict(p), "tokens": p.batch * p.seq,
        "repeats": repeats, "warmup": warmup, "lam": lam, "target_active": active,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "peak_mib_meaning": MEMORY_MEANING["cuda" if device.startswith("cuda") else "cpu"],
        "ts_path": _ts_path(device, p.dtype), "recompute_z": recompute_z,
    }
    out = []
    for row in rows:
        dense = dense_rows.get(row.kind) if row.ts or row.setting == "control" else None
        rec: dict[str, Any] = {
            "name": row.name, "kind": row.kind, "ts": row.ts, "setting": row.setting,
            "ms": ms[row.name], "ms_runs": row.times,
            "ratio_to_dense": paired_ratio(row.times, dense.times) if dense is not None else None,
            "ratio_to_dense_ci95": paired_ratio_ci(row.times, dense.times) if dense is not None else None,
            "ratio_to_floor": paired_ratio(row.times, rows[0].times),
            "cpu_ms": statistics.median(row.cpu_times) if cpu else None,
            "cpu_ratio_to_dense": paired_ratio(row.cpu_times, dense.cpu_times) if cpu and dense is not None else None,
            "peak_mib": row.result.get("peak_mib"), "saved_mib": row.result.get("saved_mib"),
            "sparsity": row.result.get("sparsity", 0.0 if row.kind != "floor" else None),
            "threshold": None if row.taus is None else ("per-module, calibrated" if row.setting == "half" else 0.0),
            "threshold_mean": row.result.get("threshold_mean"),
            "flops": row.result.get("flops"),
        }
        if dense is not None and rec["peak_mib"] is not None:
            rec["mem_ratio_to_dense"] = rec["peak_mib"] / dense.result["peak_mib"]
        else:
            rec["mem_ratio_to_dense"] = None
        rec.update(env)
        out.append(rec)
    return out


def compare_recompute(
    preset: str | Preset = "cpu",
    device: str = "cpu",
    *,
    kind: str = "lora",
    policies: tuple[str, ...] = ("none", "auto", "all"),
    repeats: int = 40,
    warmup: int = 2,
    dropout: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Return one row per ``TSConfig.recompute_z`` policy of TS-`kind` (tau = 0) against its dense twin, timed
    in the same rounds (alternating order) so that the policies' time differences are paired, with memory.

    Rows: name, recompute_z, ms, ratio_to_dense (+ ci95), ratio_to_first (the first policy, + ci95),
    peak_mib, mem_ratio_to_dense, saved_mib.
    """
    p, preset_name = _preset(preset, dropout)
    base = build_base(p, device, seed)
    batch = make_batch(base, p, device, seed)
    models = {"dense": build_variant(base, kind, p, ts=False, lam=1e-5, seed=seed)}
    for policy in policies:
        models[policy] = build_variant(base, kind, p, ts=True, lam=1e-5, seed=seed, recompute_z=policy)
    names = list(models)
    rounds = _timed_rounds([lambda m=models[n]: m for n in names], batch, device, warmup, repeats)
    times = {n: t for n, (t, _) in zip(names, rounds)}
    memory = {n: memory_step(models[n], batch, device) for n in names}
    out = []
    for n in names:
        ts = n != "dense"
        first = times[policies[0]]
        out.append({
            "name": f"TS-{LABELS[kind]} tau=0, recompute_z {n}" if ts else DENSE_NAMES[kind],
            "recompute_z": n if ts else None, "ms": statistics.median(times[n]), "ms_runs": times[n],
            "ratio_to_dense": paired_ratio(times[n], times["dense"]) if ts else None,
            "ratio_to_dense_ci95": paired_ratio_ci(times[n], times["dense"]) if ts else None,
            "ratio_to_first": paired_ratio(times[n], first) if ts else None,
            "ratio_to_first_ci95": paired_ratio_ci(times[n], first) if ts else None,
            "peak_mib": memory[n]["peak_mib"], "saved_mib": memory[n]["saved_mib"],
            "mem_ratio_to_dense": memory[n]["peak_mib"] / memory["dense"]["peak_mib"] if ts else None,
            "preset": preset_name, "device": device, "repeats": repeats,
            "dropout": p.dropout, "threads": torch.get_num_threads(),
        })
    return out


@contextlib.contextmanager
def gate_bypassed() -> Iterator[None]:
    """Within the block, the rank-space gates (LoRA, AdaLoRA, parallel adapter) skip their own work.

    No base or update norm, mask, statistics, mu or g_k: every token gets the update, and what remains is
    the fused update itself (``z = A x``, the update added into the frozen output in place, x's gradient
    through W0 and A in one buffer). A gated model stepped inside the block against the same model outside
    it measures what the gate costs; the threshold gets a zero gradient. For measuring only: the outputs
    equal the gate's at threshold 0.
    """
    from . import lowrank

    saved = lowrank._rank_forward, lowrank._rank_backward, lowrank._base_norm

    def rank_forward(z2, B, c, base_norm, threshold, real, stats):
        return z2 * c, None

    def rank_backward(gB, z2, mask, real, c, lam, lam_factor, need):
        need_gz, need_zw, need_tau, _ = need
        return (gB * c if need_gz else None, z2 * c if need_zw else None,
                gB.new_zeros((), dtype=torch.float32) if need_tau else None, None)

    lowrank._rank_forward, lowrank._rank_backward = rank_forward, rank_backward
    lowrank._base_norm = lambda base2, bias, acc: None
    try:
        yield
    finally:
        lowrank._rank_forward, lowrank._rank_backward, lowrank._base_norm = saved


GATE_COST_KINDS = ("lora", "adalora", "adapter")  # rank-space gates; DoRA's gate is part of its own fused update


def compare_gate_cost(
    preset: str | Preset = "cpu",
    device: str = "cpu",
    *,
    kind: str = "lora",
    repeats: int = 40,
    warmup: int = 2,
    dropout: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Return three rows timed in the same rounds: dense `kind`, TS-`kind` at tau = 0 with its gate bypassed
    (:func:`gate_bypassed`: the fused update alone) and TS-`kind` at tau = 0, with memory.

    ``ratio_to_bypassed`` of the TS row is what the gate itself costs; ``ratio_to_dense`` of the bypassed row
    is what the fused update saves or costs against peft's. Rows: name, ms, ratio_to_dense (+ ci95),
    ratio_to_bypassed (+ ci95), peak_mib, mem_ratio_to_dense, saved_mib.
    """
    if kind not in GATE_COST_KINDS:
        raise ValueError(f"kind must be one of {GATE_COST_KINDS} (rank-space gates), got {kind!r}")
    p, preset_name = _preset(preset, dropout)
    base = build_base(p, device, seed)
    batch = make_batch(base, p, device, seed)
    models = {"dense": build_variant(base, kind, p, ts=False, lam=1e-5, seed=seed),
              "bypassed": build_variant(base, kind, p, ts=True, lam=1e-5, seed=seed),
              "gated": build_variant(base, kind, p, ts=True, lam=1e-5, seed=seed)}
    names = list(models)
    contexts = [gate_bypassed if n == "bypassed" else contextlib.nullcontext for n in names]
    rounds = _timed_rounds([lambda m=models[n]: m for n in names], batch, device, warmup, repeats, contexts)
    times = {n: t for n, (t, _) in zip(names, rounds)}
    memory = {}
    for n, ctx in zip(names, contexts):
        with ctx():
            memory[n] = memory_step(models[n], batch, device)
    labels = {"dense": DENSE_NAMES[kind], "bypassed": f"TS-{LABELS[kind]} tau=0, gate bypassed",
              "gated": f"TS-{LABELS[kind]} tau=0"}
    out = []
    for n in names:
        dense = n == "dense"
        out.append({
            "name": labels[n], "ms": statistics.median(times[n]), "ms_runs": times[n],
            "ratio_to_dense": None if dense else paired_ratio(times[n], times["dense"]),
            "ratio_to_dense_ci95": None if dense else paired_ratio_ci(times[n], times["dense"]),
            "ratio_to_bypassed": paired_ratio(times[n], times["bypassed"]) if n == "gated" else None,
            "ratio_to_bypassed_ci95": paired_ratio_ci(times[n], times["bypassed"]) if n == "gated" else None,
            "peak_mib": memory[n]["peak_mib"], "saved_mib": memory[n]["saved_mib"],
            "mem_ratio_to_dense": None if dense else memory[n]["peak_mib"] / memory["dense"]["peak_mib"],
            "preset": preset_name, "device": device, "repeats": repeats,
            "dropout": p.dropout, "threads": torch.get_num_threads(),
        })
    return out


def format_gate_cost_table(rows: list[dict[str, Any]]) -> str:
    """Return the printed table of :func:`compare_gate_cost`."""
    return _comparison_table(rows, "gate cost", "ratio_to_bypassed", "bypassed")


def format_recompute_table(rows: list[dict[str, Any]]) -> str:
    """Return the printed table of :func:`compare_recompute`."""
    return _comparison_table(rows, "recompute_z", "ratio_to_first", rows[1]["recompute_z"])


def _comparison_table(rows: list[dict[str, Any]], what: str, second: str, second_label: str) -> str:
    """Return a side comparison's table: x dense and a second paired ratio (key `second`), each with its interval."""
    r0 = rows[0]

    def ci(v: list[float] | None) -> str:
        return "-" if v is None else f"{v[0]:.3f}-{v[1]:.3f}"

    header = ["row", "ms", "x dense", "95% CI", f"x {second_label}", "95% CI", "peak MiB", "mem x dense", "saved MiB"]
    lines = [[r["name"], _fmt(r["ms"], ".1f"), _fmt(r["ratio_to_dense"], ".3f"), ci(r["ratio_to_dense_ci95"]),
              _fmt(r[second], ".3f"), ci(r[f"{second}_ci95"]), _fmt(r["peak_mib"], ".1f"),
              _fmt(r["mem_ratio_to_dense"], ".4f"), _fmt(r["saved_mib"], ".1f")] for r in rows]
    title = (f"{what}: preset {r0['preset']}, device {r0['device']}, dropout {r0['dropout']}, "
             f"{r0['threads']} threads, median of {r0['repeats']} rounds (every row once per round, alternating order)")
    return "\n".join([title, "", *_markdown(header, lines)])


# ----------------------------------------------------------------------------------------------- output


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _markdown(header: list[str], lines: list[list[str]]) -> list[str]:
    """Return a markdown table, first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return [fmt(header), rule] + [fmt(line) for line in lines]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Return the printed tables (time and memory, then FLOP accounting) for benchmark rows."""
    r0 = rows[0]
    sh = r0["shapes"]
    cpu = r0["cpu_ms"] is not None
    out = [
        f"tspeft bench: preset {r0['preset']}, device {r0['device']}, {r0['dtype']}, "
        f"hidden {sh['hidden']}, intermediate {sh['intermediate']}, {sh['layers']} layers, vocab {sh['vocab']}, "
        f"{sh['batch']}x{sh['seq']} tokens, r={sh['r']} on {','.join(sh['targets'])}, dropout {sh['dropout']}",
        f"torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}, {r0['threads']} threads; "
        f"forward+backward, median of {r0['repeats']} rounds after {r0['warmup']} warm-up, each round runs every row",
        "x dense / x floor: median over rounds of the time ratio within a round; 95% CI: bootstrap over rounds"
        + ("; cpu = process CPU time (robust to other processes on shared cores)" if cpu else ""),
        r0["peak_mib_meaning"] + "; saved = activations saved for backward (saved-tensor hooks, weights excluded)",
        f"TS rows' rank-space gate: {r0['ts_path']}; recompute_z {r0.get('recompute_z', 'auto')}",
    ]
    if any(r["setting"] == "control" for r in rows):
        out.append("second copy: the dense row again on its own copy of the same weights (A/A); its x dense and 95% CI "
                   "are what two identical models give in this run")
    out.append("")
    header = ["row", "ms", "x dense", "95% CI", "x floor"] + (["cpu ms", "cpu x dense"] if cpu else [])
    header += ["peak MiB", "mem x dense", "saved MiB", "sparsity"]
    lines = []
    for r in rows:
        ci = r.get("ratio_to_dense_ci95")
        ci_text = "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        line = [r["name"], f"{r['ms']:.1f}", _fmt(r["ratio_to_dense"], ".3f"), ci_text, f"{r['ratio_to_floor']:.3f}"]
        if cpu:
            line += [f"{r['cpu_ms']:.1f}", _fmt(r["cpu_ratio_to_dense"], ".3f")]
        line += [_fmt(r["peak_mib"], ".1f"), _fmt(r["mem_ratio_to_dense"], ".4f"), _fmt(r["saved_mib"], ".1f"),
                 _fmt(r["sparsity"], ".1%")]
        lines.append(line)
    out += _markdown(header, lines)
    flop_rows = [r for r in rows if r["flops"] is not None and r["setting"] == "half"]
    if flop_rows:
        out += [
            "",
            "Adapter GFLOP per step at the measured sparsity (forward + backward; the frozen base's linear layers: "
            f"{flop_rows[0]['flops']['base_linear_gflop']:.1f} GFLOP):",
        ]
        lines = [
            [r["name"], f"{r['sparsity']:.1%}", f"{f['adapter_gflop']:.3f}", f"{f['bound_skip_gflop']:.3f}",
             f"{f['achievable_skip_gflop']:.3f}", f"{f['impl_skip_gflop']:.3f}"]
            for r in flop_rows
            for f in [r["flops"]]
        ]
        out += _markdown(["row", "sparsity", "adapter, dense", "paper bound skip", "achievable skip", "skipped here"], lines)
        out += [
            "adapter, dense: every token, plus DoRA's per-step column norm. paper bound: every per-token adapter FLOP",
            "of the inactive tokens (LoRA: 6 N_inactive r (d_in + d_out); DoRA under dropout adds 4 N_inactive d_in d_out",
            "for W0 dropout(x) and its gradient). achievable: the bound less what a learnt gate still needs for every",
            "token: z = A x (its norm) and B^T g (mu enters g_k); DoRA also B z and, under dropout, W0 dropout(x) (the",
            "norm of delta). skipped here = 0: masked rows are zeros inside dense matmuls, not skipped.",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from command-line arguments; print the tables; return the exit code."""
    ap = argparse.ArgumentParser(prog="tspeft bench", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    ap.add_argument("--active", type=float, default=0.5, help="fraction of active tokens for the calibrated rows")
    ap.add_argument("--calibration-iters", type=int, default=12, help="bisection passes for the thresholds")
    ap.add_argument("--dropout", type=float, default=None, help="adapter dropout instead of the preset's")
    ap.add_argument("--recompute-z", choices=RECOMPUTE, default="auto", help="the TS rows' TSConfig.recompute_z")
    ap.add_argument("--control", action="store_true",
                    help="add a second copy of each dense row (A/A): its x dense is the spread of identical models")
    ap.add_argument("--lam", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory passes")
    ap.add_argument("--json", default=None, help="write the rows as a JSON list to this file")
    ap.add_argument("--table", default=None, help="also write the printed tables to this file")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"unknown kinds {bad}; choose from {','.join(KINDS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")

    def log(s: str) -> None:
        if not a.quiet:
            print(f"[bench] {s}", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        rows = run(a.preset, a.device, kinds=kinds, repeats=a.repeats, warmup=a.warmup, active=a.active, lam=a.lam,
                   seed=a.seed, memory=not a.no_memory, calibration_iters=a.calibration_iters,
                   dropout=a.dropout, recompute_z=a.recompute_z, control=a.control, log=log)
    finally:
        torch.set_num_threads(threads)
    table = format_table(rows)
    print(table)
    if a.table:
        with open(a.table, "w") as f:
            f.write(table + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _comparison_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Return the parser of a side comparison (recompute, gate cost) with the options they share."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=None, help="adapter dropout instead of the preset's")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--json", default=None, help="write the rows as a JSON list to this file")
    return ap


def _run_comparison(ap: argparse.ArgumentParser, a: argparse.Namespace, compute: Callable[[], list[dict[str, Any]]],
                    fmt: Callable[[list[dict[str, Any]]], str]) -> int:
    """Run a side comparison with --threads applied, print its table, write --json; return the exit code."""
    if a.repeats < 1 or a.warmup < 0:
        ap.error(f"--repeats must be >= 1 and --warmup >= 0, got {a.repeats} and {a.warmup}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        rows = compute()
    finally:
        torch.set_num_threads(threads)
    print(fmt(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def recompute_main(argv: list[str] | None = None) -> int:
    """Compare the ``TSConfig.recompute_z`` policies of one TS row in one run; print the table."""
    ap = _comparison_parser("python benchmarks/recompute.py", compare_recompute.__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("lora", "adalora"), default="lora")
    ap.add_argument("--policies", default="none,auto,all", help="comma-separated; ratios are also given to the first")
    a = ap.parse_args(argv)
    policies = tuple(x for x in a.policies.split(",") if x)
    bad = [x for x in policies if x not in RECOMPUTE]
    if bad or not policies:
        ap.error(f"unknown policies {bad}; choose from {','.join(RECOMPUTE)}")
    return _run_comparison(ap, a, lambda: compare_recompute(a.preset, a.device, kind=a.kind, policies=policies,
                                                             repeats=a.repeats, warmup=a.warmup, dropout=a.dropout),
                           format_recompute_table)


def gate_cost_main(argv: list[str] | None = None) -> int:
    """Time TS-`kind` with its gate and with the gate bypassed against dense `kind`, in one run; print the table."""
    ap = _comparison_parser("python benchmarks/gate_cost.py", compare_gate_cost.__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=GATE_COST_KINDS, default="lora")
    a = ap.parse_args(argv)
    return _run_comparison(ap, a, lambda: compare_gate_cost(a.preset, a.device, kind=a.kind, repeats=a.repeats,
                                                             warmup=a.warmup, dropout=a.dropout),
                           format_gate_cost_table)


if __name__ == "__main__":
    raise SystemExit(main())
