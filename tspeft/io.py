"""Saving and loading what token selection adds to an adapter: config, thresholds, their rule state.

Files beside peft's ``adapter_config.json`` / ``adapter_model.safetensors``:
``tspeft_config.json`` (TSConfig) and ``tspeft_state.safetensors`` (``<module>.threshold`` and, when an
optimizer was built, ``<module>.step/.exp_avg/.exp_avg_sq``, with a sha256 of the tensors in its metadata,
checked on load, and a sha256 of the adapter weights file it was saved with, so that thresholds left behind
by an earlier save are never loaded onto other weights: see :func:`stale_reason`). A save writes every file (peft's included) into a staging folder first and only then
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

from .config import CONFIG_NAME, TSConfig, read_json
from .model import THRESHOLD, controller, enable, gated_modules

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


_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SUPERSEDES = {
    **{name: (*(n for n in _PEFT_WEIGHTS if n != name), ADAPTER_WEIGHTS, ADAPTER_CONFIG) for name in _PEFT_WEIGHTS},
    ADAPTER_WEIGHTS: (*_PEFT_WEIGHTS, "adapter_config.json"),
}
"""The files an adapter weights file replaces in its folder: the other format's (peft reads .safetensors
before .bin, so an older one of those would be loaded instead) and another kind of adapter's (peft's
beside tspeft's parallel adapter, or the reverse): a folder holds the adapter saved last, and the TS state
saved with it."""


def staged_save(directory: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(staging) on a fresh folder inside `directory`, then rename each file it wrote into place,
    and remove the files of the adapter saved there before that it replaces (:data:`SUPERSEDES`).

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
        for src in files:  # then the previous adapter's files that this one replaces, whatever their kind
            for old in SUPERSEDES.get(src.name, ()):
                (directory / src.relative_to(staging)).with_name(old).unlink(missing_ok=True)
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
    """Return where peft writes the gated adapter: the directory, or a subfolder for non-default names."""
    name = controller(model).adapter_name or "default"
    return Path(directory) if name == "default" else Path(directory) / name


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", ADAPTER_WEIGHTS)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _adapter_fingerprint(folder: Path) -> dict[str, str]:
    """Return {"adapter_file": name, "adapter_sha256": hash} of the adapter weights beside the TS state, or {}."""
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            return {"adapter_file": name, "adapter_sha256": _file_sha256(folder / name)}
    return {}


def stale_reason(directory: str | Path) -> str | None:
    """Return why the TS files in `directory` do not belong to the adapter weights there, or None if they do.

    The TS state records a sha256 of the adapter file it was saved with. A later dense save into the same
    folder (plain peft, or after ``tspeft.disable``) replaces the adapter but leaves the TS files behind;
    loading those thresholds onto the new adapter would silently gate a model that was never gated.
    """
    folder = Path(directory)
    try:
        with safe_open(str(folder / STATE_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:
        return None  # absent or unreadable: reported by whoever reads it
    name, expected = metadata.get("adapter_file"), metadata.get("adapter_sha256")
    if name is None or expected is None:  # saved before the fingerprint existed
        return None
    loaded = next((n for n in ADAPTER_FILES if (folder / n).is_file()), None)  # what peft (or tspeft) reads
    if loaded != name or _file_sha256(folder / name) != expected:
        dense = (
            "delete the two tspeft_* files to load it as a dense adapter with tspeft.from_pretrained"
            if name == ADAPTER_WEIGHTS else "load the dense adapter with peft.PeftModel.from_pretrained"
        )
        return (
            f"the token-selection files in {folder} ({CONFIG_NAME}, {STATE_NAME}) were saved with another "
            f"{name} than the one there now: the adapter was saved again without token selection (plain peft, "
            f"or after tspeft.disable) or changed since. To use that adapter, {dense}; to keep token "
            "selection, save the gated model again."
        )
    return None


def save_ts_state(model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the TS config, thresholds and threshold-rule state beside the adapter; return the folder.

    state_dict: the model's full state dict when the caller gathered one (FSDP, DeepSpeed): thresholds are
    taken from it (``<module>.ts_threshold``) rather than from the live, possibly sharded, parameters.
    """
    from .optim import threshold_state, whole_tensor

    ctrl = controller(model)
    folder = _adapter_dir(model, directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in gated_modules(model).items():
        value = (state_dict or {}).get(f"{name}.{THRESHOLD}")
        value = whole_tensor(mod.ts_threshold if value is None else value)
        tensors[f"{name}.threshold"] = value.detach().float().cpu().reshape(1).contiguous()
    bad = [n for n in gated_modules(model) if not math.isfinite(float(tensors[f"{n}.threshold"]))]
    if bad:  # load refuses them: writing them would replace a good save with one that cannot be loaded
        raise ValueError(
            f"cannot save non-finite thresholds ({len(bad)} gated module(s), e.g. {bad[:3]}); nothing was written. "
            "Training diverged: load the last good save or checkpoint and lower the learning rate or s"
        )
    for name, state in threshold_state(model).items():
        for k in RULE_KEYS:
            tensors[f"{name}.{k}"] = torch.as_tensor(state[k]).float().cpu().reshape(1).contiguous()
    metadata = {"format": "tspeft", "sha256": state_checksum(tensors), **_adapter_fingerprint(folder)}
    atomic_write(folder / STATE_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    config_text = json.dumps(ctrl.config.to_dict(), indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))
    return folder


def load_ts_state(model: nn.Module, directory: str | Path) -> None:
    """Load thresholds (and threshold-rule state, for the next tspeft.optimizer) into an enabled model."""
    ctrl = controller(model)
    if not (Path(directory) / STATE_NAME).exists():  # a checkpoint of an adapter not named "default": its subfolder
        directory = _adapter_dir(model, directory)
    path = Path(directory) / STATE_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this folder holds no token-selection state")
    if (why := stale_reason(directory)) is not None:
        raise ValueError(why)
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
    """Return True if `directory` holds a token-selective adapter saved by tspeft (and still belonging to the
    adapter weights there: see :func:`stale_reason`)."""
    return (Path(directory) / CONFIG_NAME).exists() and stale_reason(directory) is None


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
    cfg = dict(getattr(model, "tspeft_adapter_config", {}))
    weights = _adapter_weights(model, cfg)
    # parameters the user unfroze besides the adapters: named in the config, so that a model loaded from this
    # save writes them again (it loads them frozen, or trainable with is_trainable=True)
    cfg["extra_parameters"] = sorted(set(weights) - _saved_names(model, {**cfg, "extra_parameters": []}))

    def write(staging: Path) -> None:
        save_file(weights, str(staging / ADAPTER_WEIGHTS))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        if getattr(model, "_tspeft", None) is not None:
            save_ts_state(model, staging)

    staged_save(directory, write)
    return directory


def _saved_names(model: nn.Module, cfg: dict[str, Any]) -> set[str]:
    """Return the parameter names a parallel-adapter save must hold: every adapter's own weights, the
    modules_to_save and the extra parameters an earlier save held, whether or not they train now (a model
    loaded for inference has them frozen)."""
    from .adapter import _matches, parallel_adapters

    prefixes = [f"{n}.adapter_" for n in parallel_adapters(model)]
    keep = cfg.get("modules_to_save") or []
    kept = [f"{n}." for n, _ in model.named_modules() if keep and n and _matches(n, keep)]
    extra = set(cfg.get("extra_parameters") or [])
    return {n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes + kept)) or n in extra}


def _adapter_weights(model: nn.Module, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return what a parallel-adapter save writes: the adapters and modules_to_save, plus anything else
    that trains (a user may unfreeze more), never the thresholds (they go in the TS state)."""
    names = _saved_names(model, cfg)
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if (n in names or p.requires_grad) and not n.endswith(THRESHOLD)}


def is_parallel_adapter_model(model: nn.Module) -> bool:
    """Return True for a model with tspeft parallel adapters (not a peft model): saved by :func:`save_pretrained`."""
    from peft import PeftModel

    from .adapter import parallel_adapters

    return not isinstance(model, PeftModel) and bool(parallel_adapters(model))


def load_parallel_adapter_weights(model: nn.Module, directory: str | Path, cfg: dict[str, Any] | None = None) -> None:
    """Load the parallel-adapter weights saved in `directory` into `model` (whose adapters are already added);
    refuse a file that holds weights the model lacks or lacks some of the adapters'."""
    directory = Path(directory)
    cfg = read_json(directory / ADAPTER_CONFIG) if cfg is None else cfg
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected adapter weights in {directory}: {result.unexpected_keys[:5]}")
    missing = sorted(_saved_names(model, cfg) - set(weights))
    if missing:
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} lacks {len(missing)} adapter weight(s), e.g. {missing[:3]}: "
            "the file is incomplete (saved by an older tspeft from a model loaded for inference?); "
            "re-save the adapter from the trained model"
        )


def from_pretrained(base_model: nn.Module, directory: str | Path, is_trainable: bool = False, **kwargs: Any) -> nn.Module:
    """Return base_model with the saved adapter, token selection enabled and thresholds restored.

    Works for peft adapters (LoRA, DoRA, AdaLoRA) and tspeft parallel adapters; a folder without TS files
    loads as a dense adapter with a clear error instead of silently dropping the gates.
    """
    from .adapter import parallel_adapters

    directory = Path(directory)
    if getattr(base_model, "peft_config", None) or gated_modules(base_model) or parallel_adapters(base_model):
        raise ValueError(
            "base_model already has adapter layers (get_peft_model and add_parallel_adapter change the model "
            "they are given, in place): pass a freshly loaded base model, e.g. "
            "AutoModelForCausalLM.from_pretrained(...), to tspeft.from_pretrained"
        )
    if (directory / CONFIG_NAME).exists() and (why := stale_reason(directory)) is not None:
        raise ValueError(why)
    selective = is_token_selective(directory)
    if not selective and not (directory / ADAPTER_CONFIG).exists():
        if (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{directory} holds a whole transformers model (config.json, no tspeft files): a model with "
                "tspeft parallel adapters saves its adapters and thresholds with tspeft.save_pretrained(model, "
                "directory), not with model.save_pretrained"
            )
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: it is not a token-selective adapter saved by tspeft "
            "(load a dense peft adapter with peft.PeftModel.from_pretrained)"
        )
    config = TSConfig.load(directory) if selective else None
    if (directory / ADAPTER_CONFIG).exists():
        from .adapter import add_parallel_adapter

        acfg = read_json(directory / ADAPTER_CONFIG)
        model = add_parallel_adapter(
            base_model, acfg["target_modules"], hidden=acfg["hidden"], scale=acfg["scale"],
            dropout=acfg["dropout"], act=acfg["act"], modules_to_save=acfg.get("modules_to_save"),
        )
        extra = set(acfg.get("extra_parameters") or [])
        model.tspeft_adapter_config["extra_parameters"] = sorted(extra)
        load_parallel_adapter_weights(model, directory, acfg)
        for name, p in model.named_parameters():  # add_parallel_adapter made the adapters trainable
            if not is_trainable:
                p.requires_grad_(False)
            elif name in extra:
                p.requires_grad_(True)
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
