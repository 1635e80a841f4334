"""``tspeft.TSTrainer``: ``transformers.Trainer`` for a token-selective (or dense) peft model.

    model = get_peft_model(base, LoraConfig(...))
    tspeft.enable(model, tspeft.TSConfig(lam=1e-5, s=1e-3))
    trainer = tspeft.TSTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                     # or trainer.train(resume_from_checkpoint=True)

What it changes in ``Trainer``, and nothing else:

- the optimizer is :func:`tspeft.optimizer` (adapters as ``args`` say, plus the thresholds' group: lr = s,
  betas (0.9, 0.98), no weight decay, following the learning-rate schedule), and an fp16 loss scaler is
  attached so that lambda's term is scaled like the loss's;
- gradient clipping (and the logged ``grad_norm``) covers the adapters only, never the thresholds;
- every logging step adds ``ts_sparsity`` (share of real training tokens whose update was skipped since
  the previous logging step, summed over data-parallel ranks) and ``ts_threshold_mean`` to the logs, so they
  reach TensorBoard, W&B or whatever ``report_to`` names, and reports threshold updates skipped for a
  non-finite ``g_k``; ``evaluate``/``predict`` add ``eval_ts_sparsity`` (their prefix) for the evaluated
  tokens, which do not count in the training window;
- checkpoints hold the thresholds and their optimizer state (the model's ``save_pretrained`` writes
  them), and resuming loads them back; for a model with parallel adapters, checkpoints and ``save_model``
  hold what ``tspeft.save_pretrained`` writes (adapters and thresholds, not the whole model), which
  ``tspeft.from_pretrained`` loads;
- a peft AdaLoRA model gets ``update_and_allocate`` after every optimizer step (peft leaves it to the loop);
- a multiple-choice batch from :func:`tspeft.data.collate` with ``return_choice_mask=True`` has its filler
  choices (questions with fewer choices than the batch's widest) kept out of the loss, label smoothing too;
- a model whose loss is a per-batch mean although its forward takes ``**kwargs`` (BERT's classifiers,
  transformers' generic sequence classifier) is scaled as one under gradient accumulation and data
  parallelism (Trainer alone would take it for a loss divided by ``num_items_in_batch``);
- ``gradient_checkpointing=True`` checkpoints non-reentrantly with :func:`tspeft.checkpoint_context_fn`
  (``use_reentrant=True`` warns); resuming with another threshold rule than the checkpoint's is refused;
  an optimizer it built for thresholds since replaced (``disable``, then ``enable``) is built again.

A dense peft model (token selection not enabled) trains as with ``Trainer``, AdaLoRA's allocation included.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from .config import CONFIG_NAME
from .io import (
    ADAPTER_WEIGHTS,
    STATE_NAME,
    _adapter_dir,
    is_parallel_adapter_model,
    load_parallel_adapter_weights,
    load_ts_state,
    save_pretrained,
)
from .model import STATS, checkpoint_context_fn, gated_modules, is_enabled
from .optim import (
    TSOptimizer,
    adapter_parameters,
    attach_grad_scaler,
    optimizer,
    report_skipped_updates,
    threshold_parameters,
)
from .stats import all_reduce_stats, overall_sparsity, reset_stats, thresholds


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside a data-parallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class AdaLoraAllocation(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after every optimizer step, before gradients are zeroed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)
        self.calls += 1


def _loss_ignores_item_count(model: nn.Module) -> bool:
    """Return True if the transformers model's forward computes a per-batch mean loss of its own, though it
    takes ``**kwargs``: a loss class (BERT's CrossEntropyLoss) or ``self.loss_function(...)`` called without
    passing the keyword arguments on (transformers' generic sequence classifier: Llama, Qwen, ...). False
    where the loss gets ``num_items_in_batch`` (the causal LMs', ViT's ``loss_function(..., **kwargs)``), where
    the forward hands labels and keyword arguments on (a subclass's ``super().forward``, a wrapper), where it
    computes no loss, where the model declares ``accepts_loss_kwargs``, or where its source cannot be read."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if "accepts_loss_kwargs" in dir(type(inner)):  # the model says which it is: Trainer already followed it
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(inner).forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]

    def name(call: ast.Call) -> str:
        return getattr(call.func, "attr", getattr(call.func, "id", ""))

    def passes_kwargs(call: ast.Call) -> bool:
        return any(k.arg is None for k in call.keywords)

    def mentions(call: ast.Call, word: str) -> bool:
        return any(isinstance(n, ast.Name) and n.id == word for n in ast.walk(call)) or any(
            k.arg == word for k in call.keywords)

    if any(mentions(c, "num_items_in_batch") for c in calls):
        return False
    if any(passes_kwargs(c) and mentions(c, "labels") for c in calls):
        return False  # the labels and the keyword arguments go on to a loss elsewhere
    losses = [c for c in calls if name(c) == "loss_function"]
    if losses:
        return not any(passes_kwargs(c) for c in losses)
    return any(name(c) in ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss", "loss_fct") for c in calls)


def _is_adalora(model: nn.Module) -> bool:
    from peft.tuners.adalora import AdaLoraModel

    return isinstance(getattr(model, "base_model", None), AdaLoraModel)


class TSTrainer(Trainer):
    """``transformers.Trainer`` with tspeft's optimizer, threshold-free clipping, sparsity in the logs and
    threshold-aware checkpoints (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ts_built_optimizer = None  # the optimizer create_optimizer built (not one passed in)
        model = unwrap(self.model)
        if _is_adalora(model):
            self.add_callback(AdaLoraAllocation(model))
        if self.model_accepts_loss_kwargs and _loss_ignores_item_count(model):
            # Trainer takes a forward with **kwargs (BERT's classifiers) for one whose loss divides by
            # num_items_in_batch, so it neither divides the loss by the gradient-accumulation steps nor leaves it
            # unscaled across data-parallel ranks: the loss, and mu in g_k against lambda's term, would grow
            # with both. Such a model's loss is a per-batch mean; Trainer then scales it as one.
            self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model=None):
        model = model if model is not None else self.model
        built = self._ts_built_optimizer
        current = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper after a train()
        if built is not None and current is built and not _rules_thresholds(unwrap(model), built):
            # built by an earlier train() for thresholds since dropped (tspeft.disable, then enable again):
            # build it anew for the model as it is now, with its scheduler, and wrap the model again: a
            # DistributedDataParallel made for the old parameters would not average the new thresholds' gradients
            self.optimizer = self.lr_scheduler = None
            self.model_wrapped = self.model
        if is_enabled(unwrap(model)):
            if self.optimizer is None:  # not passed in by the caller (optimizers=(...))
                if not str(getattr(self.args.optim, "value", self.args.optim)).startswith("adamw"):
                    warnings.warn(f"tspeft.TSTrainer: optim={self.args.optim!r} is not used: a token-selective "
                                  "model trains with tspeft.optimizer (AdamW and the threshold rule)", stacklevel=2)
                self.optimizer = optimizer(unwrap(model), lr=self.args.learning_rate,
                                           weight_decay=self.args.weight_decay, eps=self.args.adam_epsilon,
                                           betas=(self.args.adam_beta1, self.args.adam_beta2))
                self._ts_built_optimizer = self.optimizer
            else:
                _check_thresholds_optimized(unwrap(model), self.optimizer)
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:  # whoever built the optimizer: lambda's term must be scaled like the loss
                attach_grad_scaler(unwrap(model), scaler)
        if self.optimizer is None:
            self._ts_built_optimizer = super().create_optimizer(model)
        return self.optimizer

    def _clip_grad_norm(self, model):
        params = adapter_parameters(unwrap(model))  # thresholds stay out of clipping (see tspeft.clip_grad_norm_)
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = self.accelerator.clip_grad_norm_(adapter_parameters(unwrap(model)), float("inf"))
        return grad_norm

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and ``save_model`` of a model with parallel adapters hold what ``tspeft.save_pretrained``
        writes (the adapters, thresholds and their rule state), as a peft model's hold its adapter, not the
        whole model; ``tspeft.from_pretrained(base, folder)`` loads them. A state dict gathered by DeepSpeed or
        FSDP goes to Trainer's own saving."""
        target = unwrap(self.model)
        if state_dict is not None or not is_parallel_adapter_model(target):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        save_pretrained(target, output_dir)
        processor = self.processing_class
        if processor is None:  # as Trainer: else the data collator's tokenizer, if it has one
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = unwrap(model if model is not None else self.model)
        if is_enabled(target):
            saved = _adapter_dir(target, resume_from_checkpoint)  # a subfolder for an adapter not named default
            if (saved / CONFIG_NAME).is_file():
                _check_resumed_rule(target, saved)
        elif (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            raise ValueError(
                f"{resume_from_checkpoint} is a token-selective checkpoint, but token selection is not enabled on "
                "this model: call tspeft.enable(model, config) (the run's TSConfig) before resuming"
            )
        if not _load_parallel_adapters(target, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if is_enabled(target) and not _whole_model_checkpoint(target, resume_from_checkpoint):
                load_ts_state(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target, best = unwrap(self.model), self.state.best_model_checkpoint
        if best is not None and _load_parallel_adapters(target, best):
            return
        super()._load_best_model()  # the adapter's weights of the best checkpoint ...
        if is_enabled(target) and best is not None and not _whole_model_checkpoint(target, best):
            load_ts_state(target, best)  # ... and its thresholds, which peft's adapter file does not hold

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        model = unwrap(self.model)
        if not is_enabled(model):
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        with _training_stats_kept(model):  # the evaluated tokens are counted apart from the training window's
            reset_stats(model)
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            all_reduce_stats(model)  # data parallel: every rank evaluates (a collective on every rank)
            output.metrics[f"{metric_key_prefix}_ts_sparsity"] = overall_sparsity(model)
        return output

    def train(self, *args: Any, **kwargs: Any):
        if is_enabled(unwrap(self.model)):
            reset_stats(unwrap(self.model))  # the first window counts this run's training tokens only
        with _checkpointing_replays_masks(self.model, unwrap(self.model)):
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        choice_mask = inputs.pop("choice_mask", None)
        labels = inputs.get("labels")  # read first: with a label smoother, Trainer takes them out of inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if choice_mask is not None and labels is not None:
            # the model's cross-entropy counts filler choices (pad rows) as wrong answers; the same loss without
            # them (label smoothing spread over the real choices only), with whatever scaling the model or
            # Trainer gave its own (gradient accumulation)
            logits = outputs.logits.float()
            smoothing = self.args.label_smoothing_factor if self.label_smoother is not None else 0.0
            dense = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
            masked = _choice_cross_entropy(logits, labels, choice_mask, smoothing)
            loss = masked * (loss / dense).detach()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        model = unwrap(self.model)
        training = is_enabled(model) and "loss" in logs  # a training logging step (not an evaluation's)
        if training:
            report_skipped_updates(model)  # threshold updates skipped for a non-finite g_k (read here on CUDA)
            all_reduce_stats(model)  # data parallel: every rank's tokens (a collective: every rank logs)
            taus = list(thresholds(model).values())
            logs = {**logs, "ts_sparsity": overall_sparsity(model), "ts_threshold_mean": sum(taus) / len(taus)}
        super().log(logs, *args, **kwargs)  # callbacks' on_log run here and may read module_stats
        if training:
            reset_stats(model)  # each logging step reports the tokens since the previous one


def _check_thresholds_optimized(model: nn.Module, opt: Any) -> None:
    """Warn when an optimizer passed in does not train the thresholds with tspeft's rule."""
    taus = {id(p) for p in threshold_parameters(model).values()}
    inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    ruled = {id(p) for g in getattr(inner, "param_groups", []) if g.get("ts_threshold") for p in g["params"]}
    if not isinstance(inner, TSOptimizer) or not taus <= ruled:
        warnings.warn(
            "tspeft.TSTrainer: the optimizer passed in does not train the thresholds with tspeft's rule (Eq. 16-20: "
            "lr = s, betas of TSConfig, no weight decay); build it with tspeft.optimizer(model, lr=...) instead",
            stacklevel=3,
        )


def _choice_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, choice_mask: torch.Tensor,
                          smoothing: float) -> torch.Tensor:
    """Return the mean cross-entropy over the real choices only, label smoothing spread over those."""
    logp = logits.masked_fill(~choice_mask, float("-inf")).log_softmax(-1)
    valid = labels != -100  # cross_entropy's ignore_index: such a question does not count
    loss = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    if smoothing != 0.0:
        uniform = -(logp.masked_fill(~choice_mask, 0.0).sum(-1) / choice_mask.sum(-1))
        loss = (1.0 - smoothing) * loss + smoothing * uniform
    return torch.where(valid, loss, 0.0).sum() / valid.sum()


def _rules_thresholds(model: nn.Module, opt: Any) -> bool:
    """Return True if `opt` holds exactly the model's thresholds (none for a dense model)."""
    held = {id(p) for g in opt.param_groups if g.get("ts_threshold") for p in g["params"]}
    taus = {id(p) for p in threshold_parameters(model).values()} if is_enabled(model) else set()
    return held == taus


RULE_FIELDS = ("s", "betas", "eps", "rule", "follow_schedule")
"""TSConfig fields that a resumed optimizer takes from its checkpoint, whatever the model's config says."""


def _check_resumed_rule(model: nn.Module, checkpoint: Path) -> None:
    from .config import TSConfig
    from .model import controller

    saved, current = TSConfig.load(checkpoint).to_dict(), controller(model).config.to_dict()
    changed = [f"{k} {saved[k]!r} -> {current[k]!r}" for k in RULE_FIELDS if saved.get(k) != current.get(k)]
    if changed:
        raise ValueError(
            f"{checkpoint} was trained with another threshold rule ({'; '.join(changed)}): a resumed optimizer "
            "keeps the checkpoint's, so the change would not apply. Enable the model with the checkpoint's "
            f"config (tspeft.TSConfig.load({str(checkpoint)!r})), or start a new run"
        )


_CHECKPOINTING_KWARGS = {"activation_checkpointing_enable": "activation_checkpointing_kwargs",
                         "gradient_checkpointing_enable": "gradient_checkpointing_kwargs"}


@contextlib.contextmanager
def _checkpointing_replays_masks(called: nn.Module, model: nn.Module) -> Iterator[None]:
    """Within the block, Trainer's activation checkpointing (``TrainingArguments(gradient_checkpointing=True)``)
    of a token-selective model is non-reentrant with :func:`tspeft.checkpoint_context_fn`, so that a
    recompute reads the padding mask of the forward it replays; ``use_reentrant=True`` warns instead."""
    patched = []
    if is_enabled(model):
        for name, key in _CHECKPOINTING_KWARGS.items():
            original = getattr(called, name, None)
            if not callable(original) or name in called.__dict__:
                continue

            def enable(*args: Any, _original=original, _key=key, **kwargs: Any) -> Any:
                options = dict((args[0] if args else kwargs.pop(_key, None)) or {})
                if options.get("use_reentrant") is True:
                    warnings.warn(
                        "tspeft.TSTrainer: reentrant activation checkpointing cannot replay the padding mask of "
                        "each forward in its recompute; with several forwards before one backward, g_k counts "
                        "the wrong tokens. Leave use_reentrant unset (non-reentrant, with the replay)",
                        stacklevel=2,
                    )
                else:
                    options.setdefault("use_reentrant", False)
                    replay = checkpoint_context_fn(model)
                    own = options.get("context_fn")  # the user's (a selective-checkpointing policy): both apply
                    options["context_fn"] = replay if own is None else _both_contexts(own, replay)
                return _original(*args[1:], **{_key: options}, **kwargs)

            called.__dict__[name] = enable
            patched.append(name)
    try:
        yield
    finally:
        for name in patched:
            called.__dict__.pop(name, None)


def _both_contexts(first: Any, second: Any) -> Any:
    """Return a checkpoint ``context_fn`` that enters both functions' forward and recompute contexts."""

    def context_fn() -> tuple[Any, Any]:
        (fwd1, rec1), (fwd2, rec2) = first(), second()
        return _stacked(fwd1, fwd2), _stacked(rec1, rec2)

    return context_fn


@contextlib.contextmanager
def _stacked(*contexts: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def _load_parallel_adapters(model: nn.Module, checkpoint: str) -> bool:
    """Load a parallel-adapter checkpoint written by ``TSTrainer._save`` (adapters, thresholds and their rule
    state) into `model`; return False, loading nothing, for any other checkpoint."""
    if not is_parallel_adapter_model(model) or not (Path(checkpoint) / ADAPTER_WEIGHTS).is_file():
        return False
    load_parallel_adapter_weights(model, checkpoint)
    if is_enabled(model):
        load_ts_state(model, checkpoint)
    return True


def _whole_model_checkpoint(model: nn.Module, checkpoint: str) -> bool:
    """Return True if a checkpoint saved the whole model (parallel adapters: not a peft model), thresholds
    included as parameters, so that Trainer's own loading brought them back."""
    from peft import PeftModel

    return not isinstance(model, PeftModel) and not (Path(checkpoint) / STATE_NAME).is_file()


@contextlib.contextmanager
def _training_stats_kept(model: nn.Module) -> Iterator[None]:
    """Within the block, the gates' statistics may count other tokens; afterwards they are as before."""
    if not is_enabled(model):
        yield
        return
    saved = {n: getattr(m, STATS).clone() for n, m in gated_modules(model).items()}
    try:
        yield
    finally:
        for n, m in gated_modules(model).items():
            getattr(m, STATS).copy_(saved[n])
