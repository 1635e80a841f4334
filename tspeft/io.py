"""Saving and loading what token selection adds to an adapter: config, thresholds, their rule state.

Files beside peft's ``adapter_config.json`` / ``adapter_model.safetensors``:
``tspeft_config.json`` (TSConfig) and ``tspeft_state.safetensors`` (``<module>.threshold`` and, when an
optimizer was built, ``<module>.step/.exp_avg/.exp_avg_sq``, with a sha256 of the tensors in its metadata,
checked on load). A save writes every file (peft's included) into a staging folder first and only then
renames them into place, so a crash mid-save leaves the previous files whole and consistent.

Plain ``peft.PeftModel.from_pretrained`` ignores these files and gives the dense adapter; use
:func:`from_pretrained` (it checks for them with :func:`is_token_selective`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, TSConfig
from .model import controller, enable, gated_modules

STATE_NAME = "tspeft_state.safetensors"
ADAPTER_CONFIG = "tspeft_adapter.json"
ADAPTER_WEIGHTS = "tspeft_adapter.safetensors"
RULE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename tmp_path to `path`, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def staged_save(directory: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(staging) on a fresh folder inside `directory`, then rename each file it wrote into place.

    peft writes ``adapter_model.safetensors`` in place, so a crash (even SIGKILL) in the middle of a plain
    save destroys the previous adapter, and a crash between the adapter and the TS state leaves new weights
    with old thresholds. Staged, nothing of the previous save is touched until every new file is whole;
    then come only renames. A killed save leaves a hidden ``.tspeft-save-*`` folder behind, nothing else.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".tspeft-save-"))
    try:
        if (directory / "README.md").is_file():  # peft updates an existing model card rather than replace it
            shutil.copy2(directory / "README.md", staging / "README.md")
        write(staging)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for src in files:  # durable before visible
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
        for src in files:
            dst = directory / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def state_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Return the sha256 of the state's names, dtypes, shapes and bytes (stored in the file's metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a state file; raise ValueError if it is truncated, unreadable or tampered with."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a truncated or tampered file: refuse it whole
        raise ValueError(f"{path} is corrupt or truncated ({exc}); nothing was loaded") from exc
    expected = metadata.get("sha256")
    if expected is not None and state_checksum(tensors) != expected:
        raise ValueError(
            f"{path} is corrupt: its tensors do not match the sha256 stored when it was saved (modified or "
            "damaged since); nothing was loaded"
        )
    return tensors


def _adapter_dir(model: nn.Module, directory: str | Path) -> Path:
    """Return where peft writes the active adapter: the directory, or a subfolder for non-default names."""
    name = getattr(model, "active_adapter", "default")
    name = name if isinstance(name, str) else "default"
    return Path(directory) if name == "default" else Path(directory) / name


def save_ts_state(model: nn.Module, directory: str | Path) -> Path:
    """Write the TS config, thresholds and threshold-rule state beside the adapter; return the folder."""
    from .optim import threshold_state

    ctrl = controller(model)
    folder = _adapter_dir(model, directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in gated_modules(model).items():
        tensors[f"{name}.threshold"] = mod.ts_threshold.detach().float().cpu().reshape(1).contiguous()
    for name, state in threshold_state(model).items():
        for k in RULE_KEYS:
            tensors[f"{name}.{k}"] = torch.as_tensor(state[k]).float().cpu().reshape(1).contiguous()
    metadata = {"format": "tspeft", "sha256": state_checksum(tensors)}
    atomic_write(folder / STATE_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    config_text = json.dumps(ctrl.config.to_dict(), indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))
    return folder


def load_ts_state(model: nn.Module, directory: str | Path) -> None:
    """Load thresholds (and threshold-rule state, for the next tspeft.optimizer) into an enabled model."""
    ctrl = controller(model)
    path = Path(directory) / STATE_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this folder holds no token-selection state")
    tensors = _read_state(path)
    mods = gated_modules(model)
    missing = [n for n in mods if f"{n}.threshold" not in tensors]
    if missing:
        raise ValueError(f"{path} has no threshold for {len(missing)} gated module(s), e.g. {missing[:3]}")
    bad = [n for n in mods if not math.isfinite(float(tensors[f"{n}.threshold"]))]
    if bad:
        raise ValueError(
            f"{path} holds non-finite thresholds for {bad[:5]}; refusing to load (re-save from a healthy run)"
        )
    with torch.no_grad():
        for name, mod in mods.items():
            mod.ts_threshold.copy_(tensors[f"{name}.threshold"].to(mod.ts_threshold.device).reshape(1))
    ctrl.pending_optimizer_state = {
        n: {k: tensors[f"{n}.{k}"] for k in RULE_KEYS}
        for n in mods
        if all(f"{n}.{k}" in tensors for k in RULE_KEYS)
    }


def is_token_selective(directory: str | Path) -> bool:
    """Return True if `directory` holds a token-selective adapter saved by tspeft."""
    return (Path(directory) / CONFIG_NAME).exists()


def save_pretrained(model: nn.Module, directory: str | Path, **kwargs: Any) -> Path:
    """Save a TS adapter (peft model or parallel adapters) with its thresholds; return the folder."""
    from peft import PeftModel

    directory = Path(directory)
    if isinstance(model, PeftModel):
        model.save_pretrained(str(directory), **kwargs)  # the TS state is written by the wrapped method
        return directory
    from .adapter import parallel_adapters

    adapters = parallel_adapters(model)
    if not adapters:
        raise ValueError("nothing to save: the model is neither a peft model nor has tspeft parallel adapters")
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad and not n.endswith("ts_threshold")}
    cfg = dict(getattr(model, "tspeft_adapter_config", {}))

    def write(staging: Path) -> None:
        save_file(trainable, str(staging / ADAPTER_WEIGHTS))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        if getattr(model, "_tspeft", None) is not None:
            save_ts_state(model, staging)

    staged_save(directory, write)
    return directory


def from_pretrained(base_model: nn.Module, directory: str | Path, is_trainable: bool = False, **kwargs: Any) -> nn.Module:
    """Return base_model with the saved adapter, token selection enabled and thresholds restored.

    Works for peft adapters (LoRA, DoRA, AdaLoRA) and tspeft parallel adapters; a folder without TS files
    loads as a dense adapter with a clear error instead of silently dropping the gates.
    """
    directory = Path(directory)
    selective = is_token_selective(directory)
    if not selective and not (directory / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: it is not a token-selective adapter saved by tspeft "
            "(load a dense peft adapter with peft.PeftModel.from_pretrained)"
        )
    config = TSConfig.load(directory) if selective else None
    if (directory / ADAPTER_CONFIG).exists():
        from .adapter import add_parallel_adapter

        acfg = json.loads((directory / ADAPTER_CONFIG).read_text())
        model = add_parallel_adapter(
            base_model, acfg["target_modules"], hidden=acfg["hidden"], scale=acfg["scale"],
            dropout=acfg["dropout"], act=acfg["act"], modules_to_save=acfg.get("modules_to_save"),
        )
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"unexpected adapter weights in {directory}: {result.unexpected_keys[:5]}")
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable, **kwargs)
    if config is not None:  # a dense parallel adapter loads without gates
        enable(model, config)
        load_ts_state(model, directory)
        for mod in gated_modules(model).values():
            mod.ts_threshold.requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()
    return model
