"""cuda_graphs=True: capture and replay of the decoder layers in training.

On CPU the stand-in capture (graphed_training.py) checks when a key is captured, what a
capture is handed, which forwards replay and what falls back to ungraphed layers; on CUDA
the real graphs are checked against ungraphed training step by step. Which keys get graph
sets: test_cuda_graphs_sets.py; bucketed shapes: test_cuda_graphs_buckets.py.
"""
import logging

import pytest
import torch

import sparselora_compile as slc
from sparselora_compile import cuda_graphs
from sparselora_compile.cuda_graphs import LayerGraphs
from sparselora_compile.graph_payoff import GpuSpan

from graphed_training import (CUDA, PACKED_LENGTHS, PADDED_LENGTHS, POLICY, StandIn, assert_same,
                              packed_row, padded_sft_batch, plain_run, split_batches, train)
from llama import ALL, tiny_llama

# fp32 replays against ungraphed training on the GPU: the two may round differently in the
# last bit (the loss agrees to 5e-7); AdamW divides by the gradients' own size, so after
# eight steps that leaves up to ~6e-6 in the LoRA weights (measured on the H200), where one
# update moves them by ~1e-2: a stale split or weight shows far above this
FP32_REPLAY = dict(rtol=1e-4, atol=1e-5)


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


def test_capture_on_the_second_forward_of_a_key_then_replay(monkeypatch):
    stand_in = StandIn()
    plain = plain_run((3,) * 5)
    graphed = train(True, split_batches((3,) * 5), monkeypatch=monkeypatch, stand_in=stand_in)
    assert_same(graphed, plain)
    assert graphed[2] == plain[2] and plain[2]["saved_fraction"] > 0  # FLOPs of replayed layers
    g = graphed[3]
    # forward 1 records, forward 2 captures and replays, and so do forwards 3-5
    assert g.captures == 1 and g.graphed_forwards == 4 and len(g.sets) == 1
    stats = g.stats()
    assert stats.pop("capture_s") >= 0
    assert stats.pop("capture_phases_s") == {}  # the stand-in times no phases
    assert stats == {"graphed_forwards": 4, "longer_fills": 0, "captures": 1, "sets": 1, "disabled": None,
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
    graphed = train(True, split_batches((3,) * 5), monkeypatch=monkeypatch, stand_in=stand_in)
    assert_same(graphed, plain_run((3,) * 5))
    assert graphed[2] == plain_run((3,) * 5)[2]  # layer 1 counted its FLOPs ungraphed
    assert stand_in.replays == [4, 0, 4] and graphed[3].graphed_forwards == 4


def test_accumulated_gradients_survive_the_next_replay(monkeypatch):
    """Gradient accumulation: a replayed backward returns its gradients in static buffers,
    which the first micro-batch's `.grad` must not alias (the next replay would overwrite
    them before they are summed, pytorch/pytorch#181723)."""
    batches = split_batches((3,) * 8)
    plain = train(False, batches, accumulate=2)
    graphed = train(True, batches, monkeypatch=monkeypatch, stand_in=StaticGrads(), accumulate=2)
    assert graphed[3].graphed_forwards == 7
    assert_same(graphed, plain)


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
    (ids, labels), = split_batches((3,))
    for _ in range(2):
        wrapped(input_ids=ids, labels=labels).loss.backward()
    assert wrapped.graphs.graphed_forwards == 1
    first = wrapped(input_ids=ids, labels=labels).loss      # replays
    second = wrapped(input_ids=ids, labels=labels).loss     # first's backward pending
    assert wrapped.graphs.graphed_forwards == 2
    (first + second).backward()
    wrapped(input_ids=ids, labels=labels).loss.backward()   # replays again
    assert wrapped.graphs.graphed_forwards == 3
    if frozen_first_layer:
        return  # no grad and eval (each a compile of every layer): checked once, every adapter trainable
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


def test_the_gradient_copies_own_their_storage_per_dtype():
    """The copies come out of one buffer per dtype: equal values, the given shapes, none
    sharing storage with a (static) incoming gradient, None left None."""
    grads = (torch.randn(3, 4), None, torch.randn(5, dtype=torch.bfloat16), torch.randn(2, 1),
             torch.randn(4, dtype=torch.bfloat16))
    copies = cuda_graphs._OwnGrads.backward(None, *grads)
    assert copies[1] is None
    for g, c in zip(grads, copies):
        if g is not None:
            assert c.dtype == g.dtype and c.shape == g.shape and torch.equal(c, g)
            assert c.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()


def test_a_failing_capture_turns_graphs_off_and_training_goes_on(monkeypatch, caplog):
    plain = plain_run((3,) * 5)
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        graphed = train(True, split_batches((3,) * 5), monkeypatch=monkeypatch, stand_in=StandIn(fail=True))
    assert_same(graphed, plain)
    assert graphed[2] == plain[2]
    assert graphed[3].graphed_forwards == 0 and "stream is capturing" in graphed[3].disabled
    assert "CUDA graphs failed" in caplog.text


@pytest.mark.parametrize("blocker", ["dropout", "checkpointing"])
def test_dropout_and_checkpointing_run_ungraphed(monkeypatch, caplog, blocker):
    monkeypatch.setattr(LayerGraphs, "needs_cuda", False)
    monkeypatch.setattr(LayerGraphs, "make_graphed", StandIn())
    torch._dynamo.reset()
    # two layers: what blocks the capture is in every layer
    model = tiny_llama(ALL, layers=2, dropout=0.1 if blocker == "dropout" else 0.0,
                       checkpointing=blocker == "checkpointing")
    wrapped = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager", cuda_graphs=True)
    (ids, labels), = split_batches((3,))
    with caplog.at_level(logging.INFO, logger="sparselora_compile"):
        for _ in range(3):
            wrapped(input_ids=ids, labels=labels).loss.backward()
    assert wrapped.graphs.captures == 0 and wrapped.graphs.graphed_forwards == 0
    assert ("random masks" if blocker == "dropout" else "recomputes the layers") in caplog.text


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
    # CPU tensors: the real capture needs CUDA; two layers suffice to see that nothing is captured
    losses, _, _, g = train(True, split_batches((3,) * 2), layers=2)
    assert g.captures == 0 and g.graphed_forwards == 0 and g.disabled is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype, cast", [(torch.float32, None), (torch.bfloat16, None),
                                         (torch.float32, torch.bfloat16)])
def test_graph_replay_matches_ungraphed_training_on_cuda(dtype, cast):
    """Real captures through Inductor: eight optimizer steps on changing tokens, with a
    split size that appears once (ungraphed) in between; bf16 keeps its own tolerance. With
    `cast`, an fp32 model trains under bf16 autocast (its cache on, as HF Trainer's bf16=True
    runs it): the replays cast the weights each optimizer step has moved."""
    sizes = (3, 3, 3, 5, 3, 3, 3, 3)
    batches = split_batches(sizes, seed=30)
    plain = train(False, batches, device="cuda", inner="inductor", dtype=dtype, casts=(cast,))
    graphed = train(True, batches, device="cuda", inner="inductor", dtype=dtype, casts=(cast,))
    g = graphed[3]
    assert g.disabled is None, g.failure
    tol = FP32_REPLAY if dtype == torch.float32 and cast is None else dict(rtol=2e-2, atol=2e-2)
    assert_same(graphed, plain, **tol)
    assert graphed[2] == plain[2]
    assert g.captures == 1 and g.graphed_forwards == 6


@pytest.mark.gpu
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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_sets_sharing_one_pool_replay_in_turn_with_accumulation_on_cuda():
    """Two sets of graphs in one memory pool, replayed in turn, with gradients of two
    micro-batches summed per optimizer step: each set's replays must find its own
    activations and leave the other's results alone (fp32, exact up to reduction order)."""
    sizes = (3, 3, 5, 5, 3, 5, 3, 5, 5, 3, 3, 5)
    batches = split_batches(sizes, seed=50)
    plain = train(False, batches, device="cuda", inner="inductor", accumulate=2)
    graphed = train(True, batches, device="cuda", inner="inductor", accumulate=2)
    g = graphed[3]
    assert g.disabled is None, g.failure
    assert g.captures == 2 and len(g.sets) == 2 and g.graphed_forwards == 10
    assert_same(graphed, plain, **FP32_REPLAY)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows", ["padding_free", "caller_packed", "fewer_dense"])
def test_filled_rows_graph_replay_matches_ungraphed_training_on_cuda(rows):
    """Real captures of packed rows (flash varlen attention, bf16) filled to one bucket,
    against ungraphed training on the exact rows: padded batches run padding-free,
    caller-packed rows, and padded batches whose fewer dense rows take a kept set's
    capacities through their filler (on CPU: test_cuda_graphs_buckets.py)."""
    if rows == "padding_free":
        batches = [padded_sft_batch(n, 12, seed=70 + i) for i, n in enumerate(PADDED_LENGTHS)]
    elif rows == "fewer_dense":
        batches = [padded_sft_batch(n, 12, n_out=k, seed=70 + i)
                   for i, (n, k) in enumerate(zip(PADDED_LENGTHS, (4, 4, 2, 4, 2, 2)))]
    else:
        batches = [packed_row(r, seed=70 + i) for i, r in enumerate(PACKED_LENGTHS)]
    bucket = 32 if rows == "caller_packed" else 16
    plain = train(False, batches, device="cuda", inner="inductor", dtype=torch.bfloat16)
    graphed = train(True, batches, device="cuda", inner="inductor", dtype=torch.bfloat16, graph_bucket=bucket)
    g = graphed[3]
    assert g.disabled is None, g.failure
    assert_same(graphed, plain, rtol=2e-2, atol=2e-2)
    assert g.captures == 1 and g.graphed_forwards == len(batches) - 1
