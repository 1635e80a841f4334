"""One fine-tuning run on top of ``transformers.Trainer``: dense PEFT or its token-selective twin.

``train(RunConfig(...))`` builds the model and adapter, trains, evaluates on the test split (or, with
``eval_on="val"``, on the ``val_fraction`` of train held out for choosing lambda and s) and writes a run
directory: ``run.json`` (scores, sparsity, per-module statistics, provenance), ``log.jsonl`` (per logging step: loss, lr,
thresholds and sparsity of every module), ``adapter/`` (the saved adapter, thresholds included) and
``checkpoints/`` (adapters, thresholds and optimizer state; ``resume=True`` continues a killed run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TSConfig
from .data import collate, compute_metrics, encode_examples, load_task, score_choices
from .data.formatting import context_limit
from .io import atomic_write
from .model import checkpoint_context_fn, enable, is_enabled
from .provenance import provenance
from .stats import module_stats, overall_sparsity, reset_stats

METHODS = ("lora", "dora", "adalora", "adapter")
EVAL_SPLITS = ("test", "val")


@dataclass
class RunConfig:
    """Everything one run needs; every field is a command-line flag of ``tspeft train``."""

    task: str = "sst2"
    model: str = "minilm"
    method: str = "lora"
    selective: bool = True
    lam: float = 1e-5
    s: float = 1e-3
    rule: str = "adam"
    follow_schedule: bool = True  # the threshold's step follows the learning-rate schedule (alpha_k); False: alpha_k = 1
    seed: int = 0
    epochs: float = 3.0
    lr: float = 5e-4
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    rank: int = 8
    init_rank: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "Q,K,V,O,I"
    target_modules: list[str] | None = None
    rank_pattern: dict[str, int] | None = None
    adapter_hidden: int = 32
    max_length: int = 128
    max_train: int | None = 600
    max_test: int | None = 272
    test_fraction: float = 0.35
    val_fraction: float = 0.0  # share of the train split held out as validation (for choosing lam and s)
    eval_on: str = "test"  # "test", or "val" (needs val_fraction > 0): the split the run is scored on
    split_seed: int = 0
    source: str = "auto"
    data_files: dict[str, str] | None = None
    text_fields: list[str] | None = None  # --task local: the text column(s) (default: sentence1+sentence2, sentence or text)
    label_field: str | None = None  # --task local: the label column (default: label)
    logging_steps: int = 10
    save_steps: int = 50
    eval_batch_size: int = 64
    output_dir: str = "runs/run"
    resume: bool = False
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known methods: {', '.join(METHODS)}")
        for name in ("epochs", "lr", "batch_size", "rank", "max_length", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_on not in EVAL_SPLITS:
            raise ValueError(f"eval_on must be one of {EVAL_SPLITS}, got {self.eval_on!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        own_val = bool((self.data_files or {}).keys() & {"val", "validation"})  # local files may bring one
        if self.eval_on == "val" and self.val_fraction == 0.0 and not own_val:
            raise ValueError("eval_on='val' needs a validation split: set val_fraction > 0 (e.g. 0.2)")
        if self.selective:
            self.ts_config()  # validates lam, s, rule

    def ts_config(self) -> TSConfig:
        """Return the token-selection config of this run."""
        return TSConfig(lam=self.lam, s=self.s, rule=self.rule, follow_schedule=self.follow_schedule)

    @property
    def label(self) -> str:
        """Return the method's display name, e.g. TS-LoRA."""
        name = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "adapter": "Adapter"}[self.method]
        return f"TS-{name}" if self.selective else name

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Return a RunConfig from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown run settings {unknown}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------- model


def build_model(cfg: RunConfig, total_steps: int, spec) -> tuple[nn.Module, Any, str]:
    """Return (model with adapter [and gates], tokenizer, head) for the task `spec`."""
    from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model

    from .adapter import add_parallel_adapter
    from .models import load_model, target_modules

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_model(cfg.model, spec)
    head = _head_of(base)
    targets = cfg.target_modules or target_modules(base, cfg.targets)
    task_type = TaskType.CAUSAL_LM if head == "causal-lm" else TaskType.SEQ_CLS
    head_modules = _head_modules(base) if head != "causal-lm" else None
    if cfg.method == "adapter":
        model = add_parallel_adapter(base, targets, hidden=cfg.adapter_hidden, scale=cfg.alpha / cfg.rank,
                                     dropout=cfg.dropout, modules_to_save=head_modules)
    elif cfg.method == "adalora":
        if total_steps < 3:  # peft needs tinit (>= 1) < total_step - tfinal (>= 1): a budgeting phase
            raise ValueError(
                f"AdaLoRA needs at least 3 optimizer steps (warm-up, rank budgeting, final phase); this run has "
                f"{total_steps}: raise --max-train or --epochs, or lower --batch-size or --grad-accum"
            )
        model = get_peft_model(base, AdaLoraConfig(
            init_r=cfg.init_rank or 2 * cfg.rank, target_r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=targets, total_step=total_steps, tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps // 5), deltaT=max(1, total_steps // 20), task_type=task_type,
            modules_to_save=head_modules if head == "multiple-choice" else None))
    else:
        model = get_peft_model(base, LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            use_dora=cfg.method == "dora", rank_pattern=cfg.rank_pattern or {}, task_type=task_type,
            # a module given its own rank keeps the run's scale alpha / rank (peft would use alpha / its rank)
            alpha_pattern={k: cfg.alpha * r / cfg.rank for k, r in (cfg.rank_pattern or {}).items()},
            modules_to_save=head_modules if head == "multiple-choice" else None))
    if cfg.selective:
        enable(model, cfg.ts_config())
    if cfg.gradient_checkpointing:
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if cfg.selective:  # the recompute must see the padding mask of the forward it replays
            kwargs["context_fn"] = checkpoint_context_fn(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, tokenizer, head


def _head_of(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForMultipleChoice"):
        return "multiple-choice"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "causal-lm"


def _head_modules(model: nn.Module) -> list[str]:
    """Return the names of the task head's modules, which train alongside the adapter."""
    return [n for n in ("classifier", "score", "pooler.dense") if _has_module(model, n)][:1]


def _has_module(model: nn.Module, suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules())


# ---------------------------------------------------------------------------------------------- trainer


def _diverged(what: str, step: int, run_dir: Path) -> str:
    return (f"{what} at step {step}: training diverged, stopping; no adapter or result is written. The "
            f"checkpoints are in {run_dir / 'checkpoints'} (the newest may hold the diverged weights); lower the "
            "learning rate and train again, or resume from an earlier checkpoint.")


def _check_finite(model: nn.Module, step: int, run_dir: Path) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(_diverged(f"{len(bad)} trained parameter(s) are not finite, e.g. {bad[0]}",
                                           step, run_dir))


def _callbacks(run_dir: Path, model: nn.Module):
    from transformers import TrainerCallback

    class RunLog(TrainerCallback):
        """Appends one JSON line per logging step; stops the run on a non-finite loss.

        TSTrainer.log has summed the statistics over ranks and put ts_sparsity / ts_threshold_mean in the
        logs; it resets them once the callbacks have run.
        """

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            # NaN adapters give a NaN grad_norm even when the loss is finite; under fp16 the loss scaler skips a
            # step whose gradients overflow (inf grad_norm), which is no divergence
            for key in ("loss",) if args.fp16 else ("loss", "grad_norm"):
                value = logs.get(key)
                if value is not None and not math.isfinite(value):
                    raise FloatingPointError(_diverged(f"{key} is {value}", state.global_step, run_dir))
            record = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                      "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                      "threshold_mean": logs.get("ts_threshold_mean"), "sparsity": logs.get("ts_sparsity"),
                      "modules": {}}
            if is_enabled(model):
                record["modules"] = {n: {"threshold": v["threshold"], "sparsity": v["sparsity"]}
                                     for n, v in module_stats(model).items()}
            if not state.is_world_process_zero:
                return  # data parallel: one writer
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    return [RunLog()]


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, spec, head: str, records: list[dict], cfg: RunConfig) -> dict[str, Any]:
    """Return {metrics, score, sparsity, modules} on `records`; sparsity counts only these batches."""
    model.eval()
    if is_enabled(model):
        reset_stats(model)
    if head == "causal-lm":  # whole prompts, as far as the model reaches: max_length is the training cutoff
        preds = score_choices(model, tokenizer, records, batch_size=cfg.eval_batch_size // 4 or 1, spec=spec,
                              max_length=context_limit(model, tokenizer, cfg.max_length))
        labels = [int(r["label"]) for r in records]
    else:
        encoded = encode_examples(spec, records, tokenizer, max_length=cfg.max_length, head=head)
        device = next(model.parameters()).device
        preds, labels = [], []
        for i in range(0, len(encoded), cfg.eval_batch_size):
            chunk = encoded[i:i + cfg.eval_batch_size]
            batch = collate(chunk, tokenizer.pad_token_id, return_choice_mask=head == "multiple-choice")
            choice_mask = batch.pop("choice_mask", None)
            labels.extend(batch.pop("labels").tolist())
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            if choice_mask is not None:
                logits = logits.masked_fill(~choice_mask.to(device), float("-inf"))
            preds.extend(logits.squeeze(-1).tolist() if spec.is_regression else logits.argmax(-1).tolist())
    metrics = compute_metrics(spec, preds, labels)
    out = {"metrics": metrics, "score": metrics[spec.primary_metric], "metric": spec.primary_metric,
           "sparsity": None, "modules": {}}
    if is_enabled(model):
        out["sparsity"] = overall_sparsity(model)
        out["modules"] = module_stats(model)
    return out


# -------------------------------------------------------------------------------------------------- run


RUN_FILES = ("run.json", "log.jsonl", "ratios.npz", "run_config.json", "checkpoints", "adapter", "analysis")
"""What a run (and ``tspeft analyze``) writes into a run directory: what a fresh run there replaces."""
RESUME_MAY_CHANGE = ("resume", "output_dir", "logging_steps", "save_steps", "eval_batch_size")
"""Settings a resumed run may give differently from the run it continues (none changes what is trained)."""


def train(cfg: RunConfig, overwrite: bool = False) -> dict[str, Any]:
    """Run one fine-tuning, evaluate on the test (or val) split, write the run directory; return run.json's dict.

    A directory that holds a previous run is refused unless ``overwrite`` (then its files, listed in
    ``RUN_FILES``, are removed once the new run is set up, never before) or ``cfg.resume`` (then the settings
    must be the checkpoint's, and training continues from the newest whole checkpoint).
    """
    from transformers import TrainingArguments

    from .trainer import TSTrainer, unwrap

    run_dir = Path(cfg.output_dir)
    previous = [n for n in RUN_FILES if (run_dir / n).exists()]
    checkpoint = None
    if cfg.resume:
        checkpoint = _last_whole_checkpoint(run_dir / "checkpoints")
        _check_resume_settings(run_dir, cfg)
    elif previous and not overwrite:
        raise FileExistsError(
            f"{run_dir} holds a previous run ({', '.join(previous)}): pass --overwrite to replace it, --resume to "
            "continue it, or choose another --output-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    origin = provenance()  # the code that trains, taken before training (the tree may change meanwhile)
    data = _load_data(cfg)
    steps_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * cfg.grad_accum))
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    model, tokenizer, head = build_model(cfg, total_steps, data.spec)
    train_set = encode_examples(data.spec, data.train, tokenizer, max_length=cfg.max_length, head=head)
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(cfg.warmup_ratio * total_steps), max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, bf16=cfg.bf16, fp16=cfg.fp16, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=os.environ.get("TSPEFT_QUIET") == "1",
        # a non-finite loss must reach the log (RunLog stops the run), not be averaged away; under fp16 the loss
        # scaler skips such a step, so there Trainer's filter stays and the final weights are checked
        logging_nan_inf_filter=cfg.fp16,
    )
    trainer = TSTrainer(
        model=model, args=args, train_dataset=train_set,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id, return_choice_mask=head == "multiple-choice"),
        callbacks=_callbacks(run_dir, model),
    )
    if trainer.is_world_process_zero():  # everything is set up: only now touch what the directory holds
        if checkpoint is not None:
            _truncate_log(run_dir / "log.jsonl", _checkpoint_step(checkpoint))
        elif previous:
            print(f"replacing the previous run in {run_dir} ({', '.join(previous)})", flush=True)
            for name in previous:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        text = json.dumps(asdict(cfg), indent=2) + "\n"
        atomic_write(run_dir / "run_config.json", lambda tmp: Path(tmp).write_text(text))
    trainer.train(resume_from_checkpoint=checkpoint)
    if not trainer.is_world_process_zero():
        return {}  # data parallel: rank 0 alone evaluates and writes the run directory
    model = unwrap(trainer.model)
    _check_finite(model, trainer.state.global_step, run_dir)  # between logging steps too: no NaN adapter is saved
    eval_records = _eval_records(data, cfg)
    result = evaluate(model, tokenizer, data.spec, head, eval_records, cfg)
    if is_enabled(model) and head != "causal-lm":
        _write_ratios(model, tokenizer, data.spec, head, eval_records, cfg, run_dir / "ratios.npz")
    adapter_dir = run_dir / "adapter"
    if cfg.method == "adapter" or is_enabled(model):
        from .io import save_pretrained

        save_pretrained(model, adapter_dir)
    else:
        model.save_pretrained(str(adapter_dir))
    record = {
        "task": cfg.task, "model": cfg.model, "method": cfg.method, "selective": cfg.selective, "seed": cfg.seed,
        "label": cfg.label, "metric": result["metric"], "score": result["score"], "metrics": result["metrics"],
        "sparsity": result["sparsity"], "note": data.note, "steps": trainer.state.global_step,
        "config": asdict(cfg), "modules": result["modules"] or _dense_module_stats(model), "provenance": origin,
    }
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(run_dir / "run.json", lambda tmp: Path(tmp).write_text(text))
    return record


def _last_whole_checkpoint(folder: Path) -> str:
    """Return the newest checkpoint that was saved whole (its trainer_state.json, written last, exists)."""
    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True) if folder.is_dir() else []
    for path in found:
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"--resume: skipping {path}: incomplete (no trainer_state.json; killed while saving?)", flush=True)
    raise FileNotFoundError(f"--resume: no whole checkpoint under {folder}")


def _checkpoint_step(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _check_resume_settings(run_dir: Path, cfg: RunConfig) -> None:
    """Raise if `cfg` trains something else than the run being resumed (its run_config.json, or run.json)."""
    saved = None
    if (run_dir / "run_config.json").is_file():
        saved = json.loads((run_dir / "run_config.json").read_text())
    elif (run_dir / "run.json").is_file():
        saved = json.loads((run_dir / "run.json").read_text()).get("config")
    if saved is None:
        return  # a run from before run_config.json existed, killed before its run.json: nothing to compare
    known = {f.name for f in fields(RunConfig)}
    saved = asdict(RunConfig.from_dict({k: v for k, v in saved.items() if k in known}))  # later settings: defaults
    now = asdict(cfg)
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if changed:
        raise ValueError(
            f"--resume: these settings differ from the run in {run_dir}: {'; '.join(changed)}. Resume with the "
            "run's own settings, or start a new run (--overwrite, or another --output-dir)."
        )


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to the checkpoint's step: the resumed run logs the later steps again."""
    if not path.is_file():
        return

    def kept(line: str) -> bool:  # a line cut short by the kill, or not a log record, goes too
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step

    lines = [x for x in path.read_text().splitlines() if kept(x)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in lines)))


def _load_data(cfg: RunConfig):
    """Return the run's TaskData (train/val/test), split as the config says."""
    return load_task(cfg.task, seed=cfg.split_seed, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction,
                     max_train=cfg.max_train, max_test=cfg.max_test, source=cfg.source, data_files=cfg.data_files,
                     text_fields=cfg.text_fields, label_field=cfg.label_field)


def _eval_records(data, cfg: RunConfig) -> list[dict]:
    """Return the records the run is scored on: the test split, or the validation split for eval_on='val'."""
    if cfg.eval_on == "test":
        return data.test
    if not data.val:
        raise ValueError(f"eval_on='val' but {cfg.task} has no validation records; set val_fraction > 0")
    return data.val


def _write_ratios(model, tokenizer, spec, head, records, cfg: RunConfig, path: Path, max_batches: int = 1) -> None:
    """Write ratios.npz: per module, the ratios ||M(x)||/||W0 x|| of real evaluation tokens (for the histogram)."""
    import numpy as np

    from .stats import collect_ratios

    encoded = encode_examples(spec, records, tokenizer, max_length=cfg.max_length, head=head)
    device = next(model.parameters()).device
    batches = []
    for i in range(0, min(len(encoded), max_batches * cfg.eval_batch_size), cfg.eval_batch_size):
        batch = collate(encoded[i:i + cfg.eval_batch_size], tokenizer.pad_token_id)
        batch.pop("labels")
        batches.append({k: v.to(device) for k, v in batch.items()})
    ratios = collect_ratios(model, batches)
    arrays = {name: r.numpy() for name, r in ratios.items()}
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))


def _dense_module_stats(model: nn.Module) -> dict[str, Any]:
    """Return parameter counts per adapter module of a dense run (no gate statistics)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .adapter import ParallelAdapter
    from .layers import adapter_param_count, fixed_param_count

    return {n: {"sparsity": None, "threshold": None, "ratio_mean": None, "delta_norm_mean": None,
                "rank": None, "params": adapter_param_count(m), "fixed_params": fixed_param_count(m)}
            for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ParallelAdapter))}


def evaluate_saved(run_dir: str | Path) -> dict[str, Any]:
    """Return a fresh evaluation of a run directory's saved adapter on the split the run was scored on."""
    from peft import PeftModel

    from .io import ADAPTER_CONFIG, from_pretrained, is_token_selective
    from .models import load_model

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: pass a run directory written by 'tspeft train'")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{meta_path} has no run settings ('config'): it was not written by 'tspeft train'")
    cfg = RunConfig.from_dict(meta["config"])
    data = _load_data(cfg)
    torch.manual_seed(cfg.seed)  # weights missing from the checkpoint (e.g. a pooler) are initialised alike
    base, tokenizer = load_model(cfg.model, data.spec)
    head = _head_of(base)
    adapter = run_dir / "adapter"
    if is_token_selective(adapter) or (adapter / ADAPTER_CONFIG).exists():
        model = from_pretrained(base, adapter)
    else:
        model = PeftModel.from_pretrained(base, str(adapter))
    result = evaluate(model, tokenizer, data.spec, head, _eval_records(data, cfg), cfg)
    return {"task": cfg.task, "label": cfg.label, "metric": result["metric"], "score": result["score"],
            "sparsity": result["sparsity"], "note": data.note, "modules": result["modules"]}
