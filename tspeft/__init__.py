"""tspeft: Token-Selective Parameter-Efficient Fine-Tuning on top of Hugging Face peft.

    model = get_peft_model(base_model, LoraConfig(r=8, target_modules=[...]))
    tspeft.enable(model, tspeft.TSConfig(lam=1e-5, s=1e-3))
    optimizer = tspeft.optimizer(model, lr=4e-4, weight_decay=0.01)
    ...
    tspeft.sparsity(model)
"""

from .adapter import ParallelAdapter, add_parallel_adapter, parallel_adapters
from .config import TSConfig
from .gate import token_gate
from .io import from_pretrained, is_token_selective, load_ts_state, save_pretrained, save_ts_state
from .lowrank import dora_gate, low_rank_gate
from .model import checkpoint_context_fn, controller, disable, enable, gated_modules, is_enabled
from .optim import (
    TSOptimizer,
    adapter_parameters,
    attach_grad_scaler,
    clip_grad_norm_,
    optimizer,
    report_skipped_updates,
    threshold_parameters,
    threshold_state,
)
from .stats import (
    all_reduce_stats,
    collect_ratios,
    module_stats,
    overall_sparsity,
    reset_stats,
    sparsity,
    thresholds,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "TSTrainer":  # imports transformers' Trainer: only when asked for
        from .trainer import TSTrainer

        return TSTrainer
    raise AttributeError(f"module 'tspeft' has no attribute {name!r}")


__all__ = [
    "ParallelAdapter",
    "TSConfig",
    "all_reduce_stats",
    "checkpoint_context_fn",
    "TSOptimizer",
    "TSTrainer",
    "adapter_parameters",
    "add_parallel_adapter",
    "attach_grad_scaler",
    "collect_ratios",
    "clip_grad_norm_",
    "controller",
    "disable",
    "dora_gate",
    "enable",
    "from_pretrained",
    "gated_modules",
    "is_enabled",
    "is_token_selective",
    "load_ts_state",
    "low_rank_gate",
    "module_stats",
    "optimizer",
    "overall_sparsity",
    "parallel_adapters",
    "report_skipped_updates",
    "reset_stats",
    "save_pretrained",
    "save_ts_state",
    "sparsity",
    "threshold_parameters",
    "threshold_state",
    "thresholds",
    "token_gate",
]
