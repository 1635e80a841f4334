r"""One optimizer for adapters and thresholds, and gradient clipping that leaves thresholds out.

The threshold rule (Eq. 16-20) is Adam applied to a parameter whose gradient is :math:`-g_k`:

.. code-block:: text

    m_k = b1 m_{k-1} + (1 - b1) g_k            v_k = b2 v_{k-1} + (1 - b2) g_k^2
    mhat = m_k / (1 - b1^k)                    vhat = v_k / (1 - b2^k)
    tau <- tau + alpha_k s mhat / (sqrt(vhat) + eps)

so thresholds are a param group with lr = s, betas/eps from TSConfig and no weight decay, in an AdamW that
updates that group itself (AdamW's arithmetic, all of a device's thresholds as one vector, no host sync). A
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

    The thresholds of a group are updated together, as vectors on their device, with no host sync: a module
    whose g_k is NaN or inf keeps its threshold, moments and step count for that step (a select, not a
    branch). Such skips are counted per threshold (``state["skipped"]``) and reported as a RuntimeWarning by
    :meth:`report_skipped`: at once when the thresholds live on the CPU (reading them costs nothing there),
    otherwise when the host reads anyway (the training log, :func:`report_skipped_updates`), so that a
    CUDA step never waits for the device. Adapter parameters are left to the caller's loss scaler as usual.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ts_reported: dict[str, int] = {}  # skips already warned about, per module

    def __setstate__(self, state: dict) -> None:  # a pickled Optimizer keeps only defaults, state and groups
        super().__setstate__(state)
        self.__dict__.setdefault("_ts_reported", {})

    def _threshold_groups(self) -> list[dict]:
        return [g for g in self.param_groups if g.get("ts_threshold")]

    def _tau_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:  # a loaded state keeps AdamW's CPU step: moved once
            state["step"] = state["step"].to(p.device)
        return state

    def _skip_counter(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "skipped" not in state:
            state["skipped"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state["skipped"]

    @torch.no_grad()
    def _update_thresholds(self, group: dict, params: list[torch.Tensor]) -> None:
        """Apply the group's rule to `params` (thresholds of one device, each with a gradient -g_k)."""
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        grad = torch.cat([p.grad.reshape(1) for p in params]).to(dtype)
        ok = torch.isfinite(grad)
        grad = torch.where(ok, grad, 0.0)
        tau = torch.cat([p.detach().reshape(1) for p in params]).to(dtype)
        lr = group["lr"]
        if group["ts_rule"] == "plain":  # Appendix A.2: tau <- tau + lr * g_k (a skipped grad is 0 here)
            new = tau - lr * grad
        else:  # Eq. 16-20, as AdamW computes them, per threshold and step count
            b1, b2 = group["betas"]
            states = [self._tau_state(p) for p in params]
            step = torch.stack([s["step"] for s in states]) + ok
            m = torch.cat([s["exp_avg"].reshape(1) for s in states]).to(dtype)
            v = torch.cat([s["exp_avg_sq"].reshape(1) for s in states]).to(dtype)
            m = torch.where(ok, m * b1 + grad * (1 - b1), m)
            v = torch.where(ok, v * b2 + grad * grad * (1 - b2), v)
            bc1 = 1 - torch.pow(b1, step).to(dtype)  # 0 where a threshold was never updated: not selected below
            bc2 = 1 - torch.pow(b2, step).to(dtype)
            new = torch.where(ok, tau - lr * (m / bc1) / (v.sqrt() / bc2.sqrt() + group["eps"]), tau)
            torch._foreach_copy_([s["step"] for s in states], list(step.unbind(0)))
            torch._foreach_copy_([s["exp_avg"] for s in states], list(m.reshape(-1, 1).unbind(0)))
            torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(v.reshape(-1, 1).unbind(0)))
        torch._foreach_copy_(params, list(new.reshape(-1, 1).unbind(0)))
        counters = [self._skip_counter(p) for p in params]
        torch._foreach_copy_(counters, list((torch.stack([c.float() for c in counters]) + ~ok).unbind(0)))

    def report_skipped(self) -> dict[str, int]:
        """Warn about threshold updates skipped (non-finite g_k) since the last report; return {module: count}.

        Reads one counter vector per device: a host sync on CUDA, so call it where the host reads anyway."""
        params = [p for g in self._threshold_groups() for p in g["params"] if "skipped" in self.state.get(p, {})]
        reported = self._ts_reported
        new: dict[str, int] = {}
        for ps in _by_device(params).values():
            for p, count in zip(ps, torch.stack([self.state[p]["skipped"].float() for p in ps]).tolist()):
                name = getattr(p, "_ts_name", "?")
                if count > reported.get(name, 0):
                    new[name] = int(count) - reported.get(name, 0)
                    reported[name] = int(count)
        if new:
            names = list(new)
            warnings.warn(
                f"tspeft: non-finite threshold gradient (g_k) in {len(names)} module(s) {names[:5]}: "
                f"{sum(new.values())} threshold update(s) skipped (threshold, moments and step count kept)",
                RuntimeWarning,
                stacklevel=2,
            )
        return new

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stash: dict[torch.Tensor, torch.Tensor] = {}
        devices: set[torch.device] = set()
        for group in self._threshold_groups():
            saved_lr = group["lr"]
            if not group["ts_follow_schedule"]:
                group["lr"] = group["ts_s"]
            by_device = _by_device([p for p in group["params"] if p.grad is not None])
            try:
                for device, params in by_device.items():
                    self._update_thresholds(group, params)
                    devices.add(device)
            finally:
                group["lr"] = saved_lr
            for params in by_device.values():
                for p in params:  # AdamW below must not touch the thresholds
                    stash[p] = p.grad
                    p.grad = None
        try:
            super().step()
        finally:
            for p, grad in stash.items():
                p.grad = grad
        if devices and self._reads_are_free(devices):
            self.report_skipped()
        return loss

    @staticmethod
    def _reads_are_free(devices: set[torch.device]) -> bool:
        """Return True if reading the skip counters costs no wait for a device (CPU tensors only)."""
        return all(d.type == "cpu" for d in devices)


def _by_device(params: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    """Return `params` grouped by device, in order (thresholds of a model split over devices)."""
    out: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault(p.device, []).append(p)
    return out


def report_skipped_updates(model: nn.Module) -> dict[str, int]:
    """Warn about and return the threshold updates of `model` skipped since the last report (non-finite g_k).

    On CUDA the optimizer step does not read its skip counters (that would wait for the device); the
    training log calls this at each logging step. Returns {} when no tspeft optimizer is attached."""
    ctrl = controller(model)
    opt = ctrl.optimizer_ref() if ctrl.optimizer_ref is not None else None
    return opt.report_skipped() if isinstance(opt, TSOptimizer) else {}


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
    # The rule's moments belong to the thresholds, not to one optimizer: a new optimizer continues from the
    # latest state (the live previous optimizer's, else the pending one: loaded, or kept from a dead
    # optimizer), and when the newest optimizer is gone its state becomes the pending one, so that a save
    # after it still has the moments (a fit() that builds and drops its optimizer, then save_pretrained).
    try:
        latest = threshold_state(model)
    except ValueError:  # the previous optimizer's state is sharded (FSDP): start from the pending one
        latest = ctrl.pending_optimizer_state
    _restore_threshold_state(opt, taus, latest)
    ctrl.optimizer_ref = weakref.ref(opt)
    ctrl.optimizer_generation = generation = ctrl.optimizer_generation + 1
    weakref.finalize(opt, _keep_rule_state, ctrl, generation, opt.state, taus).atexit = False
    return opt


def _rule_entries(state: dict, taus: dict[str, nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
    """Return the threshold rule's state by module from an optimizer's `state`, for thresholds that stepped."""
    out = {}
    for name, p in taus.items():
        s = state.get(p)
        if s and "exp_avg" in s and float(whole_tensor(torch.as_tensor(s["step"]))) > 0:  # only skips: nothing
            out[name] = {k: whole_tensor(torch.as_tensor(s[k])).detach().cpu().reshape(-1)
                         for k in ("step", "exp_avg", "exp_avg_sq")}
    return out


def _keep_rule_state(ctrl, generation: int, state: dict, taus: dict[str, nn.Parameter]) -> None:
    if generation != ctrl.optimizer_generation:  # a newer optimizer took the state over: this one's is older
        return
    try:
        kept = _rule_entries(state, taus)
    except ValueError:  # sharded across ranks (FSDP): not whole here, and a finalizer cannot gather it
        return
    ctrl.pending_optimizer_state = {**ctrl.pending_optimizer_state, **kept}


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


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """Return a plain tensor with all of `t`: itself, or a sharded DTensor's local part when it holds every
    element (a threshold is one element: under FSDP2 the rank that saves, rank 0, holds it whole). No
    collective is called: saving runs on one rank only."""
    if not hasattr(t, "to_local"):
        return t
    local = t.to_local()
    if local.numel() != t.numel():
        raise ValueError(
            f"a threshold or its optimizer state is sharded across ranks ({local.numel()} of {t.numel()} elements "
            "here); gather it first, e.g. pass save_pretrained the full state_dict"
        )
    return local.reshape(t.shape)


def threshold_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Return the threshold rule's state (step, exp_avg, exp_avg_sq) by module, from the live optimizer."""
    ctrl = controller(model)
    opt = ctrl.optimizer_ref() if ctrl.optimizer_ref is not None else None
    out: dict[str, dict[str, torch.Tensor]] = dict(ctrl.pending_optimizer_state)
    if opt is not None:
        out.update(_rule_entries(opt.state, threshold_parameters(model)))
    return out


def attach_grad_scaler(model: nn.Module, scaler) -> None:
    """Tell the gates about a torch.amp.GradScaler, so lambda's term of g_k is scaled like the loss."""
    controller(model).grad_scaler = scaler


