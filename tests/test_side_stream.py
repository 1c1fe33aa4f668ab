"""A frozen MLP's channel selection queued on a side stream beside its dense rows
(runtime/side_stream.py): where the pass asks for it, the order sparse_mlp keeps, and on a
GPU the same results as the selection in line: eager, inside a captured CUDA graph, and
in graphed training."""
import pytest
import torch

import sparselora_compile as slc
from sparselora_compile import backend
from sparselora_compile.runtime import gathered, side_stream
from sparselora_compile.runtime.row_split import compute_split
from sparselora_compile.runtime.run import Run
from sparselora_compile.runtime.sparse_mlp import sparse_mlp_forward, sparse_mlp_reference

from graphed_training import CUDA, assert_same, split_batches, train
from llama import ALL, QKVO, batch, tiny_llama

ops = torch.ops.sparselora


@pytest.mark.parametrize("targets, overlapped", [(QKVO, True), (ALL, False)], ids=["frozen_mlp", "lora_mlp"])
def test_the_selection_overlaps_only_where_sparse_mlp_alone_reads_it(monkeypatch, targets, overlapped):
    """A frozen MLP (LoRA on q, k, v, o) becomes one sparse_mlp, the selection's only
    reader: overlap=True. With LoRA on gate, up and down, the per-product ops read it too
    and do not join a side stream: overlap stays off."""
    graphs, inner = [], backend._inner_compile

    def spy(name, gm, *args, **kwargs):
        graphs.append(gm)
        return inner(name, gm, *args, **kwargs)
    monkeypatch.setattr(backend, "_inner_compile", spy)
    model = slc.compile(tiny_llama(targets, layers=1), slc.Policy(mlp=0.5, attention=0.5), inner="eager")
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    selects = [n for gm in graphs for n in gm.graph.nodes if n.target is ops.select_mlp.default]
    assert selects
    for n in selects:
        flagged = len(n.args) > len(ops.select_mlp.default._schema.arguments) - 1 and n.args[-1] is True
        assert flagged == overlapped
        assert ({u.target for u in n.users} == {ops.sparse_mlp.default}) == overlapped


@pytest.mark.parametrize("kind", ["mixed_all_rows", "mixed_context_rows", "all_context", "all_dense"])
def test_sparse_mlp_waits_for_the_selection_only_before_its_context_part(monkeypatch, kind):
    """`ready` is called once; no product reads the kept channels before it, and the dense
    rows' products come first (they are what the side stream overlaps). The output and the
    saved (g, u) buffer are those of the order without `ready`, and the output is the
    reference's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    wg, wu, wd = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((12, 8), (12, 8), (8, 12)))
    rows = {"all_dense": torch.ones(2, 7, dtype=torch.bool), "all_context": torch.zeros(2, 7, dtype=torch.bool)
            }.get(kind, torch.rand(2, 7, generator=g) < 0.4)
    idx = torch.tensor([0, 3, 4, 9])
    all_rows_max_k = 10**9 if kind == "mixed_all_rows" else 0
    events = []
    for name in ("gather_rows_mm_t", "gather_cols_mm_t"):
        real = getattr(gathered, name)
        monkeypatch.setattr(gathered, name, lambda *a, _real=real, **kw: events.append("context") or _real(*a, **kw))
    mm = torch.mm

    def counted_mm(*a, **kw):
        events.append("dense")
        return mm(*a, **kw)
    split = compute_split(rows)
    plain_y, plain_saved = sparse_mlp_forward(x, wg, wu, wd, None, None, None, idx, split, all_rows_max_k)
    events.clear()
    monkeypatch.setattr(torch, "mm", counted_mm)
    y, saved = sparse_mlp_forward(x, wg, wu, wd, None, None, None, idx, split, all_rows_max_k,
                                  ready=lambda: events.append("ready"))
    monkeypatch.undo()
    assert events.count("ready") == 1
    at = events.index("ready")
    assert "context" not in events[:at]
    if kind != "all_context":
        assert events[0] == "dense"
    if kind != "all_dense":
        assert "context" in events[at:]
    torch.testing.assert_close(y, plain_y, rtol=0, atol=0)
    torch.testing.assert_close(saved, plain_saved, rtol=0, atol=0)
    torch.testing.assert_close(y, sparse_mlp_reference(x, wg, wu, wd, None, None, None, idx, rows))


def test_a_run_without_side_work_joins_nothing():
    run = Run()
    side_stream.join(run)  # no side work: no stream touched (this runs on CPU)
    assert run.side_work is None


def _select_then_mlp(x, factors, weights, rows, run, overlap):
    idx = ops.select_mlp(x, *factors, rows, 48, run.handle, "blk", "silu", overlap)
    pending = run.side_work is not None
    y = ops.sparse_mlp(x, *weights, None, None, None, idx, rows, run.handle)[0]
    return idx, y, pending


def _mlp_case(dev):
    g = torch.Generator().manual_seed(5)
    hidden, d_ff, r = 256, 1024, 16
    bf = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dev, torch.bfloat16)  # noqa: E731
    x = bf(2, 200, hidden)
    factors = (bf(hidden, r), bf(r, d_ff), bf(hidden, r), bf(r, d_ff),
               torch.rand(d_ff, generator=g).to(dev), torch.rand(d_ff, generator=g).to(dev))
    weights = (bf(d_ff, hidden), bf(d_ff, hidden), bf(hidden, d_ff))
    rows = (torch.rand(2, 200, generator=g) < 0.25).to(dev)
    return x, factors, weights, rows


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the side stream needs CUDA")
def test_the_side_stream_selection_equals_the_selection_in_line_eager_and_captured():
    """bf16 on the GPU: the same kept channels and the same output as the selection on the
    current stream, eagerly and replayed from a CUDA graph (the fork and the join are its
    edges) on new inputs copied into the captured ones."""
    dev = torch.device("cuda")
    x, factors, weights, rows = _mlp_case(dev)
    run = Run()
    run.step = 10**6
    want_idx, want_y, pending = _select_then_mlp(x, factors, weights, rows, run, overlap=False)
    assert not pending
    got_idx, got_y, pending = _select_then_mlp(x, factors, weights, rows, run, overlap=True)
    assert pending and run.side_work is None  # forked, then joined by sparse_mlp
    assert torch.equal(got_idx, want_idx) and torch.equal(got_y, want_y)

    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture, as make_graphed_callables does
        _select_then_mlp(static_x, factors, weights, rows, run, overlap=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_idx, out_y, _ = _select_then_mlp(static_x, factors, weights, rows, run, overlap=True)
    for seed in (1, 2):
        new = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dev, x.dtype)
        want_idx, want_y, _ = _select_then_mlp(new, factors, weights, rows, run, overlap=False)
        static_x.copy_(new)
        graph.replay()
        assert torch.equal(out_idx, want_idx) and torch.equal(out_y, want_y)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graphed_training_with_frozen_mlps_matches_the_selection_in_line(monkeypatch):
    """Real captures through Inductor of layers whose frozen MLPs select on the side
    stream, against ungraphed training with the selection in line (bf16)."""
    batches = split_batches((3, 3, 3, 5, 3, 3, 3, 3), seed=31)
    monkeypatch.setattr(side_stream, "ENABLED", False)
    plain = train(False, batches, device="cuda", inner="inductor", dtype=torch.bfloat16, targets=QKVO)
    monkeypatch.setattr(side_stream, "ENABLED", True)
    forks, fork = [], side_stream.fork
    monkeypatch.setattr(side_stream, "fork", lambda *a: forks.append(1) or fork(*a))
    graphed = train(True, batches, device="cuda", inner="inductor", dtype=torch.bfloat16, targets=QKVO)
    g = graphed[3]
    assert g.disabled is None, g.failure
    assert forks and g.captures == 1 and g.graphed_forwards == 6
    assert_same(graphed, plain, rtol=2e-2, atol=2e-2)
