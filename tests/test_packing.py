"""Packed rows run variable-length attention (packing.py, runtime/varlen_attention.py):
the same outputs, loss, gradients and sparse selections as HF's SDPA over its
block-diagonal mask."""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparselora_compile as slc
from sparselora_compile import packing
from sparselora_compile.runtime.varlen_attention import (block_causal_mask, packed_causal_attention,
                                                         reference_packed_attention)

from flash_checks import assert_flash_matches_reference
from llama import ALL, assert_same_step, one_step, tiny_llama

POLICY = slc.Policy(mlp=0.5, attention=0.5, warmup_steps=0)


def _positions(rows):
    """[B, T] position ids of rows given as lists of sequence lengths (equal row sums)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def _per_sequence(q, k, v, lengths, scale=None):
    """Causal SDPA run on each sequence on its own ([N, H, D] layout)."""
    groups, outs, at = q.shape[1] // k.shape[1], [], 0
    for n in lengths:
        s = slice(at, at + n)
        kk, vv = (t[s].repeat_interleave(groups, 1).transpose(0, 1) for t in (k, v))
        outs.append(F.scaled_dot_product_attention(q[s].transpose(0, 1), kk, vv, is_causal=True,
                                                   scale=scale).transpose(0, 1))
        at += n
    return torch.cat(outs)


row_lengths = st.lists(st.integers(1, 6), min_size=1, max_size=4)


@given(st.lists(row_lengths, min_size=1, max_size=3))
@settings(max_examples=60, deadline=None)
def test_sequence_boundaries(rows):
    t = max(sum(r) for r in rows)
    rows = [r + [t - sum(r)] if sum(r) < t else r for r in rows]  # each row filled to t
    starts = packing.packed_sequences(_positions(rows))
    lengths = [n for r in rows for n in r]
    if len(lengths) == len(rows):
        assert starts is None
    else:
        expected = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        assert starts.dtype == torch.int32 and torch.equal(starts, expected)


def test_two_rows_of_one_sequence_each_are_not_packed():
    # the second row starts at position 0 after the first row ends: a row start, not a
    # new sequence in the middle of a row
    assert packing.packed_sequences(torch.arange(5).expand(2, 5)) is None
    assert packing.packed_sequences(torch.tensor([[3, 4, 5, 6]])) is None  # one sequence, offset


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5), heads=st.sampled_from([(2, 2), (4, 2), (6, 1)]),
       dim=st.sampled_from([4, 8]), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from([None, 0.3]))
@settings(max_examples=40, deadline=None)
def test_reference_is_causal_attention_per_sequence(lengths, heads, dim, dtype, scale):
    g = torch.Generator().manual_seed(len(lengths))
    n = sum(lengths)
    q = torch.randn(n, heads[0], dim, generator=g, dtype=dtype)
    k, v = (torch.randn(n, heads[1], dim, generator=g, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    want = _per_sequence(q, k, v, lengths, scale)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(reference_packed_attention(q, k, v, cu, scale), want, **tol)
    torch.testing.assert_close(packed_causal_attention(q, k, v, cu, scale), want, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_flash_varlen_matches_reference_with_gradients(dtype, heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 1, 128, 200, 5, 141]
    n, d = sum(lengths), 64
    q = torch.randn(n, heads[0], d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(n, heads[1], d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
            for _ in range(2))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    assert_flash_matches_reference(q, k, v, cu)


@functools.lru_cache(maxsize=None)
def _compiled(**kw):
    """One compiled tiny Llama per setting, reused across examples."""
    return slc.compile(tiny_llama(ALL, layers=2), POLICY, inner="aot_eager", record=True, **kw)


def _packed_batch(rows, seed=0):
    pos = _positions(rows)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, pos.shape, generator=g)
    labels = ids.clone()
    labels[pos < 2] = -100  # each sequence's first tokens are context (the first: the separator)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _train(batch, **kw):
    wrapped = _compiled(**kw)
    before = wrapped.stats.varlen_forwards
    out, grads = one_step(wrapped, batch)
    return out, grads, wrapped, wrapped.stats.varlen_forwards - before


@pytest.mark.dynamic_shapes  # one compile for every batch: static, each example's shapes recompile
@given(st.lists(st.lists(st.integers(3, 7), min_size=2, max_size=3), min_size=1, max_size=2))
@settings(max_examples=3, deadline=None)
def test_varlen_equals_block_mask(rows):
    """Same logits at every position, loss, gradients and selections as HF's SDPA over
    its block-diagonal mask (the same model with varlen_attention=False)."""
    t = max(sum(r) for r in rows)
    rows = [r + [t - sum(r)] if sum(r) < t else r for r in rows]
    b = _packed_batch(rows)
    out, grads, wrapped, varlen = _train(b)
    ref, ref_grads, ref_wrapped, ref_varlen = _train(b, varlen_attention=False)
    assert (varlen, ref_varlen) == (1, 0)
    assert_same_step((out, grads, wrapped.run.record), (ref, ref_grads, ref_wrapped.run.record))


def test_the_packing_must_matter():
    """The sequence boundaries change the logits past a sequence's first (plain causal
    attention over the row differs): the comparison above is not vacuous."""
    model = tiny_llama()
    packing.install(model)
    b = _packed_batch([[4, 5]])
    kw, added = packing.add_sequence_starts(b)
    with torch.no_grad():
        out, plain = model(**kw).logits, model(**b).logits  # the latter: HF's block mask
        causal = model(**{**b, "position_ids": torch.arange(9)[None]}).logits
    assert added
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[:, 4:], causal[:, 4:], rtol=1e-3, atol=1e-4)


def test_a_varlen_forward_hands_hf_a_prepared_mask():
    """Without HF's mask (its packed-sequence check syncs, and the varlen path never reads
    the [1, 1, N, N] mask): the same logits; a layer that falls back to HF's SDPA (here:
    attention treated as not causal) gets HF's own block-diagonal mask rebuilt."""
    from transformers.masking_utils import create_causal_mask
    model = tiny_llama()
    packing.install(model)
    b = _packed_batch([[4, 5], [2, 7]])
    kw = packing.add_sequence_starts(b)[0]
    prepared = packing.without_hf_mask(kw)
    assert prepared["attention_mask"].shape == (1, 1, 1, 1)
    assert packing.without_hf_mask(kw)["attention_mask"] is prepared["attention_mask"]  # one per device
    with torch.no_grad():
        torch.testing.assert_close(model(**prepared).logits, model(**kw).logits, rtol=0, atol=0)
    cfg = model.get_base_model().config
    hf = create_causal_mask(config=cfg, inputs_embeds=torch.zeros(2, 9, cfg.hidden_size),
                            attention_mask=None, cache=None, position_ids=b["position_ids"])
    assert torch.equal(block_causal_mask(kw[packing.SEQ_STARTS], 2, 9)[:, None], hf)  # the fallback's mask
    attn = model.get_base_model().model.layers[0].self_attn
    q, k, v = (torch.randn(2, h, 9, 8) for h in (4, 2, 2))
    attn.is_causal = False  # falls back to HF's SDPA, which then reads the mask
    try:
        out = packing.attention(attn, q, k, v, prepared["attention_mask"], **{packing.SEQ_STARTS: kw[packing.SEQ_STARTS]})[0]
        ref = packing._hf_sdpa(attn, q, k, v, hf)[0]
    finally:
        attn.is_causal = True
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_what_keeps_hf_attention():
    kw = _packed_batch([[3, 4]])
    out, added = packing.add_sequence_starts(kw)
    assert added and torch.equal(out[packing.SEQ_STARTS], torch.tensor([0, 3, 7], dtype=torch.int32))
    for keep in ({**kw, "attention_mask": torch.ones(1, 7, dtype=torch.long)},  # HF combines the two
                 {**kw, "past_key_values": object()},                         # a cache
                 {**kw, "position_ids": torch.arange(7)[None]},               # one sequence
                 {k: v for k, v in kw.items() if k != "position_ids"}):       # no positions
        out, added = packing.add_sequence_starts(keep)
        assert not added and out is keep
    own = {**kw, packing.SEQ_STARTS: torch.tensor([0, 7])}  # TRL's padding-free collator passes them
    out, varlen = packing.add_sequence_starts(own)
    assert varlen and out is own


def test_install_and_uncompile_restore_sdpa():
    model = tiny_llama()
    config = model.get_base_model().config
    assert config._attn_implementation == "sdpa"
    wrapped = slc.compile(model, POLICY, inner="aot_eager")
    assert config._attn_implementation == packing.IMPLEMENTATION
    wrapped.uncompile()
    assert config._attn_implementation == "sdpa"
    slc.compile(model, POLICY, inner="aot_eager", varlen_attention=False).uncompile()
    assert config._attn_implementation == "sdpa"


def test_other_attention_implementations_are_left_alone():
    model = tiny_llama()
    model.get_base_model().set_attn_implementation("eager")
    wrapped = slc.compile(model, POLICY, inner="aot_eager")
    assert model.get_base_model().config._attn_implementation == "eager"
    wrapped(**_packed_batch([[3, 4]])).loss.backward()
    assert wrapped.stats.varlen_forwards == 0


def test_bad_option_value():
    with pytest.raises(ValueError, match="varlen_attention"):
        slc.compile(tiny_llama(), POLICY, varlen_attention=1)


def _padded_batch(lengths, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(lengths), t), generator=g)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):  # a prompt of >= 1 token, then a response of <= 3
        labels[i, : max(n - 3, 1)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_unpad_packs_the_real_tokens():
    b = _padded_batch([3, 5], 6)
    out, unpadded = packing.unpad(b)
    real = b["attention_mask"].bool()
    assert torch.equal(out["input_ids"], b["input_ids"][real][None])
    assert torch.equal(out["labels"], b["labels"][real][None])
    assert torch.equal(out["position_ids"], torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    assert torch.equal(out[packing.SEQ_STARTS], torch.tensor([0, 3, 8], dtype=torch.int32))
    assert "attention_mask" not in out
    logits = torch.randn(1, 8, 4, requires_grad=True)
    padded = unpadded.repad(logits)
    assert padded.shape == (2, 6, 4) and torch.equal(padded[real], logits[0])
    assert not padded[~real].any()
    padded.sum().backward()
    assert torch.equal(logits.grad, torch.ones_like(logits))


def test_unpad_fills_the_row_to_its_bucket():
    """8 real tokens and 4 filler sequences fill a row of 16 (bucket_step(12, 16) = 16)."""
    b = _padded_batch([3, 5], 6)
    out, unpadded = packing.unpad(b, bucket=16, filler_id=7)
    exact, _ = packing.unpad(b)
    assert out["input_ids"].shape == (1, 16) and packing.FILLER_SEQUENCES == 4
    assert torch.equal(out["input_ids"][:, :8], exact["input_ids"]) and out["input_ids"][0, 8:].eq(7).all()
    assert torch.equal(out["labels"][:, :8], exact["labels"]) and out["labels"][0, 8:].eq(-100).all()
    assert torch.equal(out["position_ids"], torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4] + [0, 1] * 4]))
    assert torch.equal(out[packing.SEQ_STARTS], torch.tensor([0, 3, 8, 10, 12, 14, 16], dtype=torch.int32))
    assert torch.equal(unpadded.real, (torch.arange(16) < 8).long()[None])
    logits = torch.randn(1, 16, 4)
    torch.testing.assert_close(unpadded.repad(logits), packing.unpad(b)[1].repad(logits[:, :8]), rtol=0, atol=0)
    # a row one token short of a bucket still gets one token per filler sequence
    assert packing.unpad(_padded_batch([6, 6, 1], 6), bucket=16)[0]["input_ids"].shape == (1, 32)


def test_fill_packed_rounds_tokens_and_sequences():
    """A caller's row of 3 sequences (9 tokens): 8 - 3 + 4 = 9 filler sequences take it to
    a row of 32 (bucket_step(18, 16) = 16) and 12 sequences."""
    b = _packed_batch([[3, 4, 2]])
    out, filled = packing.fill_packed(b, 16, filler_id=7)
    assert out["input_ids"].shape == (1, 32) and out["input_ids"][0, 9:].eq(7).all()
    assert torch.equal(out["input_ids"][:, :9], b["input_ids"]) and out["labels"][0, 9:].eq(-100).all()
    starts = out[packing.SEQ_STARTS]
    assert starts.dtype == torch.int32 and starts.numel() == 12 + 1 and starts[-1] == 32
    assert torch.equal(starts[:4], torch.tensor([0, 3, 7, 9], dtype=torch.int32))
    assert (starts.diff() >= 1).all()  # every filler sequence holds a token
    assert torch.equal(packing.packed_sequences(out["position_ids"]), starts)  # positions agree
    assert torch.equal(filled.real, (torch.arange(32) < 9).long()[None])
    logits = torch.randn(1, 32, 4)
    assert torch.equal(filled.repad(logits), logits[:, :9])
    # what it leaves alone: rows of one sequence, two rows, a mask, the caller's boundaries
    for keep in (_packed_batch([[9]]), _packed_batch([[3, 4], [5, 2]]), {**b, "attention_mask": torch.ones(1, 9)},
                 {**b, packing.SEQ_STARTS: torch.tensor([0, 3, 7, 9], dtype=torch.int32)}):
        assert packing.fill_packed(keep, 16) == (keep, None)


@pytest.mark.parametrize("packed", [False, True])
@given(st.lists(st.integers(2, 9), min_size=1, max_size=3), st.integers(1, 8))
@settings(max_examples=6, deadline=None)
def test_filler_changes_no_real_token(packed, lengths, bucket):
    """The dense model on the filled row (a padded batch unpadded, or a caller's packed
    row): the loss, the real tokens' logits and the gradients of the exact row."""
    model = _dense_model()
    if packed:  # sequences of 3 or more: _packed_batch supervises from each one's third token
        b = _packed_batch([[max(n, 3) for n in lengths] + [3]], seed=len(lengths))
        variants = (packing.add_sequence_starts(b)[0], packing.fill_packed(b, bucket)[0])
    else:
        b = _padded_batch(lengths, max(lengths) + 1, seed=len(lengths))
        variants = (packing.unpad(b)[0], packing.unpad(b, bucket=bucket)[0])
    n = variants[0]["input_ids"].shape[1]  # the real tokens
    results = []
    for kw in variants:
        model.zero_grad(set_to_none=True)
        out = model(**kw)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss, out.logits[:, :n], grads))
    (loss, logits, grads), (f_loss, f_logits, f_grads) = results
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_logits, logits, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(f_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


@functools.lru_cache(maxsize=None)
def _dense_model():
    """A tiny Llama switched to the packed attention, uncompiled."""
    model = tiny_llama(ALL, layers=2)
    assert packing.install(model) is not None
    return model


def test_unpad_leaves_a_batch_without_padding_and_drops_its_mask():
    b = _padded_batch([6, 6], 6)
    out, unpadded = packing.unpad(b)
    assert unpadded is None and "attention_mask" not in out
    assert all(out[k] is b[k] for k in ("input_ids", "labels"))


def test_unpad_keeps_what_it_must():
    b = _padded_batch([3, 5], 6)
    first = b["labels"].clone()
    first[1, 0] = 9  # a supervised first token: the previous row's last would predict it
    pad = b["labels"].clone()
    pad[0, 4] = 9    # a supervised pad
    left = {**b, "attention_mask": b["attention_mask"].flip(1)}
    for keep in (left, {**b, "labels": first}, {**b, "labels": pad},
                 {**b, "position_ids": torch.arange(6).expand(2, 6)},
                 {**b, "output_hidden_states": True}, {**b, "past_key_values": object()},
                 {k: v for k, v in b.items() if k != "labels"}):
        out, unpadded = packing.unpad(keep)
        assert unpadded is None and out is keep


@pytest.mark.dynamic_shapes
@given(st.lists(st.integers(2, 9), min_size=2, max_size=3))
@settings(max_examples=3, deadline=None)
def test_padding_free_equals_padded(lengths):
    """Same loss, gradients, selections and real-position logits as the padded batch (the
    model without varlen attention, hence without padding_free, runs it padded)."""
    b = _padded_batch(lengths, max(lengths) + 1)
    wrapped = _compiled()
    before = wrapped.stats.padding_free_forwards
    out, grads, wrapped, _ = _train(b)
    ref, ref_grads, ref_wrapped, _ = _train(b, varlen_attention=False)  # and so padding_free
    assert wrapped.stats.padding_free_forwards == before + 1
    assert ref_wrapped.stats.padding_free_forwards == 0
    real = b["attention_mask"].bool()
    assert out.logits.shape == ref.logits.shape and not out.logits[~real].any()
    assert_same_step((out, grads, wrapped.run.record), (ref, ref_grads, ref_wrapped.run.record),
                     real=real, packed=True)
