"""DoRA (`LoraConfig(use_dora=True)`) is refused: slc.compile raises one clear error; under
torch.compile every block stays dense, with a reason in explain() and one warning, and no
step is counted by a graph that cannot see the batch."""
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sparselora_compile as slc

from llama import ALL, QKVO, batch

POLICY = slc.Policy(mlp=0.5, attention=0.5)


def tiny_dora(targets=QKVO, layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    peft.train()
    return peft


@pytest.mark.parametrize("regional", [True, False])
def test_slc_compile_refuses_dora(regional):
    model = tiny_dora()
    with pytest.raises(ValueError, match=r"DoRA adapters \(use_dora=True\) are not supported.*"
                                         r"use_dora=False.*layers\.0\.self_attn\.q_proj"):
        slc.compile(model, POLICY, regional=regional, inner="aot_eager")
    assert getattr(model, "_sparselora", None) is None  # nothing installed


@pytest.mark.parametrize("targets", [QKVO, ALL], ids=["qkvo", "all"])
def test_torch_compile_leaves_dora_models_dense_and_says_so(targets):
    model = tiny_dora(targets)
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    compiled = torch.compile(model, backend="sparselora", options={"policy": POLICY, "inner": "aot_eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
    dora_warnings = {str(w.message) for w in caught if "DoRA" in str(w.message)}
    assert len(dora_warnings) == 1 and "use_dora=False" in dora_warnings.pop()
    torch.testing.assert_close(loss, want)  # dense: the eager result
    stats = slc.run_of(compiled).stats
    # nothing is sparse, and no graph piece counts steps (it was 3 per forward before)
    assert stats.base_flops_dense == 0 and stats.steps == 0


def test_explain_names_dora_and_the_pieces_it_leaves():
    model = tiny_dora(QKVO)
    ids, labels = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = slc.explain(model, input_ids=ids, labels=labels, policy=POLICY, verbose=False)
    assert e.blocks == []
    reasons = [s["reason"] for s in e.skipped]
    assert any(r.startswith("DoRA adapter (use_dora=True)") for r in reasons)
    # the MLPs (no adapter) sit in graphs that resume after DoRA's graph break
    resumed = [s for s in e.skipped if "resumes after a graph break" in s["reason"]]
    assert resumed and all(s["where"].endswith("mlp") for s in resumed)
