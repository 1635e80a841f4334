"""Data parallel: 2 gloo processes with DDP equal 1 process on the global batch (thresholds, adapters, counts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tspeft

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _start_two_ranks(out: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only: 127.0.0.1
    return [
        subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), "--rank", str(r), "--world", "2", "--out", str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]


def _collect(procs: list[subprocess.Popen], out: Path) -> list[dict]:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed ({p.returncode}):\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_gloo_ranks_equal_one_process_on_the_global_batch(tmp_path):
    procs = _start_two_ranks(tmp_path)
    try:
        ref = ddp_worker.train(rank=0, world=1)  # the 1-process reference, while the ranks run
    finally:
        ranks = _collect(procs, tmp_path)
    # thresholds are parameters: averaged by DDP, the same on both ranks after every single step
    for step, (t0, t1) in enumerate(zip(ranks[0]["taus"], ranks[1]["taus"])):
        assert t0 == t1, f"ranks disagree on thresholds after step {step + 1}"
    assert len(ranks[0]["taus"]) == ddp_worker.STEPS
    # ... and equal the 1-process run: lambda's term is multiplied by the world size to undo DDP's mean
    final = ref["taus"][-1]
    for name, tau in final.items():
        assert abs(ranks[0]["taus"][-1][name] - tau) <= 1e-6, name
    assert ref["params"].keys() == ranks[0]["params"].keys()
    for name, p in ref["params"].items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["params"][name], p, rtol=0, atol=1e-6, msg=f"rank {r}: {name}")
    # the run is non-trivial: thresholds moved apart from each other and sparsity is partial
    assert len({round(t, 4) for t in final.values()}) > 1 and min(final.values()) > 0.1
    sparsity = 1 - sum(ref["active"].values()) / sum(ref["tokens"].values())
    assert 0.2 < sparsity < 0.8, sparsity
    # statistics are per rank and add up to the global counts (DDP must not broadcast rank 0's counts)
    for name, tokens in ref["tokens"].items():
        assert ranks[0]["tokens"][name] + ranks[1]["tokens"][name] == tokens, name
        assert ranks[0]["active"][name] + ranks[1]["active"][name] == ref["active"][name], name
        # ... and tspeft.all_reduce_stats gives every rank the global counts
        for r in range(2):
            assert ranks[r]["tokens_all"][name] == tokens and ranks[r]["active_all"][name] == ref["active"][name]
    real = sum(int(ddp_worker.global_batch(s)["attention_mask"].sum()) for s in range(ddp_worker.STEPS))
    assert set(ref["tokens"].values()) == {real}  # padding never counted


def test_stats_buffers_are_kept_out_of_ddp_buffer_broadcast():
    model = ddp_worker.build()
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    buffers = {n for n, _ in model.named_buffers() if n.endswith("ts_stats")}
    assert buffers and buffers == ignored
    assert not any(n.endswith("ts_threshold") for n in ignored)  # thresholds must be averaged
    tspeft.disable(model)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")


def test_fsdp2_sharded_thresholds_save_from_the_gathered_state_dict(tmp_path):
    import torch.multiprocessing as mp

    if not hasattr(torch.distributed, "fsdp") or not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    out = tmp_path / "adapter"
    mp.spawn(ddp_worker.fsdp2_save, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    loaded = tspeft.from_pretrained(ddp_worker.tiny_llama(seed=0), out)
    assert set(tspeft.thresholds(loaded).values()) == {0.125}
