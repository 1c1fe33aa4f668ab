"""Models whose attention keeps a sliding window (Mistral, Gemma 3): the varlen kernel
attends whole sequences, so rows longer than the window run HF's attention; the loss and
gradients are HF's either way."""
import copy
import warnings

import pytest
import torch
import transformers as T
from peft import LoraConfig

import sparselora_compile as slc
from sparselora_compile import packing

from llama import with_lora

DENSE = slc.Policy(mlp=0.0, attention=0.0)  # rewritten, nothing dropped: HF's numbers


def _tiny(kind, window):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    if kind == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=window))
    else:
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            **common, sliding_window=window, layer_types=["sliding_attention", "full_attention"]))
    return with_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _padded():
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed():
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None]
    labels = ids.clone()
    labels[0, [0, 20]] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def _step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
@pytest.mark.parametrize("window, varlen", [(8, False), (64, True)])
def test_rows_longer_than_the_window_run_hfs_attention(kind, window, varlen):
    for batch in (_padded(), _packed()):
        model = _tiny(kind, window)
        want_loss, want_grads = _step(copy.deepcopy(model), batch)
        torch._dynamo.reset()
        wrapped = slc.compile(model, DENSE, inner="eager")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, grads = _step(wrapped, batch)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert (wrapped.stats.varlen_forwards == 1) == varlen
        assert any("sliding window (8)" in str(w.message) for w in caught) != varlen
        wrapped.uncompile()
        torch._dynamo.reset()


def test_which_models_keep_a_window():
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    assert packing.sliding_window(T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=16))) == 16
    assert packing.sliding_window(T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=None))) is None
    # Qwen2 carries a window only with use_sliding_window; Gemma 3 through its layer types
    assert packing.sliding_window(T.Qwen2ForCausalLM(T.Qwen2Config(**common, sliding_window=16))) is None
    full = T.Gemma3TextConfig(**common, head_dim=8, sliding_window=16, layer_types=["full_attention"] * 2)
    assert packing.sliding_window(T.Gemma3ForCausalLM(full)) is None
    assert packing.sliding_window(T.LlamaForCausalLM(T.LlamaConfig(**common))) is None
