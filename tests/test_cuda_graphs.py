"""cuda_graphs=True: the decoder layers replayed as CUDA graphs in training.

On CPU the capture is replaced by a stand-in that returns the layer functions unchanged,
which checks the bookkeeping (when a key is captured, which forwards replay, FLOP counts,
fallbacks); on CUDA the real graphs are checked against ungraphed training step by step.
"""
import functools
import logging

import pytest
import torch

import sparselora_compile as slc
from sparselora_compile import cuda_graphs
from sparselora_compile.cuda_graphs import LayerGraphs
from sparselora_compile.graph_payoff import GpuSpan, Payoff
from sparselora_compile.runtime.run import Run

from llama import ALL, batch, tiny_llama

CUDA = torch.cuda.is_available()
POLICY = dict(mlp=0.5, attention=0.5, sparsity={"layers.1.mlp": 0.75})


class StandIn:
    """The capture's contract without a GPU: the functions come back, run without
    the ops' Python side effects (the FLOP counters), as a replay would."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, fns, samples, **kwargs):
        self.calls.append([[t.requires_grad for t in s] for s in samples])
        self.samples, self.links = samples, kwargs.get("links")
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return tuple(self._replaying(fn) for fn in fns)

    @staticmethod
    def _replaying(forward):
        def replay(*tensors):
            count = Run.count_flops
            Run.count_flops = lambda *a: None
            try:
                return forward(*tensors)
            finally:
                Run.count_flops = count
        return replay


class _StaticGrad(torch.autograd.Function):
    """Identity whose backward hands its gradient back in one buffer that every later
    backward overwrites, as a replayed graph's backward does."""

    @staticmethod
    def forward(ctx, x, buffer):
        ctx.buffer = buffer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.buffer.copy_(g)
        return ctx.buffer.detach(), None


class StaticGrads(StandIn):
    """The stand-in, with the capture's gradients: each argument's gradient
    comes back in a static buffer that the next replay's backward overwrites."""

    @staticmethod
    def _replaying(forward):
        replay, buffers = StandIn._replaying(forward), {}

        def with_static_grads(*tensors):
            return replay(*(_StaticGrad.apply(t, buffers.setdefault(i, torch.empty_like(t)))
                            if t.requires_grad else t for i, t in enumerate(tensors)))
        return with_static_grads


def _batches(n, n_out=(3,), t=12):
    # different tokens each step; the split's sizes change only where n_out does
    return [batch(t=t, n_out=n_out[i % len(n_out)], seed=10 + i) for i in range(n)]


def _train(graphs, batches, device="cpu", monkeypatch=None, stand_in=None, inner="aot_eager",
           dtype=torch.float32, graph_bucket=0, accumulate=1, graph_sets=None, casts=(None,)):
    torch._dynamo.reset()
    model = tiny_llama(ALL, layers=3).to(device, dtype)
    if monkeypatch is not None:
        monkeypatch.setattr(LayerGraphs, "needs_cuda", False)
        monkeypatch.setattr(LayerGraphs, "make_graphed", stand_in)
    policy = slc.Policy(**POLICY)
    wrapped = slc.compile(model, policy, inner=inner, cuda_graphs=graphs, graph_bucket=graph_bucket,
                          **({} if graph_sets is None else {"graph_sets": graph_sets}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i, b in enumerate(batches, 1):
        b = b if isinstance(b, dict) else {"input_ids": b[0], "labels": b[1]}
        cast = casts[(i - 1) % len(casts)]  # this step's autocast dtype (None: off)
        with torch.autocast(torch.device(device).type, dtype=cast, enabled=cast is not None):
            loss = wrapped(**{k: v.to(device) for k, v in b.items()}).loss
        loss.backward()
        if i % accumulate == 0:  # gradients of `accumulate` micro-batches summed in .grad
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().cpu())
    params = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return losses, params, wrapped.stats.as_dict(), wrapped.graphs


@functools.cache
def _plain_five_steps():
    """The ungraphed baseline that two tests compare with (trained once)."""
    return _train(False, _batches(5))


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for n in b[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=rtol, atol=atol, msg=n)


def test_capture_on_the_second_forward_of_a_key_then_replay(monkeypatch):
    stand_in = StandIn()
    plain = _plain_five_steps()
    graphed = _train(True, _batches(5), monkeypatch=monkeypatch, stand_in=stand_in)
    _assert_same(graphed, plain)
    assert graphed[2] == plain[2] and plain[2]["saved_fraction"] > 0  # FLOPs of replayed layers
    g = graphed[3]
    # forward 1 records, forward 2 captures and replays, and so do forwards 3-5
    assert g.captures == 1 and g.graphed_forwards == 4 and len(g.sets) == 1
    stats = g.stats()
    assert stats.pop("capture_s") >= 0
    assert stats == {"graphed_forwards": 4, "captures": 1, "sets": 1, "disabled": None,
                     "window": {"forwards": 5, "keys": 1, "graphed": 4}, "payoff": None}
    # layer 0's input (the frozen embedding's output) needs no grad, the others do
    assert stand_in.calls[0][0][0] is False and all(s[0] for s in stand_in.calls[0][1:])
    # each later layer's hidden states (argument 0) are its predecessor's output 0, so the
    # capture chains their static buffers; nothing else a layer takes was an output
    assert stand_in.links == [{}, {0: (0, 0)}, {0: (1, 0)}]
    # A captured backward must not reach gradient accumulators made on the default stream
    # by earlier steps: the capture gets new leaves on the parameters' storage, and a
    # replay passes the real parameters (whose .grad filled: the same training as above).
    (graphs,) = g.sets.values()
    for sample, (_, _, layer_fn) in zip(stand_in.samples, graphs.layers.values()):
        params = layer_fn.params()
        assert params and all(p.requires_grad for p in params)
        for a, p in zip(sample[-len(params):], params):
            assert a is not p and a.is_leaf and a.requires_grad and a.data_ptr() == p.data_ptr()


def test_graph_sets_are_keyed_on_the_autocast_dtype(monkeypatch):
    """A replay repeats the casts autocast made at its capture: forwards under autocast
    and forwards without it get sets of their own, and one never replays the other's."""
    g = _train(True, _batches(4), monkeypatch=monkeypatch, stand_in=StandIn(),
               casts=(torch.bfloat16,) * 2 + (None,) * 2)[3]
    assert sorted(str(k[-1]) for k in g.sets) == ["None", "torch.bfloat16"]
    # each half: a record, then a capture that replays (a key blind to autocast: 1 capture
    # and 3 replays)
    assert g.captures == 2 and g.graphed_forwards == 2


class Refusing(StandIn):
    """The stand-in whose layer 1 refuses its arguments (`accepts`, as a chained graph
    handed another tensor than its producer's output does); counts each layer's replays."""

    def __call__(self, fns, samples, **kwargs):
        graphed = super().__call__(fns, samples, **kwargs)
        self.replays = [0] * len(graphed)

        def counted(i, fn):
            def replay(*tensors):
                self.replays[i] += 1
                return fn(*tensors)
            replay.accepts = lambda tensors: i != 1
            return replay
        return tuple(counted(i, fn) for i, fn in enumerate(graphed))


def test_a_layer_that_refuses_its_arguments_runs_ungraphed(monkeypatch):
    stand_in = Refusing()
    graphed = _train(True, _batches(5), monkeypatch=monkeypatch, stand_in=stand_in)
    _assert_same(graphed, _plain_five_steps())
    assert graphed[2] == _plain_five_steps()[2]  # layer 1 counted its FLOPs ungraphed
    assert stand_in.replays == [4, 0, 4] and graphed[3].graphed_forwards == 4


def test_accumulated_gradients_survive_the_next_replay(monkeypatch):
    """Gradient accumulation: a replayed backward returns its gradients in static buffers,
    which the first micro-batch's `.grad` must not alias (the next replay would overwrite
    them before they are summed, pytorch/pytorch#181723)."""
    batches = _batches(8)
    plain = _train(False, batches, accumulate=2)
    graphed = _train(True, batches, monkeypatch=monkeypatch, stand_in=StaticGrads(), accumulate=2)
    assert graphed[3].graphed_forwards == 7
    _assert_same(graphed, plain)


class FakeSpan:
    """A forward's GPU span without a GPU: `ms_of[graphed]` milliseconds."""
    ms_of = {True: 10.0, False: 10.0}

    def __init__(self, device, graphed):
        self.graphed = graphed

    def close(self):
        pass

    def ms(self):
        return self.ms_of[self.graphed]


@pytest.mark.parametrize("replayed_ms", [8.0, 9.8])
def test_graphs_whose_replays_are_not_faster_are_dropped(monkeypatch, caplog, replayed_ms):
    """Replayed steps that take 98% of an ungraphed step's GPU time (the GPU sets the
    pace) turn graphs off and drop their sets; at 80% they keep them, and timing stops."""
    monkeypatch.setattr(Payoff, "span", FakeSpan)
    monkeypatch.setattr(FakeSpan, "ms_of", {True: replayed_ms, False: 10.0})
    # steps that compile are not timed: step 1, and here the first replay (the stand-in
    # runs the layers). Key 5 is timed ungraphed at step 2, captured at 3, timed
    # replaying at 4-6, and judged when step 7 begins
    sizes = (3, 5, 5, 5, 5, 5, 5)
    batches = [batch(t=12, n_out=n, seed=60 + i) for i, n in enumerate(sizes)]
    plain = _train(False, batches)
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        graphed = _train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn())
    _assert_same(graphed, plain)
    g, pays = graphed[3], replayed_ms == 8.0
    assert g.stats()["payoff"] == {"replayed_ms": replayed_ms, "ungraphed_ms": 10.0, "pays": pays}
    if pays:
        assert g.graphed_forwards == 5 and len(g.sets) == 1 and g.disabled is None
        assert "did not pay" not in caplog.text
    else:
        assert g.graphed_forwards == 4 and not g.sets and "9.8 ms on the GPU against 10.0" in g.disabled
        assert caplog.text.count("graph sets are dropped") == 1


def test_a_new_split_runs_ungraphed_until_it_repeats(monkeypatch):
    stand_in = StandIn()
    # output tokens 3, 3, 5, 3, 5, 5, 5: the split's sizes key the graph sets
    sizes = (3, 3, 5, 3, 5, 5, 5)
    batches = [batch(t=12, n_out=n, seed=20 + i) for i, n in enumerate(sizes)]
    plain = _train(False, batches)
    graphed = _train(True, batches, monkeypatch=monkeypatch, stand_in=stand_in)
    _assert_same(graphed, plain)
    assert graphed[2] == plain[2]
    g = graphed[3]
    # key 3 captured at forward 2 (replayed at 2 and 4); key 5, recorded at forward 3 and
    # seen again at 5, captured there (replayed at 5, 6, 7)
    assert g.captures == 2 and g.graphed_forwards == 5 and len(g.sets) == 2


def test_a_rare_key_does_not_evict_common_ones(monkeypatch):
    """Two sets kept: splits 3 and 5 come often and are captured; split 4, seen twice
    late in the window, is rarer than both and runs ungraphed instead of evicting one."""
    sizes = (3, 3, 5, 5, 3, 5, 3, 5, 4, 4, 3, 5)
    batches = [batch(t=12, n_out=n, seed=80 + i) for i, n in enumerate(sizes)]
    plain = _train(False, batches)
    graphed = _train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn(), graph_sets=2)
    _assert_same(graphed, plain)
    g = graphed[3]
    assert g.captures == 2 and g.graphed_forwards == 8 and len(g.sets) == 2


def test_one_kept_set_serves_the_commonest_key(monkeypatch):
    """graph_sets=1: split 3 is captured at forward 2; split 5 replaces it at forward 5,
    once it came more often in the window (at forward 4 both came twice); split 3 then runs
    ungraphed (forward 7) rather than evicting the commoner one."""
    sizes = (3, 3, 5, 5, 5, 5, 3, 5)
    batches = [batch(t=12, n_out=n, seed=60 + i) for i, n in enumerate(sizes)]
    plain = _train(False, batches)
    graphed = _train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn(), graph_sets=1)
    _assert_same(graphed, plain)
    g = graphed[3]
    assert g.max_sets == 1 and len(g.sets) == 1
    assert g.captures == 2 and g.graphed_forwards == 4  # forwards 2, 5, 6 and 8


def test_past_the_capture_limit_new_splits_run_ungraphed(monkeypatch, caplog):
    monkeypatch.setattr(cuda_graphs, "MAX_CAPTURES", 1)
    batches = [batch(t=12, n_out=n, seed=40 + i) for i, n in enumerate((3, 3, 5, 5, 5))]
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        g = _train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn())[3]
    # split size 3 captured at forward 2; size 5 would be at forward 4, past the limit
    assert g.captures == 1 and g.graphed_forwards == 1 and len(g.sets) == 1
    assert caplog.text.count("1 CUDA graph captures made") == 1  # said once, not per forward
    # said at forward 4, with what spreads the keys
    assert "the last 4 forwards had 2 distinct keys for 3 kept sets" in caplog.text
    assert g.stats()["window"] == {"forwards": 5, "keys": 2, "graphed": 1}


@pytest.mark.parametrize("frozen_first_layer", [False, True])
def test_a_forward_whose_predecessor_awaits_its_backward_runs_ungraphed(monkeypatch, frozen_first_layer):
    """With the first layer's adapters frozen its output needs no gradient, and the
    watch on the pending backward goes on the next layer's output."""
    monkeypatch.setattr(LayerGraphs, "needs_cuda", False)
    monkeypatch.setattr(LayerGraphs, "make_graphed", StandIn())
    torch._dynamo.reset()
    model = tiny_llama(ALL, layers=3)
    if frozen_first_layer:
        for n, p in model.named_parameters():
            if ".layers.0." in n:
                p.requires_grad_(False)
    wrapped = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager", cuda_graphs=True)
    (ids, labels), = _batches(1)
    for _ in range(2):
        wrapped(input_ids=ids, labels=labels).loss.backward()
    assert wrapped.graphs.graphed_forwards == 1
    first = wrapped(input_ids=ids, labels=labels).loss      # replays
    second = wrapped(input_ids=ids, labels=labels).loss     # first's backward pending
    assert wrapped.graphs.graphed_forwards == 2
    (first + second).backward()
    wrapped(input_ids=ids, labels=labels).loss.backward()   # replays again
    assert wrapped.graphs.graphed_forwards == 3
    with torch.no_grad():  # no grad, eval: never graphed
        wrapped(input_ids=ids, labels=labels)
    model.eval()
    wrapped(input_ids=ids, labels=labels)
    assert wrapped.graphs.graphed_forwards == 3


def test_a_parameter_a_replay_does_not_use_keeps_its_grad_none():
    """A replayed backward returns None for a parameter the layer did not use; its
    gradient copy must not turn that into zeros (AdamW would then move it)."""
    used, unused = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    a, _ = cuda_graphs._OwnGrads.apply(used, unused)
    (2 * a).sum().backward()
    assert unused.grad is None and torch.equal(used.grad, torch.full((3,), 2.0))


def test_a_failing_capture_turns_graphs_off_and_training_goes_on(monkeypatch, caplog):
    plain = _plain_five_steps()
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        graphed = _train(True, _batches(5), monkeypatch=monkeypatch, stand_in=StandIn(fail=True))
    _assert_same(graphed, plain)
    assert graphed[2] == plain[2]
    assert graphed[3].graphed_forwards == 0 and "stream is capturing" in graphed[3].disabled
    assert "CUDA graphs failed" in caplog.text


@pytest.mark.parametrize("blocker", ["dropout", "checkpointing"])
def test_dropout_and_checkpointing_run_ungraphed(monkeypatch, caplog, blocker):
    monkeypatch.setattr(LayerGraphs, "needs_cuda", False)
    monkeypatch.setattr(LayerGraphs, "make_graphed", StandIn())
    torch._dynamo.reset()
    model = tiny_llama(ALL, layers=3, dropout=0.1 if blocker == "dropout" else 0.0,
                       checkpointing=blocker == "checkpointing")
    wrapped = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager", cuda_graphs=True)
    (ids, labels), = _batches(1)
    with caplog.at_level(logging.INFO, logger="sparselora_compile"):
        for _ in range(3):
            wrapped(input_ids=ids, labels=labels).loss.backward()
    assert wrapped.graphs.captures == 0 and wrapped.graphs.graphed_forwards == 0
    assert ("random masks" if blocker == "dropout" else "recomputes the layers") in caplog.text


def _one_set_serves_all(monkeypatch, batches, bucket):
    """Ungraphed training, and training with `graph_bucket` and the stand-in capture: the
    same; one key captured at forward 2 and replayed from then on. (graphed, plain, key)."""
    plain = _train(False, batches)
    graphed = _train(True, batches, monkeypatch=monkeypatch, stand_in=StandIn(), graph_bucket=bucket)
    _assert_same(graphed, plain, rtol=1e-4, atol=1e-5)
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


def padded_sft_batch(lengths, t, n_out=3, seed=0):
    """Right-padded rows of `lengths` real tokens, the last `n_out` of each supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(lengths), t), generator=g)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):
        labels[i, : n - n_out] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


PADDED_LENGTHS = [(9, 12), (11, 7), (12, 10), (8, 8), (10, 12), (12, 9)]  # 16-24 real tokens


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


def test_cuda_graphs_needs_regional_compilation_and_its_settings_need_graphs():
    with pytest.raises(ValueError, match="regional=True"):
        slc.compile(tiny_llama(ALL), slc.Policy(**POLICY), regional=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs cuda_graphs=True"):
        slc.compile(tiny_llama(ALL), slc.Policy(**POLICY), graph_bucket=1024)
    with pytest.raises(ValueError, match="graph_sets=2 is how many .* needs cuda_graphs=True"):
        slc.compile(tiny_llama(ALL), slc.Policy(**POLICY), graph_sets=2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            slc.compile(tiny_llama(ALL), slc.Policy(**POLICY), cuda_graphs=True, graph_sets=bad)


def test_without_cuda_graphs_stay_off():
    losses, _, _, g = _train(True, _batches(2))  # CPU tensors: the real capture needs CUDA
    assert g.captures == 0 and g.graphed_forwards == 0 and g.disabled is None


def packed_row(lengths, n_out=1, seed=0):
    """A caller's packed row (DataCollatorWithFlattening's form): sequences of `lengths`
    back to back, position ids restarting, the last `n_out` tokens of each supervised."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(1, 64, pos.shape, generator=g)
    labels = torch.full_like(ids, -100)
    at = 0
    for n in lengths:
        labels[0, at + n - n_out: at + n] = ids[0, at + n - n_out: at + n]
        at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


PACKED_LENGTHS = [(9, 8), (7, 6, 5), (11, 10), (6, 6, 6), (10, 9), (8, 7, 6)]  # 17-21 tokens


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


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype, cast", [(torch.float32, None), (torch.bfloat16, None),
                                         (torch.float32, torch.bfloat16)])
def test_graph_replay_matches_ungraphed_training_on_cuda(dtype, cast):
    """Real captures through Inductor: eight optimizer steps on changing tokens, with a
    split size that appears once (ungraphed) in between; bf16 keeps its own tolerance. With
    `cast`, an fp32 model trains under bf16 autocast (its cache on, as HF Trainer's bf16=True
    runs it): the replays cast the weights each optimizer step has moved."""
    sizes = (3, 3, 3, 5, 3, 3, 3, 3)
    batches = [batch(t=12, n_out=n, seed=30 + i) for i, n in enumerate(sizes)]
    plain = _train(False, batches, device="cuda", inner="inductor", dtype=dtype, casts=(cast,))
    graphed = _train(True, batches, device="cuda", inner="inductor", dtype=dtype, casts=(cast,))
    g = graphed[3]
    assert g.disabled is None, g.failure
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 and cast is None else dict(rtol=2e-2, atol=2e-2)
    _assert_same(graphed, plain, **tol)
    assert graphed[2] == plain[2]
    assert g.captures == 1 and g.graphed_forwards == 6


@pytest.mark.skipif(not CUDA, reason="CUDA events need a GPU")
def test_a_gpu_span_times_the_kernels_queued_inside_it():
    x = torch.randn(2048, 2048, device="cuda")
    x @ x  # cuBLAS's first product sets it up (tens of ms): keep that out of the spans
    torch.cuda.synchronize()
    short = GpuSpan(x.device, graphed=False)
    x @ x
    short.close()
    long = GpuSpan(x.device, graphed=False)
    for _ in range(20):
        x @ x
    long.close()
    torch.cuda.synchronize()
    assert 0 < short.ms() < long.ms()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_sets_sharing_one_pool_replay_in_turn_with_accumulation_on_cuda():
    """Two sets of graphs in one memory pool, replayed in turn, with gradients of two
    micro-batches summed per optimizer step: each set's replays must find its own
    activations and leave the other's results alone (fp32, exact up to reduction order)."""
    sizes = (3, 3, 5, 5, 3, 5, 3, 5, 5, 3, 3, 5)
    batches = [batch(t=12, n_out=n, seed=50 + i) for i, n in enumerate(sizes)]
    plain = _train(False, batches, device="cuda", inner="inductor", accumulate=2)
    graphed = _train(True, batches, device="cuda", inner="inductor", accumulate=2)
    g = graphed[3]
    assert g.disabled is None, g.failure
    assert g.captures == 2 and len(g.sets) == 2 and g.graphed_forwards == 10
    _assert_same(graphed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows", ["padding_free", "caller_packed", "fewer_dense"])
def test_filled_rows_graph_replay_matches_ungraphed_training_on_cuda(rows):
    """Real captures of packed rows (flash varlen attention, bf16) filled to one bucket,
    against ungraphed training on the exact rows: padded batches run padding-free,
    caller-packed rows, and padded batches whose fewer dense rows take a kept set's
    capacities through their filler (the CPU test above)."""
    if rows == "padding_free":
        batches = [padded_sft_batch(n, 12, seed=70 + i) for i, n in enumerate(PADDED_LENGTHS)]
    elif rows == "fewer_dense":
        batches = [padded_sft_batch(n, 12, n_out=k, seed=70 + i)
                   for i, (n, k) in enumerate(zip(PADDED_LENGTHS, (4, 4, 2, 4, 2, 2)))]
    else:
        batches = [packed_row(r, seed=70 + i) for i, r in enumerate(PACKED_LENGTHS)]
    bucket = 32 if rows == "caller_packed" else 16
    plain = _train(False, batches, device="cuda", inner="inductor", dtype=torch.bfloat16)
    graphed = _train(True, batches, device="cuda", inner="inductor", dtype=torch.bfloat16, graph_bucket=bucket)
    g = graphed[3]
    assert g.disabled is None, g.failure
    _assert_same(graphed, plain, rtol=2e-2, atol=2e-2)
    assert g.captures == 1 and g.graphed_forwards == len(batches) - 1
