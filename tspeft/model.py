"""Turning token selection on: `enable` converts a peft model's adapter layers into gated ones.

Each gated layer gets a threshold parameter ``ts_threshold`` (shape (1,), fp32, tau_0 = 0) and a
statistics buffer; its class is swapped for a subclass whose forward gates the update (the layer stays
an instance of its peft class, so peft's save, load, and adapter switching still see it). The model gets
a forward pre-hook that hands the 2-D ``attention_mask`` to the gates, so that padding counts neither in
the threshold's gradient nor in sparsity.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .adapter import _matches
from .config import TSConfig
from .layers import KEEP_Z, SUPPORTED, gated_forward_for, recomputable_rank, unsupported_reason

THRESHOLD = "ts_threshold"
STATS = "ts_stats"


class TSController:
    """Model-wide state shared by the gates: config, the current token mask, loss scale, optimizer."""

    def __init__(self, config: TSConfig) -> None:
        self.config = config
        self.token_mask: torch.Tensor | None = None  # (batch, seq) bool of the current forward, or None
        # encoder-decoder models: token_mask is the encoder's; the decoder's own, and which tensor is the
        # encoder's output (the input of cross-attention's key and value projections)
        self.decoder_mask: torch.Tensor | None = None
        self.encoder_states: tuple[int, tuple[int, ...]] | None = None  # (data_ptr, shape)
        # the 2-D mask generate() handed prepare_inputs_for_generation, which builds a 4-D one (or one per
        # layer type) for a compileable cache (cache_implementation="static"): read by the next cached call
        self.generation_mask: torch.Tensor | None = None
        self.depth = 0  # calls of the hooked top-level model(s) under way
        self.grad_scaler: Any = None  # a torch.amp.GradScaler whose scale multiplies lambda's term
        self.optimizer_ref: weakref.ref | None = None
        self.optimizer_generation = 0  # optimizers built for these thresholds (the newest keeps its rule state)
        self.pending_optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
        self.hook_handles: list[Any] = []
        self.adapter_name: str | None = None  # the peft adapter that was active at enable (None: parallel adapters)
        self.modules: list[nn.Module] = []  # the gated layers

    def lam_factor(self) -> float | torch.Tensor:
        """Return the factor for lambda's term of g_k: the loss scale times the data-parallel world size.

        The loss part of g_k comes from backpropagated gradients, which a loss scaler has multiplied and
        DDP averages across ranks; lambda's part is a count, so it is scaled alike here.
        """
        factor: float | torch.Tensor = 1.0
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
            factor = scaler._scale.reshape(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            factor = factor * torch.distributed.get_world_size()
        return factor

    def real_tokens(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor | None:
        """Return (N,) bool real-token flags for a layer input x (..., d), or None if every position counts.

        The captured mask (batch, seq) applies when x is that token sequence, i.e. x.shape[:-1] ==
        (batch, seq) (or flattens to it), or a view of it flattened to (batch * seq, d) rows, as OPT's fc1 and
        many MoE shared experts take it (rows computed from those, e.g. fc2's input, and rows gathered for a
        routed expert count as real: their order is not the sequence's). Other inputs — BERT's pooler (one
        vector per sequence), a vision
        tower's patches, cross-attention over another sequence — count every position as real. In an
        encoder-decoder model a decoder layer (`module`) reads the decoder's mask, unless its input is the
        encoder's output (cross-attention's key and value), which reads the encoder's.
        """
        mask = self.token_mask
        if module is not None and module.__dict__.get(DECODER, False) and not self._is_encoder_states(x):
            mask = self.decoder_mask
        if mask is None:
            return None
        if x.dim() == 2:  # (batch * seq, d) rows: the token sequence only if they are a view of it, in order
            return mask.reshape(-1) if _flattened_sequence(x, mask) else None
        if x.dim() < 2 or x.shape[-2] != mask.shape[-1]:
            return None
        if x[..., 0].numel() != mask.numel():
            return None
        return mask.reshape(-1)

    def _is_encoder_states(self, x: torch.Tensor) -> bool:
        return self.encoder_states is not None and self.encoder_states == (x.data_ptr(), tuple(x.shape))

    def masks(self) -> tuple[Any, Any, Any]:
        """Return the captured masks (to replay in a checkpointed block's recompute)."""
        return self.token_mask, self.decoder_mask, self.encoder_states

    def set_masks(self, masks: tuple[Any, Any, Any]) -> None:
        self.token_mask, self.decoder_mask, self.encoder_states = masks


@torch.compiler.disable  # reads x._base and data pointers, which a compiled graph's fake tensors do not have
def _flattened_sequence(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Return True if the rows of x (2-D) are a (batch, ..., seq, d) tensor's tokens in order: a view of the
    whole of it, whose leading dims are the mask's (not a gather, not another tensor of as many rows)."""
    base = x._base
    return (
        base is not None and base.dim() == mask.dim() + 1 and tuple(base.shape[:-1]) == tuple(mask.shape)
        and base.numel() == x.numel() and base.data_ptr() == x.data_ptr() and x.is_contiguous()
    )


DECODER = "_ts_decoder"
"""Instance attribute of a gated layer inside an encoder-decoder model's decoder."""


class GatedLayer:
    """Mixin put in front of an adapter layer's class: its forward gates the update per token."""

    _ts_ctrl: TSController

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise RuntimeError("mixed-adapter batches (adapter_names=...) are not supported with token selection: "
                               "call the model without adapter_names, one adapter per batch (model.set_adapter)")
        if getattr(self, "disable_adapters", False) or getattr(self, "merged", False):
            return super().forward(x, *args, **kwargs)
        ctrl = self._ts_ctrl
        base = self.get_base_layer()(x, *args, **kwargs) if hasattr(self, "get_base_layer") else self.base_layer(x)
        gate = {
            "threshold": self._parameters[THRESHOLD],  # not getattr: nn.Module's __getattr__ is slow, per call
            "lam": ctrl.config.lam,
            "real": ctrl.real_tokens(x, self),
            "stats": self._buffers[STATS],
            "lam_factor": ctrl.lam_factor,
        }
        return type(self)._ts_update(self, x, base, gate)

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)``, ``.half()``: the threshold stays fp32 (a step of s would round away in
        16 bits) and the statistics float64 (token counts stop at 256 in bf16, overflow in fp16)."""
        out = super()._apply(fn, recurse)
        tau = self._parameters.get(THRESHOLD)
        if tau is not None and tau.dtype in (torch.float16, torch.bfloat16):
            tau.data = tau.data.float()  # the same Parameter: an optimizer holding it keeps it
            if tau.grad is not None:
                tau.grad = tau.grad.float()
        stats = self._buffers.get(STATS)
        if stats is not None and stats.dtype != torch.float64:
            self._buffers[STATS] = stats.to(torch.float64)
        return out

    def merge(self, *args: Any, **kwargs: Any) -> None:
        names = kwargs.get("adapter_names", args[1] if len(args) > 1 else None)  # merge(safe_merge, adapter_names)
        gated = self._ts_ctrl.adapter_name
        if names is not None and gated is not None and gated not in names:  # another adapter: not gated
            return super().merge(*args, **kwargs)
        # every gated layer of the model, not only this one: peft merges layer by layer, and a refusal half-way
        # through merge_and_unload would leave the earlier layers merged and unloaded for good
        taus = [float(m._parameters[THRESHOLD].detach().max()) for m in self._ts_ctrl.modules]
        above = sum(not t <= 0 for t in taus)  # a NaN threshold gates every token out: not mergeable either
        if above:
            raise RuntimeError(
                f"cannot merge a token-selective adapter: {above} of {len(taus)} gated modules have a threshold "
                f"> 0 or not finite (largest {max(taus, key=lambda t: (t == t, t)):.4g}), and merged weights would "
                "apply the update to every token. Keep the adapter unmerged (the gate stays on at inference); "
                "nothing was merged."
            )
        return super().merge(*args, **kwargs)


_GATED_CLASSES: dict[type, type] = {}


def _gated_class(cls: type, update) -> type:
    if cls not in _GATED_CLASSES:
        _GATED_CLASSES[cls] = type(f"TS{cls.__name__}", (GatedLayer, cls), {"_ts_update": staticmethod(update)})
    return _GATED_CLASSES[cls]


def _is_adapter_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .adapter import ParallelAdapter

    return isinstance(module, (BaseTunerLayer, ParallelAdapter))


def controller(model: nn.Module) -> TSController:
    """Return the model's TSController; raise if token selection is not enabled."""
    ctrl = getattr(model, "_tspeft", None)
    if ctrl is None:
        raise RuntimeError("token selection is not enabled on this model; call tspeft.enable(model, TSConfig(...))")
    return ctrl


def gated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Return the model's gated layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLayer)}


def checkpoint_context_fn(model: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """Return a ``context_fn`` for non-reentrant gradient checkpointing that replays each forward's padding mask.

    A checkpointed block runs its forward again during backward; the gates read the padding mask the
    model's pre-hook captured, which by then belongs to the latest forward. When several forwards with
    different masks precede one backward (e.g. chosen and rejected sequences, or any loss over two
    batches), the recompute of the earlier ones would count the wrong tokens in g_k. Pass this as
    ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
    "context_fn": tspeft.checkpoint_context_fn(model)})`` (``tspeft train`` does); reentrant
    checkpointing has no such hook.
    """
    ctrl = controller(model)

    def context_fn() -> tuple[Any, Any]:
        # called when the checkpointed block runs forward: its masks are the current ones
        return contextlib.nullcontext(), _masks_as(ctrl, ctrl.masks())

    return context_fn


@contextlib.contextmanager
def _masks_as(ctrl: TSController, masks: tuple[Any, Any, Any]) -> Iterator[None]:
    """Run a block's recompute with the padding masks of its original forward, then restore the current ones."""
    current = ctrl.masks()
    ctrl.set_masks(masks)
    try:
        yield
    finally:
        ctrl.set_masks(current)


def is_enabled(model: nn.Module) -> bool:
    """Return True if token selection is on for `model`."""
    return getattr(model, "_tspeft", None) is not None


def _check_active_adapters(model: nn.Module) -> str | None:
    """Return the peft model's one active adapter (None: parallel adapters); raise if there are several."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    active = model.active_adapters
    if not isinstance(active, str) and len(active) != 1:
        raise ValueError(
            f"token selection needs exactly one active adapter, the model has {list(active)}; "
            "call model.set_adapter(name) first"
        )
    return active if isinstance(active, str) else active[0]


def _gateable(model: nn.Module, adapter: str | None) -> dict[str, nn.Module]:
    """Return the adapter layers that hold `adapter` by name: not a layer that only another adapter targets
    (peft passes its input through, and so does the gate by not being there), nor one inside peft's
    auxiliary wrappers (modules_to_save copies, trainable tokens), which are no update to gate."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    aux = tuple(f"{n}." for n, m in model.named_modules() if n and isinstance(m, AuxiliaryTrainingWrapper))
    out = {}
    for name, mod in model.named_modules():
        if not _is_adapter_layer(mod) or name.startswith(aux):
            continue
        held = getattr(mod, "adapter_layer_names", ())
        if adapter is not None and held and not any(adapter in getattr(mod, a, {}) for a in held):
            continue
        out[name] = mod
    return out


def enable(model: nn.Module, config: TSConfig | None = None) -> nn.Module:
    """Return `model` with every targeted adapter layer gated per token (thresholds start at tau_0).

    model: a peft model (LoRA, DoRA, AdaLoRA) or a model with tspeft parallel adapters.
    """
    config = TSConfig() if config is None else config
    if not isinstance(config, TSConfig):
        raise TypeError(f"config must be a tspeft.TSConfig, got {type(config).__name__}")
    if is_enabled(model):
        raise RuntimeError("token selection is already enabled on this model; call tspeft.disable(model) first")
    active = _check_active_adapters(model)
    targets = config.target_modules  # name suffixes, or one regex, as peft reads them
    candidates = {n: m for n, m in _gateable(model, active).items() if targets is None or _matches(n, targets)}
    problems = []
    for name, mod in candidates.items():
        if gated_forward_for(mod) is None:
            problems.append(f"{name}: {type(mod).__module__}.{type(mod).__name__}")
        elif (why := unsupported_reason(mod)) is not None:
            problems.append(f"{name}: {why}")
    if problems:
        raise TypeError(
            "tspeft cannot gate these adapter layers:\n  " + "\n  ".join(problems[:20])
            + f"\nSupported: {SUPPORTED}. Restrict TSConfig.target_modules to supported layers."
        )
    if not candidates:
        raise ValueError(
            "no adapter layer to gate: build the model with peft.get_peft_model (LoRA, DoRA, AdaLoRA) or "
            "tspeft.add_parallel_adapter first"
            + (f"; TSConfig.target_modules={config.target_modules} matched nothing" if config.target_modules else "")
        )
    ctrl = TSController(config)
    if isinstance(getattr(model, "active_adapter", None), str):
        ctrl.adapter_name = model.active_adapter
    recompute = set(_recompute_z(list(candidates.values()), config.recompute_z))
    for mod in candidates.values():
        update = gated_forward_for(mod)
        device = next(mod.parameters()).device
        mod.register_parameter(
            THRESHOLD, nn.Parameter(torch.full((1,), config.init_threshold, device=device, dtype=torch.float32))
        )
        mod.register_buffer(STATS, torch.zeros(4, device=device, dtype=torch.float64), persistent=False)
        mod.__class__ = _gated_class(type(mod), update)
        mod._ts_ctrl = ctrl
        mod.__dict__[KEEP_Z] = mod not in recompute
    ctrl.modules = list(candidates.values())
    model._tspeft = ctrl
    stacks = _encoder_decoder(model)
    if stacks is not None:
        in_decoder = {id(m) for m in stacks[1].modules()}
        for mod in candidates.values():
            mod.__dict__[DECODER] = id(mod) in in_decoder
    _ddp_ignore(model, [f"{name}.{STATS}" for name in candidates], add=True)
    # on the peft wrapper and on the transformers model inside: generate() calls the inner model directly;
    # and, leniently, on that model's backbone (e.g. LlamaModel), which a user may call without the head
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(inner, "base_model", None)
    hooked = {model: "top", inner: "top"}
    if isinstance(backbone, nn.Module) and backbone not in hooked:
        hooked[backbone] = "lenient"
    if stacks is not None:  # generate() runs the encoder alone, then the decoder with its own mask
        hooked.update({stacks[0]: "encoder", stacks[1]: "decoder"})
    if callable(getattr(type(inner), "prepare_inputs_for_generation", None)):
        inner.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_keeping_mask, inner)
    for mod, kind in hooked.items():
        mod._ts_mask_ctrl = ctrl  # the hook finds the controller through the module: right for a deepcopy too
        hook = _capture_attention_mask(model, mod, lenient=kind == "lenient", decoder=kind == "decoder")
        ctrl.hook_handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        if kind == "top":  # count the calls under way, so that the backbone knows it runs inside one
            ctrl.hook_handles += [mod.register_forward_pre_hook(_enter), mod.register_forward_hook(_leave, always_call=True)]
    _wrap_save(model)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Return `model` with the gates removed (thresholds dropped): the dense adapter again."""
    controller(model)  # raises if token selection is not on
    _ddp_ignore(model, [f"{name}.{STATS}" for name in gated_modules(model)], add=False)
    for mod in gated_modules(model).values():
        mod.__class__ = next(c for c in type(mod).__mro__[1:] if c is not GatedLayer and not issubclass(c, GatedLayer))
        del mod._parameters[THRESHOLD]
        del mod._buffers[STATS]
        del mod._ts_ctrl
        mod.__dict__.pop(KEEP_Z, None)
        mod.__dict__.pop(DECODER, None)
    _release_hooks(model)
    controller(model).modules = []
    for wrapped in (model, getattr(model, "base_model", None)):
        if getattr(type(wrapped), "_ts_wrapped", False):
            wrapped.__class__ = type(wrapped).__mro__[1]
    del model._tspeft
    return model


def _encoder_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Return (encoder, decoder) of an encoder-decoder transformers model (T5, BART, ...), else None."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if not getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        return None
    try:
        encoder, decoder = inner.get_encoder(), inner.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    ok = isinstance(encoder, nn.Module) and isinstance(decoder, nn.Module) and encoder is not decoder
    return (encoder, decoder) if ok else None


def _release_hooks(model: nn.Module, ctrl: TSController | None = None) -> None:
    """Remove the padding-mask pre-hooks (every one of the controller's) and the controller references from
    the model's modules."""
    ctrl = controller(model) if ctrl is None else ctrl
    for handle in ctrl.hook_handles:
        handle.remove()
    ctrl.hook_handles.clear()
    for mod in model.modules():
        if "_ts_mask_ctrl" in mod.__dict__:
            del mod._ts_mask_ctrl
        prepare = mod.__dict__.get("prepare_inputs_for_generation")
        if getattr(prepare, "__func__", None) is _prepare_inputs_keeping_mask:
            del mod.prepare_inputs_for_generation


def _recompute_z(modules: list[nn.Module], policy: str) -> list[nn.Module]:
    """Return the modules that compute z again in backward instead of keeping it (``TSConfig.recompute_z``).

    "auto": every gated module keeps a one-byte mask per token that dense PEFT does not; a z not kept saves
    r elements per token, at least 2 r bytes (bf16/fp16). The first recomputable modules are taken until
    their 2 r sum covers one byte per gated module, so that the masks cost no memory overall.
    """
    eligible = [(m, r) for m in modules if (r := recomputable_rank(m))]
    if policy == "none":
        return []
    if policy == "all":
        return [m for m, _ in eligible]
    chosen, covered = [], 0
    for mod, r in eligible:
        if covered >= len(modules):
            break
        chosen.append(mod)
        covered += 2 * r
    return chosen


def _ddp_ignore(model: nn.Module, names: list[str], *, add: bool) -> None:
    """Add (or remove) the statistics buffers to the names DistributedDataParallel leaves alone.

    DDP's broadcast_buffers copies rank 0's buffers into every other rank before each forward, which would
    overwrite each rank's token counts with rank 0's. Statistics are per rank (sum them across ranks for
    the global count); thresholds are parameters and are averaged like any other.
    """
    key = "_ddp_params_and_buffers_to_ignore"
    current = [n for n in vars(model).get(key, []) if n not in names] + (names if add else [])
    if current:
        setattr(model, key, current)
    else:
        vars(model).pop(key, None)


def _capture_attention_mask(model: nn.Module, module: nn.Module, lenient: bool = False, decoder: bool = False):
    """Return a forward pre-hook for `module` that stores the call's 2-D attention mask on model's controller.

    lenient (the backbone inside the hooked model): called inside the model's own call, it leaves the mask
    the model captured (the model may pass it on transformed); called alone, it captures its own.
    decoder (an encoder-decoder model's decoder): the mask is the decoder's, and the call's
    ``encoder_hidden_states`` is remembered as the encoder's output.
    """
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        params = []

    def argument(name: str, args: tuple, kwargs: dict) -> Any:
        value = kwargs.get(name)
        if value is None and name in params and len(args) > params.index(name):
            value = args[params.index(name)]
        return value

    def hook(hooked: nn.Module, args: tuple, kwargs: dict) -> None:
        if lenient and hooked._ts_mask_ctrl.depth > 0:
            return  # inside the model's own call: its mask is captured, and may reach here transformed
        strict(hooked, args, kwargs)

    def strict(hooked: nn.Module, args: tuple, kwargs: dict) -> None:
        ctrl = hooked._ts_mask_ctrl
        cached = any(kwargs.get(k) is not None for k in _CACHE_ARGS)
        given, ctrl.generation_mask = ctrl.generation_mask, None  # one call's: never read by a later one
        raw = argument("attention_mask", args, kwargs)
        if cached and given is not None and not decoder and _built_by_transformers(raw):
            raw = given  # what generate() passed before building its own 4-D mask (or dict of them)
        mask = _as_token_mask(raw)
        ids, embeds = argument("input_ids", args, kwargs), argument("inputs_embeds", args, kwargs)
        what, tokens = ("input_ids", ids.shape) if isinstance(ids, torch.Tensor) else ("inputs_embeds", None)
        if tokens is None and isinstance(embeds, torch.Tensor):
            tokens = embeds.shape[:-1]
        if tokens is not None:
            _check_tokens(tuple(tokens), what, mask, cached)
            if mask is not None and mask.shape[-1] > tokens[-1]:  # KV cache: the new tokens are the mask's last
                mask = mask[..., -tokens[-1]:]
        if not decoder:
            ctrl.token_mask = mask
            return
        ctrl.decoder_mask = mask
        states = argument("encoder_hidden_states", args, kwargs)
        ctrl.encoder_states = (states.data_ptr(), tuple(states.shape)) if isinstance(states, torch.Tensor) else None

    return hook


def _built_by_transformers(mask: Any) -> bool:
    """Return True for a mask transformers builds itself: 4-D, or a dict of them per layer type."""
    return isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


def _prepare_inputs_keeping_mask(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's own prepare_inputs_for_generation, after noting the 2-D padding mask generate() gave it."""
    ctrl = self.__dict__.get("_ts_mask_ctrl")
    mask = kwargs.get("attention_mask")
    if ctrl is not None:
        ctrl.generation_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return type(self).prepare_inputs_for_generation(self, *args, **kwargs)


def _enter(module: nn.Module, args: tuple) -> None:
    module._ts_mask_ctrl.depth += 1


def _leave(module: nn.Module, args: tuple, output: Any) -> None:
    module._ts_mask_ctrl.depth -= 1


_CACHE_ARGS = ("cache", "past_key_values")  # transformers 5 calls the KV cache `cache`, 4.x `past_key_values`


def _check_tokens(tokens: tuple[int, ...], what: str, mask: torch.Tensor | None, cached: bool) -> None:
    """Raise a ValueError naming the fix for an empty batch or a padding mask that does not fit the input."""
    if len(tokens) >= 2 and tokens[0] == 0:
        raise ValueError(
            f"tspeft: empty batch ({what} of shape {tokens}); there is no token to gate. "
            "Skip empty batches in the data loader or collator."
        )
    if mask is None:
        return
    m, n = mask.shape[-1], tokens[-1]
    # with a KV cache the mask covers past + current tokens, so it may be longer than the new input
    if tuple(mask.shape[:-1]) != tokens[:-1] or m < n or (m > n and not cached):
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not match {what} of shape {tokens}: tspeft needs "
            "one mask entry per input token (1 real, 0 padding) to keep padding out of the thresholds' "
            "gradient and of sparsity. Pass the attention_mask built with this batch (same batch size and "
            "sequence length)."
        )


def _as_token_mask(mask: Any) -> torch.Tensor | None:
    """Return a padding mask as bool (batch, seq) [or (batch, choices, seq)], or raise naming the fix."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() not in (2, 3):
        raise ValueError(
            f"tspeft needs a padding mask of shape (batch, seq_len) with 1 for real tokens and 0 for padding; "
            f"got attention_mask of shape {tuple(mask.shape)}. Pass the tokenizer's 2-D attention_mask "
            "(4-D additive masks cannot tell padding apart)."
        )
    return mask if mask.dtype == torch.bool else mask != 0


_SAVE_CLASSES: dict[type, type] = {}


def _wrap_save(model: nn.Module) -> None:
    """Swap a PeftModel's class for one whose save_pretrained also writes the TS state."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    cls = type(model)
    if cls not in _SAVE_CLASSES:

        def save_pretrained(self, save_directory, *args, **kwargs):
            from .io import ADAPTER_FILES, _adapter_dir, save_ts_state, staged_save

            bound = inspect.signature(cls.save_pretrained).bind_partial(self, save_directory, *args, **kwargs)
            if not bound.arguments.get("is_main_process", True):  # other ranks: peft writes nothing, nor do we
                return cls.save_pretrained(self, save_directory, *args, **kwargs)

            # peft saves every parameter of an adapter layer; the thresholds belong in the TS state only
            given = kwargs.get("state_dict")  # gathered by the caller (FSDP, DeepSpeed): the thresholds come from it
            state = self.state_dict() if given is None else given
            kwargs["state_dict"] = {k: v for k, v in state.items() if not k.endswith("." + THRESHOLD)}

            def write(staging):
                cls.save_pretrained(self, str(staging), *args, **kwargs)
                if _adapter_dir(self, staging).is_dir() and any(
                    (_adapter_dir(self, staging) / f).is_file() for f in ADAPTER_FILES
                ):  # not when selected_adapters leaves the gated adapter out: its TS state stays as it was
                    save_ts_state(self, staging, state_dict=given)

            staged_save(save_directory, write)

        def merge_and_unload(self, *args, **kwargs):
            merged = self.base_model.merge_and_unload(*args, **kwargs)  # refused whole if a threshold is > 0
            _release_hooks(self)  # the plain model it returns keeps no tspeft hook
            return merged

        def unload(self, *args, **kwargs):
            plain = self.base_model.unload(*args, **kwargs)
            _release_hooks(self)
            return plain

        methods = {"save_pretrained": save_pretrained, "merge_and_unload": merge_and_unload, "unload": unload}
        _SAVE_CLASSES[cls] = type(f"TS{cls.__name__}", (cls,), {**methods, "_ts_wrapped": True})
    model.__class__ = _SAVE_CLASSES[cls]
    _wrap_tuner(model.base_model)


def _wrap_tuner(tuner: nn.Module) -> None:
    """Swap the peft tuner's class (LoraModel, ...) for one whose merge_and_unload and unload, called on the
    tuner directly (``model.base_model.merge_and_unload()``), also release the hooks from the plain model."""
    cls = type(tuner)
    if getattr(cls, "_ts_wrapped", False):
        return
    if cls not in _SAVE_CLASSES:

        def released(method: str):
            def call(self, *args, **kwargs):
                plain = getattr(cls, method)(self, *args, **kwargs)  # refused whole if a threshold is > 0
                ctrl = getattr(self.model, "_ts_mask_ctrl", None)
                if ctrl is not None:
                    _release_hooks(self.model, ctrl)
                return plain

            return call

        methods = {m: released(m) for m in ("merge_and_unload", "unload")}
        _SAVE_CLASSES[cls] = type(f"TS{cls.__name__}", (cls,), {**methods, "_ts_wrapped": True})
    tuner.__class__ = _SAVE_CLASSES[cls]
