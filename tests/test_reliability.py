"""Reliability: gradient checkpointing, mixed precision and loss scaling, accumulation, crash-safe saving,
tampered state files, and bad input (non-finite loss, all padding, empty batch, zero base, bad masks)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny_bert, tiny_llama, with_adapter
from safetensors import safe_open
from safetensors.torch import save_file

import tspeft

TESTS = Path(__file__).resolve().parent


def _ts_llama(*, lam: float = 1e-2, s: float = 2e-2, init: float = 0.18, dtype=torch.float32):
    """Return a tiny TS-LoRA Llama whose ratios are about 0.2: thresholds near `init` give partial masks."""
    model = with_adapter(tiny_llama(dtype=dtype), "llama", "lora", random_b=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.01).to(p.dtype))
    return tspeft.enable(model, tspeft.TSConfig(lam=lam, s=s, init_threshold=init))


def _tau_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in tspeft.threshold_parameters(model).items()}


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    taus = {id(p) for p in tspeft.threshold_parameters(model).values()}
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and id(p) not in taus}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _counts(model) -> dict[str, tuple[int, int]]:
    return {n: (v["active"], v["tokens"]) for n, v in tspeft.module_stats(model).items()}


def _token_loss_sum(model, data) -> torch.Tensor:
    """Sum of next-token cross entropies over real labels: micro-batch sums add up to the batch's."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def _n_labels(data) -> int:
    return int((data["labels"][:, 1:] != -100).sum())


# --------------------------------------------------------------------------------------------------
# 2. Gradient checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_grads_and_counts(reentrant):
    data = batch("llama", b=3, t=10, pad=3)
    results = []
    for checkpointing in (False, True):
        model = _ts_llama()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:  # frozen embeddings: reentrant checkpoints need an input that requires grad
                model.enable_input_require_grads()
        calls = []
        first = next(iter(tspeft.gated_modules(model).values()))
        first.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model(**data).loss.backward()
        results.append((len(calls), _tau_grads(model), _adapter_grads(model), _counts(model)))
    (calls0, tau0, ad0, counts0), (calls1, tau1, ad1, counts1) = results
    assert calls0 == 1 and calls1 == 2  # the checkpointed layer really ran again during backward
    assert tau0.keys() == tau1.keys() and ad0.keys() == ad1.keys() and ad0
    for n in tau0:
        torch.testing.assert_close(tau1[n], tau0[n], rtol=1e-6, atol=1e-9, msg=n)
    for n in ad0:
        torch.testing.assert_close(ad1[n], ad0[n], rtol=1e-6, atol=1e-9, msg=n)
    assert counts1 == counts0  # the recompute does not count the same tokens twice
    real = int(data["attention_mask"].sum())
    assert {t for _, t in counts0.values()} == {real}
    assert any(0 < a < t for a, t in counts0.values())  # masks are partial: the gate matters


def test_checkpoint_context_fn_replays_each_forwards_padding_mask():
    """Two forwards with different padding, one backward: the recompute must use each forward's own mask."""
    a = batch("llama", seed=1, b=3, t=10, pad=0)  # no padding
    b = batch("llama", seed=2, b=3, t=10, pad=6)  # same shape, rows 1-2 mostly padding
    results = {}
    for how in ("plain", "checkpoint + context_fn", "checkpoint alone"):
        model = _ts_llama()
        model.train()
        if how != "plain":
            kwargs = {"use_reentrant": False}
            if how == "checkpoint + context_fn":
                kwargs["context_fn"] = tspeft.checkpoint_context_fn(model)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        (model(**a).loss + model(**b).loss).backward()
        results[how] = (_tau_grads(model), _adapter_grads(model))
    tau0, ad0 = results["plain"]
    tau1, ad1 = results["checkpoint + context_fn"]
    for n in tau0:
        torch.testing.assert_close(tau1[n], tau0[n], rtol=1e-6, atol=1e-9, msg=n)
    for n in ad0:
        torch.testing.assert_close(ad1[n], ad0[n], rtol=1e-6, atol=1e-9, msg=n)
    # without it the first forward is recomputed under the second's mask: g_k counts the wrong tokens
    tau2, _ = results["checkpoint alone"]
    assert any(not torch.allclose(tau2[n], tau0[n], rtol=1e-6, atol=1e-9) for n in tau0)


# --------------------------------------------------------------------------------------------------
# 3. Mixed precision and loss scaling


def test_bf16_autocast_trains_close_to_fp32():
    data = batch("llama", b=3, t=10, pad=3)
    results = {}
    for bf16 in (False, True):
        model = _ts_llama()
        opt = tspeft.optimizer(model, lr=1e-3)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**data).loss
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
        results[bf16] = (tspeft.thresholds(model), tspeft.overall_sparsity(model))
    (tau32, sp32), (tau16, sp16) = results[False], results[True]
    assert any(abs(t - 0.18) > 1e-3 for t in tau32.values())  # thresholds moved
    for n in tau32:
        assert abs(tau16[n] - tau32[n]) < 5e-3, (n, tau16[n], tau32[n])
    assert 0.0 < sp32 < 1.0 and abs(sp16 - sp32) < 0.05


class _HandScaler:
    """What tspeft reads from a torch.amp.GradScaler: `_scale` and `is_enabled()`."""

    def __init__(self, scale: float) -> None:
        self._scale = torch.tensor(scale)

    def is_enabled(self) -> bool:
        return True


def test_loss_scaling_by_hand_unscaled_grads_equal_the_unscaled_run():
    """fp32, exact: loss x S, then grads / S, equals the plain run, lambda's term included."""
    data = batch("llama", b=3, t=10, pad=3)
    scale = 1024.0
    runs = {}
    for mode in ("plain", "scaled", "scaler_not_attached"):
        model = _ts_llama(lam=0.05)
        loss = model(**data).loss
        if mode != "plain":
            if mode == "scaled":
                tspeft.attach_grad_scaler(model, _HandScaler(scale))
            loss = loss * scale
        loss.backward()
        div = 1.0 if mode == "plain" else scale
        runs[mode] = ({n: g / div for n, g in _tau_grads(model).items()},
                      {n: g / div for n, g in _adapter_grads(model).items()})
    for n, g in runs["plain"][0].items():
        torch.testing.assert_close(runs["scaled"][0][n], g, rtol=1e-5, atol=1e-7, msg=n)
    for n, g in runs["plain"][1].items():
        torch.testing.assert_close(runs["scaled"][1][n], g, rtol=1e-5, atol=1e-9, msg=n)
    # without attach_grad_scaler, lambda's term would come out divided by S: the test can tell
    assert any(not torch.allclose(runs["scaler_not_attached"][0][n], g, rtol=1e-3) for n, g in runs["plain"][0].items())


def test_fp16_grad_scaler_unscaled_threshold_grads_equal_the_unscaled_run():
    data = batch("llama", b=3, t=10, pad=3)
    runs = {}
    for enabled in (False, True):
        model = _ts_llama(lam=0.05)
        opt = tspeft.optimizer(model, lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=enabled)
        tspeft.attach_grad_scaler(model, scaler)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**data).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        runs[enabled] = (_tau_grads(model), _adapter_grads(model))
    for n, g in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][n], g, rtol=1e-4, atol=1e-6, msg=n)
    for n, g in runs[False][1].items():  # fp16 backward: the unscaled run may underflow a little
        torch.testing.assert_close(runs[True][1][n], g, rtol=2e-2, atol=1e-4, msg=n)


def test_fp16_step_skipped_for_inf_does_not_move_thresholds():
    data = batch("llama", b=3, t=10, pad=3)
    model = _ts_llama()
    opt = tspeft.optimizer(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tspeft.attach_grad_scaler(model, scaler)

    def step():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**data).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        tspeft.clip_grad_norm_(model, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step()
    taus, params = tspeft.thresholds(model), _trainable(model)
    state = {n: {k: v.clone() for k, v in s.items()} for n, s in tspeft.threshold_state(model).items()}
    assert any(abs(t - 0.18) > 1e-4 for t in taus.values())  # the first step moved thresholds
    scaler.update(new_scale=2.0**40)  # fp16 gradients overflow at this scale
    step()
    assert scaler.get_scale() == 2.0**39  # the scaler saw inf, skipped the step and backed off
    assert tspeft.thresholds(model) == taus
    after = tspeft.threshold_state(model)
    for n, s in state.items():
        for k, v in s.items():
            assert torch.equal(after[n][k], v), (n, k)
    for n, p in _trainable(model).items():
        assert torch.equal(p, params[n]), n


# --------------------------------------------------------------------------------------------------
# 4. Gradient accumulation


@pytest.mark.parametrize("pad", [False, True])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(pad):
    k, steps = 2, 3
    batches = [batch("llama", seed=s, b=4, t=10, pad=3 if pad else 0) for s in range(steps)]

    def loss_of(model, d, n_global):
        if pad:  # micro-batches hold different token counts: normalise token sums by the global count
            return _token_loss_sum(model, d) / n_global
        return model(**d).loss  # HF mean over labels: every micro-batch has the same count here

    finals = []
    for micro in (False, True):
        model = _ts_llama()
        opt = tspeft.optimizer(model, lr=1e-3)
        for data in batches:
            n = _n_labels(data)
            if micro:
                size = data["input_ids"].shape[0] // k
                for j in range(k):
                    part = {key: v[j * size:(j + 1) * size] for key, v in data.items()}
                    loss = loss_of(model, part, n)
                    (loss if pad else loss / k).backward()
            else:
                loss_of(model, data, n).backward()
            opt.step()
            opt.zero_grad()
        finals.append((tspeft.thresholds(model), _trainable(model), tspeft.overall_sparsity(model)))
    (tau_full, p_full, sp_full), (tau_acc, p_acc, sp_acc) = finals
    assert len(set(tau_full.values())) > 1
    for n, t in tau_full.items():
        assert abs(tau_acc[n] - t) <= 1e-6, n
    for n, p in p_full.items():
        torch.testing.assert_close(p_acc[n], p, rtol=0, atol=1e-6, msg=n)
    assert sp_acc == sp_full and 0.0 < sp_full < 1.0


# --------------------------------------------------------------------------------------------------
# 5. Crash safety and tampered state

_CHILD = """
import os, sys, time
import safetensors.torch as st

hang_at, calls, real_save_file = int(os.environ["HANG_AT"]), [], st.save_file


def save_file_then_hang(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) < hang_at:
        return real_save_file(tensors, filename, metadata=metadata)
    data = st.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:  # half of the file, on disk, then stall until killed
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    print("WRITING", filename, flush=True)
    time.sleep(120)


st.save_file = save_file_then_hang  # before peft / tspeft bind the name
sys.path[:0] = [os.environ["TESTS"], os.path.dirname(os.environ["TESTS"])]  # conftest, this checkout's tspeft
import torch
from conftest import tiny_bert, with_adapter
import tspeft

model = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora", seed=9), tspeft.TSConfig(lam=1e-2))
with torch.no_grad():
    for p in tspeft.threshold_parameters(model).values():
        p.fill_(0.7)
model.save_pretrained(sys.argv[1])
print("DONE", flush=True)
"""


def _bert_inputs():
    return {k: v for k, v in batch("bert").items() if k != "labels"}


@pytest.mark.parametrize("hang_at", [1, 2], ids=["in-peft-adapter-weights", "in-tspeft-state"])
def test_sigkill_mid_save_leaves_the_previous_save_whole(tmp_path, hang_at):
    folder = tmp_path / "adapter"
    model = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora"), tspeft.TSConfig(lam=1e-2))
    with torch.no_grad():
        for p in tspeft.threshold_parameters(model).values():
            p.fill_(0.2)
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = tspeft.from_pretrained(tiny_bert(), folder)(**_bert_inputs()).logits
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    env = dict(os.environ, HANG_AT=str(hang_at), TESTS=str(TESTS), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("WRITING"), f"the child did not reach the write: {line!r}"
        assert Path(line.split(maxsplit=1)[1].strip()).parent != folder  # it writes a staged copy
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after == before  # every previously saved file is byte for byte what it was
    loaded = tspeft.from_pretrained(tiny_bert(), folder)
    with torch.no_grad():
        assert torch.equal(loaded(**_bert_inputs()).logits, expected)
    assert all(abs(t - 0.2) < 1e-7 for t in tspeft.thresholds(loaded).values())
    # the next save goes through, and the leftover staging folder of the killed one is harmless
    model.save_pretrained(folder)
    assert torch.equal(tspeft.from_pretrained(tiny_bert(), folder)(**_bert_inputs()).logits, expected)


def test_non_main_process_writes_no_token_selection_files(tmp_path):
    model = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora"), tspeft.TSConfig())
    model.save_pretrained(tmp_path, is_main_process=False)
    assert not (tmp_path / "tspeft_state.safetensors").exists()
    assert not (tmp_path / "tspeft_config.json").exists()


def _saved_state(tmp_path):
    model = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora"), tspeft.TSConfig())
    with torch.no_grad():
        for p in tspeft.threshold_parameters(model).values():
            p.fill_(0.25)
    model.save_pretrained(tmp_path)
    return tmp_path / "tspeft_state.safetensors"


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_truncated_or_header_damaged_state_is_refused(tmp_path):
    state = _saved_state(tmp_path)
    original = state.read_bytes()
    state.write_bytes(original[:-3])  # a few bytes short
    with pytest.raises(ValueError, match="corrupt or truncated"):
        tspeft.from_pretrained(tiny_bert(), tmp_path)
    damaged = bytearray(original)
    damaged[9] ^= 0xFF  # inside the JSON header
    state.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        tspeft.from_pretrained(tiny_bert(), tmp_path)
    state.write_bytes(original)
    assert set(tspeft.thresholds(tspeft.from_pretrained(tiny_bert(), tmp_path)).values()) == {0.25}


def test_tampered_finite_threshold_is_caught_by_the_checksum(tmp_path):
    state = _saved_state(tmp_path)
    original = state.read_bytes()
    tensors, metadata = _read(state)
    assert "sha256" in metadata
    # 1. a threshold replaced by another valid number, the metadata copied over
    name = next(k for k in tensors if k.endswith(".threshold"))
    tensors[name] = torch.tensor([0.123])
    save_file(tensors, str(state), metadata=metadata)
    with pytest.raises(ValueError, match="sha256"):
        tspeft.from_pretrained(tiny_bert(), tmp_path)
    # 2. one bit of a stored value flipped (still a finite number)
    flipped = bytearray(original)
    flipped[-4] ^= 0x01  # lowest mantissa byte of the last float32
    state.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sha256"):
        tspeft.from_pretrained(tiny_bert(), tmp_path)
    # 3. limit: a file rewritten without the checksum (another tool, an older tspeft) loads as it is
    tensors[name] = torch.tensor([0.123])
    save_file(tensors, str(state), metadata={"format": "tspeft"})
    assert 0.123 in {round(v, 6) for v in tspeft.thresholds(tspeft.from_pretrained(tiny_bert(), tmp_path)).values()}


# --------------------------------------------------------------------------------------------------
# 6. Bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_skips_the_threshold_update_with_a_warning(bad):
    model = _ts_llama(init=0.0)  # tau = 0: every token active, so mu = nan/-inf must not drop out of g_k
    opt = tspeft.optimizer(model, lr=1e-3)
    data = batch("llama")
    (model(**data).loss * bad).backward()
    assert all(not torch.isfinite(g).all() for g in _tau_grads(model).values())
    with pytest.warns(RuntimeWarning, match="non-finite threshold gradient"):
        opt.step()
    opt.zero_grad()
    assert set(tspeft.thresholds(model).values()) == {0.0}
    assert tspeft.threshold_state(model) == {}  # no moment and no step count was recorded
    # after a healthy step, a bad one leaves thresholds and their moments as they were
    model = _ts_llama(init=0.0)
    opt = tspeft.optimizer(model, lr=1e-3)
    model(**data).loss.backward()
    opt.step()
    opt.zero_grad()
    taus = tspeft.thresholds(model)
    state = {n: {k: v.clone() for k, v in s.items()} for n, s in tspeft.threshold_state(model).items()}
    assert state and any(t != 0.0 for t in taus.values())
    (model(**data).loss * bad).backward()
    with pytest.warns(RuntimeWarning, match="non-finite threshold gradient"):
        opt.step()
    assert tspeft.thresholds(model) == taus
    for n, s in tspeft.threshold_state(model).items():
        for k, v in s.items():
            assert torch.equal(v, state[n][k]), (n, k)


def test_all_padding_batch_counts_nothing_and_leaves_g_k_zero():
    model = _ts_llama(init=0.1)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=torch.zeros(2, 6, dtype=torch.long)).logits
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for n, g in _tau_grads(model).items():
        assert g.abs().item() == 0.0, n  # no real token: neither mu nor lambda contributes
    assert all(math.isnan(v) for v in tspeft.sparsity(model).values())
    assert math.isnan(tspeft.overall_sparsity(model))
    stats = tspeft.module_stats(model)
    assert all(v["tokens"] == 0 and v["active"] == 0 and v["sparsity"] is None for v in stats.values())
    # one padded-out sequence among real ones: only the real ones count
    tspeft.reset_stats(model)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1] = 0
    model(input_ids=torch.randint(1, 64, (3, 6)), attention_mask=mask)
    assert {v["tokens"] for v in tspeft.module_stats(model).values()} == {12}


def test_empty_batch_raises_a_clear_error_and_works_at_the_gate_level():
    model = _ts_llama()
    ids = torch.zeros(0, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="empty batch"):
        model(input_ids=ids, attention_mask=torch.zeros(0, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        model(input_ids=ids)
    # the gate itself accepts zero tokens: empty output, g_k = 0, nothing counted
    tau = torch.nn.Parameter(torch.tensor([0.5]))
    stats = torch.zeros(4, dtype=torch.float64)
    base = torch.zeros(0, 5, 6, requires_grad=True)
    out = tspeft.token_gate(base, torch.zeros(0, 5, 6), tau, 0.1, torch.zeros(0, 5, dtype=torch.bool), stats=stats)
    out.sum().backward()
    assert out.shape == (0, 5, 6) and tau.grad.item() == 0.0 and stats.abs().sum() == 0
    tau.grad = None
    z, B = torch.zeros(0, 5, 2, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    out = tspeft.low_rank_gate(torch.zeros(0, 5, 6) + 0, z, B, 0.5, tau, 0.1, stats=stats)
    out.sum().backward()
    assert out.shape == (0, 5, 6) and tau.grad.item() == 0.0 and B.grad.abs().sum() == 0 and stats.abs().sum() == 0


def test_zero_base_output_is_active_for_every_finite_threshold():
    base = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    delta = torch.tensor([[1e-3, 0.0, 0.0], [0.1, 0.0, 0.0]])
    for tau_value in (0.05, 1.0, 1e30):
        stats = torch.zeros(4, dtype=torch.float64)
        out = tspeft.token_gate(base, delta, torch.tensor([tau_value]), 0.0, stats=stats)
        assert torch.equal(out[0], delta[0])  # ratio = +inf: active
        assert torch.equal(out[1], base[1])  # ratio 0.02 < tau: inactive
        assert stats[:2].tolist() == [1.0, 2.0] and torch.isfinite(stats).all()  # mean ratio stays finite
    out = tspeft.token_gate(base, delta, torch.tensor([float("inf")]), 0.0)
    assert torch.equal(out, base)  # an infinite threshold switches every update off


def test_attention_mask_that_does_not_fit_the_input_raises_naming_the_fix():
    model = _ts_llama()
    ids = torch.randint(1, 64, (2, 6))
    for mask in (torch.ones(2, 4), torch.ones(2, 8), torch.ones(3, 6)):
        with pytest.raises(ValueError, match=r"does not match input_ids of shape \(2, 6\).*attention_mask built with"):
            model(input_ids=ids, attention_mask=mask.long())
    bert = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora"), tspeft.TSConfig())
    with pytest.raises(ValueError, match="does not match input_ids"):
        bert(input_ids=ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_generation_with_a_kv_cache_uses_each_calls_own_mask():
    """generate() calls the transformers model directly, with a mask longer than the new tokens."""
    model = _ts_llama()
    model.eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding: 8 real prompt tokens
    with torch.no_grad():  # a previous call with a mask of the same shape must not leak into generate()
        model(input_ids=ids, attention_mask=torch.zeros(2, 5, dtype=torch.long))
    tspeft.reset_stats(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
    tokens = {v["tokens"] for v in tspeft.module_stats(model).values()}
    assert tokens <= {8 + 2 * j for j in range(1, 4)} and len(tokens) == 1  # padding never counted


def test_generation_with_a_static_cache_reads_the_mask_generate_was_given():
    """A compileable cache makes transformers build a 4-D mask (a dict per layer type for some models) inside
    generate(); the gates read the 2-D one it was given, as with the dynamic cache."""
    runs = []
    for cache in (None, "static"):
        model = _ts_llama()
        model.eval()
        with torch.no_grad():
            for p in tspeft.threshold_parameters(model).values():
                p.fill_(0.3)
        ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, :2] = 0
        tspeft.reset_stats(model)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             cache_implementation=cache)
        runs.append((out, tspeft.module_stats(model)))
    (dynamic, dynamic_stats), (static, static_stats) = runs
    assert torch.equal(static, dynamic)
    for name, stats in dynamic_stats.items():
        assert (static_stats[name]["tokens"], static_stats[name]["active"]) == (stats["tokens"], stats["active"])
    assert 0 < sum(s["active"] for s in dynamic_stats.values()) < sum(s["tokens"] for s in dynamic_stats.values())


@pytest.mark.parametrize("compiled", [False, True])
def test_padding_stays_out_of_layers_that_take_a_view_of_the_sequence_flattened(compiled):
    """Qwen2-MoE's shared expert reads a (batch * seq, d) view of the sequence: its rows are the tokens in
    order. Its down_proj reads rows computed from those, which could as well be a routed expert's gathered
    rows (as many, in another order): every row of it counts as real, none is given another token's flag."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    base = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        vocab_size=64, max_position_embeddings=64))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "down_proj"]))
    tspeft.enable(model, tspeft.TSConfig(lam=1.0))
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # 13 real tokens of 16
    run = torch.compile(model, backend="aot_eager") if compiled else model  # the view check runs outside graphs
    (run(input_ids=ids, attention_mask=mask).logits.sum() * 0).backward()  # g_k = lambda * active real tokens
    stats = tspeft.module_stats(model)
    assert {n.split("layers.0.")[-1] for n in stats} == {"self_attn.q_proj", "mlp.shared_expert.gate_proj",
                                                          "mlp.shared_expert.down_proj"}
    for name, s in stats.items():
        real = 16 if name.endswith("down_proj") else 13
        assert s["tokens"] == real, name
        assert float(tspeft.threshold_parameters(model)[name].grad) == -real


def test_rows_gathered_in_another_order_are_not_given_the_sequences_flags():
    """A routed expert's rows: as many as the tokens (top-2 of 2 experts), ordered by routing, not by token."""
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    ctrl = model._tspeft
    ctrl.token_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    hidden = torch.randn(2, 4, 8)
    flat = hidden.reshape(-1, 8)
    assert torch.equal(ctrl.real_tokens(flat), ctrl.token_mask.reshape(-1))  # the sequence, flattened in order
    order = torch.tensor([1, 2, 3, 6, 7, 0, 4, 5])
    assert ctrl.real_tokens(flat[order]) is None  # gathered: every row counts
    assert ctrl.real_tokens(torch.randn(8, 8)) is None  # another tensor with as many rows
