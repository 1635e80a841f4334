"""tspeft.TSTrainer in a user's own transformers.Trainer script (no tspeft CLI, no run directory)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batch, tiny_llama, with_adapter
from transformers import TrainingArguments

import tspeft


def _data(n: int = 24):
    out = []
    for i in range(n):
        b = batch("llama", seed=i, b=1, t=10, pad=3 * (i % 2))
        out.append({k: v[0] for k, v in b.items()})
    return out


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _trainer(model, out, eval_dataset=None, optimizers=(None, None), trainer_class=tspeft.TSTrainer, **kw):
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
                    logging_steps=2, save_steps=3, save_strategy="steps", report_to="none", use_cpu=True,
                    seed=0, data_seed=0, disable_tqdm=True)
    args = TrainingArguments(**{**settings, **kw})
    return trainer_class(model=model, args=args, train_dataset=_data(), eval_dataset=eval_dataset,
                         data_collator=_collate, optimizers=optimizers)


def _ts_model():
    return tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(lam=1e-3, s=2e-2))


def _adapter_model():
    return tspeft.enable(with_adapter(tiny_llama(), "llama", "adapter"), tspeft.TSConfig(lam=1e-3, s=2e-2))


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter_" in n}


def test_ts_trainer_trains_thresholds_logs_sparsity_and_resumes(tmp_path):
    trainer = _trainer(_ts_model(), tmp_path / "full")
    trainer.train()
    assert any(g.get("ts_threshold") for g in trainer.optimizer.param_groups)  # the thresholds' own group
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(0.0 <= h["ts_sparsity"] <= 1.0 and "ts_threshold_mean" in h for h in logged)
    assert logged[-1]["ts_threshold_mean"] > 0
    final = tspeft.thresholds(trainer.model)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "tspeft_state.safetensors").is_file()  # the model's save_pretrained wrote the TS state
    again = _trainer(_ts_model(), tmp_path / "full")
    again.train(resume_from_checkpoint=str(checkpoint))
    for name, tau in tspeft.thresholds(again.model).items():
        assert tau == pytest.approx(final[name], rel=1e-5, abs=1e-7)


def test_ts_trainer_allocates_adalora_ranks_dense_or_not(tmp_path, monkeypatch):
    from peft.tuners.adalora.model import AdaLoraModel

    calls = []
    original = AdaLoraModel.update_and_allocate
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", lambda self, step: calls.append(step) or original(self, step))
    model = with_adapter(tiny_llama(), "llama", "adalora")
    trainer = _trainer(model, tmp_path, max_grad_norm=1.0)
    trainer.train()
    assert calls == list(range(6))
    assert "ts_sparsity" not in trainer.state.log_history[0]  # dense: a plain Trainer's logs


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_filler_choices_stay_out_of_the_multiple_choice_loss(tmp_path, smoothing):
    from transformers import BertConfig, BertForMultipleChoice

    from tspeft.data import collate

    torch.manual_seed(0)
    model = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=48, max_position_embeddings=32)).eval()
    rows = [{"input_ids": [[5, 6, 7], [5, 8], [5, 9, 9]], "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1]], "labels": 2},
            {"input_ids": [[5, 10], [5, 11, 12]], "attention_mask": [[1, 1], [1, 1, 1]], "labels": 1}]  # 2 choices
    inputs = collate(rows, 0, return_choice_mask=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             label_smoothing_factor=smoothing)
    trainer = tspeft.TSTrainer(model=model, args=args)
    loss = trainer.compute_loss(model, dict(inputs))
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k not in ("choice_mask", "labels")}).logits
    expected = 0.0  # by hand: smoothing spread over each question's real choices
    for row, label in enumerate(inputs["labels"].tolist()):
        real = logits[row][inputs["choice_mask"][row]].log_softmax(-1)
        expected += (1 - smoothing) * -real[label] + smoothing * -real.mean()
    expected = expected / len(rows)
    torch.testing.assert_close(loss.detach(), expected)
    assert not torch.isclose(expected, torch.nn.functional.cross_entropy(logits, inputs["labels"]))


def test_ts_trainer_resumes_an_adapter_not_named_default(tmp_path):
    from peft import LoraConfig, get_peft_model

    def make():
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="foo")
        return tspeft.enable(model, tspeft.TSConfig(lam=1e-3, s=2e-2))

    first = _trainer(make(), tmp_path)
    first.train()
    assert (tmp_path / "checkpoint-3" / "foo" / "tspeft_state.safetensors").is_file()
    again = _trainer(make(), tmp_path)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    for name, tau in tspeft.thresholds(again.model).items():
        assert tau == pytest.approx(tspeft.thresholds(first.model)[name], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_best_model_at_end_brings_back_that_checkpoints_thresholds(tmp_path, kind):
    from safetensors.torch import load_file

    model = _ts_model() if kind == "lora" else _adapter_model()
    trainer = _trainer(model, tmp_path, eval_dataset=_data(8), eval_strategy="steps", eval_steps=3,
                       load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3")  # the higher eval loss: not the last step's
    saved = load_file(f"{best}/tspeft_state.safetensors")
    for name, tau in tspeft.thresholds(trainer.model).items():
        assert tau == pytest.approx(float(saved[f"{name}.threshold"]))
    if kind == "adapter":  # and the adapters' weights, which the checkpoint holds instead of the whole model
        weights = load_file(f"{best}/tspeft_adapter.safetensors")
        for name, value in _adapter_state(trainer.model).items():
            torch.testing.assert_close(value, weights[name])


def test_evaluation_tokens_stay_out_of_the_training_sparsity(tmp_path):
    """ts_sparsity covers the training tokens of each logging window; an evaluation in between counts none."""
    logs = []
    for evaluate in (False, True):
        model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(lam=5e-2, s=0.5))
        trainer = _trainer(model, tmp_path / str(evaluate), eval_dataset=_data(40) if evaluate else None,
                           eval_strategy="steps" if evaluate else "no", eval_steps=2, save_strategy="no")
        trainer.evaluate() if evaluate else None  # before training, too
        trainer.train()
        logs.append([(h["step"], h["ts_sparsity"]) for h in trainer.state.log_history if "loss" in h])
    assert logs[0] == logs[1] and any(v > 0 for _, v in logs[0])
    evaluated = [h["eval_ts_sparsity"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evaluated) == 3 and all(0.0 <= v <= 1.0 for v in evaluated) and evaluated[-1] > 0


def test_an_optimizer_passed_in_that_does_not_rule_the_thresholds_warns(tmp_path):
    model = _ts_model()
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    with pytest.warns(UserWarning, match="does not train the thresholds with tspeft's rule"):
        _trainer(model, tmp_path, optimizers=(plain, None), max_steps=1, save_strategy="no").train()
    with pytest.warns(UserWarning, match="optim='sgd'|optim=<OptimizerNames.SGD"):
        _trainer(_ts_model(), tmp_path, optim="sgd", max_steps=1, save_strategy="no").train()


def test_resuming_a_token_selective_checkpoint_without_enable_names_the_fix(tmp_path):
    _trainer(_ts_model(), tmp_path / "run", max_steps=3).train()
    dense = with_adapter(tiny_llama(), "llama", "lora")
    with pytest.raises(ValueError, match="call tspeft.enable"):
        _trainer(dense, tmp_path / "again", max_steps=6).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))


def test_parallel_adapters_checkpoint_their_adapters_not_the_whole_model_and_resume(tmp_path):
    full = _trainer(_adapter_model(), tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "tspeft_adapter.safetensors").is_file() and (checkpoint / "tspeft_state.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is not written at every save
    again = _trainer(_adapter_model(), tmp_path / "full")
    again.train(resume_from_checkpoint=str(checkpoint))
    final = tspeft.thresholds(full.model)
    for name, tau in tspeft.thresholds(again.model).items():
        assert tau == pytest.approx(final[name], rel=1e-5, abs=1e-7)
    done, resumed = _adapter_state(full.model), _adapter_state(again.model)
    assert done.keys() == resumed.keys() and done
    for name in done:
        torch.testing.assert_close(resumed[name], done[name], rtol=1e-5, atol=1e-7)


def test_parallel_adapters_save_model_loads_with_from_pretrained(tmp_path):
    trainer = _trainer(_adapter_model(), tmp_path / "run", save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "training_args.bin").is_file()
    loaded = tspeft.from_pretrained(tiny_llama(), tmp_path / "final")
    assert tspeft.thresholds(loaded) == pytest.approx(tspeft.thresholds(trainer.model))
    trained = trainer.model.eval()
    inputs = batch("llama", seed=99, b=2, t=10, pad=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits)


def test_parallel_adapters_still_resume_from_a_whole_model_checkpoint(tmp_path, monkeypatch):
    """Checkpoints written whole by earlier versions (Trainer's own saving) keep resuming."""
    from transformers import Trainer

    with monkeypatch.context() as m:
        m.setattr(tspeft.TSTrainer, "_save", Trainer._save)
        full = _trainer(_adapter_model(), tmp_path / "full")
        full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "tspeft_adapter.safetensors").exists()
    again = _trainer(_adapter_model(), tmp_path / "full")
    again.train(resume_from_checkpoint=str(checkpoint))
    final = tspeft.thresholds(full.model)
    for name, tau in tspeft.thresholds(again.model).items():
        assert tau == pytest.approx(final[name], rel=1e-5, abs=1e-7)


def _llama_classifier():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=2, pad_token_id=0))
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))


@pytest.mark.parametrize("arch", ["bert", "llama", "llama-classifier"])
def test_gradient_accumulation_gives_the_loss_of_the_whole_batch(tmp_path, arch):
    """BERT's classifier and transformers' generic one (Llama, Qwen, ...) take **kwargs but their loss is a
    per-batch mean: Trainer alone would add the accumulated micro-batches' losses (2x here), and mu in g_k
    would outweigh lambda's term twice over. The causal LM's loss divides by num_items_in_batch."""
    from conftest import tiny_bert

    rows = []
    for i in range(16):
        b = batch("llama" if arch == "llama" else "bert", seed=i, b=1, t=10, pad=3 * (i % 2))
        rows.append({k: v[0] for k, v in b.items()})
    losses = []
    for size, accumulate in ((8, 1), (4, 2)):
        if arch == "llama-classifier":
            adapted = _llama_classifier()
        else:
            adapted = with_adapter(tiny_bert(dropout=0.0) if arch == "bert" else tiny_llama(), arch, "lora")
        model = tspeft.enable(adapted, tspeft.TSConfig(lam=1e-3, s=2e-2))
        args = TrainingArguments(output_dir=str(tmp_path / str(size)), per_device_train_batch_size=size,
                                 gradient_accumulation_steps=accumulate, max_steps=1, logging_steps=1,
                                 learning_rate=5e-3, report_to="none", use_cpu=True, seed=0, data_seed=0,
                                 disable_tqdm=True, save_strategy="no")
        trainer = tspeft.TSTrainer(model=model, args=args, train_dataset=rows, data_collator=_collate)
        trainer.train()
        losses.append(next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


class _TwoForwards(tspeft.TSTrainer):
    """A loss over two batches before one backward (chosen/rejected style), the second without padding."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        padded = batch("llama", seed=1, b=2, t=10, pad=4)
        full = batch("llama", seed=2, b=2, t=10, pad=0)
        return model(**padded).loss + model(**full).loss


def _counting_context_fn(calls):
    import contextlib

    def context_fn():
        calls.append(1)
        return contextlib.nullcontext(), contextlib.nullcontext()

    return context_fn


_OWN_CONTEXT_CALLS: list = []


@pytest.mark.parametrize("checkpointing", [None, {}, {"use_reentrant": False},
                                           {"context_fn": _counting_context_fn(_OWN_CONTEXT_CALLS)}])
def test_trainer_checkpointing_replays_each_forwards_padding_mask(tmp_path, checkpointing):
    def thresholds_after_a_step(**kw):
        # the plain rule: the step is s * g_k itself (Adam's first step would be s * sign(g_k) whatever g_k is)
        config = tspeft.TSConfig(lam=1e-1, s=1e-2, rule="plain")
        model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), config)
        _trainer(model, tmp_path, max_steps=1, save_strategy="no", logging_steps=1, trainer_class=_TwoForwards,
                 **kw).train()
        return tspeft.thresholds(model)

    plain = thresholds_after_a_step()
    kw = {} if checkpointing is None else {"gradient_checkpointing_kwargs": checkpointing}
    _OWN_CONTEXT_CALLS.clear()
    assert thresholds_after_a_step(gradient_checkpointing=True, **kw) == pytest.approx(plain, abs=1e-7)
    assert bool(_OWN_CONTEXT_CALLS) == ("context_fn" in (checkpointing or {}))  # a user's own runs as well


def test_trainer_reentrant_checkpointing_warns(tmp_path):
    model = _ts_model()
    with pytest.warns(UserWarning, match="reentrant activation checkpointing cannot replay"):
        _trainer(model, tmp_path, max_steps=1, save_strategy="no", gradient_checkpointing=True,
                 gradient_checkpointing_kwargs={"use_reentrant": True}).train()


def test_resuming_with_another_threshold_rule_is_refused(tmp_path):
    _trainer(_ts_model(), tmp_path / "run", max_steps=3).train()
    other = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(lam=1e-3, s=1e-4))
    with pytest.raises(ValueError, match=r"another threshold rule \(s 0.02 -> 0.0001\)"):
        _trainer(other, tmp_path / "run", max_steps=6).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    again = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(lam=1e-2, s=2e-2))
    _trainer(again, tmp_path / "run", max_steps=6).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))


def test_a_trainer_trains_the_thresholds_of_a_model_enabled_again(tmp_path):
    model = _ts_model()
    trainer = _trainer(model, tmp_path, max_steps=2, save_strategy="no")
    trainer.train()
    tspeft.disable(model)
    tspeft.enable(model, tspeft.TSConfig(lam=1e-3, s=2e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "optimizer passed in" warning: the trainer built it
        trainer.train()
    assert all(tau != 0.0 for tau in tspeft.thresholds(model).values())


def test_an_ignored_multiple_choice_label_stays_out_of_the_filler_free_loss(tmp_path):
    from transformers import BertConfig, BertForMultipleChoice

    from tspeft.data import collate

    torch.manual_seed(0)
    model = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=48, max_position_embeddings=32)).eval()
    rows = [{"input_ids": [[5, 6, 7], [5, 8], [5, 9, 9]], "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1]], "labels": 2},
            {"input_ids": [[5, 10], [5, 11, 12]], "attention_mask": [[1, 1], [1, 1, 1]], "labels": 1}]
    inputs = collate(rows, 0, return_choice_mask=True)
    inputs["labels"][1] = -100  # cross_entropy's ignore_index: only the first question counts
    trainer = tspeft.TSTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                     use_cpu=True))
    loss = trainer.compute_loss(model, dict(inputs))
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k not in ("choice_mask", "labels")}).logits
    torch.testing.assert_close(loss.detach(), -logits[0].log_softmax(-1)[2])


def test_a_subclass_that_hands_its_loss_on_keeps_trainers_loss_scaling():
    from transformers import LlamaForCausalLM

    from tspeft.trainer import _loss_ignores_item_count

    class Mine(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Mine(tiny_llama().config)
    assert not _loss_ignores_item_count(model)  # num_items_in_batch reaches LlamaForCausalLM's loss_function
