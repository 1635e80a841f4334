"""Module-selection sweeps (Table 4, Figure 2) and the small-scale reproduction: plan, resume, verdicts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import tspeft.sweep as sweep_module
from tspeft import reproduce
from tspeft.analysis import load_run, select_modules
from tspeft.sweep import plan_sweep, sweep
from tspeft.train import RunConfig, train
from tspeft.verdicts import (
    NOT,
    PARTLY,
    REPRODUCED,
    UNTESTED,
    Verdict,
    choose_setting,
    combine,
    judge_ablation,
    judge_curve,
    judge_polarization,
    judge_selection,
    judge_tables,
    threshold_summary,
)


@pytest.fixture(scope="module")
def source_run(tiny_model_dir, tmp_path_factory):
    """A finished token-selective LoRA run of the tiny model (the sweep's source)."""
    out = tmp_path_factory.mktemp("source")
    train(RunConfig(model=tiny_model_dir, task="sst2", max_train=32, max_test=16, epochs=1, batch_size=8,
                    logging_steps=1, save_steps=100, lr=5e-3, lam=1e-3, s=2e-2, max_length=32,
                    eval_batch_size=16, output_dir=str(out)))
    return out


def _refuse(cfg, overwrite=False):
    raise AssertionError(f"train() called for {cfg.output_dir}: the sweep should have reused it")


# ------------------------------------------------------------------------------------------------- sweep


def test_sweep_writes_table4_and_figure2_and_resumes(source_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TSPEFT_QUIET", "1")
    out = tmp_path / "sweep"
    result = sweep(source_run, out, fraction=0.5, fractions=[0.5, 1.0], strategies=["s_low", "s_high"], seeds=[0])
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["table4"] == result["table4"] and saved["figure2"] == result["figure2"]
    assert saved["source"] == str(source_run) and saved["task"] == "sst2" and saved["method"] == "lora"
    assert [(e["strategy"], e["fraction"], e["seed"]) for e in saved["table4"]] == [("s_low", 0.5, 0), ("s_high", 0.5, 0)]
    assert [(e["method"], e["fraction"]) for e in saved["figure2"]] == [("lora", 0.5), ("lora", 1.0)]
    assert all(0 <= e["score"] <= 100 for e in saved["table4"] + saved["figure2"])
    # Figure 2 at 50% is S_low_50% (same modules, same settings): one run, one directory
    assert saved["figure2"][0]["run_dir"] == saved["table4"][0]["run_dir"]
    assert saved["figure2"][0]["score"] == saved["table4"][0]["score"]
    assert not (out / "figure2" / "50pct-seed0").exists()
    assert (out / "figure2.png").stat().st_size > 0
    # the run trained the selected modules densely, nothing else
    run = load_run(source_run)
    chosen = load_run(saved["table4"][0]["run_dir"])
    assert not chosen.selective and chosen.config["target_modules"] == select_modules(run, "s_low", 0.5).modules
    assert sorted(chosen.modules) == sorted("base_model.model." + m for m in chosen.config["target_modules"])
    assert len(chosen.modules) == len(run.modules) // 2
    # resume: a second call trains nothing and returns the same results
    monkeypatch.setattr(sweep_module, "train", _refuse)
    again = sweep(source_run, out, fraction=0.5, fractions=[0.5, 1.0], strategies=["s_low", "s_high"], seeds=[0])
    assert again["table4"] == result["table4"] and again["figure2"] == result["figure2"]
    # the same folder spelt another way (relative, trailing slash) holds the same runs: reused, not retrained
    monkeypatch.chdir(tmp_path)
    relative = sweep(source_run, "sweep/", fraction=0.5, fractions=[0.5, 1.0], strategies=["s_low", "s_high"], seeds=[0])
    assert [e["score"] for e in relative["table4"]] == [e["score"] for e in result["table4"]]
    # the command line reaches the same runs
    from tspeft.cli import main as cli

    assert cli(["sweep", str(source_run), "--output", str(out), "--fractions", "0.5", "1.0",
                "--strategies", "s_low", "s_high"]) == 0
    assert json.loads((out / "sweep.json").read_text())["table4"] == result["table4"]
    # changed settings are not reused
    with pytest.raises(AssertionError, match="train\\(\\) called"):
        sweep(source_run, out, fractions=[], strategies=["s_low"], overrides={"lr": 1e-3})


def test_plan_random_draws_and_half_rank_patterns_build_the_intended_peft_model(source_run, tmp_path):
    from tspeft.data import get_task
    from tspeft.train import build_model

    points = plan_sweep(source_run, tmp_path, fraction=0.5, fractions=[], strategies=["random", "half_rank"])
    random = [p for p in points if p.strategy == "random"]
    assert [p.draw for p in random] == [0, 1, 2] and len({p.config.output_dir for p in random}) == 3
    assert len({tuple(p.selection.modules) for p in random}) > 1  # three different seeded draws
    half = next(p for p in points if p.strategy == "half_rank")
    run = load_run(source_run)
    assert half.config.target_modules == [m.removeprefix("base_model.model.") for m in run.modules]
    assert set(half.config.rank_pattern.values()) <= {4} and not half.config.selective
    model, _, _ = build_model(half.config, 10, get_task("sst2"))
    ranks = {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {"base_model.model." + k: v for k, v in half.config.rank_pattern.items()}
    # half the rank, the same scale alpha / r as the source run (peft's own default would double it)
    source = run.config["alpha"] / run.config["rank"]
    assert {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")} == {source}
    s_low = plan_sweep(source_run, tmp_path, fraction=0.25, fractions=[], strategies=["s_low"])[0]
    model, _, _ = build_model(s_low.config, 10, get_task("sst2"))
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == sorted(s_low.selection.modules) and len(adapted) == 3  # 25% of 12, no suffix collisions


# -------------------------------------------------------------------------------------------- verdicts


def test_verdict_rules_on_synthetic_numbers():
    assert judge_tables([80, 81, 79], [79.5, 80.5, 79], [0.5, 0.55, 0.45]).label == REPRODUCED
    assert judge_tables([80, 80], [78, 78], [0.5, 0.5]).label == PARTLY  # trails by 2 points
    assert judge_tables([80, 80], [80, 80], [0.9, 0.9]).label == PARTLY  # too sparse for the range
    assert judge_tables([80, 80], [80, 80], [0.05, 0.05]).label == NOT  # barely sparse
    assert judge_tables([80, 80], [75, 75], [0.5, 0.5]).label == NOT
    table4 = {"s_low": [85.7], "s_high": [83.0], "norm_relative": [83.2], "norm_abs": [80.5],
              "random": [84.5, 84.0, 84.1], "half_rank": [84.9]}
    assert judge_selection(table4, dense_all=85.0).label == REPRODUCED  # the paper's own Table 4
    assert judge_selection({**table4, "s_high": [85.3]}).label == PARTLY
    assert judge_selection({**table4, "s_low": [80.0]}).label == NOT
    assert judge_curve({0.2: [84.0], 0.5: [85.8], 0.6: [79.2], 1.0: [85.0]}).label == REPRODUCED  # DoRA's shape
    assert judge_curve({0.5: [85.0], 1.0: [84.8]}).label == PARTLY
    assert judge_curve({0.5: [84.0], 1.0: [85.0]}).label == NOT
    calm, wild = {"oscillation": 1.0, "range": 0.1}, {"oscillation": 3.0, "range": 0.7}
    assert judge_ablation([75, 76], [70, 71], calm, wild).label == REPRODUCED
    assert judge_ablation([75, 76], [75, 76], calm, wild).label == PARTLY
    assert judge_ablation([75, 76], [75.5, 76], calm, calm).label == NOT
    unlogged = {"oscillation": None, "range": 0.1}  # no log lines: final thresholds only
    assert judge_ablation([75, 76], [70, 71], unlogged, unlogged).label == PARTLY
    assert judge_polarization({"lora": 9.8, "dora": 41.3, "adalora": 11.4}).label == REPRODUCED
    assert judge_polarization({"lora": 9.8, "dora": 12.0}).label == PARTLY
    assert judge_polarization({"lora": 9.8, "dora": 5.0}).label == NOT
    assert combine([Verdict(REPRODUCED, ""), Verdict(REPRODUCED, "")]) == REPRODUCED
    assert combine([Verdict(REPRODUCED, ""), Verdict(NOT, "")]) == PARTLY
    assert combine([Verdict(NOT, ""), Verdict(NOT, "")]) == NOT
    # a claim whose runs are not in the plan (e.g. --methods lora: no DoRA) is not tested, not refuted
    assert judge_polarization({"lora": 9.8}).label == UNTESTED
    assert judge_curve({1.0: [85.0]}).label == UNTESTED
    assert combine([Verdict(UNTESTED, ""), Verdict(REPRODUCED, "")]) == REPRODUCED
    assert combine([Verdict(UNTESTED, "")]) == combine([]) == UNTESTED
    # a dense method at the majority-label rate learned nothing: its cell tests nothing
    assert judge_tables([57.5, 57.5], [57.5, 57.5], [0.5, 0.5], majority=57.5).label == UNTESTED
    assert judge_tables([80, 80], [80, 80], [0.5, 0.5], majority=57.5).label == REPRODUCED


def test_choose_setting_and_threshold_summary():
    grid = [{"s": 1e-3, "lam": 1e-5, "score": 80.0, "sparsity": 0.3},
            {"s": 1e-3, "lam": 1e-4, "score": 79.5, "sparsity": 0.6},
            {"s": 3e-3, "lam": 1e-5, "score": 77.0, "sparsity": 0.9}]
    assert choose_setting(grid)["lam"] == 1e-4  # sparsest within 1 point of the best
    assert choose_setting(grid, tolerance=0.1)["sparsity"] == 0.3
    rising = [{"step": i, "modules": {"m": {"threshold": 0.01 * i}}} for i in range(1, 11)]
    swinging = [{"step": i, "modules": {"m": {"threshold": 0.1 * (i % 2)}}} for i in range(1, 11)]
    assert threshold_summary([rising]) == pytest.approx({"oscillation": 1.0, "range": 0.1})
    assert threshold_summary([swinging])["oscillation"] == pytest.approx(10.0)
    assert threshold_summary([[]], [{"m": 0.2, "n": 0.4}]) == {"oscillation": None, "range": pytest.approx(0.3)}


# ------------------------------------------------------------------------------- reproduce, train faked

TYPES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
ALL_MODULES = [f"bert.encoder.layer.{layer}.{t}" for layer in range(2) for t in TYPES]


def fake_train(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Write a synthetic run directory (run.json, log.jsonl) for cfg and return its record."""
    settings = dataclasses.asdict(cfg)
    digest = int(hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(), 16)
    names = cfg.target_modules or ALL_MODULES
    polar = cfg.method == "dora"
    modules = {}
    for i, name in enumerate(names):
        sparsity = (1.0 if i % 2 else 0.0) if polar else 0.4 + 0.02 * (i % 5)
        modules["base_model.model." + name] = {
            "sparsity": sparsity if cfg.selective else None, "threshold": 0.1 if cfg.selective else None,
            "ratio_mean": 0.1 + 0.01 * i, "delta_norm_mean": 1.0 + (i * 7) % 5, "rank": cfg.rank,
            "params": 64 * cfg.rank + 16 * polar, "fixed_params": 16 * polar}  # as training writes: DoRA's magnitude
    score = 70.0 + (digest % 200) / 10
    record = {"task": cfg.task, "model": cfg.model, "method": cfg.method, "selective": cfg.selective,
              "seed": cfg.seed, "label": cfg.label, "metric": "accuracy", "score": score, "metrics": {"accuracy": score},
              "sparsity": 0.5 if cfg.selective else None, "note": f"{cfg.task}: synthetic", "steps": 10,
              "config": settings, "modules": modules}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wiggle = 0.05 if cfg.rule == "plain" else 0.0
    log = [{"step": s, "loss": 0.7 - 0.01 * s, "modules": {
        n: {"threshold": 0.01 * s + wiggle * (s % 2), "sparsity": 0.5} for n in modules} if cfg.selective else {}}
        for s in range(1, 11)]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (out / "run.json").write_text(json.dumps(record))
    return record


def test_reproduce_plans_resumes_and_writes_the_report(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_module, "train", lambda cfg, overwrite=False: calls.append(cfg.output_dir) or fake_train(cfg))
    report = tmp_path / "docs" / "results.md"
    args = ["--smoke", "--runs", str(tmp_path / "runs"), "--output", str(report), "--device", "cpu"]
    assert reproduce.main(args) == 0
    counts = reproduce.count_plan(reproduce.MODES["smoke"], reproduce.PARTS)
    # strategies that pick the same modules share one run, so the plan's count is an upper bound
    assert len(calls) == len(set(calls)) and sum(counts.values()) - 3 <= len(calls) <= sum(counts.values())
    text = report.read_text()
    assert text.startswith("# ") and "Generated by `" in text and "--smoke" in text.split("\n\n")[1]
    # fake runs record no provenance; every run of the page is counted under "not recorded"
    assert f"Runs by the commit that trained them (a run is reused while its settings match, whatever the code): " \
        f"not recorded: {len(set(calls))}." in text
    for heading in ("## Verdicts", "Tables 1–3", "Table 4", "Figure 2", "Appendix A.2", "Table 5", "How λ and s"):
        assert heading in text
    summary = json.loads((tmp_path / "docs" / "results" / "results.json").read_text())
    assert len(summary["verdicts"]) == 5
    assert {v["verdict"] for v in summary["verdicts"]} <= {REPRODUCED, PARTLY, NOT, UNTESTED}
    assert {Path(p).name for p in summary["figures"].values()} >= {"figure2.png", "ablation_sst2.png",
                                                                    "table5_lora.png", "table5_dora.png"}
    assert all(Path(p).stat().st_size > 0 for p in summary["figures"].values())
    assert "](results/figure2.png)" in text  # linked relative to the report
    tune = [c for c in calls if "/tune/" in c]
    assert all(json.loads((Path(c) / "run.json").read_text())["config"]["eval_on"] == "val" for c in tune)
    tables = [c for c in calls if "/tables/" in c]
    assert all(json.loads((Path(c) / "run.json").read_text())["config"]["eval_on"] == "test" for c in tables)
    # lambda and s are tuned per method (on the first task here) and each method's TS runs use its own choice
    methods = reproduce.MODES["smoke"].methods
    assert {json.loads((Path(c) / "run.json").read_text())["config"]["method"] for c in tune} == set(methods)
    for c in tables:
        cfg = json.loads((Path(c) / "run.json").read_text())["config"]
        if cfg["selective"]:
            pick = summary["chosen"][cfg["task"]][cfg["method"]]
            assert (cfg["s"], cfg["lam"]) == (pick["s"], pick["lam"])
            points = {(p["s"], p["lam"]): p["score"] for p in pick["grid"]}
            assert len(points) == len(reproduce.MODES["smoke"].grid_lam) and points[(pick["s"], pick["lam"])] == pick["score"]
    # re-running trains nothing and writes the same verdicts
    monkeypatch.setattr(sweep_module, "train", _refuse)
    assert reproduce.main(args) == 0
    again = json.loads((tmp_path / "docs" / "results" / "results.json").read_text())
    assert again["verdicts"] == summary["verdicts"]


def test_reproduce_shards_share_the_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_module, "train", lambda cfg, overwrite=False: calls.append(cfg.output_dir) or fake_train(cfg))
    base = ["--smoke", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "results.md"),
            "--methods", "lora", "--parts", "tables", "table4", "--wait", "0"]
    done = set()
    for attempt in range(8):  # one process per shard would wait; here they take turns
        k = attempt % 2
        try:
            assert reproduce.main([*base, "--shard", f"{k}/2"]) == 0
            done.add(k)
        except RuntimeError as exc:
            assert "run again" in str(exc)
        if done == {0, 1}:
            break
    assert done == {0, 1} and len(calls) == len(set(calls))
    monkeypatch.setattr(sweep_module, "train", _refuse)
    assert reproduce.main(base) == 0
    assert (tmp_path / "results.md").is_file()
    with pytest.raises(ValueError, match="K/N"):
        reproduce.main([*base, "--shard", "2/2"])



def test_sweep_offers_no_flags_its_dense_points_would_ignore(capsys):
    """The points train the selected modules densely: --targets (target_modules wins) and the threshold
    settings would be recorded, ignored, and force a retrain of every finished point."""
    from tspeft.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["sweep", "--help"])
    text = capsys.readouterr().out
    assert "--fraction" in text
    for flag in ("--targets", "--follow-schedule", "--lam", "--rule"):
        assert flag not in text
