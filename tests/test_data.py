"""Tests for tspeft.data: bundled loading, splits, metrics, local files and input formatting."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings

import pytest
import torch

from tspeft.data import (
    IGNORE_INDEX,
    accuracy,
    answer_texts,
    build_prompt,
    bundled_task_names,
    collate,
    compute_metrics,
    encode_examples,
    f1,
    get_task,
    head_for,
    list_tasks,
    load_task,
    matthews_corrcoef,
    num_choices,
    pearson,
    primary_metric,
    score_choices,
    spearman,
)
from tspeft.data.bundled import read_bundled
from tspeft.data.metrics import rankdata

BUNDLED = ["sst2", "mrpc", "rte", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "obqa", "arc_e", "arc_c"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tspeft.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm").path)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_all_tasks():
    names = list_tasks()
    for name in ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", *BUNDLED, "local"]:
        assert name in names
    assert sorted(bundled_task_names()) == sorted(BUNDLED)
    assert get_task("mnli").hub_test_split == "validation_matched"
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("cola").metrics == ("matthews",)
    assert get_task("mrpc").metrics == ("accuracy", "f1") and get_task("qqp").metrics == ("accuracy", "f1")
    assert primary_metric(get_task("stsb")) == "pearson"


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="known tasks: .*sst2"):
        get_task("sst3")


# ----------------------------------------------------------------------------------------- bundled loading


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_task_loads_and_splits(name):
    spec = get_task(name)
    total = len(read_bundled(spec.bundled_path))
    data = load_task(name, seed=0, test_fraction=0.3, val_fraction=0.1)
    assert total > 0 and data.train and data.test and data.val
    assert len(data.train) + len(data.test) + len(data.val) == total
    assert abs(len(data.test) - round(0.3 * total)) <= 1
    assert "seeded split 0" in data.note and f"{len(data.train)} train / {len(data.test)} test" in data.note
    assert f"({total} rows)" in data.note
    for rec in data.train[:50] + data.test[:50]:
        if spec.family == "csr":
            assert set(rec) == {"context", "question", "choices", "label"}
            assert len(rec["choices"]) >= 2 and 0 <= rec["label"] < len(rec["choices"])
            assert all(isinstance(c, str) and c for c in rec["choices"])
        else:
            assert set(rec) == {*spec.text_fields, "label"} and rec["label"] in (0, 1)


def test_same_seed_same_split_different_seed_different_split():
    a, b, c = load_task("sst2", seed=0), load_task("sst2", seed=0), load_task("sst2", seed=1)
    assert a.train == b.train and a.test == b.test
    assert a.test != c.test
    assert "seeded split 1" in c.note


def test_caps_are_prefixes_of_the_seeded_shuffle():
    full = load_task("rte", seed=3)
    capped = load_task("rte", seed=3, max_train=20, max_test=10)
    assert capped.train == full.train[:20] and capped.test == full.test[:10]
    assert "20 train / 10 test" in capped.note
    assert f"train {len(full.train)} -> 20, test {len(full.test)} -> 10" in capped.note


def test_split_argument_errors():
    with pytest.raises(ValueError, match="test_fraction"):
        load_task("rte", test_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_task("rte", val_fraction=-0.1)
    with pytest.raises(ValueError, match="max_train"):
        load_task("rte", max_train=0)
    with pytest.raises(ValueError, match="no bundled offline data"):
        load_task("cola", source="bundled")
    with pytest.raises(ValueError, match="source"):
        load_task("rte", source="web")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_source_without_datasets_names_the_install():
    with pytest.raises(ImportError, match="pip install datasets"):
        load_task("cola")


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values():
    preds, labels = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]  # tp=2 tn=1 fp=1 fn=1
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    assert f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert matthews_corrcoef([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0], [0, 1, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: undefined -> 0
    assert f1([0, 0], [0, 0]) == 0.0
    # x=[1,2,3], y=[1,2,5]: sum dx*dy = 4, sum dx^2 = 2, sum dy^2 = 78/9
    assert pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(4 / math.sqrt(2 * 78 / 9))
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4] -> r = 4.5 / sqrt(4.5 * 5)
    assert list(rankdata([1, 2, 2, 3])) == [1, 2.5, 2.5, 4]
    assert list(rankdata([3, 1, 3, 3])) == [3, 1, 3, 3]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_compute_metrics_in_percent_with_ids_or_logits():
    mrpc = compute_metrics(get_task("mrpc"), [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert list(mrpc) == ["accuracy", "f1"]
    assert mrpc["accuracy"] == pytest.approx(60.0) and mrpc["f1"] == pytest.approx(100 * 4 / 6)
    logits = [[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]]
    assert compute_metrics(get_task("sst2"), logits, [1, 0, 0]) == {"accuracy": pytest.approx(200 / 3)}
    stsb = compute_metrics(get_task("stsb"), [[1.0], [2.0], [2.0], [3.0]], [1.0, 3.0, 2.0, 4.0])
    assert stsb["spearman"] == pytest.approx(100 * 4.5 / math.sqrt(22.5))
    assert set(compute_metrics(get_task("cola"), [0, 1], [0, 1])) == {"matthews"}
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])


# ------------------------------------------------------------------------------------------------ local files


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def test_local_csv_with_train_and_test(tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["sentence", "label"], [(f"good {i}", i % 2) for i in range(10)])
    test = _write_csv(tmp_path / "test.csv", ["sentence", "label"], [("bad", 0), ("fine", 1), ("ok", 1)])
    data = load_task("local", data_files={"train": train, "test": test}, text_fields=("sentence",),
                     label_field="label", val_fraction=0.2)
    assert len(data.test) == 3 and len(data.train) == 8 and len(data.val) == 2
    assert sorted(r["sentence"] for r in data.test) == ["bad", "fine", "ok"]
    assert data.spec.num_labels == 2 and data.spec.metrics == ("accuracy", "f1")
    assert isinstance(data.train[0]["label"], int) and "train.csv" in data.note


def test_local_jsonl_pairs_string_labels_and_seeded_split(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"s1": f"a {i}", "s2": f"b {i}", "y": ["yes", "no", "maybe"][i % 3]} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_task("local", data_files={"train": path}, text_fields=("s1", "s2"), label_field="y", seed=0)
    assert len(data.train) + len(data.test) == 12 and "seeded split 0" in data.note
    assert data.spec.label_names == ("maybe", "no", "yes") and data.spec.num_labels == 3
    assert set(data.train[0]) == {"s1", "s2", "label"}


def test_local_float_labels_are_regression(tmp_path):
    path = _write_csv(tmp_path / "r.csv", ["text", "score"], [("x", 0.5), ("y", 1.25), ("z", 3.0), ("w", 2.0)])
    data = load_task("local", data_files={"train": path}, label_field="score")
    assert data.spec.is_regression and data.spec.num_labels == 1 and data.spec.primary_metric == "pearson"


def test_local_errors(tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["sentence", "target"], [("a", 1), ("b", 0)])
    with pytest.raises(ValueError, match=r"label column\(s\) \['label'\].*\['sentence', 'target'\]"):
        load_task("local", data_files={"train": path})
    with pytest.raises(ValueError, match=r"text column\(s\) \['text'\].*\['sentence', 'target'\]"):
        load_task("local", data_files={"train": path}, text_fields=("text",), label_field="target")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_task("local", data_files={"train": empty})
    header_only = _write_csv(tmp_path / "h.csv", ["sentence", "label"], [])
    with pytest.raises(ValueError, match="no rows"):
        load_task("local", data_files={"train": header_only})
    with pytest.raises(ValueError, match="data_files"):
        load_task("local")
    with pytest.raises(FileNotFoundError):
        load_task("local", data_files={"train": tmp_path / "missing.csv"})


# ------------------------------------------------------------------------------------------ encoder formatting


def test_heads_and_num_choices():
    assert head_for(get_task("sst2"), "encoder") == "sequence-classification"
    assert head_for(get_task("boolq"), "encoder") == "sequence-classification"
    assert head_for(get_task("hellaswag"), "encoder") == "multiple-choice"
    assert head_for(get_task("piqa"), "causal-lm") == "causal-lm"
    assert num_choices(get_task("siqa")) == 3 and num_choices(get_task("sst2")) is None


def test_single_and_pair_encoding_with_padding(tokenizer):
    recs = [{"sentence": "a fine film", "label": 1}, {"sentence": "a long and rather tedious film", "label": 0}]
    enc = encode_examples(get_task("sst2"), recs, tokenizer, max_length=32)
    batch = collate(enc, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, len(enc[1]["input_ids"]))
    short = len(enc[0]["input_ids"])
    assert batch["attention_mask"][0, short:].sum() == 0 and (batch["input_ids"][0, short:] == 0).all()
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    pair = encode_examples(get_task("mrpc"), [{"sentence1": "one", "sentence2": "two", "label": 1}], tokenizer)
    assert 1 in pair[0]["token_type_ids"] and collate(pair, 0)["token_type_ids"].shape[0] == 1
    reg = encode_examples(get_task("stsb"), [{"sentence1": "a", "sentence2": "b", "label": 3.5}], tokenizer)
    assert collate(reg, 0)["labels"].dtype == torch.float32


def test_multiple_choice_layout_and_uneven_choices(tokenizer):
    recs = [{"context": "", "question": "q one", "choices": ["a", "b", "c"], "label": 2},
            {"context": "ctx", "question": "q two", "choices": ["a much longer choice", "b"], "label": 0}]
    enc = encode_examples(get_task("arc_e"), recs, tokenizer, max_length=32)
    assert len(enc[0]["input_ids"]) == 3 and len(enc[1]["input_ids"]) == 2
    batch = collate(enc, tokenizer.pad_token_id, return_choice_mask=True)
    width = max(len(r) for ex in enc for r in ex["input_ids"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 3, width)
    assert batch["choice_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["attention_mask"][1, 2].tolist() == [1] + [0] * (width - 1)
    assert batch["labels"].tolist() == [2, 0]
    wino = encode_examples(get_task("winogrande"), [{"context": "", "question": "Tom beat Ann because _ won.",
                                                    "choices": ["Tom", "Ann"], "label": 0}], tokenizer)
    assert tokenizer.decode(wino[0]["input_ids"][1], skip_special_tokens=True).startswith("tom beat ann because ann")


def test_truncation_warns_once_and_clamps(tokenizer):
    recs = [{"sentence": "word " * 40, "label": 1}, {"sentence": "short", "label": 0},
            {"sentence": "word " * 30, "label": 1}]
    with pytest.warns(UserWarning, match=r"2 of 3 sequences .*max_length=8") as record:
        enc = encode_examples(get_task("sst2"), recs, tokenizer, max_length=8)
    assert len([w for w in record if "truncated" in str(w.message)]) == 1
    assert [len(e["input_ids"]) for e in enc] == [8, 3, 8] and enc[0]["input_ids"][-1] == tokenizer.sep_token_id
    with pytest.warns(UserWarning, match="exceeds the model's limit of 512"):
        encode_examples(get_task("sst2"), recs, tokenizer, max_length=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_examples(get_task("sst2"), recs, tokenizer, max_length=128)


# ------------------------------------------------------------------------------------------- causal-LM prompts


def test_causal_prompt_masks_the_prompt(tokenizer):
    spec = get_task("piqa")
    rec = {"context": "", "question": "How to open a jar?", "choices": ["twist the lid", "eat it"], "label": 0}
    prompt = build_prompt(spec, rec)
    assert "Solution1: twist the lid" in prompt and "Answer format: solution1/solution2" in prompt
    assert answer_texts(spec, rec)[0] == "the correct answer is solution1"
    boolq = build_prompt(get_task("boolq"), {"context": "p", "question": "is it", "choices": [], "label": 1})
    assert "true or false" in boolq
    enc = encode_examples(spec, [rec, {**rec, "label": 1}], tokenizer, head="causal-lm")
    answer = tokenizer(answer_texts(spec, rec)[0], add_special_tokens=False)["input_ids"]
    labels, ids = enc[0]["labels"], enc[0]["input_ids"]
    n_prompt = len(ids) - len(answer)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == answer == ids[n_prompt:]
    batch = collate(enc, tokenizer.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()


def test_score_choices_on_tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).train()
    spec = get_task("arc_e")
    recs = [{"context": "", "question": f"question {i}?", "choices": ["red", "blue", "green"][: 2 + i % 2],
             "label": 0} for i in range(4)]
    preds = score_choices(model, tokenizer, recs, batch_size=3, spec=spec)
    assert len(preds) == 4 and all(0 <= p < len(r["choices"]) for p, r in zip(preds, recs))
    assert preds == score_choices(model, tokenizer, recs, batch_size=1, spec=spec)  # padding-independent
    assert model.training


def test_hub_ids_splits_and_revisions_of_the_commonsense_sets(monkeypatch):
    """Offline: a stand-in `datasets` records what would be asked of the hub and serves the bundled rows."""
    import sys
    import types

    from tspeft.data.bundled import read_bundled
    from tspeft.data.tasks import get_task

    asked = []

    def load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split, kwargs.get("revision")))
        return read_bundled(spec.bundled_path)[:8]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    expected = {
        "piqa": ("ybisk/piqa", "default", "validation", "refs/convert/parquet"),  # no loading script there
        "siqa": ("lighteval/siqa", None, "validation", None),
        "arc_c": ("allenai/ai2_arc", "ARC-Challenge", "test", None),  # the DoRA / LLM-Adapters test sets
        "obqa": ("allenai/openbookqa", "main", "test", None),
        "boolq": ("google/boolq", None, "validation", None),
    }
    for task, (path, name, split, revision) in expected.items():
        spec = get_task(task)
        asked.clear()
        data = load_task(task, source="hub")
        assert asked == [(path, name, "train", revision), (path, name, split, revision)], task
        assert len(data.test) == 8 and f"/ {split} (8 rows)" in data.note
