"""The benchmark's models and batch: a random-init Llama of a preset, its adapter variants, thresholds set or
calibrated to a fraction of active tokens."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import tspeft

from .adapter import ParallelAdapter


@dataclass(frozen=True)
class Preset:
    """Shapes of the Llama-style model, batch and adapters of one benchmark setting."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    r: int
    dropout: float
    dtype: str
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 172, 2, 4, 2, 256, 2, 32, 4, 0.0, "float32"),
    "cpu": Preset(512, 1376, 4, 8, 2, 4096, 4, 256, 16, 0.0, "float32"),
    # the bundled demo model's widths and depth (MiniLM-L6: hidden 384, 6 layers) and the demo's 16 x 64
    # tokens, r = 8, in the benchmark's Llama shape: what the gate costs at a small, real model's size
    "minilm-shape": Preset(384, 1536, 6, 12, 12, 4096, 16, 64, 8, 0.0, "float32"),
    "llama8b-4layers": Preset(4096, 14336, 4, 32, 8, 128256, 8, 1024, 32, 0.05, "bfloat16"),
}

KINDS = ("lora", "dora", "adalora", "adapter")
LABELS = {"floor": "frozen base", "lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "adapter": "Adapter"}


# ----------------------------------------------------------------------------------------------- models


def build_base(p: Preset, device: str, seed: int = 0) -> nn.Module:
    """Return a random-init LlamaForCausalLM of preset `p` on `device`, all parameters frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, max_position_embeddings=max(p.seq, 128),
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, p.dtype))
    model.requires_grad_(False)
    return model


def randomize_updates(model: nn.Module, std: float = 0.02) -> None:
    """Give every adapter a non-zero update in place: B (LoRA/DoRA), E (AdaLoRA), up (parallel adapter)."""
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.lora.layer import LoraLayer

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, ParallelAdapter):
                mod.adapter_up.weight.normal_(0.0, std)
            elif isinstance(mod, SVDLinear):
                for e in mod.lora_E.values():
                    e.normal_(0.0, 1.0)  # singular values; A and B are already N(0, 0.02) in peft
            elif isinstance(mod, LoraLayer):
                for lin in mod.lora_B.values():
                    lin.weight.normal_(0.0, std)


def build_variant(base: nn.Module, kind: str, p: Preset, *, ts: bool, lam: float, seed: int = 0,
                  recompute_z: str = "auto") -> nn.Module:
    """Return a copy of `base` with adapter `kind` (floor/lora/dora/adalora/adapter), gated if `ts`."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    torch.manual_seed(seed + 1)  # a dense row and its TS twin get the same adapter weights
    targets = list(p.targets)
    if kind in ("lora", "dora"):
        cfg = LoraConfig(r=p.r, lora_alpha=2 * p.r, lora_dropout=p.dropout, target_modules=targets,
                         use_dora=kind == "dora")
        model = get_peft_model(model, cfg)
    elif kind == "adalora":
        cfg = AdaLoraConfig(init_r=p.r, target_r=max(p.r // 2, 1), total_step=1000, lora_alpha=2 * p.r,
                            lora_dropout=p.dropout, target_modules=targets)
        model = get_peft_model(model, cfg)
    elif kind == "adapter":
        model = tspeft.add_parallel_adapter(model, targets, hidden=p.r, dropout=p.dropout)
    elif kind != "floor":
        raise ValueError(f"unknown kind {kind!r}; choose floor or one of {KINDS}")
    randomize_updates(model)
    if ts:
        tspeft.enable(model, tspeft.TSConfig(lam=lam, s=1e-3, recompute_z=recompute_z))
    return model.train()


@dataclass
class Batch:
    """One batch shared by every row: an inputs_embeds leaf that requires grad, mask and labels."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def make_batch(base: nn.Module, p: Preset, device: str, seed: int = 0) -> Batch:
    """Return a random batch of p.batch x p.seq tokens embedded by `base`."""
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, p.vocab, (p.batch, p.seq), generator=g).to(device)
    labels = torch.randint(0, p.vocab, (p.batch, p.seq), generator=g).to(device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids).detach()
    return Batch(embeds.requires_grad_(True), torch.ones_like(ids), labels)


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Return the training loss of one forward pass (CE on the batch's labels)."""
    out = model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


# ----------------------------------------------------------------------------------------------- thresholds


def set_thresholds(model: nn.Module, taus: dict[str, float] | float) -> None:
    """Set every gated module's threshold, to one value or per module name."""
    with torch.no_grad():
        for name, t in tspeft.threshold_parameters(model).items():
            t.fill_(taus if isinstance(taus, float) else taus[name])


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batch: Batch, active: float = 0.5, iters: int = 14) -> dict[str, float]:
    """Return per-module thresholds, found by bisection, at which about `active` of the tokens are active.

    All modules are bisected together (a module's inputs depend on earlier modules' gates, so a few
    passes settle them jointly); each pass is one no-grad forward in training mode with a fixed seed.
    """
    names = list(tspeft.threshold_parameters(model))
    set_thresholds(model, 0.0)
    tspeft.reset_stats(model)
    torch.manual_seed(0)
    loss_of(model, batch)
    stats = tspeft.module_stats(model)
    cur = {n: max(float(stats[n]["ratio_mean"] or 0.0), 1e-6) for n in names}
    lo = dict.fromkeys(names, 0.0)
    hi: dict[str, float | None] = dict.fromkeys(names)
    for _ in range(iters):
        set_thresholds(model, cur)
        tspeft.reset_stats(model)
        torch.manual_seed(0)
        loss_of(model, batch)
        sp = tspeft.sparsity(model)
        for n in names:
            if sp[n] > 1.0 - active:
                hi[n] = cur[n]
            else:
                lo[n] = cur[n]
            h = hi[n]
            cur[n] = 2.0 * cur[n] if h is None else 0.5 * (lo[n] + h)
    set_thresholds(model, cur)
    return cur
