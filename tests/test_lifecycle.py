"""What a peft user does around training: re-saving, merging, switching adapters, calling parts of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, tiny_llama, with_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import tspeft


def _fill(model, value):
    with torch.no_grad():
        for p in tspeft.threshold_parameters(model).values():
            p.fill_(value)


def test_a_parallel_adapter_loaded_for_inference_saves_whole(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "adapter"), tspeft.TSConfig())
    tspeft.save_pretrained(model, tmp_path)
    first = load_file(str(tmp_path / "tspeft_adapter.safetensors"))
    loaded = tspeft.from_pretrained(tiny_llama(), tmp_path)  # frozen: nothing requires grad
    assert not any(p.requires_grad for p in loaded.parameters())
    tspeft.save_pretrained(loaded, tmp_path)
    second = load_file(str(tmp_path / "tspeft_adapter.safetensors"))
    assert first.keys() == second.keys() and first
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=0)
    data = batch("llama")
    again = tspeft.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data).logits, again(**data).logits, rtol=0, atol=0)


def test_an_incomplete_parallel_adapter_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    tspeft.save_pretrained(with_adapter(tiny_llama(), "llama", "adapter"), tmp_path)  # dense: no TS state
    path = tmp_path / "tspeft_adapter.safetensors"
    weights = load_file(str(path))
    dropped = next(iter(weights))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(path))
    with pytest.raises(ValueError, match="lacks 1 adapter weight"):
        tspeft.from_pretrained(tiny_llama(), tmp_path)


def test_a_second_add_parallel_adapter_call_is_refused():
    model = tspeft.add_parallel_adapter(tiny_llama(), ["q_proj"], hidden=4)
    with pytest.raises(ValueError, match="one call"):
        tspeft.add_parallel_adapter(model, ["v_proj"], hidden=4)


def test_a_refused_merge_merges_nothing():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    model.eval()
    taus = tspeft.threshold_parameters(model)
    with torch.no_grad():
        taus[list(taus)[-1]].fill_(0.5)  # only the last module: peft would merge the others first
    data = batch("llama")
    with torch.no_grad():
        before = model(**data).logits
    for merge in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(RuntimeError, match="nothing was merged"):
            merge()
    assert len(tspeft.gated_modules(model)) == len(taus)
    assert not any(getattr(m, "merged", False) for m in tspeft.gated_modules(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, before, rtol=0, atol=0)


def test_merge_and_unload_leaves_a_plain_model_without_hooks():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    merged = model.merge_and_unload()
    assert not any("_ts_mask_ctrl" in m.__dict__ or "prepare_inputs_for_generation" in m.__dict__
                   for m in merged.modules())
    assert not any(m._forward_pre_hooks for m in merged.modules())
    ids = torch.randint(0, 64, (2, 5))
    merged(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))  # a 4-D mask is the model's business now


def test_thresholds_stay_out_of_peft_adapter_weights(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert keys and not any("ts_threshold" in k for k in keys)
    assert any(k.endswith(".threshold") for k in load_file(str(tmp_path / "tspeft_state.safetensors")))


def test_token_selection_files_of_another_adapter_save_are_refused(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    _fill(model, 0.5)
    model.save_pretrained(tmp_path)
    assert tspeft.is_token_selective(tmp_path)
    tspeft.disable(model)
    with torch.no_grad():  # trained on densely, then saved by peft into the same folder
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tspeft_state.safetensors").exists()
    assert not tspeft.is_token_selective(tmp_path)
    with pytest.raises(ValueError, match="saved with another adapter_model.safetensors"):
        tspeft.from_pretrained(tiny_llama(), tmp_path)
    dense = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # the dense adapter still loads
    data = batch("llama")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(**data).logits, model(**data).logits, rtol=0, atol=0)


def test_switching_to_another_adapter_is_refused_and_saves_go_with_the_gated_one(tmp_path):
    model = with_adapter(tiny_llama(), "llama", "lora")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    tspeft.enable(model, tspeft.TSConfig())
    data = batch("llama")
    model.set_adapter("other")
    with pytest.raises(RuntimeError, match="enabled for adapter 'default'"):
        model(**data)
    model.save_pretrained(tmp_path)  # peft writes both adapters; the TS files belong to "default"
    assert (tmp_path / "tspeft_state.safetensors").exists()
    assert not (tmp_path / "other" / "tspeft_state.safetensors").exists()
    model.set_adapter("default")
    model(**data)
    assert tspeft.from_pretrained(tiny_llama(), tmp_path) is not None


def test_a_backbone_called_alone_counts_its_own_padding():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    data = batch("llama", b=2, t=7, pad=3)
    with torch.no_grad():
        model(**data)
    tspeft.reset_stats(model)
    backbone = model.get_base_model().model
    with torch.no_grad():
        backbone(input_ids=data["input_ids"], attention_mask=torch.ones_like(data["attention_mask"]))
    assert {v["tokens"] for v in tspeft.module_stats(model).values()} == {14}
    with torch.no_grad():
        model(**data)
    tspeft.reset_stats(model)
    with torch.no_grad():
        backbone(input_ids=data["input_ids"])  # alone and without a mask: every position is real
    assert {v["tokens"] for v in tspeft.module_stats(model).values()} == {14}


def test_target_modules_as_one_string_is_a_regex_as_in_peft():
    model = with_adapter(tiny_llama(), "llama", "lora")
    tspeft.enable(copy.deepcopy(model), tspeft.TSConfig(target_modules=["q_proj"]))
    gated = tspeft.gated_modules(tspeft.enable(model, tspeft.TSConfig(target_modules=r".*layers\.0\..*_proj")))
    assert gated and all(".layers.0." in n for n in gated)
    assert tspeft.TSConfig.from_dict(tspeft.TSConfig(target_modules=".*q_proj").to_dict()).target_modules == ".*q_proj"


def _seq2seq(arch: str):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if arch == "t5":
        cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0)
        return get_peft_model(T5ForConditionalGeneration(cfg), LoraConfig(r=4, target_modules=["q", "k", "v"]))
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    return get_peft_model(BartForConditionalGeneration(cfg), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_layers_count_their_own_sequences_padding(arch):
    """Encoder layers and cross-attention's key/value read the encoder's mask, the other decoder layers the decoder's."""
    model = tspeft.enable(_seq2seq(arch), tspeft.TSConfig())
    ids = torch.randint(3, 64, (2, 6))
    enc_mask = torch.ones(2, 6, dtype=torch.long)
    enc_mask[0, 3:] = 0  # 9 real encoder tokens
    dec_ids = torch.randint(3, 64, (2, 6))  # as long as the encoder's: shapes cannot tell the masks apart
    dec_mask = torch.ones(2, 6, dtype=torch.long)
    dec_mask[1, 4:] = 0  # 10 real decoder tokens
    model(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)
    counts = {n: v["tokens"] for n, v in tspeft.module_stats(model).items()}
    cross = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")
    for name, tokens in counts.items():
        from_encoder = ".encoder." in name or name.endswith(cross)
        assert tokens == (9 if from_encoder else 10), (name, tokens)
    tspeft.reset_stats(model)
    model.eval()
    with torch.no_grad():  # generate: the encoder runs alone, then the decoder token by token with a cache
        model.generate(input_ids=ids, attention_mask=enc_mask, max_new_tokens=3, do_sample=False)
    counts = {n: v["tokens"] for n, v in tspeft.module_stats(model).items()}
    assert all(t == 9 for n, t in counts.items() if ".encoder." in n or n.endswith(cross))


def test_a_bin_save_over_an_older_safetensors_save_replaces_it(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    _fill(model, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=False)  # peft alone would still read the old .safetensors
    assert not (tmp_path / "adapter_model.safetensors").exists()
    loaded = tspeft.from_pretrained(tiny_llama(), tmp_path)
    assert set(tspeft.thresholds(loaded).values()) == {0.5}
    data = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data).logits, model.eval()(**data).logits, rtol=0, atol=0)


@pytest.mark.parametrize("first, second", [("lora", "adapter"), ("adapter", "lora")])
def test_a_save_over_another_kind_of_adapter_is_the_one_that_loads(tmp_path, first, second):
    def save(kind, tau):
        model = tspeft.enable(with_adapter(tiny_llama(), "llama", kind), tspeft.TSConfig())
        _fill(model, tau)
        tspeft.save_pretrained(model, tmp_path)
        return model.eval()

    save(first, 0.25)
    model = save(second, 0.5)
    kinds = {"lora": "adapter_model.safetensors", "adapter": "tspeft_adapter.safetensors"}
    assert (tmp_path / kinds[second]).is_file() and not (tmp_path / kinds[first]).exists()
    loaded = tspeft.from_pretrained(tiny_llama(), tmp_path)
    assert set(tspeft.thresholds(loaded).values()) == {0.5}
    data = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data).logits, model(**data).logits, rtol=0, atol=0)


def test_non_finite_thresholds_are_not_saved_over_a_good_save(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    _fill(model, 0.1)
    model.save_pretrained(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    with torch.no_grad():
        next(iter(tspeft.threshold_parameters(model).values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite thresholds"):
        model.save_pretrained(tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tspeft-save-")]


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_casting_the_model_keeps_the_threshold_fp32_and_the_statistics_float64(cast):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    tau = next(iter(tspeft.threshold_parameters(model).values()))
    getattr(model, cast)()
    assert next(iter(tspeft.threshold_parameters(model).values())) is tau and tau.dtype == torch.float32
    tspeft.reset_stats(model)
    ids = torch.randint(1, 64, (1, 3))
    with torch.no_grad():
        for _ in range(100):  # 300 tokens: bf16 counts stop at 256
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert {s["tokens"] for s in tspeft.module_stats(model).values()} == {300}


def test_a_nan_threshold_is_not_merged():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    with torch.no_grad():
        next(iter(tspeft.threshold_parameters(model).values())).fill_(float("nan"))  # gates every token out
    with pytest.raises(RuntimeError, match="nothing was merged"):
        model.merge_and_unload()


def test_merging_through_the_tuner_also_leaves_no_hooks():
    for method in ("merge_and_unload", "unload"):
        model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
        plain = getattr(model.base_model, method)()
        assert not any("_ts_mask_ctrl" in m.__dict__ for m in plain.modules())
        assert not any(m._forward_pre_hooks for m in plain.modules())


def test_loading_onto_a_base_model_that_already_has_adapters_names_the_fix(tmp_path):
    base = tiny_llama()
    model = tspeft.enable(with_adapter(base, "llama", "lora"), tspeft.TSConfig())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="freshly loaded base model"):
        tspeft.from_pretrained(base, tmp_path)  # get_peft_model changed it in place


@pytest.mark.parametrize("name", ["tspeft_config.json", "tspeft_adapter.json"])
def test_a_damaged_json_file_is_named(tmp_path, name):
    tspeft.save_pretrained(tspeft.enable(with_adapter(tiny_llama(), "llama", "adapter"), tspeft.TSConfig()), tmp_path)
    text = (tmp_path / name).read_text()
    (tmp_path / name).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{name} is not valid JSON"):
        tspeft.from_pretrained(tiny_llama(), tmp_path)


def test_extra_trained_parameters_of_a_parallel_adapter_survive_load_and_save(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "adapter"), tspeft.TSConfig())
    model.model.norm.weight.requires_grad_(True)  # the user trains one more parameter
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    tspeft.save_pretrained(model, tmp_path / "first")
    for trainable in (False, True):
        loaded = tspeft.from_pretrained(tiny_llama(), tmp_path / "first", is_trainable=trainable)
        assert loaded.model.norm.weight.requires_grad == trainable
        tspeft.save_pretrained(loaded, tmp_path / str(trainable))
        again = load_file(str(tmp_path / str(trainable) / "tspeft_adapter.safetensors"))
        torch.testing.assert_close(again["model.norm.weight"], model.model.norm.weight.detach(), rtol=0, atol=0)


def test_saving_only_another_adapter_leaves_the_gated_adapters_state_alone(tmp_path):
    model = with_adapter(tiny_llama(), "llama", "lora")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    tspeft.enable(model, tspeft.TSConfig())
    model.save_pretrained(tmp_path)
    state = (tmp_path / "tspeft_state.safetensors").read_bytes()
    _fill(model, 0.5)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert (tmp_path / "tspeft_state.safetensors").read_bytes() == state
    assert set(tspeft.thresholds(tspeft.from_pretrained(tiny_llama(), tmp_path)).values()) == {0.0}


def test_merging_another_adapter_is_not_refused():
    model = with_adapter(tiny_llama(), "llama", "lora")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    tspeft.enable(model, tspeft.TSConfig())
    _fill(model, 0.5)
    model.base_model.merge_adapter(adapter_names=["other"])  # not gated: merges
    with pytest.raises(RuntimeError, match="nothing was merged"):
        model.base_model.merge_adapter(adapter_names=["default"])


def test_thresholds_come_from_a_gathered_state_dict_when_one_is_given(tmp_path):
    """FSDP/DeepSpeed: the caller gathers the full state dict; the live parameters may be shards."""
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    state = {k: (torch.full_like(v, 0.25) if k.endswith(".ts_threshold") else v) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    assert set(tspeft.thresholds(tspeft.from_pretrained(tiny_llama(), tmp_path)).values()) == {0.25}


def test_a_whole_model_saved_by_transformers_gets_pointed_to_tspeft_save_pretrained(tmp_path):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "adapter"), tspeft.TSConfig())
    model.save_pretrained(tmp_path)  # transformers' own save: the whole model, no tspeft files
    with pytest.raises(FileNotFoundError, match="tspeft.save_pretrained"):
        tspeft.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_hook_on_the_frozen_base_layer_keeps_the_gradients_peft_gives(method):
    """The fused backward assumes base = W0 x + b; a hook that changes the base output must turn it off."""
    dense = with_adapter(tiny_llama(dtype=torch.float64), "llama", method)
    for m in dense.modules():
        if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear):
            m.base_layer.register_forward_hook(lambda mod, args, out: out * 2.0)
    gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig())
    data = batch("llama")
    grads = []
    for model in (dense, gated):
        emb = model.get_input_embeddings()(data["input_ids"]).detach().requires_grad_()
        model(inputs_embeds=emb, attention_mask=data["attention_mask"], labels=data["labels"]).loss.backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("active", ["default", "other"])
def test_adapters_on_different_modules_gate_only_the_active_ones_layers(active):
    """Layers that only another adapter targets pass their input through, in peft and with token selection."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
    model.set_adapter(active)
    data = batch("llama")
    with torch.no_grad():
        dense = model(**data).logits
    tspeft.enable(model, tspeft.TSConfig())
    suffixes = {n.rsplit(".", 1)[-1] for n in tspeft.gated_modules(model)}
    assert suffixes == ({"q_proj", "v_proj"} if active == "default" else {"k_proj"})
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, dense, rtol=0, atol=0)


def test_trainable_tokens_are_left_ungated():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 4])
    model = tspeft.enable(get_peft_model(tiny_llama(), config), tspeft.TSConfig())
    assert {n.rsplit(".", 1)[-1] for n in tspeft.gated_modules(model)} == {"q_proj", "v_proj"}


def test_deleting_the_gated_adapter_names_the_fix():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    tspeft.enable(model, tspeft.TSConfig())
    model.delete_adapter("default")
    with pytest.raises(RuntimeError, match="has been deleted: call tspeft.disable"):
        model(**batch("llama"))
    tspeft.disable(model)
    model(**batch("llama"))
