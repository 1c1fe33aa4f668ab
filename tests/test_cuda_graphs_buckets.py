"""cuda_graphs=True with `graph_bucket`: batches of varying lengths padded or filled to one
shape, so that one capture serves them, with the stand-in capture (graphed_training.py) on
CPU. Every graphed training equals ungraphed training on the unpadded batches.

The bucket's shapes do not depend on depth: these tests train two decoder layers (two
layer plans, one chained layer) rather than test_cuda_graphs.py's three.
"""
import pytest
import torch

from graphed_training import (PACKED_LENGTHS, PADDED_LENGTHS, StandIn, assert_same, packed_row,
                              padded_sft_batch, train)
from llama import ALL, batch, tiny_llama

LAYERS = 2


def _one_set_serves_all(monkeypatch, batches, bucket):
    """Ungraphed training, and training with `graph_bucket` and the stand-in capture: the
    same; one key captured at forward 2 and replayed from then on. (graphed, plain, key)."""
    plain = train(False, batches, layers=LAYERS, dynamic=True)  # unpadded: one compile for all lengths
    graphed = train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn(), graph_bucket=bucket,
                    layers=LAYERS)
    assert_same(graphed, plain, rtol=1e-4, atol=1e-5)
    g = graphed[3]
    assert g.captures == 1 and g.graphed_forwards == len(batches) - 1 and len(g.sets) == 1
    (key,) = g.sets
    return graphed, plain, key


def test_buckets_let_one_capture_serve_varying_lengths(monkeypatch):
    """Two rows of lengths 10-13 (no padding, so not padding-free) and 2-3 output tokens
    per row; a bucket of 32 tokens pads each row to 16 and rounds the dense rows to 8: one
    key, captured at forward 2 and replayed from then on; the training equals ungraphed
    training on the unpadded batches."""
    shapes = [(10, 3), (12, 2), (11, 3), (13, 3), (12, 2), (10, 2)]
    batches = [batch(t=t, n_out=n, seed=50 + i) for i, (t, n) in enumerate(shapes)]
    key = _one_set_serves_all(monkeypatch, batches, 32)[2]
    # [B, T] padded to 32 // B = 16; dense rows rounded up to a multiple of 32 // DENSE_SHARE
    # = 8, context rows to 32 - 8 + 7 (the most that 1-8 dense rows leave)
    assert key[0] == (2, 16) and key[2] == (8, 31) and key[4] is None


@pytest.mark.parametrize("with_mask,with_positions", [(True, False), (False, True), (False, False)])
def test_padding_a_batch_keeps_its_loss_and_logits(with_mask, with_positions):
    from sparselora_compile.padding import pad_batch
    model = tiny_llama(ALL, layers=2)
    ids, labels = batch(t=11, n_out=4)
    kwargs = {"input_ids": ids, "labels": labels}
    if with_mask:
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][0, -2:] = 0  # the row's own right padding
        kwargs["labels"][0, -2:] = -100
    if with_positions:  # two packed sequences per row
        kwargs["position_ids"] = torch.cat([torch.arange(5), torch.arange(6)]).expand(2, 11)
    padded, n, score_mask = pad_batch(kwargs, 16, 0)
    assert n == 5 and padded["input_ids"].shape == (2, 16) and score_mask[:, 11:].eq(0).all()
    assert ("attention_mask" in padded) == with_mask
    with torch.no_grad():
        want, got = model(**kwargs), model(**padded)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.logits[:, :11], want.logits, rtol=1e-5, atol=1e-6)
    assert pad_batch({"inputs_embeds": torch.zeros(2, 11, 32), "labels": labels}, 16, 0)[1] == 0


@pytest.mark.parametrize("rows", ["padding_free", "caller_packed"])
def test_buckets_serve_filled_rows(monkeypatch, rows):
    """One key, captured at forward 2 and replayed from then on; the training equals
    ungraphed training on the exact rows. Padded batches of 16-24 real tokens run
    padding-free, filled to one 32-token row of their 2 rows and FILLER_SEQUENCES filler
    sequences, 8 dense rows (2 x 3 outputs and their predictors). Caller-packed rows of
    17-21 tokens in 2 or 3 sequences are filled to 32 tokens and 8 + FILLER_SEQUENCES
    sequences, their 4-6 dense rows rounded to 8."""
    from sparselora_compile.packing import FILLER_SEQUENCES, SEQUENCE_STEP
    # four batches of each kind: lengths and sequence counts vary, the CPU run stays short
    if rows == "padding_free":
        batches = [padded_sft_batch(n, 12, seed=60 + i) for i, n in enumerate(PADDED_LENGTHS[:4])]
        bucket, counter, key_want = 16, "padding_free_forwards", ((1, 32), (8, 27), 2 + FILLER_SEQUENCES)
    else:
        batches = [packed_row(r, seed=90 + i) for i, r in enumerate(PACKED_LENGTHS[:4])]
        bucket, counter, key_want = 32, "varlen_forwards", ((1, 32), (8, 31), SEQUENCE_STEP + FILLER_SEQUENCES)
    graphed, plain, key = _one_set_serves_all(monkeypatch, batches, bucket)
    assert graphed[2][counter] == plain[2][counter] == len(batches)
    assert (key[0], key[2], key[4]) == key_want


def test_a_kept_set_serves_fewer_dense_rows_through_the_filler(monkeypatch):
    """Filled padding-free rows with 10 dense rows (4 outputs per row) round to 12 dense
    rows, with 6 (2 outputs) to 8: two keys by their own rounding. Once the 12 set is kept,
    the batches with 6 take its capacities, 6 of their filler rows computed densely in
    place of copies, so one capture serves every batch; training equals ungraphed training
    on the exact rows."""
    outputs = (4, 4, 2, 4, 2, 2)
    batches = [padded_sft_batch(n, 12, n_out=k, seed=110 + i) for i, (n, k) in enumerate(zip(PADDED_LENGTHS, outputs))]
    assert _one_set_serves_all(monkeypatch, batches, 16)[2][2] == (12, 23)


def test_a_shorter_row_takes_a_longer_kept_set(monkeypatch):
    """Rows of 16-24 real tokens fill to 32 (bucket 16); rows of 11 real tokens would fill
    to 16, a key of their own. Once the 32 set is kept they fill to 32 instead and replay
    it (its 8 dense rows fit theirs), so one capture serves every batch; training equals
    ungraphed training on the exact rows."""
    lengths = [(9, 12), (11, 7), (6, 5), (12, 10), (5, 6), (10, 12)]
    batches = [padded_sft_batch(n, 12, seed=130 + i) for i, n in enumerate(lengths)]
    graphed, _, key = _one_set_serves_all(monkeypatch, batches, 16)
    assert key[0] == (1, 32) and graphed[3].stats()["longer_fills"] == 2


def test_a_longer_kept_set_is_taken_only_within_one_bucket(monkeypatch):
    """With bucket 8, rows of 23-24 real tokens fill to 32 and rows of 11 to 16: two buckets
    below the kept 32, so they run ungraphed on their own key rather than on 16 rows of
    filler."""
    lengths = [(12, 11), (11, 12), (12, 11), (6, 5)]
    batches = [padded_sft_batch(n, 12, seed=150 + i) for i, n in enumerate(lengths)]
    g = train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn(), graph_bucket=8,
              layers=LAYERS)[3]
    assert [k[0] for k in g.sets] == [(1, 32)] and g.graphed_forwards == 2 and g.longer_fills == 0
