"""The threshold rule (Eq. 16-20) against a hand loop, clipping, non-finite g_k, save/load round trips."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import batch, tiny_bert, tiny_llama, with_adapter

import tspeft


def _hand_adam(gs, multipliers, s, b1=0.9, b2=0.98, eps=1e-8):
    """Eq. 16-20 written out: tau <- tau + alpha_k s mhat / (sqrt(vhat) + eps)."""
    tau, m, v, out = 0.0, 0.0, 0.0, []
    for k, (g, alpha) in enumerate(zip(gs, multipliers), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**k), v / (1 - b2**k)
        tau = tau + alpha * s * mhat / (math.sqrt(vhat) + eps)
        out.append(tau)
    return out


@pytest.mark.parametrize("rule", ["adam", "plain"])
def test_threshold_rule_matches_hand_loop_with_schedule(rule):
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(s=1e-2, rule=rule))
    opt = tspeft.optimizer(model, lr=1e-3)
    multipliers = [0.25, 0.5, 0.75, 1.0, 0.8, 0.6, 0.4, 0.2]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: multipliers[min(step, len(multipliers) - 1)])
    gs = [3.0, -1.0, 0.5, 2.0, -4.0, 0.1, 0.0, 1.5]
    taus = tspeft.threshold_parameters(model)
    name, tau = next(iter(taus.items()))
    seen = []
    for g in gs:
        for p in taus.values():
            p.grad = torch.tensor([-g])  # the gate hands the optimizer -g_k
        opt.step()
        sched.step()
        seen.append(tau.item())
    if rule == "adam":
        expected = _hand_adam(gs, multipliers, 1e-2)
    else:  # Appendix A.2: tau <- tau + alpha_k s g_k
        expected = list(torch.tensor([m * 1e-2 * g for g, m in zip(gs, multipliers)], dtype=torch.float64).cumsum(0))
    for a, b in zip(seen, expected):
        assert abs(a - float(b)) < 1e-6


def test_gate_plus_optimizer_match_an_independent_implementation():
    """Eq. 2, 3, 9, 15 and 16-20 written from scratch for one linear LoRA layer, against tspeft, to 1e-6."""
    torch.manual_seed(0)
    model = with_adapter(tiny_llama(dtype=torch.float64), "llama", "lora")
    tspeft.enable(model, tspeft.TSConfig(lam=1e-2, s=1e-2))
    opt = tspeft.optimizer(model, lr=1e-9)  # adapters barely move: isolate the thresholds
    name, layer = next(iter(tspeft.gated_modules(model).items()))
    A, B, c = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer.scaling["default"]
    W = layer.get_base_layer().weight.detach()
    tau, m, v = 0.0, 0.0, 0.0
    for k in range(1, 6):
        x = torch.randn(2, 6, W.shape[1], dtype=torch.float64)
        g = torch.randn(2, 6, W.shape[0], dtype=torch.float64)
        opt.zero_grad()
        layer(x).backward(g)
        opt.step()
        base, delta = x @ W.t(), c * (x @ A.t()) @ B.t()
        mask = delta.norm(dim=-1) >= tau * base.norm(dim=-1)
        mu = (g * delta).sum(-1)
        g_k = float((((mu >= 0) == mask) * mu).sum() + 1e-2 * mask.sum())
        m, v = 0.9 * m + 0.1 * g_k, 0.98 * v + 0.02 * g_k**2
        tau += 1e-2 * (m / (1 - 0.9**k)) / (math.sqrt(v / (1 - 0.98**k)) + 1e-8)
        assert abs(layer.ts_threshold.item() - tau) < 1e-6


def test_clip_leaves_thresholds_out_and_follow_schedule_off():
    model = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora"), tspeft.TSConfig(follow_schedule=False, s=1e-2))
    model(**batch("bert")).loss.backward()
    taus = tspeft.threshold_parameters(model)
    before = {n: p.grad.clone() for n, p in taus.items()}
    norm = tspeft.clip_grad_norm_(model, 1e-6)
    assert norm > 0
    for n, p in taus.items():
        assert torch.equal(p.grad, before[n])
    assert all(torch.linalg.vector_norm(p.grad) <= 1e-5 for p in tspeft.adapter_parameters(model) if p.grad is not None)
    opt = tspeft.optimizer(model, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # adapters frozen by the schedule
    tau = next(iter(taus.values()))
    tau.grad = torch.tensor([-1.0])
    opt.step()
    sched.step()
    assert abs(tau.item() - 1e-2) < 1e-7  # lr stays s whatever the schedule


def test_nonfinite_g_k_skips_the_threshold_update_with_a_warning():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(s=1e-2))
    opt = tspeft.optimizer(model, lr=1e-3)
    taus = list(tspeft.threshold_parameters(model).values())
    for p in taus:
        p.grad = torch.tensor([-1.0])
    taus[0].grad = torch.tensor([float("nan")])
    with pytest.warns(RuntimeWarning, match="non-finite threshold gradient"):
        opt.step()
    skipped, healthy = opt.state[taus[0]], opt.state[taus[1]]
    assert taus[0].item() == 0.0 and float(skipped["step"]) == 0.0
    assert float(skipped["exp_avg"]) == 0.0 == float(skipped["exp_avg_sq"]) and float(skipped["skipped"]) == 1.0
    assert taus[1].item() > 0.0 and float(healthy["step"]) == 1.0 and float(healthy["skipped"]) == 0.0
    assert tspeft.report_skipped_updates(model) == {}  # each skip is reported once
    # then a finite g_k: this threshold's first step, with its own step count (bias correction of step 1)
    taus[0].grad = torch.tensor([-1.0])
    opt.step()
    assert abs(taus[0].item() - 1e-2) < 1e-7 and float(skipped["step"]) == 1.0


def test_nonfinite_g_k_on_a_device_is_reported_when_the_host_reads(monkeypatch):
    # On CUDA the step must not wait for the device to learn whether a g_k was finite: the update selects on
    # the device, and the skip is reported at the next read (the training log's). Simulated on CPU.
    monkeypatch.setattr(tspeft.TSOptimizer, "_reads_are_free", staticmethod(lambda devices: False))
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(s=1e-2))
    opt = tspeft.optimizer(model, lr=1e-3)
    names, taus = zip(*tspeft.threshold_parameters(model).items())
    for step in range(3):
        for p in taus:
            p.grad = torch.tensor([-1.0])
        taus[1].grad = torch.tensor([float("nan")]) if step < 2 else torch.tensor([-1.0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning inside the step
            opt.step()
    with pytest.warns(RuntimeWarning, match="2 threshold update"):
        assert tspeft.report_skipped_updates(model) == {names[1]: 2}
    assert tspeft.report_skipped_updates(model) == {}
    assert float(opt.state[taus[1]]["step"]) == 1.0 and float(opt.state[taus[0]]["step"]) == 3.0
    assert abs(taus[1].item() - 1e-2) < 1e-7  # one Adam step: s * mhat / sqrt(vhat) with mhat = vhat^0.5


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "adapter"])
def test_save_load_round_trip_is_bit_identical(tmp_path, method):
    model = tspeft.enable(with_adapter(tiny_bert(), "bert", method, random_b=False), tspeft.TSConfig(lam=1e-2, s=5e-2))
    opt = tspeft.optimizer(model, lr=1e-2)
    data = batch("bert")
    for _ in range(3):
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    data = {k: v for k, v in data.items() if k != "labels"}  # peft's AdaLoRA needs a trainable adapter for a loss
    with torch.no_grad():
        expected = model(**data).logits
    tspeft.save_pretrained(model, tmp_path)
    assert tspeft.is_token_selective(tmp_path)
    loaded = tspeft.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        got = loaded(**data).logits
    assert torch.equal(got, expected)
    assert tspeft.thresholds(loaded) == tspeft.thresholds(model)
    assert tspeft.controller(loaded).config == tspeft.controller(model).config
    # the threshold rule's state comes back with the next optimizer
    trainable = tspeft.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    opt2 = tspeft.optimizer(trainable, lr=1e-2)
    for (_, p1), (_, p2) in zip(tspeft.threshold_parameters(model).items(), tspeft.threshold_parameters(trainable).items()):
        assert torch.equal(opt.state[p1]["exp_avg"], opt2.state[p2]["exp_avg"])
        assert float(opt.state[p1]["step"]) == float(opt2.state[p2]["step"]) == 3.0


def test_corrupt_or_nan_state_is_refused(tmp_path):
    model = tspeft.enable(with_adapter(tiny_bert(), "bert", "lora"), tspeft.TSConfig())
    model.save_pretrained(tmp_path)
    state = tmp_path / "tspeft_state.safetensors"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        tspeft.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        next(iter(tspeft.threshold_parameters(model).values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="cannot save non-finite thresholds"):  # nor written over a good save
        model.save_pretrained(tmp_path)
    state.write_bytes(data)
    _with_nan_threshold(state)  # written some other way, with a valid checksum: load refuses it too
    with pytest.raises(ValueError, match="non-finite thresholds"):
        tspeft.from_pretrained(tiny_bert(), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a token-selective adapter"):
        tspeft.from_pretrained(tiny_bert(), tmp_path / "nothing")


def _with_nan_threshold(path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tspeft.io import state_checksum

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = next(k for k in sorted(tensors) if k.endswith(".threshold"))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(path), metadata={**metadata, "sha256": state_checksum(tensors)})


def _steps(model, opt, n=2):
    for _ in range(n):
        model(**batch("llama")).loss.backward()
        opt.step()
        opt.zero_grad()


def test_the_rule_state_outlives_its_optimizer(tmp_path):
    """A fit() that builds, uses and drops its optimizer, then a save: the moments are still written, and a
    loaded state reaches every later optimizer, not only the first one built."""
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(s=1e-2))

    def fit():
        opt = tspeft.optimizer(model, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        _steps(model, opt)
        scheduler.step()
        return {n: dict(opt.state[p]) for n, p in tspeft.threshold_parameters(model).items()}

    live = fit()  # the optimizer and its scheduler are gone once it returns
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "tspeft_state.safetensors"))
    for name, state in live.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert float(saved[f"{name}.{key}"]) == pytest.approx(float(state[key]))
    loaded = tspeft.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    first = tspeft.optimizer(loaded, lr=1e-3)
    del first  # dropped before it stepped: the loaded state is not used up
    second = tspeft.optimizer(loaded, lr=1e-3)
    for name, p in tspeft.threshold_parameters(loaded).items():
        assert float(second.state[p]["exp_avg"]) == pytest.approx(float(live[name]["exp_avg"]))



def test_a_new_optimizer_continues_the_rule_state_of_the_one_before():
    """opt = tspeft.optimizer(model) in a loop: each continues the moments, whatever order the old ones die in."""
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig(s=1e-2))
    for _ in range(3):
        opt = tspeft.optimizer(model, lr=1e-3)  # built while the previous one is still referenced
        _steps(model, opt, n=1)
    assert {float(opt.state[p]["step"]) for p in tspeft.threshold_parameters(model).values()} == {3.0}
    del opt
    state = tspeft.optim.threshold_state(model)
    assert {float(s["step"]) for s in state.values()} == {3.0}  # the newest one's, kept after it is gone
