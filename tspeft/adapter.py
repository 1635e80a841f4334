"""A parallel adapter (He et al. / LLM-Adapters), which peft does not provide: the paper's TS-Adapter.

``out = W0 x + b + scale * up(act(down(dropout(x))))`` beside a frozen ``nn.Linear``; ``up`` starts at
zero so the model is unchanged at step 0, and has no bias, so the update is low rank in the adapter's
hidden size (``delta = scale * U z``, ``z = act(down(dropout(x)))``) and the gate runs in that space.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ParallelAdapter(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) with a trainable bottleneck beside it."""

    def __init__(
        self, base_layer: nn.Linear, hidden: int = 32, scale: float = 1.0, dropout: float = 0.0, act: str = "relu"
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"ParallelAdapter wraps nn.Linear, got {type(base_layer).__name__}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.hidden, self.scale, self.act_name = hidden, float(scale), act
        w = base_layer.weight
        self.adapter_down = nn.Linear(base_layer.in_features, hidden, bias=True, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(hidden, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.adapter_up.weight)
        self.adapter_act = ACTIVATIONS[act]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """Return z = act(down(dropout(x))) of shape (..., hidden)."""
        return self.adapter_act(self.adapter_down(self.adapter_dropout(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return W0 x + b + scale * up(z)."""
        return self.base_layer(x) + self.adapter_up(self.hidden_states(x)) * self.scale

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, scale={self.scale}, act={self.act_name}"


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_parallel_adapter(
    model: nn.Module,
    target_modules: str | Iterable[str],
    hidden: int = 32,
    scale: float = 1.0,
    dropout: float = 0.0,
    act: str = "relu",
    modules_to_save: Iterable[str] | None = None,
) -> nn.Module:
    """Return `model` with a ParallelAdapter beside each targeted nn.Linear; only adapters train.

    target_modules: a list of name suffixes (as peft's) or one regex matched against full names.
    modules_to_save: name suffixes of modules that stay trainable too (a classification head).
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    existing = parallel_adapters(model)
    if existing:
        raise ValueError(
            f"the model already has parallel adapters ({len(existing)}, e.g. {next(iter(existing))}); a second "
            "add_parallel_adapter call would freeze them and leave them out of saves. Add every target in one "
            "call (target_modules takes a list of names or one regex)."
        )
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and _matches(name, targets) and not isinstance(mod, ParallelAdapter)
    ]
    bad = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
    if bad:
        raise TypeError(f"add_parallel_adapter supports nn.Linear targets only; got {', '.join(bad)}")
    if not found:
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ParallelAdapter(mod, hidden=hidden, scale=scale, dropout=dropout, act=act))
    keep = list(modules_to_save or [])
    for name, mod in model.named_modules():
        if keep and name and _matches(name, keep):
            for p in mod.parameters():
                p.requires_grad_(True)
    model.tspeft_adapter_config = {
        "target_modules": targets, "hidden": hidden, "scale": scale, "dropout": dropout, "act": act,
        "modules_to_save": keep,
    }
    return model


def parallel_adapters(model: nn.Module) -> dict[str, ParallelAdapter]:
    """Return the model's parallel adapters by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ParallelAdapter)}
