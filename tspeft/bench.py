"""Benchmark of one training step (forward + backward): dense PEFT vs token selection, time and memory.

Rows, all in one process and one run, on copies of one random-init ``LlamaForCausalLM``:
the frozen base with no adapter (the floor), peft LoRA / DoRA / AdaLoRA, tspeft's parallel adapter,
and each of them token-selective (``tspeft.enable``), the latter at threshold 0 (every token active)
and at thresholds calibrated so that about half of the tokens are active.

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
- FLOP accounting per TS row at the measured sparsity (see :func:`flop_accounting`).

``python benchmarks/step.py --help`` or ``tspeft bench --help`` lists the options; docs/performance.md
has the measured tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tspeft

from .adapter import ParallelAdapter
from .layers import layer_rank

MiB = 2**20


@dataclass(frozen=True)
class Preset:
    """Shapes of the Llama-style model, batch and adapters of one benchmark setting."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    r: int
    dropout: float
    dtype: str
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 172, 2, 4, 2, 256, 2, 32, 4, 0.0, "float32"),
    "cpu": Preset(512, 1376, 4, 8, 2, 4096, 4, 256, 16, 0.0, "float32"),
    "llama8b-4layers": Preset(4096, 14336, 4, 32, 8, 128256, 8, 1024, 32, 0.05, "bfloat16"),
}

KINDS = ("lora", "dora", "adalora", "adapter")
LABELS = {"floor": "frozen base", "lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "adapter": "Adapter"}
MEMORY_MEANING = {
    "cuda": "peak_mib = model weights + rise of torch.cuda.max_memory_allocated during forward+backward",
    "cpu": "peak_mib = model weights + peak of live tensor storages allocated by torch ops during "
    "forward+backward (dispatch-mode tracker; allocator caching and library scratch not included)",
}


# ----------------------------------------------------------------------------------------------- models


def build_base(p: Preset, device: str, seed: int = 0) -> nn.Module:
    """Return a random-init LlamaForCausalLM of preset `p` on `device`, all parameters frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, max_position_embeddings=max(p.seq, 128),
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, p.dtype))
    model.requires_grad_(False)
    return model


def randomize_updates(model: nn.Module, std: float = 0.02) -> None:
    """Give every adapter a non-zero update in place: B (LoRA/DoRA), E (AdaLoRA), up (parallel adapter)."""
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.lora.layer import LoraLayer

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, ParallelAdapter):
                mod.adapter_up.weight.normal_(0.0, std)
            elif isinstance(mod, SVDLinear):
                for e in mod.lora_E.values():
                    e.normal_(0.0, 1.0)  # singular values; A and B are already N(0, 0.02) in peft
            elif isinstance(mod, LoraLayer):
                for lin in mod.lora_B.values():
                    lin.weight.normal_(0.0, std)


def build_variant(base: nn.Module, kind: str, p: Preset, *, ts: bool, lam: float, seed: int = 0) -> nn.Module:
    """Return a copy of `base` with adapter `kind` (floor/lora/dora/adalora/adapter), gated if `ts`."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    torch.manual_seed(seed + 1)  # a dense row and its TS twin get the same adapter weights
    targets = list(p.targets)
    if kind in ("lora", "dora"):
        cfg = LoraConfig(r=p.r, lora_alpha=2 * p.r, lora_dropout=p.dropout, target_modules=targets,
                         use_dora=kind == "dora")
        model = get_peft_model(model, cfg)
    elif kind == "adalora":
        cfg = AdaLoraConfig(init_r=p.r, target_r=max(p.r // 2, 1), total_step=1000, lora_alpha=2 * p.r,
                            lora_dropout=p.dropout, target_modules=targets)
        model = get_peft_model(model, cfg)
    elif kind == "adapter":
        model = tspeft.add_parallel_adapter(model, targets, hidden=p.r, dropout=p.dropout)
    elif kind != "floor":
        raise ValueError(f"unknown kind {kind!r}; choose floor or one of {KINDS}")
    randomize_updates(model)
    if ts:
        tspeft.enable(model, tspeft.TSConfig(lam=lam, s=1e-3))
    return model.train()


@dataclass
class Batch:
    """One batch shared by every row: an inputs_embeds leaf that requires grad, mask and labels."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def make_batch(base: nn.Module, p: Preset, device: str, seed: int = 0) -> Batch:
    """Return a random batch of p.batch x p.seq tokens embedded by `base`."""
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, p.vocab, (p.batch, p.seq), generator=g).to(device)
    labels = torch.randint(0, p.vocab, (p.batch, p.seq), generator=g).to(device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids).detach()
    return Batch(embeds.requires_grad_(True), torch.ones_like(ids), labels)


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Return the training loss of one forward pass (CE on the batch's labels)."""
    out = model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


# ----------------------------------------------------------------------------------------------- thresholds


def set_thresholds(model: nn.Module, taus: dict[str, float] | float) -> None:
    """Set every gated module's threshold, to one value or per module name."""
    with torch.no_grad():
        for name, t in tspeft.threshold_parameters(model).items():
            t.fill_(taus if isinstance(taus, float) else taus[name])


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batch: Batch, active: float = 0.5, iters: int = 14) -> dict[str, float]:
    """Return per-module thresholds, found by bisection, at which about `active` of the tokens are active.

    All modules are bisected together (a module's inputs depend on earlier modules' gates, so a few
    passes settle them jointly); each pass is one no-grad forward in training mode with a fixed seed.
    """
    names = list(tspeft.threshold_parameters(model))
    set_thresholds(model, 0.0)
    tspeft.reset_stats(model)
    torch.manual_seed(0)
    loss_of(model, batch)
    stats = tspeft.module_stats(model)
    cur = {n: max(float(stats[n]["ratio_mean"] or 0.0), 1e-6) for n in names}
    lo = dict.fromkeys(names, 0.0)
    hi: dict[str, float | None] = dict.fromkeys(names)
    for _ in range(iters):
        set_thresholds(model, cur)
        tspeft.reset_stats(model)
        torch.manual_seed(0)
        loss_of(model, batch)
        sp = tspeft.sparsity(model)
        for n in names:
            if sp[n] > 1.0 - active:
                hi[n] = cur[n]
            else:
                lo[n] = cur[n]
            h = hi[n]
            cur[n] = 2.0 * cur[n] if h is None else 0.5 * (lo[n] + h)
    set_thresholds(model, cur)
    return cur


# ----------------------------------------------------------------------------------------------- measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _zero_grads(model: nn.Module, batch: Batch) -> None:
    model.zero_grad(set_to_none=True)
    batch.embeds.grad = None


def timed_step(model: nn.Module, batch: Batch, device: str) -> tuple[float, float]:
    """Return (wall ms, process CPU ms) of one forward + backward (grads zeroed before, outside the timing)."""
    _zero_grads(model, batch)
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    loss_of(model, batch).backward()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


class LiveStorageBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by torch ops while active, and their peak.

    An op output whose storage is not one of the op's inputs' is a new allocation; it is subtracted
    when the storage is freed (a weakref finalizer: torch keeps a storage's Python object alive with it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._keys.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            key, nbytes = st._cdata, st.nbytes()
            if nbytes == 0 or key in inputs or key in self._keys:
                continue
            self._keys.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return out


def model_bytes(model: nn.Module) -> int:
    """Return the bytes of the model's parameters and buffers (unique storages)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def memory_step(model: nn.Module, batch: Batch, device: str) -> dict[str, float]:
    """Return peak_mib (weights + step peak) and saved_mib (activations saved for backward) of one step."""
    weights = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    weights.add(batch.embeds.untyped_storage()._cdata)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in weights:
            saved[st._cdata] = st.nbytes()
        return t

    _zero_grads(model, batch)
    gc.collect()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if device.startswith("cuda"):
            _sync(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = loss_of(model, batch)
            saved_bytes = sum(saved.values())
            loss.backward()
            _sync(device)
            step_peak = torch.cuda.max_memory_allocated() - before
        else:
            tracker = LiveStorageBytes()
            with tracker:
                loss = loss_of(model, batch)
                saved_bytes = sum(saved.values())
                loss.backward()
                del loss
            step_peak = tracker.peak
    _zero_grads(model, batch)
    return {"peak_mib": (model_bytes(model) + step_peak) / MiB, "saved_mib": saved_bytes / MiB}


# ----------------------------------------------------------------------------------------------- FLOPs


def _module_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Return {gated module: (d_in, d_out, r)}."""
    out = {}
    for name, mod in tspeft.gated_modules(model).items():
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod.base_layer
        out[name] = (base.in_features, base.out_features, layer_rank(mod))
    return out


def flop_accounting(model: nn.Module, tokens: int, stats: dict[str, dict[str, Any]]) -> dict[str, float]:
    r"""Return adapter GFLOP per step at the measured sparsity (a gated model, `stats` of one step).

    A low-rank update on N tokens costs 2 N r (d_in + d_out) forward (z = A x, then B z) and twice that
    backward (dB, dz, dA, dx through A): 6 N r (d_in + d_out) per module. With N_in inactive tokens:

    - ``adapter_gflop``: the dense cost, every token.
    - ``bound_skip_gflop``: the paper's theoretical bound, 6 N_in r (d_in + d_out): every FLOP of an
      inactive token skipped.
    - ``achievable_skip_gflop``: 4 N_in r (d_in + d_out). A learnt gate cannot skip z = A x for any token
      (its norm decides the mask) nor B^T g (mu_i of an inactive token enters g_k, Eq. 15): that is
      ``gate_needs_gflop`` = 2 N_in r (d_in + d_out); B (mask z), dB, dA and dx through A could be skipped.
    - ``impl_skip_gflop``: what this implementation skips: 0. It keeps dense shapes (no gather, no host
      sync): the masked rows of mask * z (forward) and of dz and dB's operand (backward) are zeros inside
      dense matmuls. What it saves instead is memory traffic and memory: no d_out-sized delta is formed
      or saved for backward, the update is one in-place addmm, and x's two input gradients share a buffer.
    """
    dense = bound = 0.0
    for name, (d_in, d_out, r) in _module_shapes(model).items():
        row = stats[name]
        inactive = tokens * (1.0 - int(row["active"]) / max(int(row["tokens"]), 1))
        dense += 6.0 * tokens * r * (d_in + d_out)
        bound += 6.0 * inactive * r * (d_in + d_out)
    return {
        "adapter_gflop": dense / 1e9,
        "bound_skip_gflop": bound / 1e9,
        "gate_needs_gflop": bound / 3.0 / 1e9,
        "achievable_skip_gflop": 2.0 * bound / 3.0 / 1e9,
        "impl_skip_gflop": 0.0,
    }


def base_linear_gflop(base: nn.Module, tokens: int) -> float:
    """Return the frozen base's linear-layer GFLOPs for one step: forward + input gradient, 4 N d_in d_out."""
    return sum(4.0 * tokens * m.in_features * m.out_features for m in base.modules() if isinstance(m, nn.Linear)) / 1e9


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


def _rows(kinds: tuple[str, ...], ts_settings: tuple[str, ...]) -> list[Row]:
    rows = [Row("frozen base (floor)", "floor", False, "no adapter", "floor")]
    dense_names = {"lora": "peft LoRA", "dora": "peft DoRA", "adalora": "peft AdaLoRA", "adapter": "parallel adapter"}
    for k in kinds:
        rows.append(Row(dense_names[k], k, False, "dense", k))
        for s in ts_settings:
            label = "tau=0" if s == "tau0" else "~50% active"
            rows.append(Row(f"TS-{LABELS[k]} {label}", k, True, s, f"ts-{k}"))
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
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Return the benchmark rows (dicts: name, ms, peak_mib, ratio_to_dense, ...) for one preset.

    dropout: the adapters' dropout probability instead of the preset's (None: the preset's).
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if dropout is not None:
        p = dataclasses.replace(p, dropout=dropout)
    preset_name = preset if isinstance(preset, str) else "custom"
    say = log or (lambda s: None)
    tokens = p.batch * p.seq
    say(f"building models ({preset_name}, {device}, {p.dtype})")
    base = build_base(p, device, seed)
    batch = make_batch(base, p, device, seed)
    rows = _rows(kinds, ("tau0", "half"))
    models: dict[str, nn.Module] = {}
    for row in rows:
        if row.model_key not in models:
            models[row.model_key] = build_variant(base, row.kind, p, ts=row.ts, lam=lam, seed=seed)
    for k in kinds:
        say(f"calibrating TS-{LABELS[k]} thresholds to ~{active:.0%} active tokens")
        half = calibrate_thresholds(models[f"ts-{k}"], batch, active, calibration_iters)
        for row in rows:
            if row.model_key == f"ts-{k}":
                row.taus = 0.0 if row.setting == "tau0" else half

    def prepare(row: Row) -> nn.Module:
        model = models[row.model_key]
        if row.taus is not None:
            set_thresholds(model, row.taus)
        return model

    say(f"timing {len(rows)} rows: {warmup} warm-up + {repeats} timed rounds, each row once per round")
    for rep in range(warmup + repeats):
        order = rows if rep % 2 == 0 else rows[::-1]  # alternate the order: no row always follows another
        for row in order:
            ms, cpu_ms = timed_step(prepare(row), batch, device)
            if rep >= warmup:
                row.times.append(ms)
                row.cpu_times.append(cpu_ms)
    for row in rows:
        _zero_grads(models[row.model_key], batch)
    if memory:
        say("memory passes")
        for row in rows:
            row.result.update(memory_step(prepare(row), batch, device))
    say("sparsity and FLOP passes")
    base_gflop = base_linear_gflop(base, tokens)
    for row in rows:
        model = prepare(row)
        if not row.ts:
            continue
        tspeft.reset_stats(model)
        torch.manual_seed(seed)
        with torch.no_grad():
            loss_of(model, batch)
        stats = tspeft.module_stats(model)
        row.result["sparsity"] = tspeft.overall_sparsity(model)
        row.result["threshold_mean"] = statistics.fmean(float(v["threshold"]) for v in stats.values())
        row.result["flops"] = flop_accounting(model, tokens, stats)
        row.result["flops"]["base_linear_gflop"] = base_gflop
    return _assemble(rows, p, preset_name, device, repeats, warmup, lam, active)


def _ts_path(device: str, dtype: str) -> str:
    """Return which implementation the TS rows' rank-space gate used: Triton kernels or PyTorch (and why)."""
    from . import kernels

    probe = torch.empty(1, 1, device=device, dtype=getattr(torch, dtype))
    if kernels.enabled(probe):
        return "triton kernels"
    why = kernels.unavailable_reason() if probe.is_cuda else "CPU"
    return f"pytorch ({why})" if why else "pytorch"


def _paired_ratio(times: list[float], ref: list[float]) -> float:
    """Return the median over rounds of time / reference time measured in the same round."""
    return statistics.median(t / r for t, r in zip(times, ref))


def _paired_ratio_ci(times: list[float], ref: list[float], level: float = 0.95, draws: int = 2000) -> list[float]:
    """Return a bootstrap interval [lo, hi] of :func:`_paired_ratio` (rounds resampled; fixed seed)."""
    import random

    ratios = [t / r for t, r in zip(times, ref)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = (1.0 - level) / 2
    return [medians[int(tail * (draws - 1))], medians[int((1.0 - tail) * (draws - 1))]]


def _assemble(rows: list[Row], p: Preset, preset_name: str, device: str, repeats: int, warmup: int,
              lam: float, active: float) -> list[dict[str, Any]]:
    import peft
    import transformers

    ms = {row.name: statistics.median(row.times) for row in rows}
    cpu = not device.startswith("cuda")  # process CPU time: robust to other processes sharing the cores
    by_key = {(row.kind, row.ts): row for row in rows if not (row.ts and row.setting == "half")}
    env = {
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": p.dtype, "preset": preset_name, "shapes": asdict(p), "tokens": p.batch * p.seq,
        "repeats": repeats, "warmup": warmup, "lam": lam, "target_active": active,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "peak_mib_meaning": MEMORY_MEANING["cuda" if device.startswith("cuda") else "cpu"],
        "ts_path": _ts_path(device, p.dtype),
    }
    out = []
    for row in rows:
        dense = by_key.get((row.kind, False)) if row.ts else None
        rec: dict[str, Any] = {
            "name": row.name, "kind": row.kind, "ts": row.ts, "setting": row.setting,
            "ms": ms[row.name], "ms_runs": row.times,
            "ratio_to_dense": _paired_ratio(row.times, dense.times) if dense is not None else None,
            "ratio_to_dense_ci95": _paired_ratio_ci(row.times, dense.times) if dense is not None else None,
            "ratio_to_floor": _paired_ratio(row.times, rows[0].times),
            "cpu_ms": statistics.median(row.cpu_times) if cpu else None,
            "cpu_ratio_to_dense": _paired_ratio(row.cpu_times, dense.cpu_times) if cpu and dense is not None else None,
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
        f"TS rows' rank-space gate: {r0['ts_path']}",
        "",
    ]
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
            "paper bound = 6 N_inactive r (d_in + d_out): every adapter FLOP of the inactive tokens.",
            "achievable = 4 N_inactive r (d_in + d_out): a learnt gate still needs z = A x (its norm) and B^T g (mu enters",
            "g_k) for every token. skipped here = 0: masked rows are zeros inside dense matmuls, not skipped.",
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
                   dropout=a.dropout, log=log)
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


if __name__ == "__main__":
    raise SystemExit(main())
