"""Gated models against peft (threshold -inf and 0), the generic gate, accumulation, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, forward_saved_bytes, tiny_bert, tiny_llama, with_adapter
from peft import LoraConfig, get_peft_model

import tspeft


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None and "ts_threshold" not in n}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("tau", [float("-inf"), 0.0])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])  # the adapter: next test (peft has none)
def test_parity_with_peft_when_every_token_is_active(arch, tau, dropout, method):
    make = tiny_bert if arch == "bert" else tiny_llama
    dense = with_adapter(make(dtype=torch.float64), arch, method, dropout=dropout)
    gated = copy.deepcopy(dense)
    tspeft.enable(gated, tspeft.TSConfig(lam=1e-3, s=1e-2, init_threshold=0.0))
    with torch.no_grad():
        for p in tspeft.threshold_parameters(gated).values():
            p.fill_(tau)
    data = batch(arch)
    outs = []
    for m in (dense, gated):
        m.train()
        torch.manual_seed(123)  # same dropout masks
        out = m(**data)
        out.loss.backward()
        outs.append(out.logits.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    gd, gg = _grads(dense), _grads(gated)
    assert gd.keys() == gg.keys() and gd
    for k in gd:
        torch.testing.assert_close(gd[k], gg[k], rtol=1e-8, atol=1e-9, msg=k)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_parity_with_peft_when_the_base_bias_trains(method, dropout):
    """peft's bias="all": the base layer's bias trains, so the gate cannot fuse the frozen base's backward."""
    dense = get_peft_model(tiny_bert(dtype=torch.float64), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=dropout, use_dora=method == "dora",
        bias="all", task_type="SEQ_CLS"))
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            if "lora_magnitude" in n:
                p.mul_(1.3)
    gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(lam=1e-3))
    data = batch("bert")
    results = []
    for m in (dense, gated):
        torch.manual_seed(5)
        out = m(**data)
        out.loss.backward()
        results.append((out.logits.detach(), _grads(m)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    assert results[0][1].keys() == results[1][1].keys()
    assert any(k.endswith("query.base_layer.bias") for k in results[0][1])
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-8, atol=1e-9, msg=k)


def test_parallel_adapter_dense_vs_gated_at_zero():
    dense = with_adapter(tiny_llama(dtype=torch.float64), "llama", "adapter")
    gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig())
    data = batch("llama")
    results = []
    for m in (dense, gated):
        out = m(**data)
        out.loss.backward()
        results.append((out.logits.detach(), _grads(m)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-8, atol=1e-9)


def _reference_layer(layer, x, tau, lam, real, dense_layer):
    """Gate a dense copy of the layer through the generic token_gate: the independent reference."""
    base_layer = dense_layer.get_base_layer() if hasattr(dense_layer, "get_base_layer") else dense_layer.base_layer
    bias = base_layer.bias
    base = base_layer(x) - (bias if bias is not None else 0)
    delta = dense_layer(x) - base_layer(x)
    out = tspeft.token_gate(base, delta, tau, lam, real)
    return out + (bias if bias is not None else 0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fast_path_equals_generic_gate_with_random_thresholds(arch, method):
    make = tiny_bert if arch == "bert" else tiny_llama
    dense = with_adapter(make(dtype=torch.float64), arch, method)
    gated = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(lam=1e-2))
    torch.manual_seed(5)
    dense_mods = dict(dense.named_modules())
    for name, layer in tspeft.gated_modules(gated).items():
        ref_layer = dense_mods[name]
        d_in = ref_layer.get_base_layer().in_features if hasattr(ref_layer, "get_base_layer") else ref_layer.base_layer.in_features
        x = torch.randn(3, 7, d_in, dtype=torch.float64)
        real = torch.rand(3, 7) > 0.3
        tspeft.controller(gated).token_mask = real
        with torch.no_grad():
            ratios = (ref_layer(x) - ref_layer.get_base_layer()(x) if hasattr(ref_layer, "get_base_layer") else ref_layer(x) - ref_layer.base_layer(x)).norm(dim=-1)
        tau_value = float(torch.rand(()) * 0.8 + 0.1) * float(ratios.median() / x.norm(dim=-1).mean()) + 0.05
        layer.ts_threshold.data.fill_(tau_value)
        tau_ref = torch.nn.Parameter(torch.tensor([tau_value], dtype=torch.float32))
        g = torch.randn(3, 7, layer.ts_threshold.new_empty(0).new_zeros(1).numel() * 0 + (ref_layer.get_base_layer().out_features if hasattr(ref_layer, "get_base_layer") else ref_layer.base_layer.out_features), dtype=torch.float64)
        gated.zero_grad()
        dense.zero_grad()
        out = layer(x)
        out.backward(g)
        ref = _reference_layer(layer, x, tau_ref, 1e-2, real.reshape(-1), ref_layer)
        ref.backward(g)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.ts_threshold.grad, tau_ref.grad, rtol=1e-6, atol=1e-8)
        ref_params = dict(ref_layer.named_parameters())
        for pname, p in layer.named_parameters():
            if p.grad is not None and pname != "ts_threshold":
                torch.testing.assert_close(p.grad, ref_params[pname].grad, rtol=1e-9, atol=1e-10, msg=pname)
    tspeft.controller(gated).token_mask = None


@pytest.mark.parametrize("pad", [0, 3])
def test_two_micro_batches_equal_one_batch(method, pad):
    model = with_adapter(tiny_llama(dtype=torch.float64), "llama", method)
    tspeft.enable(model, tspeft.TSConfig(lam=1e-3))
    with torch.no_grad():
        for p in tspeft.threshold_parameters(model).values():
            p.fill_(0.1)
    data = batch("llama", b=4, pad=pad)

    def loss_of(d):  # a sum over tokens: micro-batch losses add up to the full batch's
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        return (logits.square().mean(-1) * d["attention_mask"]).sum()

    loss_of(data).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        loss_of({k: v[half] for k, v in data.items()}).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:  # thresholds are fp32: two roundings instead of one
            tol = 1e-6 if p.dtype == torch.float32 else 1e-9
            torch.testing.assert_close(p.grad, full[n], rtol=tol, atol=tol, msg=n)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_twenty_steps_move_thresholds_and_give_partial_sparsity(arch, method):
    make = tiny_bert if arch == "bert" else tiny_llama
    model = with_adapter(make(), arch, method, random_b=False)
    tspeft.enable(model, tspeft.TSConfig(lam=1e-2, s=5e-2))
    opt = tspeft.optimizer(model, lr=1e-3)
    data = batch(arch, b=4, t=12)
    for _ in range(20):
        model(**data).loss.backward()
        tspeft.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad()
    taus = tspeft.thresholds(model)
    assert all(t != 0.0 for t in taus.values())
    total = tspeft.overall_sparsity(model)
    assert 0.0 < total < 1.0, (method, total)
    tokens = {v["tokens"] for v in tspeft.module_stats(model).values() if arch == "llama"}
    assert tokens <= {20 * int(data["attention_mask"].sum())}  # padding never counts


def test_padding_excluded_but_pooler_counts_every_sequence():
    model = with_adapter(tiny_bert(), "bert", "lora")  # "dense" also targets BERT's pooler
    tspeft.enable(model, tspeft.TSConfig())
    data = batch("bert", b=3, t=10, pad=3)
    model(**data)
    stats = tspeft.module_stats(model)
    pooler = [v for k, v in stats.items() if "pooler" in k]
    query = [v for k, v in stats.items() if k.endswith("query")]
    assert pooler and pooler[0]["tokens"] == 3  # one vector per sequence, all real
    assert query[0]["tokens"] == int(data["attention_mask"].sum())


def test_eval_keeps_gate_and_merge_rules():
    model = with_adapter(tiny_llama(), "llama", "lora")
    tspeft.enable(model, tspeft.TSConfig())
    data = batch("llama")
    dense_out = model(**data).logits
    with torch.no_grad():
        for p in tspeft.threshold_parameters(model).values():
            p.fill_(1e6)
    model.eval()
    base_out = model(**data).logits
    with model.disable_adapter():
        torch.testing.assert_close(base_out, model(**data).logits)
    with pytest.raises(RuntimeError, match="cannot merge"):
        model.merge_and_unload()
    with torch.no_grad():
        for p in tspeft.threshold_parameters(model).values():
            p.fill_(0.0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(**data).logits, dense_out, rtol=1e-4, atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="lam"):
        tspeft.TSConfig(lam=-1)
    with pytest.raises(ValueError, match="s must be"):
        tspeft.TSConfig(s=float("nan"))
    with pytest.raises(ValueError, match="betas"):
        tspeft.TSConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="rule"):
        tspeft.TSConfig(rule="sgd")
    emb = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(TypeError, match="Supported"):
        tspeft.enable(emb, tspeft.TSConfig())
    two = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    two.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    two.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="exactly one active adapter"):
        tspeft.enable(two, tspeft.TSConfig())
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    with pytest.raises(RuntimeError, match="already enabled"):
        tspeft.enable(model, tspeft.TSConfig())
    with pytest.raises(ValueError, match="padding mask"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(RuntimeError, match="not enabled"):
        tspeft.sparsity(tiny_llama())
    with pytest.raises(ValueError, match="lr"):
        tspeft.optimizer(model, lr=-1.0)


def test_disable_restores_the_dense_model():
    model = with_adapter(tiny_llama(), "llama", "dora")
    data = batch("llama")
    before = model(**data).logits
    tspeft.enable(model, tspeft.TSConfig())
    tspeft.disable(model)
    assert not tspeft.is_enabled(model)
    assert not any("ts_threshold" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**data).logits, before)


def test_a_deepcopy_of_an_enabled_model_uses_its_own_padding_mask():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "lora"), tspeft.TSConfig())
    twin = copy.deepcopy(model)
    data = batch("llama", b=3, t=10, pad=3)
    twin(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    assert tspeft.controller(model).token_mask is None
    tokens = {v["tokens"] for v in tspeft.module_stats(twin).values()}
    assert tokens == {int(data["attention_mask"].sum())}


def test_masks_cost_no_saved_memory_against_peft_lora():
    """Saved activations of one forward, against peft's LoRA (no dropout), by hand: every gated module keeps
    a one-byte mask per token that peft does not, each z computed again in backward keeps N r fp32 fewer,
    and "auto" takes the first ceil(n / 2r) modules: in total no more than peft."""
    dense = with_adapter(tiny_llama(), "llama", "lora", r=4)
    data = batch("llama", pad=3)
    n_tokens = data["input_ids"].numel()

    peft_bytes = forward_saved_bytes(dense, data)
    sizes, models = {}, {}
    for policy in ("none", "auto", "all"):
        models[policy] = tspeft.enable(copy.deepcopy(dense), tspeft.TSConfig(recompute_z=policy))
        sizes[policy] = forward_saved_bytes(models[policy], data)
    n = len(tspeft.gated_modules(models["none"]))  # 2 layers x q, k, v, up, down
    z_bytes = n_tokens * 4 * 4  # r = 4, fp32
    real_bytes = n_tokens  # the padding mask as bool, kept once for all modules
    assert sizes["none"] == peft_bytes + n * n_tokens + real_bytes
    k = -(-n // (2 * 4))
    assert sizes["auto"] == sizes["none"] - k * z_bytes
    assert sizes["all"] == sizes["none"] - n * z_bytes
    assert sizes["auto"] <= peft_bytes
    recomputing = [name for name, m in tspeft.gated_modules(models["auto"]).items() if not m._ts_keep_z]
    assert recomputing == list(tspeft.gated_modules(models["auto"]))[:k]
    # the same gradients whichever z is kept
    grads = []
    for policy in ("none", "auto"):
        models[policy].zero_grad()
        models[policy](**data).loss.backward()
        grads.append({name: p.grad for name, p in models[policy].named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)
    assert "_ts_keep_z" not in tspeft.disable(models["auto"]).base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_recompute_z_skips_dora_and_rejects_unknown_policies():
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", "dora"), tspeft.TSConfig(recompute_z="all"))
    assert all(m._ts_keep_z for m in tspeft.gated_modules(model).values())
    with pytest.raises(ValueError, match="recompute_z must be one of"):
        tspeft.TSConfig(recompute_z="some")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_module_stats_count_the_parameters_that_do_not_scale_with_rank(method):
    """params = r (d_in + d_out) [+ d_out for DoRA's magnitude]; fixed_params is that magnitude (half_rank's budget)."""
    model = tspeft.enable(with_adapter(tiny_llama(), "llama", method, r=4), tspeft.TSConfig())
    model(**batch("llama"))
    for name, stats in tspeft.module_stats(model).items():
        base = dict(model.named_modules())[name].get_base_layer()
        d_out, d_in = base.weight.shape
        fixed = d_out if method == "dora" else 0
        assert stats["fixed_params"] == fixed and stats["params"] == 4 * (d_in + d_out) + fixed
