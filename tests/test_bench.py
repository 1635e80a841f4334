"""The benchmark (tiny preset: schema and rows, never seconds) and the fused speed paths it measures."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import batch, tiny_llama, with_adapter

import tspeft
from tspeft import bench, measure

ROWS = [
    "frozen base (floor)",
    "peft LoRA", "TS-LoRA tau=0", "TS-LoRA ~50% active",
    "peft DoRA", "TS-DoRA tau=0", "TS-DoRA ~50% active",
    "peft AdaLoRA", "TS-AdaLoRA tau=0", "TS-AdaLoRA ~50% active",
    "parallel adapter", "TS-Adapter tau=0", "TS-Adapter ~50% active",
]


def test_tiny_benchmark_json_has_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.txt"
    argv = ["--preset", "tiny", "--repeats", "2", "--warmup", "1", "--calibration-iters", "5", "--quiet", "--threads", "1",
            "--json", str(out), "--table", str(table)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and [r["name"] for r in rows] == ROWS
    assert table.read_text().strip() == printed.strip()
    for r in rows:
        for key in ("name", "ms", "peak_mib", "ratio_to_dense", "ratio_to_floor", "saved_mib", "sparsity",
                    "device", "dtype", "shapes", "peak_mib_meaning", "ms_runs", "cpu_ms"):
            assert key in r, (r["name"], key)
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["preset"] == "tiny"
        assert r["ms"] > 0 and len(r["ms_runs"]) == 2 and r["peak_mib"] > 0 and r["saved_mib"] >= 0
        assert r["name"] in printed
        if r["ts"]:
            assert r["ratio_to_dense"] > 0 and r["mem_ratio_to_dense"] > 0
            lo, hi = r["ratio_to_dense_ci95"]
            assert lo <= r["ratio_to_dense"] <= hi
            f = r["flops"]
            assert f["impl_skip_gflop"] == 0.0
            if r["kind"] != "dora":  # low rank: the gate needs a third of an inactive token's adapter FLOPs
                assert f["bound_skip_gflop"] == pytest.approx(3 * f["gate_needs_gflop"])
            assert f["achievable_skip_gflop"] == pytest.approx(f["bound_skip_gflop"] - f["gate_needs_gflop"])
            assert f["adapter_gflop"] >= f["bound_skip_gflop"] >= f["achievable_skip_gflop"] >= 0
        else:
            assert r["ratio_to_dense"] is None and r["flops"] is None
    sp = {r["name"]: r["sparsity"] for r in rows}
    for kind in ("LoRA", "DoRA", "AdaLoRA", "Adapter"):
        assert sp[f"TS-{kind} tau=0"] == 0.0
        assert 0.2 < sp[f"TS-{kind} ~50% active"] < 0.8  # calibrated thresholds: about half the tokens


def test_control_rows_pair_each_dense_row_with_a_copy_of_itself(capsys):
    """--control: an A/A row after each dense row, its ratio taken to that row; TS rows still pair with the first."""
    argv = ["--preset", "tiny", "--kinds", "lora,adapter", "--repeats", "3", "--warmup", "1", "--calibration-iters", "3",
            "--no-memory", "--quiet", "--threads", "1", "--control"]
    rows = bench.run("tiny", kinds=("lora", "adapter"), repeats=3, warmup=1, calibration_iters=3, memory=False,
                     control=True)
    names = [r["name"] for r in rows]
    assert names == ["frozen base (floor)", "peft LoRA", "peft LoRA, second copy", "TS-LoRA tau=0", "TS-LoRA ~50% active",
                     "parallel adapter", "parallel adapter, second copy", "TS-Adapter tau=0", "TS-Adapter ~50% active"]
    by = {r["name"]: r for r in rows}
    for dense, copy_, ts in (("peft LoRA", "peft LoRA, second copy", "TS-LoRA tau=0"),
                             ("parallel adapter", "parallel adapter, second copy", "TS-Adapter tau=0")):
        c = by[copy_]
        assert c["setting"] == "control" and not c["ts"] and c["flops"] is None
        assert c["ratio_to_dense"] == measure.paired_ratio(c["ms_runs"], by[dense]["ms_runs"])
        assert by[ts]["ratio_to_dense"] == measure.paired_ratio(by[ts]["ms_runs"], by[dense]["ms_runs"])
        lo, hi = c["ratio_to_dense_ci95"]
        assert lo <= c["ratio_to_dense"] <= hi
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "peft LoRA, second copy" in printed and "(A/A)" in printed


def test_benchmark_memory_follows_recompute_z():
    """TS-LoRA's peak and saved activations on the tiny preset (no dropout): "all" < "auto" <= peft < "none"."""
    rows = {}
    for policy in ("none", "auto", "all"):
        out = bench.run("tiny", kinds=("lora",), repeats=1, warmup=0, calibration_iters=2, recompute_z=policy)
        rows[policy] = {r["name"]: r for r in out}
        assert all(r["recompute_z"] == policy for r in out)
    ts = {policy: rows[policy]["TS-LoRA tau=0"] for policy in rows}
    assert ts["all"]["saved_mib"] < ts["auto"]["saved_mib"] < ts["none"]["saved_mib"]
    assert ts["all"]["mem_ratio_to_dense"] < ts["auto"]["mem_ratio_to_dense"] <= 1.0 < ts["none"]["mem_ratio_to_dense"]


def _side_comparison(main, tmp_path, capsys) -> tuple[list[dict], str]:
    """Run a side comparison's command line on the tiny preset; return (its JSON rows, its printed table)."""
    out = tmp_path / "rows.json"
    argv = ["--preset", "tiny", "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_recompute_comparison_pairs_the_policies(tmp_path, capsys):
    rows, printed = _side_comparison(bench.recompute_main, tmp_path, capsys)
    assert [r["recompute_z"] for r in rows] == [None, "none", "auto", "all"]
    assert rows[0]["name"] == "peft LoRA" and all(r["name"] in printed for r in rows)
    assert rows[1]["ratio_to_first"] == 1.0 and len(rows[2]["ms_runs"]) == 2
    saved = [r["saved_mib"] for r in rows[1:]]
    assert saved[0] > saved[1] > saved[2]
    assert rows[2]["mem_ratio_to_dense"] <= 1.0 < rows[1]["mem_ratio_to_dense"]
    with pytest.raises(SystemExit):
        bench.recompute_main(["--policies", "some"])


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter"])
def test_gate_bypassed_applies_the_update_to_every_token_and_restores_the_gate(method):
    """Inside gate_bypassed the gated model computes what its gate computes at threshold 0 (every token
    active), against peft's dense layer too, with a zero threshold gradient; the gate is back afterwards."""
    from tspeft import lowrank

    originals = lowrank._rank_forward, lowrank._rank_backward, lowrank._base_norm
    dense = with_adapter(tiny_llama(), "llama", method, dropout=0.0)
    gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(lam=1e-3))
    b = batch("llama")

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        grads = {n.replace("base_model.model.", ""): p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None and "ts_threshold" not in n}
        taus = {n: p.grad.clone() for n, p in model.named_parameters() if "ts_threshold" in n and p.grad is not None}
        return loss.detach(), grads, taus

    loss_gate, grads_gate, taus_gate = step(gated)
    with bench.gate_bypassed():
        loss_free, grads_free, taus_free = step(gated)
    loss_dense, grads_dense, _ = step(dense)
    assert (lowrank._rank_forward, lowrank._rank_backward, lowrank._base_norm) == originals
    torch.testing.assert_close(loss_free, loss_gate)
    torch.testing.assert_close(loss_free, loss_dense)
    for name, g in grads_dense.items():
        torch.testing.assert_close(grads_free[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads_gate[name], g, rtol=1e-4, atol=1e-6)
    assert taus_free and all(float(t.abs().max()) == 0.0 for t in taus_free.values())
    assert any(float(t.abs().max()) > 0.0 for t in taus_gate.values())  # the gate's own g_k, which the bypass skips


def test_gate_cost_comparison_pairs_gated_bypassed_and_dense(tmp_path, capsys):
    rows, printed = _side_comparison(bench.gate_cost_main, tmp_path, capsys)
    assert [r["name"] for r in rows] == ["peft LoRA", "TS-LoRA tau=0, gate bypassed", "TS-LoRA tau=0"]
    assert all(r["name"] in printed for r in rows) and "x bypassed" in printed
    assert rows[0]["ratio_to_dense"] is None and rows[1]["ratio_to_dense"] > 0 and rows[2]["ratio_to_bypassed"] > 0
    assert rows[1]["ratio_to_bypassed"] is None and len(rows[2]["ms_runs"]) == 2
    with pytest.raises(ValueError, match="rank-space"):
        bench.compare_gate_cost("tiny", kind="dora", repeats=1)
    with pytest.raises(SystemExit):
        bench.gate_cost_main(["--kind", "dora"])


def test_paired_ratio_and_its_bootstrap_interval():
    ref = [100.0, 200.0, 100.0, 100.0, 300.0]
    times = [99.0, 210.0, 95.0, 101.0, 270.0]  # ratios .99, 1.05, .95, 1.01, .90: median .99
    assert measure.paired_ratio(times, ref) == pytest.approx(0.99)
    lo, hi = measure.paired_ratio_ci(times, ref)
    assert 0.90 <= lo <= 0.99 <= hi <= 1.05 and lo < hi
    assert measure.paired_ratio_ci([2.0] * 4, [1.0] * 4) == [2.0, 2.0]


def test_saved_activations_count_what_backward_will_read():
    """Only storages held by graph nodes still alive count: a dropped node's saved tensor and excluded weights do not."""
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    with measure.SavedActivations([w]) as saved:
        kept = x.exp()  # ExpBackward keeps its result: 4000 bytes
        y = x * w  # MulBackward keeps x (counted) and w (excluded)
        tmp = (x * 3.0).sin()  # SinBackward keeps x * 3 ...
        dropped = tmp.detach()
        del tmp  # ... until its node is dropped with tmp
        for _ in range(4):  # freed storages whose addresses may be reused
            torch.empty(1000)
    assert saved.nbytes() == 8000
    assert kept.requires_grad and y.requires_grad and not dropped.requires_grad
    del kept
    assert saved.nbytes() == 4000


def test_live_storage_tracker_counts_allocations_and_frees():
    tracker = measure.LiveStorageBytes()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        del a, b, c
        d = torch.empty(250, dtype=torch.float32)  # 1000 bytes, after the frees
    assert tracker.peak == 8000
    assert tracker.live == 1000
    del d


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_paths_equal_unfused_paths_fp64(method, dropout, monkeypatch):
    """The fused gates (x's gradient shared through W0 and A) against the plain rank-space / DoRA gates."""
    dense = with_adapter(tiny_llama(dtype=torch.float64), "llama", method, dropout=dropout)
    fused = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(lam=1e-2))
    plain = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(lam=1e-2))
    data = batch("llama", pad=3)
    with torch.no_grad():
        fused.eval()(**data)  # thresholds around each module's mean ratio: partly active
    ratio = {n: v["ratio_mean"] for n, v in tspeft.module_stats(fused).items()}
    taus = {n: 0.0 if i % 4 == 0 else ratio[n] * (0.7 + 0.2 * (i % 4)) for i, n in enumerate(ratio)}
    results = []
    for model, unfused in ((fused, False), (plain, True)):
        if unfused:
            monkeypatch.setattr("tspeft.layers._frozen_linear", lambda layer: None)
        with torch.no_grad():
            for n, t in tspeft.threshold_parameters(model).items():
                t.fill_(taus[n])
        tspeft.reset_stats(model)
        model.train()
        torch.manual_seed(7)  # same dropout masks
        out = model(**data)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads, tspeft.module_stats(model)))
        monkeypatch.undo()
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-10)
    assert g0.keys() == g1.keys() and any(n.endswith("ts_threshold") for n in g0)
    for n in g0:
        tol = 1e-6 if g0[n].dtype == torch.float32 else 1e-9
        torch.testing.assert_close(g0[n], g1[n], rtol=tol, atol=tol, msg=lambda m, n=n: f"{n}: {m}")
    assert 0 < sum(v["active"] for v in s0.values()) < sum(v["tokens"] for v in s0.values())
    for name in s0:
        assert s0[name]["active"] == s1[name]["active"] and s0[name]["tokens"] == s1[name]["tokens"]


def test_gate_models_and_benchmark_import_without_the_data_and_plot_packages():
    # benchmarks/gpu_check.sh runs on a machine with torch, transformers, peft and triton only: importing the
    # gate, the test helpers' model loading and the benchmark must not need pyarrow (bundled data) or matplotlib.
    code = (
        "import sys\n"
        "sys.modules.update({'pyarrow': None, 'pyarrow.ipc': None, 'matplotlib': None})\n"
        "import tspeft, tspeft.bench, tspeft.models, tspeft.kernels\n"
        "try:\n"
        "    tspeft.data.bundled._read_table('.')\n"
        "except ImportError:\n"
        "    print('data needs pyarrow')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "data needs pyarrow"  # the import was blocked, so the check means something


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("dora", 0.0), ("dora", 0.1), ("adalora", 0.0), ("adapter", 0.1)])
def test_flop_accounting_per_token_cost_matches_a_flop_counter(method, dropout):
    """The dense adapter's FLOPs per token, counted by torch's FlopCounterMode on the peft (dense) model: the
    difference between two batch sizes cancels what is paid once per step (DoRA's column norm)."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(model, b):
        data = batch("llama", b=b, t=10, pad=0)
        with FlopCounterMode(display=False) as fc:
            emb = model.get_input_embeddings()(data["input_ids"]).detach().requires_grad_()
            model(inputs_embeds=emb, attention_mask=data["attention_mask"], labels=data["labels"]).loss.backward()
        return fc.get_total_flops()

    floor = tiny_llama(dtype=torch.float64).requires_grad_(False)
    dense = with_adapter(tiny_llama(dtype=torch.float64), "llama", method, dropout=dropout)
    gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig())
    stats = {n: {"active": 1, "tokens": 1} for n in tspeft.gated_modules(gated)}
    per_token = [(counted(dense, b) - counted(floor, b)) / 1e9 for b in (3, 6)]
    formula = [measure.flop_accounting(gated, 10 * b, stats)["adapter_gflop"] for b in (3, 6)]
    assert formula[1] - formula[0] == pytest.approx(per_token[1] - per_token[0], rel=1e-9)
    if method == "dora":  # once per step: A W0^T, A A^T and B (A A^T) per module, by hand
        shapes = [(m.get_base_layer().in_features, m.get_base_layer().out_features)
                  for m in tspeft.gated_modules(gated).values()]
        expected = sum(2 * 4 * i * o + 2 * 16 * (i + o) for i, o in shapes) / 1e9
        assert measure.flop_accounting(gated, 30, stats)["per_step_gflop"] == pytest.approx(expected)
