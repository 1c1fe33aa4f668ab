"""GPT-NeoX and GPT-2 (non-gated MLPs; GPT-2's Conv1D) and Phi-3 (fused gate_up_proj)
through the rewrite, against the reference semantics. Phi-3's and GPT-2's fused [q | k | v]
attention is rewritten too; GPT-NeoX's (q, k, v interleaved per head) stays dense and
explain says why."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import LoraConfig, get_peft_model

import sparselora_compile as slc
from sparselora_compile.calibrate import calibrate  # slc.calibrate is the module once that is imported
from sparselora_compile.testing import assert_rewrite_equivalent
from sparselora_compile.testing.models import FusedGatedMLP, PlainMLP, Stack, with_lora
from sparselora_compile.testing.reference import reference_semantics

from llama import batch

POLICY = slc.Policy(mlp=0.5, attention=0.5)
FAMILIES = ("neox", "gpt2", "phi3")
TARGETS = {"neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
           "gpt2": ["c_attn", "c_proj", "c_fc"],
           "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
BLOCKS = {"neox": 2, "gpt2": 4, "phi3": 4}  # two layers; NeoX's attention stays dense
MLP_ONLY_FROZEN = {"neox": ["query_key_value", "dense"], "gpt2": ["c_attn"], "phi3": ["qkv_proj", "o_proj"]}


def tiny(kind, targets=None, layers=2, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    if kind == "neox":
        model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=64))
    elif kind == "gpt2":  # gelu_new, Conv1D layers; no dropout so that eager and compiled agree
        model = T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        # without it transformers logs a warning in loss_function, a graph break before the
        # loss that keeps the labels from the layers' graph under plain torch.compile
        model.loss_type = "ForCausalLM"
    else:
        model = T.Phi3ForCausalLM(T.Phi3Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0))
    model.config.use_cache = False
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets or TARGETS[kind],
                     lora_dropout=dropout, fan_in_fan_out=kind == "gpt2")  # PEFT's setting for Conv1D
    peft = get_peft_model(model, cfg)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft.train()
    return peft


def _inputs():
    ids, labels = batch()
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_matches_the_reference(kind):
    model, inputs = tiny(kind), _inputs()
    cmp = assert_rewrite_equivalent(model, inputs, POLICY, expect_blocks=BLOCKS[kind])
    dense = model(**inputs).loss.item()
    assert cmp.loss != pytest.approx(dense, rel=1e-5)  # the sparse MLPs changed something


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_regional_matches_the_reference(kind):
    assert_rewrite_equivalent(tiny(kind), _inputs(), POLICY, regional=True, expect_blocks=BLOCKS[kind])


@pytest.mark.parametrize("kind", FAMILIES)
def test_frozen_mlp_matches_the_reference(kind):
    """LoRA on attention only: the MLP's products are frozen, base and bias only."""
    assert_rewrite_equivalent(tiny(kind, MLP_ONLY_FROZEN[kind]), _inputs(), POLICY,
                              expect_blocks=BLOCKS[kind])


def _train(kind, make_step):
    model = tiny(kind)
    step, stats = make_step(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(4):
        loss = step(**_inputs()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert stats().steps == 4 and stats().base_flops_executed < stats().base_flops_dense
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_trains_through_slc_compile(kind):
    def make(model):
        wrapped = slc.compile(model, POLICY, inner="aot_eager")
        return wrapped, lambda: wrapped.stats
    _train(kind, make)


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_trains_through_torch_compile(kind):
    def make(model):
        compiled = torch.compile(model, backend="sparselora",
                                 options={"policy": POLICY, "inner": "aot_eager"})
        return compiled, lambda: slc.run_of(compiled).stats
    torch._dynamo.reset()
    _train(kind, make)


def test_explain_says_why_interleaved_qkv_attention_stays_dense():
    e = slc.explain(tiny("neox"), **_inputs(), policy=POLICY, verbose=False)
    assert [b["kind"] for b in e.blocks] == ["mlp", "mlp"]
    fused = [s for s in e.skipped if s["reason"].startswith("fused q/k/v projection")]
    assert len(fused) == 2 and all("query_key_value" in s["reason"] for s in fused)
    assert not any("query_key_value" in s["where"] for s in e.skipped)  # said at the block


@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_explain_counts_fused_qkv_attention(kind):
    e = slc.explain(tiny(kind), **_inputs(), policy=POLICY, verbose=False)
    assert sorted(b["kind"] for b in e.blocks) == ["attention", "attention", "mlp", "mlp"]
    attn = [b for b in e.blocks if b["kind"] == "attention"]
    # channels: kv channels (GPT-2: 4 heads x 8; Phi-3: 2 kv heads x 8), half kept
    assert [(b["channels"], b["k"]) for b in attn] == [(32, 16)] * 2 if kind == "gpt2" else [(16, 8)] * 2
    assert all(b["sparse_flops"] < b["dense_flops"] for b in attn)


# ---- the estimator scores the right channels -------------------------------------------

def _selection(model, x, labels, policy):
    wrapped = slc.compile(model, policy, regional=False, inner="aot_eager", record=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped(x=x, labels=labels).sum().backward()
    (sel,) = wrapped.run.record.values()
    return sel["idx"], sel["dense_rows"]


def _top(scores, k):
    return scores.topk(k).indices.sort().values


@pytest.mark.parametrize("conv1d", [False, True])
def test_plain_mlp_keeps_the_top_channels_of_act_fc(conv1d):
    """At full estimator rank the kept channels are the top-k of sum over context rows of
    act(x W_fc^T)^2: the Conv1D weight is read as [in, out]."""
    torch.manual_seed(0)
    mlp = PlainMLP(16, 24, "gelu", conv1d)
    fc = mlp.c_fc if conv1d else mlp.dense_h_to_4h
    model = with_lora(Stack(mlp, "mlp"), [mlp.names[1]], fan_in_fan_out=conv1d)
    x, labels = torch.randn(2, 6, 16), torch.full((2, 6), -100)
    labels[:, -2:] = 1
    idx, dense_rows = _selection(model, x, labels, slc.Policy(mlp=0.5, rank=16, k_multiple=1))
    w = fc.weight.t() if conv1d else fc.weight
    ctx = x.reshape(-1, 16)[~dense_rows.reshape(-1)]
    torch.testing.assert_close(idx, _top(F.gelu(ctx @ w.t()).square().sum(0), idx.numel()))


def test_fused_gate_up_scores_gate_then_up_halves():
    """Phi-3: rows [0, d_ff) of gate_up_proj are the gate, [d_ff, 2 d_ff) the up."""
    torch.manual_seed(0)
    mlp = FusedGatedMLP(16, 12)
    model = with_lora(Stack(mlp, "mlp"), ["down_proj"])
    x, labels = torch.randn(2, 6, 16), torch.full((2, 6), -100)
    idx, _ = _selection(model, x, labels, slc.Policy(mlp=0.5, rank=12, k_multiple=1,
                                                     dense_output_tokens=False))
    g, u = (x.reshape(-1, 16) @ mlp.gate_up_proj.weight.t()).chunk(2, -1)
    torch.testing.assert_close(idx, _top((F.silu(g) * u).square().sum(0), idx.numel()))


def test_reference_of_a_fused_mlp_is_the_masked_intermediate():
    """The reference zeroes h = up * silu(gate) outside the kept channels on context rows."""
    torch.manual_seed(0)
    mlp = FusedGatedMLP(8, 6)
    x = torch.randn(1, 3, 8)
    idx, rows = torch.tensor([1, 4]), torch.tensor([[False, True, False]])
    g, u = mlp.gate_up_proj(x).chunk(2, -1)
    h = u * F.silu(g)
    mask = torch.zeros(6)
    mask[idx] = 1
    h = torch.where(rows.unsqueeze(-1), h, h * mask)
    model = Stack(mlp, "mlp")
    with reference_semantics(model, {"layers.0.mlp": {"idx": idx, "dense_rows": rows}}):
        got = model(x)
    torch.testing.assert_close(got, x + mlp.down_proj(h))


@pytest.mark.parametrize("kind", FAMILIES)
def test_calibrate_counts_the_new_layouts_as_explain_does(kind):
    model, inputs = tiny(kind), _inputs()
    policy, report = calibrate(model, inputs, 0.3, return_report=True, progress=False)
    kinds = ["mlp", "mlp"] if kind == "neox" else ["attention", "mlp", "attention", "mlp"]
    assert [b["kind"] for b in report["blocks"]] == kinds
    assert all(b["candidates"]["0.5"]["rel_err"] > 0 for b in report["blocks"])  # measured sparse
    saved = slc.explain(model, **inputs, policy=policy, verbose=False).flops_saved
    assert saved >= 0.3 and abs(report["flops_saved"] - saved) < 1e-6


@pytest.mark.parametrize("act,named", [("quick_gelu", "QuickGELUActivation"), ("hardswish", "hardswish")])
def test_explain_says_why_an_unscored_activation_stays_dense(act, named):
    model = with_lora(Stack(PlainMLP(8, 16, act), "mlp"), ["dense_4h_to_h"])
    x, labels = torch.randn(1, 4, 8), torch.full((1, 4), -100)
    e = slc.explain(model, x=x, labels=labels, policy=POLICY, verbose=False)
    assert e.blocks == []
    (skip,) = [s for s in e.skipped if s["where"].endswith("layers.0.mlp")]
    assert f"non-gated MLP with activation {named}" in skip["reason"]


@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_activation_aware_factors_from_collected_moments(kind):
    """Moments of Conv1D inputs are collected too, and the factors of a transposed weight or
    of gate_up's halves are made from them (a fingerprint per moment: no SVD fallback)."""
    model, inputs = tiny(kind), _inputs()
    moments = slc.collect_moments(model, [inputs])
    assert any(k.endswith("mlp.c_fc" if kind == "gpt2" else "mlp.gate_up_proj") for k in moments)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to plain SVD warns
        assert_rewrite_equivalent(model, inputs, slc.Policy(mlp=0.5, attention=0.5,
                                                            estimator="activation_aware"),
                                  expect_blocks=4, moments=moments)


@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_activation_aware_refresh_after_warmup(kind):
    """Warm-up moments refresh the factors in place when the warm-up ends."""
    model = tiny(kind)
    policy = slc.Policy(mlp=0.5, estimator="activation_aware", warmup_steps=1)
    wrapped = slc.compile(model, policy, inner="aot_eager")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(3):
            wrapped(**_inputs()).loss.backward()
    assert not [w for w in said if "activation_aware" in str(w.message)]  # refreshed, no fallback
    stats = wrapped.stats
    assert stats.steps == 3 and stats.base_flops_executed < stats.base_flops_dense
    assert sorted(k.rsplit(".", 2)[-2:][0] for k in wrapped.run.moments if k.endswith("mlp")) == ["0", "1"]
    assert all(m.count for m in wrapped.run.moments.values())


@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_autocast_checkpointing_dropout_matches_the_reference(kind):
    """Conv1D's addmm and the fused gate_up under bf16 autocast, HF gradient checkpointing
    (the layers are checkpointed bodies) and LoRA dropout (same draws in both runs)."""
    model = tiny(kind, dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = batch()
    # embeddings as input: checkpointing needs an input that requires grad
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    assert_rewrite_equivalent(model, {"inputs_embeds": embeds, "labels": labels}, POLICY,
                              autocast_dtype=torch.bfloat16, atol=3e-2, rtol=3e-2,
                              expect_blocks=BLOCKS[kind])


def tiny_bigcode(multi_query: bool):
    torch.manual_seed(0)
    model = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=multi_query,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.config.use_cache = False
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft.train()


@pytest.mark.parametrize("regional", [False, True])
@pytest.mark.parametrize("multi_query,blocks", [(True, 4), (False, 2)])
def test_gpt_bigcode_matches_the_reference(multi_query, blocks, regional):
    """Multi-query: c_attn(x).unsqueeze(1).split(...) is [q | k | v] (one kv head), rewritten.
    Without it q, k, v interleave per head: the attention stays dense, and regional
    compilation still runs (the modules list the block, the graph leaves it dense)."""
    policy = slc.Policy(mlp=0.5, attention=0.5, k_multiple=1)
    assert_rewrite_equivalent(tiny_bigcode(multi_query), _inputs(), policy, regional=regional,
                              expect_blocks=blocks)


@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_inductor_matches_the_reference(kind):
    """End to end through Inductor (CPU code generation): Conv1D's transposed weight view,
    the fused rows' index arithmetic and the sparse ops in one compiled layer."""
    assert_rewrite_equivalent(tiny(kind, layers=1), _inputs(), POLICY, inner="inductor",
                              regional=True, expect_blocks=2)
