"""Gemma family (GeGLU: gelu_pytorch_tanh gate) through the rewrite, against the reference
semantics; Gemma2's eager attention is reported, not found."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import LoraConfig, get_peft_model

import sparselora_compile as slc
from sparselora_compile.runtime import scores, selection
from sparselora_compile.testing import assert_rewrite_equivalent

from llama import ALL, QKVO, batch

POLICY = slc.Policy(mlp=0.5, attention=0.5)


def tiny(kind, targets=ALL, layers=2, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    if kind == "gemma":
        model = T.GemmaForCausalLM(T.GemmaConfig(**common, hidden_act="gelu_pytorch_tanh"))
    elif kind == "gemma2":  # transformers requires eager attention (logit softcapping)
        model = T.Gemma2ForCausalLM(T.Gemma2Config(**common, attn_implementation="eager"))
    else:
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common))
    model.config.use_cache = False
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft.train()
    return peft


# blocks rewritten with LoRA on every projection: Gemma2's attention is not found (eager)
BLOCKS = {"gemma": 4, "gemma2": 2, "gemma3": 4}


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_family_matches_the_reference(kind):
    ids, labels = batch()
    cmp = assert_rewrite_equivalent(tiny(kind), {"input_ids": ids, "labels": labels}, POLICY,
                                    regional=False, expect_blocks=BLOCKS[kind])
    assert cmp.blocks_checked == BLOCKS[kind]


def test_gemma_regional_matches_the_reference():
    ids, labels = batch()
    assert_rewrite_equivalent(tiny("gemma"), {"input_ids": ids, "labels": labels}, POLICY,
                              regional=True, expect_blocks=4)


def test_gemma2_regional_matches_the_reference():
    ids, labels = batch()
    assert_rewrite_equivalent(tiny("gemma2"), {"input_ids": ids, "labels": labels}, POLICY,
                              regional=True, expect_blocks=2)


def test_gemma_trains_a_few_steps():
    model = tiny("gemma")
    compiled = slc.compile(model, POLICY, regional=False, inner="aot_eager")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, labels = batch()
    losses = []
    for _ in range(3):
        loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert compiled.stats.steps == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_explain_says_why_gemma_parts_stay_dense():
    ids, labels = batch()
    e = slc.explain(tiny("gemma2"), input_ids=ids, labels=labels, policy=POLICY, verbose=False)
    attn = [s for s in e.skipped if s["where"].endswith("self_attn")]
    assert len(attn) == 2 and all("without scaled_dot_product_attention" in s["reason"] for s in attn)


def test_frozen_geglu_mlp_is_rewritten_unfused():
    """LoRA on attention only: the frozen GeGLU MLP takes the per-product path (the fused
    frozen-MLP op computes silu only) and still matches the reference."""
    ids, labels = batch()
    assert_rewrite_equivalent(tiny("gemma", QKVO), {"input_ids": ids, "labels": labels}, POLICY,
                              expect_blocks=4)


@pytest.mark.parametrize("act,fn", [("silu", F.silu), ("gelu", F.gelu),
                                    ("gelu_tanh", lambda z: F.gelu(z, approximate="tanh"))])
def test_gated_score_uses_the_activation_and_its_derivative(act, fn):
    torch.manual_seed(0)
    g, u = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    rg, ru = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    d = torch.func.vmap(torch.func.grad(fn))(g.reshape(-1)).reshape(g.shape)
    want = (fn(g) ** 2 + d ** 2 * rg) * (u ** 2 + ru)
    torch.testing.assert_close(selection.corrected_gated_sq(g, u, rg, ru, act), want)
    torch.testing.assert_close(selection.corrected_gated_sq(g, u, None, None, act), (fn(g) * u) ** 2)
    zero = torch.zeros((), dtype=torch.float64)
    z0 = fn(zero) ** 2 + torch.func.grad(fn)(zero) ** 2
    assert selection.ZERO_ROW_TERM[act] == pytest.approx(z0.item())


def test_plain_scores_take_the_activation():
    from sparselora_compile.runtime.row_split import compute_split
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    ag, bg, au, bu = torch.randn(16, 3), torch.randn(3, 24), torch.randn(16, 3), torch.randn(3, 24)
    rows = torch.zeros(2, 6, dtype=torch.bool)
    got = scores.mlp_scores(x, ag, bg, au, bu, None, None, compute_split(rows), act="gelu_tanh")
    x2 = x.reshape(-1, 16)
    want = (F.gelu(x2 @ ag @ bg, approximate="tanh") * (x2 @ au @ bu)).square().sum(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gemma_blocks_are_scored_with_gelu_tanh(monkeypatch):
    seen = []
    real = scores.mlp_scores

    def spy(*args, **kwargs):
        seen.append(kwargs.get("act", "silu"))
        return real(*args, **kwargs)
    monkeypatch.setattr(scores, "mlp_scores", spy)
    model = tiny("gemma")
    compiled = slc.compile(model, POLICY, regional=False, inner="aot_eager")
    ids, labels = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(input_ids=ids, labels=labels).loss.backward()
    assert seen and set(seen) == {"gelu_tanh"}


@pytest.mark.parametrize("kind", ["Qwen2", "Mistral", "Olmo2"])
def test_llama_like_families_match_the_reference(kind):
    """SiLU-gated MLPs and SDPA grouped-query attention, as in Llama."""
    torch.manual_seed(0)
    cfg = getattr(T, kind + "Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = getattr(T, kind + "ForCausalLM")(cfg)
    model.config.use_cache = False
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids, labels = batch()
    assert_rewrite_equivalent(peft.train(), {"input_ids": ids, "labels": labels}, POLICY,
                              expect_blocks=4)
