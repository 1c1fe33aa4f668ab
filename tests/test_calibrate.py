"""calibrate(): a sparsity map from measured per-block sensitivity, meeting a FLOPs budget."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sparselora_compile.explain import explain
from sparselora_compile.calibrate import calibrate, resolve


def _model(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def _batch(b=4, t=24, n_out=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t - n_out] = -100
    return {"input_ids": ids, "labels": labels}


def _saved(model, batch, policy):
    return explain(model, **batch, policy=policy, verbose=False).flops_saved


def test_policy_meets_the_flops_budget():
    budget = 0.4
    model, batch = _model(), _batch()
    policy, report = calibrate(model, batch, budget, return_report=True, progress=False)
    saved = _saved(model, batch, policy)
    assert saved >= budget - 1e-9
    assert saved <= budget + 0.15, f"saved {saved:.3f} overshoots the budget {budget}"
    assert abs(report["flops_saved"] - saved) < 1e-6  # our count agrees with explain's
    assert set(policy.sparsity) == {f"layers.{i}.{k}" for i in range(3) for k in ("mlp", "self_attn")}
    assert {r["block"] for r in report["blocks"]} == set(policy.sparsity)
    # the same table re-solved: the same map; a lower budget needs less
    assert resolve(report, budget).sparsity == policy.sparsity
    lower, lower_report = resolve(report, budget / 2, return_report=True)
    assert budget / 2 <= lower_report["flops_saved"] <= report["flops_saved"]
    assert _saved(model, batch, lower) == pytest.approx(lower_report["flops_saved"], abs=1e-6)
    with pytest.raises(ValueError, match="at most"):
        resolve(report, 0.99)


@pytest.mark.parametrize("metric,kw", [("output", {}), ("loss", {"dense_output_tokens": False})])
def test_sensitive_block_gets_less_sparsity(metric, kw):
    model, batch = _model(), _batch()
    with torch.no_grad():  # make layer 1's MLP dominate the residual stream
        model.base_model.model.model.layers[1].mlp.down_proj.weight.mul_(30.0)
    # (a random model's loss barely feels context-only sparsity, hence all tokens sparse
    # for the loss metric)
    policy, report = calibrate(model, batch, 0.3, kinds=("mlp",), metric=metric, progress=False,
                               return_report=True, **kw)
    s = policy.sparsity
    assert s["layers.1.mlp"] < s["layers.0.mlp"] and s["layers.1.mlp"] < s["layers.2.mlp"], s
    assert all(s[f"layers.{i}.self_attn"] == 0.0 for i in range(3))
    assert report["flops_saved"] >= 0.3 - 1e-9  # == explain's count (test above)


def test_output_metric_and_policy_kwargs():
    model, batch = _model(layers=2), _batch()
    policy, report = calibrate(model, batch, 0.2, metric="output", candidates=(0.5, 0.9),
                               progress=False, return_report=True, warmup_steps=3, k_multiple=1,
                               dense_layers=[0])
    assert policy.warmup_steps == 3 and policy.k_multiple == 1
    assert policy.sparsity["layers.0.mlp"] == 0.0 and policy.sparsity["layers.0.self_attn"] == 0.0
    assert report["metric"] == "output"
    assert report["flops_saved"] >= 0.2 - 1e-9


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.0, 0.97])
def test_impossible_budget_raises(budget):
    model, batch = _model(layers=2), _batch()
    with pytest.raises(ValueError, match=r"at most|fraction in \(0, 1\)") as err:
        calibrate(model, batch, budget, progress=False)
    assert "0.9" in str(err.value)  # names the achievable maximum


def test_budget_beyond_allowed_kinds_raises():
    model, batch = _model(layers=2), _batch()
    # attention alone is a small share of the FLOPs here: 60% is out of reach
    with pytest.raises(ValueError, match="not achievable.*saves at most"):
        calibrate(model, batch, 0.6, kinds=("attention",), progress=False)
