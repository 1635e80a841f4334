"""`TSConfig`: the hyper-parameters of token selection, validated at construction."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "tspeft_config.json"
RULES = ("adam", "plain")
RECOMPUTE = ("auto", "all", "none")


def _finite_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False) -> float:
    """Return `value` as a float, or raise naming the field and its allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"TSConfig.{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"TSConfig.{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"TSConfig.{name} must be {bound}, got {value}")
    return value


@dataclass
class TSConfig:
    """Token selection (TS-PEFT, §3) for every targeted module of a peft model.

    Each module gets one threshold ``tau`` (Eq. 3), learnt with the surrogate gradient
    ``g_k`` (Eq. 15) and the Adam-style rule (Eq. 16-20)::

        tau <- tau + alpha_k * s * mhat_k / (sqrt(vhat_k) + eps)

    ``alpha_k`` is the learning-rate schedule's multiplier (1 at its peak), shared with the adapters.
    """

    lam: float = 1e-5
    """lambda of Eq. 4/15: the price of one active token. >= 0; larger means sparser."""

    s: float = 1e-3
    """The threshold's step scale (its learning rate at the schedule's peak). > 0. The Adam-style
    rule moves tau by at most about ``s`` per step, so ``s`` must fit the run's length
    (the paper's 4e-5 / 1e-4 assume tens of thousands of steps)."""

    betas: tuple[float, float] = (0.9, 0.98)
    """beta1, beta2 of Eq. 16-17, each in [0, 1)."""

    eps: float = 1e-8
    """epsilon of Eq. 20. > 0."""

    rule: str = "adam"
    """"adam" (Eq. 16-20) or "plain" (the Appendix A.2 ablation: tau <- tau + alpha_k * s * g_k)."""

    follow_schedule: bool = True
    """Scale the threshold step by the adapters' learning-rate schedule (alpha_k). With False the
    threshold group keeps lr = s whatever the scheduler does."""

    init_threshold: float = 0.0
    """tau_0 (Eq. 20): 0, so that at step 0 the model equals the dense PEFT model."""

    target_modules: str | list[str] | None = None
    """The adapter layers to gate, as peft reads its own: a list of names (suffixes of module names), or one
    string, a regular expression the full module name must match; None gates every adapter layer."""

    recompute_z: str = "auto"
    """Which LoRA/AdaLoRA modules compute their rank-space activations ``z = A x`` again in backward
    instead of keeping them (modules without dropout on a frozen ``nn.Linear``; numerics unchanged).
    Token selection keeps one byte per token and module that dense LoRA does not (the mask), and each
    ``z`` not kept saves r elements per token. "auto": the fewest modules that pay for every mask
    (one per 2 r gated modules, the first ones), so that a step keeps no more than dense LoRA, for a
    negligible cost. "all": every module (least memory, about one more rank-r product per module and
    step). "none": keep every ``z``."""

    def __post_init__(self) -> None:
        self.lam = _finite_number("lam", self.lam, low=0.0)
        self.s = _finite_number("s", self.s, low=0.0, low_open=True)
        self.eps = _finite_number("eps", self.eps, low=0.0, low_open=True)
        self.init_threshold = _finite_number("init_threshold", self.init_threshold)
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ValueError(f"TSConfig.betas must be two numbers (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(betas):
            b = _finite_number(f"betas[{i}]", b, low=0.0)
            if b >= 1.0:
                raise ValueError(f"TSConfig.betas[{i}] must be in [0, 1), got {b}")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.rule not in RULES:
            raise ValueError(f"TSConfig.rule must be one of {RULES}, got {self.rule!r}")
        if not isinstance(self.follow_schedule, bool):
            raise TypeError(f"TSConfig.follow_schedule must be a bool, got {self.follow_schedule!r}")
        if self.recompute_z not in RECOMPUTE:
            raise ValueError(f"TSConfig.recompute_z must be one of {RECOMPUTE}, got {self.recompute_z!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = [str(t) for t in self.target_modules]

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TSConfig:
        """Return a config from `to_dict`'s output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TSConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        """Write `tspeft_config.json` into `directory` and return its path."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TSConfig:
        """Return the config saved in `directory`."""
        return cls.from_dict(read_json(Path(directory) / CONFIG_NAME))


def read_json(path: Path) -> Any:
    """Return the JSON in `path`; a damaged file raises a ValueError that names it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}): the file is damaged or was cut short; save the adapter again"
        ) from exc


