"""supervised_head=True: the LM head runs on the supervised positions only, with the same
loss and gradients as the full head (supervised_head.py)."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.loss.loss_utils import ForCausalLMLoss

import sparselora_compile as slc
from sparselora_compile.supervised_head import shifted_labels_at, supervised_positions

from llama import ALL, one_step, tiny_llama

POLICY = slc.Policy(mlp=0.5, attention=0.5, warmup_steps=0)


def _padded_batch(lengths, t, n_out=3, seed=0):
    """Right-padded rows: a prompt, then up to n_out supervised tokens, then padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):
        labels[i, : max(n - n_out, 0)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed_batch(lengths, seed=0):
    """One packed row (`position_ids` restarting per sequence), each sequence's first label
    -100, as HF's DataCollatorWithFlattening makes it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)] = -100
    labels[0, :2] = -100
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def _step(batch, **kw):
    wrapped = slc.compile(tiny_llama(ALL, layers=2), POLICY, inner="aot_eager", **kw)
    return one_step(wrapped, batch), wrapped


def _assert_same_training(batch, **kw):
    (out, grads), wrapped = _step(batch, supervised_head=True, **kw)
    (ref, ref_grads), _ = _step(batch, **kw)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert wrapped.stats.base_flops_executed < wrapped.stats.base_flops_dense  # it trained sparse
    return wrapped


def test_positions_and_labels_follow_hf_shift():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    pos = supervised_positions(labels)
    assert pos.tolist() == [0, 1, 2]  # position p predicts labels[p + 1]
    assert shifted_labels_at(labels, pos).tolist() == [[-100, 5, 6], [7, -100, -100]]


@given(st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**31 - 1), st.booleans())
@settings(max_examples=80, deadline=None)
def test_the_kept_positions_give_hf_loss_and_gradient(rows, t, seed, count_items):
    """HF's loss over the head at every position equals it over the kept positions with
    their shifted labels (fp64), gradients included; no label at all gives NaN both ways."""
    g = torch.Generator().manual_seed(seed)
    vocab = 11
    hidden = torch.randn(rows, t, 5, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.randn(vocab, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, vocab, (rows, t), generator=g)
    labels[torch.rand(rows, t, generator=g) < 0.6] = -100
    items = {"num_items_in_batch": torch.tensor(max(int((labels[:, 1:] != -100).sum()), 1))} if count_items else {}
    full = ForCausalLMLoss(hidden @ head.T, labels, vocab, **items)
    (grad_full,) = torch.autograd.grad(full, hidden) if full.isfinite() else (None,)
    pos = supervised_positions(labels)
    kept = ForCausalLMLoss(hidden[:, pos] @ head.T, labels, vocab,
                           shift_labels=shifted_labels_at(labels, pos), **items)
    if grad_full is None:
        assert not kept.isfinite()
        return
    torch.testing.assert_close(kept, full)
    (grad_kept,) = torch.autograd.grad(kept, hidden)
    torch.testing.assert_close(grad_kept, grad_full)


@pytest.mark.parametrize("padding_free", [True, False])
def test_padded_batches_train_as_with_the_full_head(padding_free):
    _assert_same_training(_padded_batch([9, 6, 11], 12), padding_free=padding_free)


def test_packed_rows_train_as_with_the_full_head():
    _assert_same_training(_packed_batch([5, 7, 4]))


def test_num_items_in_batch_and_eval():
    """The Trainer's loss normalisation, and eval forwards, which keep every logit."""
    batch = {**_padded_batch([9, 6, 11], 12), "num_items_in_batch": torch.tensor(7)}
    wrapped = _assert_same_training(batch)
    wrapped.model.eval()
    with torch.no_grad():
        out = wrapped(**_padded_batch([9, 6, 11], 12))
    assert out.logits.shape == (3, 12, 64)


def test_a_deep_copy_and_uncompile_leave_the_plain_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss
    wrapped = slc.compile(tiny_llama(), POLICY, inner="aot_eager", supervised_head=True)
    base = wrapped.model.get_base_model()
    assert base.loss_function is not ForCausalLMLoss
    assert copy.deepcopy(wrapped.model).get_base_model().loss_function is ForCausalLMLoss
    wrapped.uncompile()
    assert base.loss_function is ForCausalLMLoss


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="supervised_head"):
        slc.compile(tiny_llama(), POLICY, supervised_head="yes")
    with pytest.raises(ValueError, match="regional=True"):
        slc.compile(tiny_llama(), POLICY, supervised_head=True, regional=False)
