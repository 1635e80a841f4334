"""What one training step costs: its time, its peak memory (also on CPU, where torch keeps no allocator
statistics), the activations it saves, and the adapter FLOPs a token-sparse implementation could skip."""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tspeft

from .bench_models import Batch, loss_of
from .layers import layer_rank

MiB = 2**20

MEMORY_MEANING = {
    "cuda": "peak_mib = model weights + rise of torch.cuda.max_memory_allocated during forward+backward",
    "cpu": "peak_mib = model weights + peak of live tensor storages allocated by torch ops during "
    "forward+backward (dispatch-mode tracker; allocator caching and library scratch not included)",
}


# ----------------------------------------------------------------------------------------------- measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def zero_grads(model: nn.Module, batch: Batch) -> None:
    model.zero_grad(set_to_none=True)
    batch.embeds.grad = None


def timed_step(model: nn.Module, batch: Batch, device: str) -> tuple[float, float]:
    """Return (wall ms, process CPU ms) of one forward + backward (grads zeroed before, outside the timing)."""
    zero_grads(model, batch)
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


class SavedActivations:
    """Saved-tensor hooks that count the activations autograd keeps for backward (weights left out).

    Use as a context manager around a forward; ``nbytes()`` is the size of the distinct storages saved by
    graph nodes that are still alive when it is called. A node whose graph was dropped during the forward
    (an intermediate that was detached) frees what it saved, and that is not counted: counted by storage
    address alone, a freed storage whose address is reused would make the count depend on the allocator.
    """

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._saved: list[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # The node keeps what this returns until it is freed. An alias, not t: a node that saves its own
        # output would otherwise hold that output, and the output holds the node (a cycle that outlives
        # a dropped graph, as it does not without these hooks).
        alias = t.detach()
        self._saved.append(weakref.ref(alias))
        return alias

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def nbytes(self) -> int:
        alive: dict[int, int] = {}
        for ref in self._saved:
            t = ref()
            if t is not None:
                st = t.untyped_storage()
                if st._cdata not in self._exclude:
                    alive[st._cdata] = st.nbytes()
        return sum(alive.values())


def memory_step(model: nn.Module, batch: Batch, device: str) -> dict[str, float]:
    """Return peak_mib (weights + step peak) and saved_mib (activations saved for backward) of one step."""
    zero_grads(model, batch)
    gc.collect()
    saved = SavedActivations(list(model.parameters()) + list(model.buffers()) + [batch.embeds])
    with saved:
        if device.startswith("cuda"):
            _sync(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = loss_of(model, batch)
            saved_bytes = saved.nbytes()
            loss.backward()
            _sync(device)
            step_peak = torch.cuda.max_memory_allocated() - before
        else:
            tracker = LiveStorageBytes()
            with tracker:
                loss = loss_of(model, batch)
                saved_bytes = saved.nbytes()
                loss.backward()
                del loss
            step_peak = tracker.peak
    zero_grads(model, batch)
    return {"peak_mib": (model_bytes(model) + step_peak) / MiB, "saved_mib": saved_bytes / MiB}


# ----------------------------------------------------------------------------------------------- FLOPs


def _module_costs(model: nn.Module) -> dict[str, dict[str, float]]:
    """Return, per gated module, its adapter FLOPs: per token (all of it, and what the gate needs) and per step."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    out = {}
    for name, mod in tspeft.gated_modules(model).items():
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod.base_layer
        d_in, d_out, r = base.in_features, base.out_features, layer_rank(mod)
        per_token, needs, per_step = 6.0 * r * (d_in + d_out), 2.0 * r * (d_in + d_out), 0.0
        if isinstance(mod, LoraLinear) and mod.use_dora.get(mod.active_adapters[0], False):
            drop = mod.lora_dropout[mod.active_adapters[0]]
            dropout = isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training
            needs = 2.0 * r * d_in + 4.0 * r * d_out  # z, the norm's B z term, B^T g for mu
            per_step = 2.0 * r * d_in * d_out + 2.0 * r * r * (d_in + d_out)  # column norm: A W0^T, A A^T, B (A A^T)
            if dropout:  # b' = W0 dropout(x) forward, and x's gradient through it: a dense product per token
                per_token += 4.0 * d_in * d_out
                needs += 2.0 * d_in * d_out  # the norm of delta needs b' of every token
        out[name] = {"per_token": per_token, "needs": needs, "per_step": per_step}
    return out


def flop_accounting(model: nn.Module, tokens: int, stats: dict[str, dict[str, Any]]) -> dict[str, float]:
    r"""Return adapter GFLOP per step at the measured sparsity (a gated model, `stats` of its steps).

    A low-rank update on N tokens costs 2 N r (d_in + d_out) forward (z = A x, then B z) and twice that
    backward (dB, dz, dA, dx through A): 6 N r (d_in + d_out) per module. DoRA adds, per step, its column
    norm (``per_step_gflop``: 2 r d_in d_out for A W0^T and the r x r products), and under dropout, per token,
    b' = W0 dropout(x) and x's gradient through it: 4 N d_in d_out. With N_in inactive tokens:

    - ``adapter_gflop``: the dense cost, every token, plus the per-step cost.
    - ``bound_skip_gflop``: the paper's theoretical bound: every per-token FLOP of an inactive token skipped
      (LoRA: 6 N_in r (d_in + d_out)).
    - ``gate_needs_gflop``: what a learnt gate must still compute for the inactive tokens. LoRA: z = A x (its
      norm decides the mask) and B^T g (mu_i of an inactive token enters g_k, Eq. 15), 2 N_in r (d_in +
      d_out); DoRA also B z (the norm of delta) and, under dropout, b' (2 N_in d_in d_out).
    - ``achievable_skip_gflop``: bound - gate needs (LoRA: B (mask z), dB, dA and dx through A).
    - ``impl_skip_gflop``: what this implementation skips: 0. It keeps dense shapes (no gather, no host
      sync): the masked rows of mask * z (forward) and of dz and dB's operand (backward) are zeros inside
      dense matmuls. What it saves instead is memory traffic and memory: no d_out-sized delta is formed
      or saved for backward, the update is one in-place addmm, and x's two input gradients share a buffer.
    """
    dense = bound = needs = per_step = 0.0
    for name, cost in _module_costs(model).items():
        row = stats[name]
        inactive = tokens * (1.0 - int(row["active"]) / max(int(row["tokens"]), 1))
        dense += tokens * cost["per_token"] + cost["per_step"]
        bound += inactive * cost["per_token"]
        needs += inactive * cost["needs"]
        per_step += cost["per_step"]
    return {
        "adapter_gflop": dense / 1e9,
        "bound_skip_gflop": bound / 1e9,
        "gate_needs_gflop": needs / 1e9,
        "achievable_skip_gflop": (bound - needs) / 1e9,
        "per_step_gflop": per_step / 1e9,
        "impl_skip_gflop": 0.0,
    }


def base_linear_gflop(base: nn.Module, tokens: int) -> float:
    """Return the frozen base's linear-layer GFLOPs for one step: forward + input gradient, 4 N d_in d_out."""
    return sum(4.0 * tokens * m.in_features * m.out_features for m in base.modules() if isinstance(m, nn.Linear)) / 1e9


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Return the median over rounds of time / reference time measured in the same round."""
    return statistics.median(t / r for t, r in zip(times, ref))


def paired_ratio_ci(times: list[float], ref: list[float], level: float = 0.95, draws: int = 2000) -> list[float]:
    """Return a bootstrap interval [lo, hi] of :func:`paired_ratio` (rounds resampled; fixed seed)."""
    import random

    ratios = [t / r for t, r in zip(times, ref)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = (1.0 - level) / 2
    return [medians[int(tail * (draws - 1))], medians[int((1.0 - tail) * (draws - 1))]]
