"""Training on transformers.Trainer, the run directory, eval reproducibility, resume, the CLI."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil

import peft
import pytest
import torch

import tspeft
from tspeft.cli import main
from tspeft.train import RunConfig, evaluate_saved, train


def _cfg(model_dir, out, **kw):
    settings = dict(model=model_dir, task="sst2", max_train=48, max_test=24, epochs=2, batch_size=8,
                    logging_steps=1, save_steps=2, lr=5e-3, lam=1e-3, s=2e-2, max_length=32,
                    output_dir=str(out), eval_batch_size=16)
    settings.update(kw)
    return RunConfig(**settings)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "adapter"])
def test_train_writes_a_run_directory_and_eval_reproduces_it(tiny_model_dir, tmp_path, method, monkeypatch):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    calls = []
    if method == "adalora":
        from peft.tuners.adalora.model import AdaLoraModel

        original = AdaLoraModel.update_and_allocate
        monkeypatch.setattr(AdaLoraModel, "update_and_allocate", lambda self, step: calls.append(step) or original(self, step))
    # AdaLoRA starts with E = 0 (no update at all): a slower threshold keeps its modules alive
    # (and the adapter's update, scaled by alpha / rank = 2, grows fast: a faster threshold keeps up)
    record = train(_cfg(tiny_model_dir, tmp_path, method=method, s={"adalora": 1e-3, "adapter": 1e-1}.get(method, 2e-2)))
    assert record["steps"] == 12 and record["metric"] == "accuracy" and 0 <= record["score"] <= 100
    assert 0.0 < record["sparsity"] < 1.0
    assert "seeded split" in record["note"]
    origin = record["provenance"]  # which code trained the run: reported by tspeft reproduce
    assert origin["tspeft"] == tspeft.__version__ and origin["peft"] == peft.__version__
    assert origin["torch"] == torch.__version__ and (origin["commit"] is None or len(origin["commit"]) >= 7)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(len(x["modules"]) == len(record["modules"]) for x in lines)
    assert any(x["threshold_mean"] > 0 for x in lines)
    if method == "adalora":
        assert calls == list(range(12))  # once per optimizer step, with the step count before it
    again = evaluate_saved(tmp_path)
    assert again["score"] == record["score"] and again["sparsity"] == record["sparsity"]
    assert (tmp_path / "ratios.npz").exists()


def test_dense_run_has_no_sparsity(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    record = train(_cfg(tiny_model_dir, tmp_path, selective=False, epochs=1))
    assert record["sparsity"] is None and record["label"] == "LoRA"
    assert evaluate_saved(tmp_path)["score"] == record["score"]


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_resume_after_a_kill_ends_with_the_same_metrics(tiny_model_dir, tmp_path, monkeypatch, method):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    full = train(_cfg(tiny_model_dir, tmp_path / "full", method=method))
    cut = tmp_path / "cut"
    train(_cfg(tiny_model_dir, cut, method=method))
    # what a kill after step 10 leaves: checkpoint-10 whole, no later checkpoint, no result
    shutil.rmtree(cut / "checkpoints" / "checkpoint-12")
    (cut / "run.json").unlink()
    lines = (cut / "log.jsonl").read_text().splitlines()[:10]
    (cut / "log.jsonl").write_text("\n".join(lines) + "\n")
    resumed = train(_cfg(tiny_model_dir, cut, resume=True, method=method))
    assert resumed["score"] == full["score"] and resumed["sparsity"] == full["sparsity"]
    full_log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    cut_log = (cut / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["modules"] for x in cut_log] == [json.loads(x)["modules"] for x in full_log]


def test_a_previous_run_is_never_replaced_or_resumed_by_mistake(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    run = tmp_path / "run"
    first = train(_cfg(tiny_model_dir, run))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--overwrite"):  # refused before anything is touched
        train(_cfg(tiny_model_dir, run, seed=1))
    assert main(["train", "--model", tiny_model_dir, "--output-dir", str(run)]) == 2
    assert "previous run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lam 0.001 -> 0.01"):  # a resume trains the checkpoint's run, or nothing
        train(_cfg(tiny_model_dir, run, lam=1e-2, resume=True))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    # killed while saving checkpoint-12 (trainer_state.json comes last), after logging step 12
    (run / "checkpoints" / "checkpoint-12" / "trainer_state.json").unlink()
    (run / "run.json").unlink()
    resumed = train(_cfg(tiny_model_dir, run, resume=True))
    assert "skipping" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == list(range(1, 13))
    assert resumed["score"] == first["score"] and resumed["sparsity"] == first["sparsity"]
    (run / "checkpoints" / "checkpoint-99").mkdir()  # another run's checkpoint: gone after --overwrite
    train(_cfg(tiny_model_dir, run, epochs=1), overwrite=True)
    assert "replacing the previous run" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 6
    # the CLI resumes with the run's own settings (run_config.json), without repeating its flags
    assert main(["train", "--output-dir", str(run), "--resume"]) == 0
    assert json.loads((run / "run.json").read_text())["config"]["epochs"] == 1
    assert main(["train", "--output-dir", str(run), "--resume", "--lam", "0.5"]) == 2
    assert "lam 0.001 -> 0.5" in capsys.readouterr().err


def test_eval_of_a_foreign_run_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"task": 1}')
    assert main(["eval", str(tmp_path)]) == 2
    assert "not written by 'tspeft train'" in capsys.readouterr().err


def test_cli_errors_name_the_known_choices(capsys, tmp_path):
    assert main(["train", "--task", "nope"]) == 2
    assert "known" in capsys.readouterr().err
    assert main(["train", "--method", "ia3"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["train", "--model", "no-such-model"]) == 2
    assert "minilm" in capsys.readouterr().err
    assert main(["eval", "/nonexistent/run"]) == 2
    assert main(["train", "--lam", "-1"]) == 2
    assert "lam" in capsys.readouterr().err
    assert main(["train", "--method", "adalora", "--max-train", "16", "--epochs", "1", "--output-dir", str(tmp_path)]) == 2
    assert "AdaLoRA needs at least 3 optimizer steps" in capsys.readouterr().err


def test_cli_compare_train_eval_analyze(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    common = ["--model", tiny_model_dir, "--max-train", "32", "--max-test", "16", "--epochs", "1", "--batch-size", "8",
              "--lam", "1e-3", "--s", "2e-2", "--lr", "5e-3", "--logging-steps", "1"]
    assert main(["compare", "--seeds", "0", "--output", str(tmp_path / "cmp"), *common]) == 0
    out = capsys.readouterr().out
    assert "TS-LoRA" in out and "LoRA" in out and "results.json" in out
    records = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {(r["method"], r["selective"]) for r in records} == {("lora", False), ("lora", True)}
    assert set(records[0]) >= {"task", "model", "method", "selective", "seed", "metric", "score", "sparsity"}
    ts_dir = tmp_path / "cmp" / "lora-ts-seed0"
    assert main(["eval", str(ts_dir)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["analyze", str(ts_dir)]) == 0
    assert (ts_dir / "analysis" / "sparsity_heatmap.png").stat().st_size > 0
    assert main(["select", str(ts_dir), "--strategy", "s_low", "--fraction", "0.5"]) == 0
    assert "--target-modules" in capsys.readouterr().out
    # the printed command runs, and trains with the source run's settings
    assert main(["select", str(ts_dir), "--strategy", "half_rank", "--fraction", "0.5"]) == 0
    command = capsys.readouterr().out.split("command:\n", 1)[1].strip()
    args = shlex.split(command)
    assert args[:2] == ["tspeft", "train"] and "--dense" in args and "--rank-pattern" in args
    assert main([*args[1:], "--output-dir", str(tmp_path / "half")]) == 0
    source = json.loads((ts_dir / "run.json").read_text())["config"]
    made = json.loads((tmp_path / "half" / "run.json").read_text())["config"]
    differ = {k for k in source if source[k] != made[k]}
    assert differ == {"selective", "output_dir", "target_modules", "rank_pattern"}, differ
    assert made["rank_pattern"] and set(made["rank_pattern"].values()) <= {1, 2, 3, 4}


def test_llava_vision_language_step_reports_sparsity():
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from tspeft.models import target_modules

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg)
    targets = target_modules(model, "Q,K,V,O,Up,Down,Gate")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tspeft.enable(model, tspeft.TSConfig(lam=1e-3, s=2e-2))
    assert all("language_model" in n for n in tspeft.gated_modules(model))
    opt = tspeft.optimizer(model, lr=1e-2)
    n_img = (16 // 8) ** 2
    ids = torch.cat([torch.full((2, n_img), 63), torch.randint(1, 60, (2, 8))], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    for _ in range(3):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 16, 16), labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    stats = tspeft.module_stats(model)
    assert all(v["tokens"] == 3 * int(mask.sum()) for v in stats.values())  # padding excluded
    assert 0.0 <= tspeft.overall_sparsity(model) < 1.0


def test_compare_checks_every_run_before_training_any(tmp_path, monkeypatch, capsys):
    import tspeft.compare

    monkeypatch.setattr(tspeft.compare, "train", lambda *a, **k: pytest.fail("trained before checking the plan"))
    assert main(["compare", "--methods", "lora", "dorra", "--seeds", "0", "--output", str(tmp_path)]) == 2
    assert "unknown method 'dorra'" in capsys.readouterr().err


def test_cli_local_csv_with_its_own_columns_from_a_relative_path(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    data = tmp_path / "work"
    data.mkdir()
    rows = ["review,stars"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} {i},{i % 2}" for i in range(40)]
    (data / "reviews.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(data)
    common = ["--model", tiny_model_dir, "--task", "local", "--data-files", "train=reviews.csv", "--epochs", "1",
              "--batch-size", "8", "--max-length", "16", "--output-dir", str(tmp_path / "run")]
    assert main(["train", *common, "--dense"]) == 2
    assert "--text-fields" in capsys.readouterr().err  # no sentence/text column: the flag that fixes it
    assert main(["train", *common, "--text-fields", "review", "--label-field", "stars"]) == 0
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["data_files"] == {"train": str(data / "reviews.csv")}  # absolute: eval works from elsewhere
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(tmp_path / "run")]) == 0


def test_causal_lm_evaluation_scores_whole_prompts_not_the_training_cutoff(monkeypatch):
    from types import SimpleNamespace

    from conftest import tiny_llama

    import tspeft.train as train_module
    from tspeft.data import get_task

    seen = {}
    monkeypatch.setattr(train_module, "score_choices",
                        lambda model, tok, records, **kw: seen.update(kw) or [0] * len(records))
    model = tiny_llama()  # max_position_embeddings = 64
    tokenizer = SimpleNamespace(model_max_length=int(1e30))  # no stated limit
    records = [{"label": 0}, {"label": 1}]
    train_module.evaluate(model, tokenizer, get_task("boolq"), "causal-lm", records, RunConfig(max_length=16))
    assert seen["max_length"] == 64


def test_resume_keeps_whole_log_lines_and_reads_older_settings(tmp_path):
    from tspeft.train import _check_resume_settings, _truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"loss": 1}\n{"step": 3, "lo')  # killed mid-line
    _truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    old = dataclasses.asdict(RunConfig(output_dir=str(tmp_path)))
    for later in ("eval_on", "split_seed", "text_fields", "label_field"):  # settings added after that run
        old.pop(later)
    (tmp_path / "run.json").write_text(json.dumps({"config": old}))
    _check_resume_settings(tmp_path, RunConfig(output_dir=str(tmp_path), resume=True))  # no difference
    with pytest.raises(ValueError, match="lam"):
        _check_resume_settings(tmp_path, RunConfig(output_dir=str(tmp_path), resume=True, lam=0.5))


def test_the_papers_recipes_keep_table_6s_scale_and_tables_1_3s_lambda():
    from tspeft.recipes import load_recipe

    for recipe, task in (("nlu", "sst2"), ("csr", "boolq"), ("vit", None)):
        for method in ("lora", "dora", "adalora"):
            cfg = RunConfig.from_dict({**load_recipe(recipe, task=task, method=method), "task": task or "sst2"})
            rank = (cfg.init_rank or 2 * cfg.rank) if method == "adalora" else cfg.rank  # peft: AdaLoRA's initial rank
            assert cfg.alpha / rank == 0.5, (recipe, method)  # Table 6: scale 0.5
    lam = {("csr", "lora"): 4.5e-5, ("csr", "dora"): 1e-5, ("csr", "adalora"): 1e-4,  # Table 1
           ("vit", "lora"): 2e-6, ("vit", "dora"): 1e-6, ("vit", "adalora"): 5e-7,  # Table 2
           ("nlu", "lora"): 2e-5, ("nlu", "adalora"): 2e-6, ("nlu", "adapter"): 2e-6}  # Table 3, SST-2
    for (recipe, method), value in lam.items():
        assert load_recipe(recipe, task="sst2" if recipe == "nlu" else None, method=method)["lam"] == value
    assert not RunConfig(follow_schedule=False).ts_config().follow_schedule  # alpha_k = 1 can be chosen


def test_a_diverged_run_stops_and_writes_no_adapter_or_result(tiny_model_dir, tmp_path, monkeypatch):
    """Trainer averages a NaN step loss away by default, and NaN adapters make every gate read as skipped
    (sparsity 100%): the run must stop, not report a perfectly sparse model."""
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    with pytest.raises(FloatingPointError, match="training diverged"):
        train(_cfg(tiny_model_dir, tmp_path, lr=1e30, epochs=1))
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "adapter").exists()
