"""Tiny random-init models shared by the tests (no files, no network)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import tspeft
from tspeft.measure import SavedActivations
from tspeft.models import resolve_model

warnings.filterwarnings("ignore", category=FutureWarning)
METHODS = ("lora", "dora", "adalora", "adapter")


def tiny_bert(seed: int = 0, dtype=torch.float32, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg).to(dtype)


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


TARGETS = {"bert": ["query", "key", "value", "dense"], "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}


def with_adapter(base, arch: str, method: str, *, r: int = 4, dropout: float = 0.0, seed: int = 0, random_b: bool = True):
    """Return the base model with the method's adapter (non-zero B so that updates are non-trivial)."""
    targets = TARGETS[arch]
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    if method == "adapter":
        model = tspeft.add_parallel_adapter(base, targets, hidden=r, scale=0.5, dropout=dropout,
                                            modules_to_save=["classifier"] if arch == "bert" else None)
    elif method == "adalora":
        model = get_peft_model(base, AdaLoraConfig(init_r=r, target_r=r // 2, target_modules=targets, lora_alpha=8,
                                                   lora_dropout=dropout, total_step=1000, task_type=task))
    else:
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                                                use_dora=method == "dora", task_type=task))
    if random_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if any(k in n for k in ("lora_B", "adapter_up", "lora_E")):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return model


def batch(arch: str, seed: int = 0, b: int = 3, t: int = 10, pad: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[1:, t - pad:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":
        out["labels"] = torch.randint(0, 2, (b,), generator=g)
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
        out["labels"] = labels
    return out


def saved_bytes(run, weights=()) -> tuple[object, int]:
    """Return (run(), bytes of the distinct storages autograd keeps for backward after running it), leaving out
    the storages of `weights` (also when saved as a view, e.g. W.t())."""
    with SavedActivations(list(weights)) as saved:
        out = run()
    return out, saved.nbytes()


def forward_saved_bytes(model, data: dict) -> int:
    """Return the activation bytes one training-mode forward of `model` on `data` keeps for backward (weights left out)."""
    return saved_bytes(lambda: model.train()(**data), list(model.parameters()))[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with the bundled MiniLM tokenizer, saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm").path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(params=METHODS)
def method(request):
    return request.param
