"""bench/batches.py: the benchmark's user-shaped batches (pure tensor checks, no model)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# Loaded by path: bench/ on sys.path would let its kernels.py pass for the `kernels` package.
_spec = importlib.util.spec_from_file_location(
    "bench_batches", Path(__file__).resolve().parent.parent / "bench" / "batches.py")
B = sys.modules["bench_batches"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(B)

VOCAB = 1000


def take(mode, steps=20, **kw):
    return list(B.make_batches(mode, VOCAB, steps, **kw))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", B.MODES)
def test_deterministic_for_a_seed(mode):
    a, b, c = take(mode, seed=3), take(mode, seed=3), take(mode, seed=4)
    assert len(a) == 20 and all(same(x, y) for x, y in zip(a, b))
    if mode != "fixed":
        assert not all(same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("mode", B.MODES)
def test_cpu_long_tensors(mode):
    for b in take(mode, steps=3):
        assert all(t.device.type == "cpu" and t.dtype == torch.long for t in b.values())
        assert b["input_ids"].min() >= 0 and b["input_ids"].max() < VOCAB
        assert {"attention_mask", "position_ids"} & b.keys() or mode == "fixed"


@pytest.mark.parametrize("mode", ["padded", "long"])
def test_padded(mode):
    bs = take(mode, steps=40)
    rows = B.LENGTHS[mode].batch
    lengths, prompts, responses = set(), [], []
    for b in bs:
        ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
        n, t = ids.shape
        assert n == rows and t % 8 == 0 and labels.shape == mask.shape == (n, t)
        real = mask.sum(1)
        assert t - 8 < int(real.max()) <= t  # the longest row, rounded up to a multiple of 8
        lengths.add(t)
        for i in range(n):
            m = int(real[i])
            assert mask[i, :m].eq(1).all() and mask[i, m:].eq(0).all()  # right padding
            assert ids[i, m:].eq(B.PAD_ID).all() and ids[i, :m].ne(B.PAD_ID).all()
            sup = labels[i] != B.IGNORE
            p = int(sup.nonzero()[0]) if sup.any() else m
            # -100 exactly on the prompt and the padding; the response is supervised on its ids
            assert not sup[:p].any() and sup[p:m].all() and not sup[m:].any()
            assert torch.equal(labels[i, p:m], ids[i, p:m])
            prompts.append(p)
            responses.append(m - p)
    assert len(lengths) > 10  # the length changes from step to step
    lo = B.LENGTHS[mode]
    assert lo.prompt.lo <= min(prompts) and max(prompts) <= lo.prompt.hi and max(prompts) > min(prompts)
    assert lo.response.lo <= min(responses) and max(responses) <= lo.response.hi


def test_padded_lengths_as_specified():
    """padded: prompts a few hundred tokens, responses tens to ~150; long: batch 4, prompts
    up to ~900, responses up to ~400."""
    p, lg = B.LENGTHS["padded"], B.LENGTHS["long"]
    assert p.batch == 8 and 100 <= p.prompt.median <= 400 and p.response.hi <= 160
    assert lg.batch == 4 and lg.prompt.hi == 900 and lg.response.hi == 400
    t = [b["input_ids"].shape[1] for b in take("long", steps=50)]
    assert max(t) > 1000 and min(t) < 900


def test_packed():
    tokens = 2048
    bs = list(B.packed_batches(VOCAB, 30, tokens, seed=1))
    shapes = set()
    for b in bs:
        ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
        assert "attention_mask" not in b
        assert ids.shape[0] == 1 and ids.shape == labels.shape == pos.shape
        assert tokens - B.LENGTHS["padded"].prompt.hi - B.LENGTHS["padded"].response.hi < ids.shape[1] <= tokens
        shapes.add(ids.shape[1])
        pos, labels, ids = pos[0], labels[0], ids[0]
        starts = (pos == 0).nonzero().squeeze(1).tolist()
        assert starts[0] == 0 and len(starts) >= 2  # several sequences in the row
        ends = starts[1:] + [len(pos)]
        for s, e in zip(starts, ends):
            assert torch.equal(pos[s:e], torch.arange(e - s))  # restarts at 0 per sequence
            sup = labels[s:e] != B.IGNORE
            assert not sup[0]  # the collator's separator
            p = int(sup.nonzero()[0])
            assert not sup[:p].any() and sup[p:].all()  # -100 on the prompt, then the response
            assert torch.equal(labels[s + p:e], ids[s + p:e])
    assert len(shapes) > 5


def test_packed_holds_the_padded_modes_sequences():
    """Packing changes the layout, not the data: the same seed's sequences, in order."""
    n = 0
    padded = B.padded_batches(VOCAB, 100, B.LENGTHS["padded"], batch=1, seed=5)
    for b in B.packed_batches(VOCAB, 3, 4096, seed=5):
        pos = b["position_ids"][0]
        starts = (pos == 0).nonzero().squeeze(1).tolist() + [pos.numel()]
        for s, e in zip(starts, starts[1:]):
            row = next(padded)
            m = B.real_tokens(row)
            assert e - s == m and torch.equal(b["input_ids"][0, s:e], row["input_ids"][0, :m])
            n += 1
    assert n > 5


def test_fixed_is_the_original_batch():
    bs = take("fixed", steps=3, batch=2, seq=64, n_out=16)
    assert bs[0]["input_ids"] is bs[2]["input_ids"] and bs[0]["input_ids"].shape == (2, 64)
    sup = bs[0]["labels"] != B.IGNORE
    assert not sup[:, :48].any() and sup[:, 48:].all()
    assert B.real_tokens(bs[0]) == 128 and B.output_tokens(bs[0]) == 32


def test_scaled_for_a_tiny_model():
    for b in take("long", steps=10, seq=64):
        assert b["input_ids"].shape[1] <= 168 and b["input_ids"].shape[1] % 8 == 0
    for b in take("packed", steps=5, batch=2, seq=64):
        assert b["input_ids"].shape[1] <= 128


def test_unknown_mode():
    with pytest.raises(ValueError):
        B.make_batches("nope", VOCAB, 1)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_retokened_keeps_shapes_padding_and_split(mode):
    """dist_step --same-lengths: another rank's batch of the same shapes, other tokens."""
    g = torch.Generator().manual_seed(3)
    for b in take(mode, steps=3):
        r = B.retokened(b, VOCAB, g)
        assert r.keys() == b.keys()
        for k in b:
            assert r[k].shape == b[k].shape
        pad = b["input_ids"] == B.PAD_ID
        assert r["input_ids"][pad].eq(B.PAD_ID).all() and r["input_ids"][~pad].ne(B.PAD_ID).all()
        assert torch.equal(r["labels"] == B.IGNORE, b["labels"] == B.IGNORE)
        kept = r["labels"] != B.IGNORE
        assert torch.equal(r["labels"][kept], r["input_ids"][kept])
        assert not torch.equal(r["input_ids"], b["input_ids"])
        for k in set(b) - {"input_ids", "labels"}:
            assert torch.equal(r[k], b[k])
