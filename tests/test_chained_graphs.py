"""chained_graphs.py: a chain of calls captured in CUDA graphs whose static buffers are
shared along the chain (a call's output is the next call's static input, and the next
call's input gradient the buffer of its output's gradient)."""
import pytest
import torch

from sparselora_compile.chained_graphs import capture_chain, chain_links

CUDA = torch.cuda.is_available()


def test_chain_links_follow_the_memory_of_earlier_outputs():
    base = torch.zeros(4, 6)
    out0, out1 = base[:2], base[2:]          # two outputs of call 0: views of one storage
    other = torch.zeros(2, 6)
    inputs = [[torch.ones(3)], [out1, other, out0.t()], [out0, torch.zeros(3)]]
    outputs = [[out0, 7, out1], [other.clone()], []]  # a non-tensor leaf keeps its index
    # same storage, offset, shape, strides and dtype: a transpose or another tensor is not
    assert chain_links(inputs, outputs) == [{}, {0: (0, 2)}, {0: (0, 0)}]
    # a later producer of the same memory wins
    assert chain_links([[], [], [out0]], [[out0], [out0], []]) == [{}, {}, {0: (1, 0)}]


def _layer(x, w, b):
    return torch.tanh(x @ w) + x * b  # a residual-like use of the input


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_chained_replays_match_eager_and_copy_no_hidden_states_on_cuda():
    """Three calls chained, replayed over three steps with new inputs: the same loss and
    gradients as eager (fp32, tolerance for reordered reductions), the chained buffers
    shared, and a linked argument that is not the producer's output refused. (Gradients
    come back in static buffers; cuda_graphs._OwnGrads copies them before accumulation,
    so here .grad is reset each step.)"""
    torch.manual_seed(0)
    n, d = 64, 32
    ws = [(torch.randn(d, d, device="cuda") / d ** 0.5).requires_grad_() for _ in range(3)]
    bs = [torch.randn(d, device="cuda").requires_grad_() for _ in range(3)]
    samples = [(torch.randn(n, d, device="cuda", requires_grad=i > 0),
                w.detach().requires_grad_(), b.detach().requires_grad_())
               for i, (w, b) in enumerate(zip(ws, bs))]
    links = [{}, {0: (0, 0)}, {0: (1, 0)}]
    phases = {}
    graphed = capture_chain([_layer] * 3, samples, links=links, num_warmup_iters=2, phases=phases)
    assert set(phases) == {"warmup_s", "forward_s", "backward_s"} and min(phases.values()) > 0
    assert graphed[1].inputs[0].data_ptr() == graphed[0].outputs[0].data_ptr()
    assert graphed[0].grad_outputs[0].data_ptr() == graphed[1].grad_inputs[0].data_ptr()
    assert graphed[2].grad_outputs[0] is not None and graphed[0].grad_inputs[0] is None

    ref_w = [w.detach().clone().requires_grad_() for w in ws]
    ref_b = [b.detach().clone().requires_grad_() for b in bs]
    for step in range(3):
        for p in ws + bs + ref_w + ref_b:
            p.grad = None
        x = torch.randn(n, d, device="cuda")
        h, r = x, x
        for g, w, b, rw, rb in zip(graphed, ws, bs, ref_w, ref_b):
            h, r = g(h, w, b), _layer(r, rw, rb)
        scale = torch.arange(d, device="cuda")
        loss, ref = (h.square() * scale).sum(), (r.square() * scale).sum()
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for p, q in zip(ws + bs, ref_w + ref_b):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    assert graphed[1].accepts((graphed[0].outputs[0], ws[1], bs[1]))
    foreign = graphed[0].outputs[0].clone()
    assert not graphed[1].accepts((foreign, ws[1], bs[1]))
    with pytest.raises(RuntimeError, match="accepts"):
        graphed[1](foreign, ws[1], bs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_capture_under_autocast_casts_the_current_weights_on_cuda():
    """Under autocast with its cache on (the default: HF Trainer's bf16=True), the capture
    runs with the cache off, so each replay casts the fp32 weights as they are then: after
    an in-place update the replay follows it, as eager autocast does (a cached cast would
    replay the weights of the capture)."""
    torch.manual_seed(0)
    w = torch.randn(16, 16, device="cuda", requires_grad=True)
    graphed = None
    for _ in range(3):  # steps: a forward under autocast, the update outside it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.is_autocast_cache_enabled()
            if graphed is None:
                (graphed,) = capture_chain([torch.matmul], [(torch.randn(8, 16, device="cuda"),
                                                             w.detach().requires_grad_())])
                assert torch.is_autocast_cache_enabled()  # the caller's state is back
            x = torch.randn(8, 16, device="cuda")
            got, want = graphed(x, w), x @ w
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same bf16 product
        with torch.no_grad():
            w.add_(1.0)
