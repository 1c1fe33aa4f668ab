"""Right-padded training batches run causal attention without their mask (padding.py):
the loss, every gradient, the sparse selections and the outputs at real positions equal
those of the same compiled model that keeps the mask."""
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparselora_compile as slc
from sparselora_compile.padding import causal_attention, right_padded, unmask_right_padding

from llama import ALL, assert_same_step, one_step, tiny_llama

POLICY = slc.Policy(mlp=0.5, attention=0.5, warmup_steps=0)


def _mask(lengths, t, left=False):
    pos = torch.arange(t)
    lens = torch.tensor(lengths)[:, None]
    return (pos >= t - lens if left else pos < lens).long()


def _batch(lengths, t, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(lengths), t), generator=g)
    mask = _mask(lengths, t, left)
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):  # a prompt, then a supervised response of <= 3 tokens
        real = mask[i].nonzero().squeeze(1)
        labels[i, real[: max(n - 3, 0)]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@given(st.lists(st.integers(0, 12), min_size=1, max_size=4), st.integers(0, 12))
@settings(max_examples=60, deadline=None)
def test_right_padded_matches_its_definition(lengths, gap):
    """Right padded: every row is ones then zeros. A real token placed after a pad breaks it."""
    t = 13
    mask = _mask(lengths, t)
    assert right_padded(mask) and right_padded(mask.bool())
    broken = mask.clone()
    row = 0
    if lengths[row] + 1 + gap < t:
        broken[row, lengths[row] + 1 + gap] = 1  # a pad at lengths[row], then a real token
        assert not right_padded(broken)
    if 0 < lengths[row] < t:
        assert not right_padded(_mask(lengths, t, left=True))


def test_right_padded_needs_unsupervised_padding():
    mask = _mask([5, 3], 6)
    labels = torch.full((2, 6), -100)
    labels[0, 4] = 7  # a supervised real position
    assert right_padded(mask, labels)
    labels[1, 4] = 7  # a supervised padded position: the loss would read its output
    assert not right_padded(mask, labels)


def test_unmask_keeps_what_it_must():
    kw = _batch([5, 3], 6)
    out, dropped = unmask_right_padding(kw)
    assert dropped and "attention_mask" not in out and "attention_mask" in kw
    supervised_pad = kw["labels"].clone()
    supervised_pad[1, 5] = 3
    for keep in ({**kw, "attention_mask": _mask([5, 3], 6, left=True)},   # left padding
                 {**kw, "past_key_values": object()},                     # a cache
                 {**kw, "attention_mask": torch.ones(2, 1, 6, 6)},         # a 4-D mask
                 {**kw, "labels": supervised_pad},                        # the loss reads a pad
                 {k: v for k, v in kw.items() if k != "labels"},          # a loss of the caller's
                 {"input_ids": kw["input_ids"], "labels": kw["labels"]}):  # no mask
        out, dropped = unmask_right_padding(keep)
        assert not dropped and out is keep


def test_causal_attention_of_models():
    assert causal_attention(tiny_llama())
    assert not causal_attention(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = tiny_llama()
    next(m for m in model.modules() if hasattr(m, "is_causal")).is_causal = False
    assert not causal_attention(model)


@functools.lru_cache(maxsize=None)
def _compiled(**kw):
    """One compiled tiny Llama per setting, reused across examples (one compile each: the
    batch and sequence dims are dynamic). Same seed, so the same weights."""
    return slc.compile(tiny_llama(ALL, layers=2), POLICY, inner="aot_eager", record=True,
                       padding_free=False, **kw)  # which takes these batches first (test_packing.py)


def _train(batch, **kw):
    wrapped = _compiled(**kw)
    before = wrapped.stats.unmasked_forwards
    out, grads = one_step(wrapped, batch)
    return out, grads, wrapped, wrapped.stats.unmasked_forwards - before


@given(st.lists(st.integers(4, 12), min_size=2, max_size=3))
@settings(max_examples=3, deadline=None)
def test_unmasked_equals_masked(lengths):
    """Same loss, gradients, selections and real-position logits as with the mask."""
    t = max(lengths) + 1  # at least one pad in every row
    b = _batch(lengths, t)
    # dynamic: one compile for every example (static, each example's shapes recompile)
    out, grads, wrapped, unmasked = _train(b, dynamic=True)
    ref, ref_grads, ref_wrapped, ref_unmasked = _train(b, causal_right_padding=False, dynamic=True)
    assert (unmasked, ref_unmasked) == (1, 0)
    real = b["attention_mask"].bool()
    assert_same_step((out, grads, wrapped.run.record), (ref, ref_grads, ref_wrapped.run.record), real=real)
    # the mask did matter: padded positions now attend to the pads before them
    assert not torch.allclose(out.logits[~real], ref.logits[~real], rtol=1e-4, atol=1e-5)


def test_left_padding_and_eval_keep_the_mask():
    assert _train(_batch([5, 8], 9, left=True))[3] == 0
    wrapped = _compiled()
    wrapped.model.eval()
    try:
        before = wrapped.stats.unmasked_forwards
        with torch.no_grad():
            wrapped(**_batch([5, 8], 9))
        assert wrapped.stats.unmasked_forwards == before
    finally:
        wrapped.model.train()


def test_bad_option_value():
    with pytest.raises(ValueError, match="causal_right_padding"):
        slc.compile(tiny_llama(), POLICY, causal_right_padding="yes")
