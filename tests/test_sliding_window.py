"""Models whose attention keeps a sliding window (Mistral, Gemma 3): packed and padding-free
rows run the varlen kernel with each layer's window, with HF's loss and gradients; the
windowed kernel against its definition."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from hypothesis import given, settings, strategies as st
from peft import LoraConfig

import sparselora_compile as slc
from sparselora_compile import packing
from sparselora_compile.runtime.varlen_attention import packed_causal_attention, reference_packed_attention

from flash_checks import assert_flash_matches_reference
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
@pytest.mark.parametrize("window", [8, 64])
def test_packed_rows_keep_each_layers_window(kind, window):
    """Window 8 is shorter than the sequences (20 and 12 packed, 32 and 24 padded), so a
    kernel that ignored it would not match HF; 64 is longer than every row."""
    for batch in (_padded(), _packed()):
        model = _tiny(kind, window)
        want_loss, want_grads = _step(copy.deepcopy(model), batch)
        torch._dynamo.reset()
        wrapped = slc.compile(model, DENSE, inner="eager")
        loss, grads = _step(wrapped, batch)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert wrapped.stats.varlen_forwards == 1
        wrapped.uncompile()
        torch._dynamo.reset()


def test_which_layers_keep_a_window():
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    assert packing.config_window(T.MistralConfig(**common, sliding_window=16), 1) == 16
    assert packing.config_window(T.MistralConfig(**common, sliding_window=None)) is None
    # Qwen2 keeps a window only with use_sliding_window; Gemma 3 on its sliding layers
    assert packing.config_window(T.Qwen2Config(**common, sliding_window=16)) is None
    hybrid = T.Gemma3TextConfig(**common, head_dim=8, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"])
    assert [packing.config_window(hybrid, i) for i in (0, 1)] == [16, None]
    assert packing.config_window(hybrid) == 16
    full = T.Gemma3TextConfig(**common, head_dim=8, sliding_window=16, layer_types=["full_attention"] * 2)
    assert packing.config_window(full) is None
    assert packing.config_window(T.LlamaConfig(**common)) is None
    # what HF hands the attention function wins, None included (a full layer)
    assert packing.layer_window(None, {"sliding_window": 4}) == 4
    assert packing.layer_window(None, {"sliding_window": None}) is None


def test_install_notes_each_layers_window_once():
    """The compiled attention never reads `layer_idx` (Dynamo on torch 2.11 specializes a
    layer's graph on it, compiling each layer apart): install() notes the windows."""
    model = _tiny("gemma3", 16)
    undo = packing.install(model)
    attn = [layer.self_attn for layer in model.base_model.model.model.layers]
    assert [a.sparselora_window for a in attn] == [16, None]
    for a in attn:
        a.layer_idx = "not read at run time"  # config_window would fail comparing it
    assert [packing.layer_window(a, {}) for a in attn] == [16, None]
    undo()
    assert not any(hasattr(a, packing.WINDOW_ATTR) for a in attn)


def _per_sequence_windowed(q, k, v, lengths, window, scale=None):
    """Each sequence on its own through SDPA with HF's sliding-window causal mask."""
    groups, outs, at = q.shape[1] // k.shape[1], [], 0
    for n in lengths:
        s = slice(at, at + n)
        pos = torch.arange(n)
        mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)
        kk, vv = (t[s].repeat_interleave(groups, 1).transpose(0, 1) for t in (k, v))
        outs.append(F.scaled_dot_product_attention(q[s].transpose(0, 1), kk, vv, attn_mask=mask,
                                                   scale=scale).transpose(0, 1))
        at += n
    return torch.cat(outs)


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), window=st.integers(1, 8),
       heads=st.sampled_from([(2, 2), (4, 2)]), scale=st.sampled_from([None, 0.3]))
@settings(max_examples=30, deadline=None)
def test_windowed_reference_is_sliding_attention_per_sequence(lengths, window, heads, scale):
    g = torch.Generator().manual_seed(len(lengths) + window)
    n = sum(lengths)
    q = torch.randn(n, heads[0], 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(n, heads[1], 8, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    want = _per_sequence_windowed(q, k, v, lengths, window, scale)
    torch.testing.assert_close(reference_packed_attention(q, k, v, cu, scale, window), want)
    torch.testing.assert_close(packed_causal_attention(q, k, v, cu, scale, window), want)


def test_a_window_of_no_tokens_is_an_error():
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="window of 0 tokens"):
        packed_causal_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), window=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [1, 64, 4096])
def test_flash_varlen_keeps_the_window_with_gradients(dtype, window):
    """Sequences longer and shorter than the window; 4096 is longer than every one."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 1, 128, 300, 5, 141]
    n, d = sum(lengths), 64
    q = torch.randn(n, 8, d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(n, 2, d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
            for _ in range(2))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    assert_flash_matches_reference(q, k, v, cu, window)
