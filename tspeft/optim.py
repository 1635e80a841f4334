r"""One optimizer for adapters and thresholds, and gradient clipping that leaves thresholds out.

The threshold rule (Eq. 16-20) is Adam applied to a parameter whose gradient is :math:`-g_k`:

.. code-block:: text

    m_k = b1 m_{k-1} + (1 - b1) g_k            v_k = b2 v_{k-1} + (1 - b2) g_k^2
    mhat = m_k / (1 - b1^k)                    vhat = v_k / (1 - b2^k)
    tau <- tau + alpha_k s mhat / (sqrt(vhat) + eps)

so thresholds are a param group of AdamW with lr = s, betas/eps from TSConfig and no weight decay. A
LambdaLR-style scheduler multiplies every group's lr by the same alpha_k, which is the paper's schedule
following. The Appendix A.2 ablation (``rule="plain"``) is ``tau <- tau + alpha_k s g_k``.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from .model import THRESHOLD, controller, gated_modules


def threshold_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return the threshold parameters by gated module name."""
    return {name: getattr(mod, THRESHOLD) for name, mod in gated_modules(model).items()}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the trainable parameters that are not thresholds (adapters, heads)."""
    taus = {id(p) for p in threshold_parameters(model).values()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in taus]


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0, **kwargs) -> torch.Tensor:
    """Clip the adapters' gradients to `max_norm` and return their total norm; thresholds are left out.

    The threshold's surrogate gradient g_k sums over every token and is orders of magnitude larger than
    an adapter gradient; inside a global norm it would dominate and shrink the adapters' step to nothing.
    The Adam-style rule already normalises g_k, so it needs no clipping.
    """
    return torch.nn.utils.clip_grad_norm_(adapter_parameters(model), max_norm, norm_type=norm_type, **kwargs)


class TSOptimizer(torch.optim.AdamW):
    """AdamW for adapters plus the threshold rule (Eq. 16-20, or plain) for groups marked ``ts_threshold``.

    A threshold whose g_k is NaN or inf skips its update for that step, with a warning (its moments and
    step count stay as they were); adapter parameters are left to the caller's loss scaler as usual.
    """

    def _threshold_groups(self) -> list[dict]:
        return [g for g in self.param_groups if g.get("ts_threshold")]

    def _drop_nonfinite(self) -> dict[nn.Parameter, torch.Tensor]:
        """Detach non-finite threshold grads (returned, to restore after the step)."""
        params = [p for g in self._threshold_groups() for p in g["params"] if p.grad is not None]
        if not params:
            return {}
        finite = torch.isfinite(torch.cat([p.grad.reshape(-1) for p in params]))
        if bool(finite.all()):  # one host sync per optimizer step, not per layer
            return {}
        bad = [p for p, ok in zip(params, finite.tolist()) if not ok]
        names = [getattr(p, "_ts_name", "?") for p in bad]
        warnings.warn(
            f"tspeft: non-finite threshold gradient (g_k) in {len(bad)} module(s) {names[:5]}; "
            "their thresholds are not updated this step",
            RuntimeWarning,
            stacklevel=3,
        )
        stash = {p: p.grad for p in bad}
        for p in bad:
            p.grad = None
        return stash

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stash = self._drop_nonfinite()
        saved_lr = []
        for group in self._threshold_groups():
            saved_lr.append(group["lr"])
            if not group["ts_follow_schedule"]:
                group["lr"] = group["ts_s"]
            if group["ts_rule"] == "plain":  # Appendix A.2: tau <- tau + lr * g_k  (grad = -g_k)
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
                        stash.setdefault(p, p.grad)
                        p.grad = None
        try:
            super().step()
        finally:
            for group, lr in zip(self._threshold_groups(), saved_lr):
                group["lr"] = lr
            for p, grad in stash.items():
                p.grad = grad
        return loss


def optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    **adamw_kwargs,
) -> TSOptimizer:
    """Return one optimizer: AdamW over the adapters and the threshold rule over the thresholds.

    Groups: adapter matrices (weight_decay), adapter vectors such as biases and DoRA magnitudes (no decay),
    and thresholds (lr = s, betas/eps of TSConfig, no decay). Any LambdaLR-style scheduler scales all
    groups by the same multiplier alpha_k (TSConfig.follow_schedule=False keeps the thresholds at s).
    Threshold state loaded with the adapter (tspeft.from_pretrained) is restored here.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    ctrl = controller(model)
    cfg = ctrl.config
    taus = threshold_parameters(model)
    for name, p in taus.items():
        p._ts_name = name
        if p.dtype != torch.float32:
            warnings.warn(f"threshold of {name} is {p.dtype}; keep thresholds in float32 for small steps", stacklevel=2)
    params = adapter_parameters(model)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    groups.append(
        {
            "params": list(taus.values()),
            "lr": cfg.s,
            "betas": cfg.betas,
            "eps": cfg.eps,
            "weight_decay": 0.0,
            "ts_threshold": True,
            "ts_rule": cfg.rule,
            "ts_s": cfg.s,
            "ts_follow_schedule": cfg.follow_schedule,
        }
    )
    opt = TSOptimizer(groups, lr=lr, weight_decay=weight_decay, **adamw_kwargs)
    _restore_threshold_state(opt, taus, ctrl.pending_optimizer_state)
    ctrl.pending_optimizer_state = {}
    ctrl.optimizer_ref = weakref.ref(opt)
    return opt


def _restore_threshold_state(opt: torch.optim.Optimizer, taus: dict[str, nn.Parameter], pending: dict) -> None:
    for name, state in pending.items():
        p = taus.get(name)
        if p is None:
            continue
        opt.state[p] = {
            "step": state["step"].to(torch.float32).reshape(()).clone(),
            "exp_avg": state["exp_avg"].to(p.device, p.dtype).reshape(p.shape).clone(),
            "exp_avg_sq": state["exp_avg_sq"].to(p.device, p.dtype).reshape(p.shape).clone(),
        }


def threshold_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Return the threshold rule's state (step, exp_avg, exp_avg_sq) by module, from the live optimizer."""
    ctrl = controller(model)
    opt = ctrl.optimizer_ref() if ctrl.optimizer_ref is not None else None
    out: dict[str, dict[str, torch.Tensor]] = dict(ctrl.pending_optimizer_state)
    if opt is None:
        return out
    for name, p in threshold_parameters(model).items():
        state = opt.state.get(p)
        if state and "exp_avg" in state:
            out[name] = {k: torch.as_tensor(state[k]).detach().cpu().reshape(-1) for k in ("step", "exp_avg", "exp_avg_sq")}
    return out


def attach_grad_scaler(model: nn.Module, scaler) -> None:
    """Tell the gates about a torch.amp.GradScaler, so lambda's term of g_k is scaled like the loss."""
    controller(model).grad_scaler = scaler


