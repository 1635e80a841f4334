"""A gated training step on CUDA makes no host sync: forward, backward, adapter clipping, optimizer step.

``torch.cuda.set_sync_debug_mode("error")`` raises on any operation that makes the host wait for the device
(``.item()``, ``nonzero``, a bool-masked index, ``if tensor:``, a device-to-host copy). The model is a small
module of linear layers rather than a transformers model, so that a sync the transformers code may make
(its attention-mask handling) does not hide or stand in for ours. Not covered: AdaLoRA's budget allocation
(peft's ``update_and_allocate``, which ranks importance scores on the host) and the statistics readers
(``tspeft.sparsity``, ``report_skipped_updates``), which read on purpose and run at logging time.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn

import tspeft
from tspeft import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA: host syncs are a device matter")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Blocks(nn.Module):
    """Two residual blocks of linear layers; forward takes (inputs_embeds, attention_mask, labels) as a model does."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d, bias=False),
                "up_proj": nn.Linear(d, 2 * d, bias=False), "down_proj": nn.Linear(2 * d, d, bias=False),
            })
            for _ in range(2)
        )

    def forward(self, inputs_embeds=None, attention_mask=None, labels=None, **kwargs):
        h = inputs_embeds
        for layer in self.layers:
            h = h + layer["q_proj"](h) * torch.sigmoid(layer["v_proj"](h))
            h = h + layer["down_proj"](torch.nn.functional.silu(layer["up_proj"](h)))
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        loss = (((h - labels) ** 2) * weights).sum() / weights.sum()
        return SimpleNamespace(loss=loss, logits=h)


def _model(method: str, dropout: float, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    base = Blocks().requires_grad_(False)
    if method == "adapter":
        model = tspeft.add_parallel_adapter(base, TARGETS, hidden=8, dropout=dropout)
    elif method == "adalora":
        model = get_peft_model(base, AdaLoraConfig(init_r=8, target_r=4, target_modules=TARGETS, lora_alpha=16,
                                                   lora_dropout=dropout, total_step=100))
    else:
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout,
                                                use_dora=method == "dora"))
    with torch.no_grad():  # non-zero updates, so that a positive threshold leaves some tokens active
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_E" in name or "adapter_up" in name:
                p.normal_(0.0, 0.5)
    return tspeft.enable(model.to("cuda", dtype).train(), tspeft.TSConfig(lam=1e-5, s=1e-3))


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("use_kernels", [None, False], ids=["auto", "pytorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("dora", 0.1),
                                            ("adalora", 0.0), ("adapter", 0.1)])
def test_training_step_makes_no_host_sync(method, dropout, dtype, use_kernels):
    if use_kernels is None and kernels.unavailable_reason() is not None:  # "auto" would repeat the PyTorch case
        pytest.skip(f"the Triton kernels cannot run: {kernels.unavailable_reason()}")
    model = _model(method, dropout, dtype)
    opt = tspeft.optimizer(model, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 16, 64, generator=g).to("cuda", dtype)
    labels = torch.randn(3, 16, 64, generator=g).to("cuda", dtype)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1:, 11:] = 0  # padding: the gates read the mask
    mask = mask.cuda()
    with torch.no_grad():  # each threshold at its module's mean ratio: some tokens active, some not
        model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        stats = tspeft.module_stats(model)
        for name, tau in tspeft.threshold_parameters(model).items():
            tau.fill_(stats[name]["ratio_mean"])

    def step() -> None:
        model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()
        tspeft.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with kernels.use(use_kernels):
        step()  # warm-up: Triton compiles, AdamW creates its state, cuBLAS its workspace
        tspeft.reset_stats(model)
        with _sync_is_an_error():
            step()
            step()
    torch.cuda.synchronize()
    sparsity = tspeft.sparsity(model)  # the gates did select: the step ran the gated path, not a dense one
    assert any(0.0 < v < 1.0 for v in sparsity.values()), sparsity
    assert all(torch.isfinite(t).all() for t in tspeft.threshold_parameters(model).values())


def test_sync_debug_mode_raises_on_a_sync():
    """The check above can fail: a read of a device value under the same mode raises."""
    x = torch.ones(3, device="cuda")
    with _sync_is_an_error(), pytest.raises(RuntimeError, match="synchroniz"):
        x.sum().item()
