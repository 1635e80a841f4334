"""Reading the run directories that training writes (``run.json``, ``log.jsonl``, ``ratios.npz``)."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PEFT_PREFIX = "base_model.model."
REQUIRED_KEYS = ("task", "model", "method", "selective", "seed", "metric", "score", "modules")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "adapter": "Adapter"}
LAYER_CONTAINERS = ("layer", "layers", "h", "blocks")
# Generic leaf names that say nothing on their own: the parent path tells which module it is.
GENERIC_LEAVES = ("dense", "linear", "proj", "c_proj")
TYPE_ORDER = (
    "q", "k", "v", "o", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj",
    "query_proj", "key_proj", "value_proj", "c_attn", "attn.out", "attn.c_proj", "out_proj", "dense",
    "gate_proj", "up_proj", "down_proj", "inter", "out", "fc1", "fc2", "c_fc", "mlp.c_proj",
)  # fmt: skip
ABBREVIATIONS = {
    "attention": "attn",
    "self_attn": "attn",
    "output": "out",
    "intermediate": "inter",
    "self": "",
}


@dataclass
class ModuleStats:
    """Per-module statistics of one run (``run.json`` → ``modules``)."""

    sparsity: float | None  # fraction 0..1 of tokens whose update is gated off; None: rank 0 or dense run
    threshold: float | None
    ratio_mean: float | None  # mean ||delta|| / ||base||
    delta_norm_mean: float | None  # mean ||delta||
    rank: int | None
    params: int
    fixed_params: int | None = None  # of params, those that do not scale with the rank (DoRA); None: not recorded


@dataclass
class Run:
    """One training run: its ``run.json`` (``meta``), per-module stats, log records and sampled ratios."""

    path: Path | None
    meta: dict[str, Any]
    modules: dict[str, ModuleStats]
    log: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, np.ndarray] | None = None

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def selective(self) -> bool:
        return bool(self.meta["selective"])

    @property
    def score(self) -> float:
        return float(self.meta["score"])

    @property
    def sparsity(self) -> float | None:
        value = self.meta.get("sparsity")
        return None if value is None else float(value)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config") or {})

    @property
    def label(self) -> str:
        """Returns the paper's name of the method, e.g. ``"TS-LoRA"`` or ``"LoRA"``."""
        return method_label(self.method, self.selective)

    @property
    def name(self) -> str:
        """Returns a short readable identity: task, model, method and seed."""
        return f"{self.task} / {self.meta['model']} / {self.label} / seed {self.meta['seed']}"

    def record(self) -> dict[str, Any]:
        """Returns the result record used by the comparison tables (task, model, method, ..., sparsity)."""
        keys = ("task", "model", "method", "selective", "seed", "metric", "score", "sparsity")
        return {k: self.meta.get(k) for k in keys}


def method_label(method: str, selective: bool) -> str:
    """Returns ``"TS-<Method>"`` for a token-selective run and ``"<Method>"`` for a dense one."""
    name = METHOD_NAMES.get(method.lower(), method)
    return f"TS-{name}" if selective else name


def strip_prefix(name: str) -> str:
    """Returns the module name relative to the base model (without peft's ``base_model.model.``)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def parse_module_name(name: str) -> tuple[int | None, str]:
    """Returns ``(layer_index, module_type)``, e.g. ``(3, "query")`` or ``(2, "q_proj")``; layer is None outside a stack."""
    parts = strip_prefix(name).split(".")
    layer: int | None = None
    tail = parts
    for i in range(len(parts) - 1):
        if parts[i] in LAYER_CONTAINERS and parts[i + 1].isdigit():
            layer, tail = int(parts[i + 1]), parts[i + 2 :]
            break
    if not tail:
        return layer, parts[-1]
    leaf = tail[-1]
    if leaf not in GENERIC_LEAVES:
        return layer, leaf
    short = [ABBREVIATIONS.get(p, p) for p in tail[:-1]]
    if leaf != "dense":
        short.append(leaf)
    short = [p for p in short if p]
    return layer, ".".join(short) if short else leaf


def type_sort_key(module_type: str) -> tuple[int, str]:
    """Returns the sort key that puts module types in natural order (q, k, v, o, ... then alphabetical)."""
    order = TYPE_ORDER.index(module_type) if module_type in TYPE_ORDER else len(TYPE_ORDER)
    return order, module_type


def resolve_module(run: Run, name: str) -> str:
    """Returns the full module name in ``run`` for a full, prefix-stripped or unique-suffix ``name``."""
    if name in run.modules:
        return name
    if PEFT_PREFIX + name in run.modules:
        return PEFT_PREFIX + name
    matches = [m for m in run.modules if m.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    some = ", ".join(sorted(run.modules)[:4])
    if matches:
        raise KeyError(
            f"module {name!r} is ambiguous in {_where(run)}: matches {matches[:4]}; give more of the name"
        )
    raise KeyError(f"no module {name!r} in {_where(run)}; it has {len(run.modules)} modules, e.g. {some}")


def load_run(path: str | Path) -> Run:
    """Returns the ``Run`` read from a run directory (``run.json`` required; ``log.jsonl``, ``ratios.npz`` optional)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist; pass a directory written by training")
    meta = _read_json(root / "run.json")
    run = run_from_meta(meta, path=root)
    run.log = _read_log(root / "log.jsonl")
    run.ratios = _read_ratios(root / "ratios.npz")
    return run


def run_from_meta(
    meta: dict[str, Any],
    path: Path | None = None,
    log: list[dict[str, Any]] | None = None,
    ratios: dict[str, np.ndarray] | None = None,
) -> Run:
    """Returns a ``Run`` built from an in-memory ``run.json`` dict, validated like ``load_run`` does."""
    where = path / "run.json" if path is not None else "run metadata"
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(
            f"{where} lacks the keys {missing}; training writes them all (see the run directory format)"
        )
    if not isinstance(meta["modules"], dict):
        raise ValueError(
            f"{where}: 'modules' must map module names to statistics, got {type(meta['modules']).__name__}"
        )
    modules = {name: _module_stats(name, stats, where) for name, stats in meta["modules"].items()}
    return Run(path=path, meta=dict(meta), modules=modules, log=list(log or []), ratios=ratios)


def _module_stats(name: str, stats: Any, where: object) -> ModuleStats:
    if not isinstance(stats, dict):
        raise ValueError(f"{where}: statistics of module {name!r} must be an object, got {stats!r}")

    def num(key: str) -> float | None:
        value = stats.get(key)
        return None if value is None else float(value)

    rank = stats.get("rank")
    return ModuleStats(
        sparsity=num("sparsity"),
        threshold=num("threshold"),
        ratio_mean=num("ratio_mean"),
        delta_norm_mean=num("delta_norm_mean"),
        rank=None if rank is None else int(rank),
        params=int(stats.get("params") or 0),
        fixed_params=None if stats.get("fixed_params") is None else int(stats["fixed_params"]),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; training writes run.json when a run finishes")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the run may have been interrupted: rerun it"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({err}); delete the line or rerun"
            ) from err
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path} line {number} must be a JSON object with a 'step' key")
        records.append(record)
    return records


def _read_ratios(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k], dtype=float).ravel() for k in data.files if not _reserved(k)}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} cannot be read as an .npz archive ({err}); delete it or rerun training"
        ) from err


def _reserved(key: str) -> bool:
    return re.fullmatch(r"__\w+__", key) is not None


def _where(run: Run) -> str:
    return str(run.path) if run.path is not None else "this run"
