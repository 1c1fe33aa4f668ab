"""The runtime ops against their plain-PyTorch references, forward and gradients."""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselora_compile  # noqa: F401  registers torch.ops.sparselora
from sparselora_compile.runtime import selection, sparse_linear
from sparselora_compile.runtime.ops import dense_token_rows
from sparselora_compile.runtime.row_split import compute_split
from sparselora_compile.runtime.run import Run

ops = torch.ops.sparselora
RUN = Run()  # the run the ops below count into (a module global keeps it alive)


@st.composite
def op_case(draw):
    m_b, t = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    k_in, n = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    k = draw(st.integers(1, n))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    idx = torch.randperm(n, generator=g)[:k].sort().values
    rows = torch.rand(m_b, t, generator=g) < draw(st.floats(0, 1))
    bias = torch.randn(n, generator=g, dtype=dtype) if draw(st.booleans()) else None
    return (torch.randn(m_b, t, k_in, generator=g, dtype=dtype),
            torch.randn(n, k_in, generator=g, dtype=dtype), bias, idx, rows)


def _check(op_fn, ref_fn, x, *rest, tol=None):
    kw = {} if tol is None else dict(atol=tol, rtol=tol)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = op_fn(xa, *rest), ref_fn(xb, *rest)
    torch.testing.assert_close(ya, yb, **kw)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad, **kw)


@settings(max_examples=40, deadline=None)
@given(op_case())
def test_out_sparse_linear_matches_reference(case):
    x, w, b, idx, rows = case
    _check(lambda x, *a: ops.out_sparse_linear(x, *a, RUN.handle),
           sparse_linear.out_sparse_reference, x, w, b, idx, rows)


@settings(max_examples=40, deadline=None)
@given(op_case())
def test_in_sparse_linear_matches_reference(case):
    x, w, b, idx, rows = case
    w = w.t().contiguous()  # [k_in, n]: reads n input channels
    b = None if b is None else torch.randn(w.shape[0], dtype=x.dtype)
    h = torch.randn(*x.shape[:-1], w.shape[1], dtype=x.dtype)
    _check(lambda h, *a: ops.in_sparse_linear(h, *a, RUN.handle),
           sparse_linear.in_sparse_reference, h, w, b, idx, rows)


@settings(max_examples=30, deadline=None)
@given(op_case())
def test_mask_channels_matches_reference(case):
    x, w, _, idx, rows = case
    h = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    _check(ops.mask_channels, sparse_linear.mask_reference, h, idx, rows)


def test_output_token_rows_equal_dense():
    x, w = torch.randn(2, 6, 8), torch.randn(12, 8)
    idx = torch.tensor([1, 4, 7])
    rows = torch.tensor([[False] * 4 + [True] * 2] * 2)
    dense = torch.nn.functional.linear(x, w)
    y = ops.out_sparse_linear(x, w, None, idx, rows, RUN.handle)
    torch.testing.assert_close(y[rows], dense[rows])
    assert not torch.equal(y[~rows], dense[~rows])
    z = ops.in_sparse_linear(torch.randn(2, 6, 12), w.t().contiguous(), None, idx, rows, RUN.handle)
    assert z.shape == (2, 6, 8)


def test_dense_token_rows_marks_supervised_and_predicting_positions():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, 7, -100, -100, -100, -100]])
    expect = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(dense_token_rows(labels), expect)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.data())
def test_gqa_channel_maps_match_brute_force(n_kv, n_rep, head_dim, data):
    n_heads = n_kv * n_rep
    kv_idx = torch.tensor(sorted(data.draw(st.sets(st.integers(0, n_kv * head_dim - 1), min_size=1))))
    got = selection.expand_kv_channels(kv_idx, n_heads, n_kv, head_dim).tolist()
    kept = set(kv_idx.tolist())
    brute = [h * head_dim + d for h in range(n_heads) for d in range(head_dim)
             if (h // n_rep) * head_dim + d in kept]  # repeat_kv: query head h reads kv head h // n_rep
    assert got == brute


def test_attention_selection_scores_follow_groups():
    """With one query head group carrying all the energy, QK keeps that group's kv head."""
    torch.manual_seed(0)
    n_heads, n_kv, hd, hidden = 4, 2, 4, 16
    x = torch.randn(1, 5, hidden)
    eye = torch.eye(hidden)
    aq, bq = eye, torch.zeros(hidden, n_heads * hd)
    bq[:, 2 * hd: 4 * hd] = torch.randn(hidden, 2 * hd) * 10  # query heads 2, 3 = group 1
    ak, bk = eye, torch.randn(hidden, n_kv * hd)
    av, bv = eye, torch.randn(hidden, n_kv * hd)
    rows = torch.zeros(1, 5, dtype=torch.bool)
    iq, ik, iv, io = selection.attention_selection(x, ((aq, bq), (ak, bk), (av, bv)), compute_split(rows), hd, hd,
                                                   n_heads, n_kv, hd)
    assert ik.tolist() == list(range(hd, 2 * hd))
    assert iq.tolist() == list(range(2 * hd, 4 * hd))
    assert len(io) == 2 * len(iv)


def test_mlp_scores_use_context_rows_only():
    x = torch.randn(1, 4, 6)
    a, b = torch.randn(6, 2), torch.randn(2, 10)
    rows = torch.tensor([[False, False, True, True]])
    got = selection.mlp_scores(x, a, b, a, b, None, None, compute_split(rows))
    xc = x[0, :2]
    ref = (torch.nn.functional.silu(xc @ a @ b) * (xc @ a @ b)).square().sum(0)
    torch.testing.assert_close(got, ref)
    zero = torch.zeros(10)  # zero residuals: exactly the paper's score
    torch.testing.assert_close(selection.mlp_scores(x, a, b, a, b, zero, zero, compute_split(rows)), ref)


def test_mlp_scores_add_the_residual_energy():
    """score_j = sum_t (silu(g)^2 + silu'(g)^2 σg²_j) (u^2 + σu²_j) over context rows."""
    torch.manual_seed(1)
    x = torch.randn(1, 5, 6)
    ag, bg, au, bu = torch.randn(6, 2), torch.randn(2, 10), torch.randn(6, 2), torch.randn(2, 10)
    rg, ru = torch.rand(10), torch.rand(10)
    rows = torch.tensor([[False, True, False, False, True]])
    got = selection.mlp_scores(x, ag, bg, au, bu, rg, ru, compute_split(rows))
    xc = x[0, [0, 2, 3]].double()
    g, u = xc @ ag.double() @ bg.double(), xc @ au.double() @ bu.double()
    dsilu = torch.func.vmap(torch.func.grad(torch.nn.functional.silu))(g.reshape(-1)).reshape(g.shape)
    want = ((torch.nn.functional.silu(g) ** 2 + dsilu**2 * rg.double()) * (u**2 + ru.double())).sum(0)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(selection.dsilu(g), dsilu)


def test_ops_under_autocast_follow_its_dtype():
    x, w = torch.randn(2, 3, 8), torch.randn(6, 8)
    rows = torch.zeros(2, 3, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.out_sparse_linear(x, w, None, torch.tensor([0, 2]), rows, RUN.handle)
    assert y.dtype == torch.bfloat16


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.empty(2, 3, 8), torch.empty(6, 8)
        rows = torch.empty(2, 3, dtype=torch.bool)
        assert ops.out_sparse_linear(x, w, None, torch.empty(4, dtype=torch.long), rows, 0).shape == (2, 3, 6)
        assert ops.select_mlp(x, torch.empty(8, 2), torch.empty(2, 6), torch.empty(8, 2),
                              torch.empty(2, 6), torch.empty(6), torch.empty(6), rows, 4, 0,
                              "b").shape == (4,)


@pytest.mark.parametrize("k", [1, 5])
def test_top_channels_is_sorted_set(k):
    s = torch.tensor([0.1, 5.0, 3.0, 4.0, 0.2])
    got = selection.top_channels(s, k)
    assert got.tolist() == sorted(torch.topk(s, k).indices.tolist())


@contextlib.contextmanager
def _all_rows_max_k(k):
    """Pick the sparse MLP's layout for a mixed split: the context part over every row
    (k below the limit) or over the context rows only (k at or above it)."""
    before, RUN.mlp_all_rows_max_k = RUN.mlp_all_rows_max_k, k
    try:
        yield
    finally:
        RUN.mlp_all_rows_max_k = before


@settings(max_examples=40, deadline=None)
@given(op_case(), st.booleans(), st.sampled_from([0, 10**9]))
def test_sparse_mlp_matches_reference(case, with_bias, all_rows_max_k):
    from sparselora_compile.runtime.sparse_mlp import sparse_mlp_reference
    x, w, _, idx, rows = case  # w: [d_ff, hidden]
    g = torch.Generator().manual_seed(int(idx.sum()))
    d_ff, hidden = w.shape
    wu = torch.randn(d_ff, hidden, generator=g, dtype=x.dtype)
    wd = torch.randn(hidden, d_ff, generator=g, dtype=x.dtype)
    bias = [torch.randn(n, generator=g, dtype=x.dtype) if with_bias else None for n in (d_ff, d_ff, hidden)]
    # fp32 tolerance for two chained products summed in another order
    with _all_rows_max_k(all_rows_max_k):
        _check(lambda x, *a: ops.sparse_mlp(x, *a, RUN.handle)[0],
               sparse_mlp_reference, x, w, wu, wd, *bias, idx, rows, tol=1e-4)


def test_sparse_mlp_keeps_its_weight_slices_for_the_backward(monkeypatch):
    """Off CUDA (and below the Triton kernels' k) the forward slices W_g[S], W_u[S] and
    W_d[:, S] once, into the tail of the saved buffer; the backward reads them there and
    gathers nothing again, with the reference's input gradient."""
    from sparselora_compile.runtime import gathered
    from sparselora_compile.runtime.sparse_mlp import sparse_mlp_reference
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, wg, wu, wd = r(2, 5, 8), r(12, 8), r(12, 8), r(6, 12)
    rows, idx = torch.tensor(SPLIT_KINDS["mixed"]), torch.tensor([1, 4, 7])
    xa = x.clone().requires_grad_(True)
    y, saved = ops.sparse_mlp(xa, wg, wu, wd, None, None, None, idx, rows, RUN.handle)
    k = idx.numel()
    tail = saved[-k * (2 * 8 + 6):]
    assert torch.equal(tail[:k * 8].view(k, 8), wg[idx]) and torch.equal(tail[k * 8:2 * k * 8].view(k, 8), wu[idx])
    assert torch.equal(tail[2 * k * 8:].view(6, k), wd[:, idx])

    def gathers(*args, **kwargs):
        raise AssertionError("the backward gathered the weights again")
    monkeypatch.setattr(gathered, "gather_cols_mm", gathers)
    monkeypatch.setattr(gathered, "gather_rows_mm_pair", gathers)
    gy = r(2, 5, 6)
    y.backward(gy)
    xb = x.clone().requires_grad_(True)
    sparse_mlp_reference(xb, wg, wu, wd, None, None, None, idx, rows).backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad)


SPLIT_KINDS = {"dense": [[True] * 5] * 2, "context": [[False] * 5] * 2,
               "mixed": [[False, True, False, False, True]] * 2}


@pytest.mark.parametrize("all_rows_max_k", [0, 10**9])
@pytest.mark.parametrize("kind", SPLIT_KINDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_ops_match_reference_on_each_kind_of_split(kind, with_bias, all_rows_max_k):
    """A split with one part (all dense: the warm-up; all context) writes its output directly."""
    from sparselora_compile.runtime.sparse_mlp import sparse_mlp_reference
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b = lambda n: r(n) if with_bias else None  # noqa: E731
    rows, idx = torch.tensor(SPLIT_KINDS[kind]), torch.tensor([1, 4, 7])
    x, w = r(2, 5, 8), r(12, 8)
    _check(lambda x, *a: ops.out_sparse_linear(x, *a, RUN.handle),
           sparse_linear.out_sparse_reference, x, w, b(12), idx, rows)
    _check(lambda h, *a: ops.in_sparse_linear(h, *a, RUN.handle),
           sparse_linear.in_sparse_reference, r(2, 5, 12), w.t().contiguous(), b(8), idx, rows)
    with _all_rows_max_k(all_rows_max_k):
        _check(lambda x, *a: ops.sparse_mlp(x, *a, RUN.handle)[0], sparse_mlp_reference,
               x, w, r(12, 8), r(8, 12), b(12), b(12), b(8), idx, rows)


def test_ops_without_a_backward_run_their_kernels_without_autograd():
    """Eager training calls them with grad on and inputs that need grad (the saved buffer,
    the hidden states): their kernels record no graph, like the sparse products' kernels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    wg, wu, wd = (torch.randn(*s, generator=g) for s in ((12, 8), (12, 8), (8, 12)))
    rows, idx = torch.tensor(SPLIT_KINDS["mixed"]), torch.tensor([1, 3, 5])
    y, saved = ops.sparse_mlp(x, wg, wu, wd, None, None, None, idx, rows, RUN.handle)
    assert saved.requires_grad
    gy = torch.randn(y.shape, generator=g)
    (want,) = torch.autograd.grad(y, x, gy, retain_graph=True)
    assert torch.equal(ops.sparse_mlp_grad(gy, saved, wg, wu, wd, idx, rows, RUN.handle).detach(), want)
    a, bf = torch.randn(8, 2, generator=g), torch.randn(2, 12, generator=g)
    sel = ops.select_mlp(x, a, bf, a, bf, torch.zeros(12), torch.zeros(12), rows, 3, RUN.handle, "m")
    assert sel.grad_fn is None and not ops.token_rows(None, None, x, RUN.handle).requires_grad


def test_padding_is_left_out_of_the_estimator_scores():
    """Padded positions run sparse but do not vote: huge pad activations change nothing."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8)
    labels = torch.full((1, 6), -100)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    a, b = torch.randn(8, 3), torch.randn(3, 16)
    rows = ops.token_rows(labels, mask, x, RUN.handle)
    assert not rows.any()
    r = torch.rand(16)
    base = ops.select_mlp(x, a, b, a, b, r, r, rows, 4, RUN.handle, "t")
    x_loud = x.clone()
    x_loud[0, 4:] = 1e4 * torch.randn(2, 8)
    rows2 = ops.token_rows(labels, mask, x_loud, RUN.handle)
    assert torch.equal(ops.select_mlp(x_loud, a, b, a, b, r, r, rows2, 4, RUN.handle, "t"), base)
    rows3 = ops.token_rows(labels, None, x_loud, RUN.handle)  # without the mask they vote
    assert not torch.equal(ops.select_mlp(x_loud, a, b, a, b, r, r, rows3, 4, RUN.handle, "t"), base)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.lists(st.tuples(st.integers(1, 6), st.integers(1, 20)),
                                                         min_size=1, max_size=3))
def test_gram_column_norms_equal_explicit_products(tokens, hidden, shapes):
    """The r x r Gram route gives ||x A B||^2 per column without the [tokens x out] product."""
    g = torch.Generator().manual_seed(tokens * 1000 + hidden)
    x = torch.randn(tokens, hidden, generator=g)
    factors = [(torch.randn(hidden, r, generator=g), torch.randn(r, out, generator=g)) for r, out in shapes]
    got = selection.gram_column_sq_norms(x, factors, compute_split(torch.zeros(tokens, dtype=torch.bool)))
    for (a, b), norms in zip(factors, got):
        want = (x.double() @ a.double() @ b.double()).square().sum(0).float()
        # fp32 Gram: relative to the largest norm (b^T G b cancels where the norm is small)
        torch.testing.assert_close(norms, want, rtol=1e-4, atol=1e-4 * float(want.max()) + 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the ops' Triton paths in bf16")
@pytest.mark.parametrize("k", [64, 640])  # all-rows layout + slice/cuBLAS; context rows + Triton
def test_sparse_mlp_on_cuda_in_bf16_matches_reference(k):
    """The CUDA path (Triton SwiGLU, gathered GEMMs from k >= 512) in bf16 against the fp32
    reference, forward and input gradient, on a mixed split. The allocator's free blocks are
    filled with NaN first, so outputs allocated from them start as NaN: an unwritten element
    fails the comparison."""
    from sparselora_compile.runtime.sparse_mlp import sparse_mlp_reference
    g = torch.Generator().manual_seed(k)
    dev, hidden, d_ff = torch.device("cuda"), 256, 1024
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dev)  # noqa: E731
    x, wg, wu, wd = r(2, 96, hidden), r(d_ff, hidden), r(d_ff, hidden), r(hidden, d_ff)
    rows = torch.rand(2, 96, generator=g) < 0.3
    idx = torch.randperm(d_ff, generator=g)[:k].sort().values.to(dev)
    rows = rows.to(dev)
    ref_x = x.clone().requires_grad_(True)
    want = sparse_mlp_reference(ref_x, wg, wu, wd, None, None, None, idx, rows)
    gy = torch.randn(want.shape, generator=g).to(dev)
    want.backward(gy)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    torch.empty(64 * 2**20, device=dev).fill_(float("nan"))  # freed at once: NaN in the pool
    xb = bf(x).requires_grad_(True)
    y = ops.sparse_mlp(xb, bf(wg), bf(wu), bf(wd), None, None, None, idx, rows, RUN.handle)[0]
    y.backward(bf(gy))
    for got, ref in ((y, want), (xb.grad, ref_x.grad)):
        assert not got.isnan().any()
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.float(), ref.detach(), rtol=0, atol=2e-2 * scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the ops' Triton paths in bf16")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bucket", [0, 16])
def test_sparse_linears_on_cuda_in_bf16_match_reference(bias, bucket):
    """The CUDA path of the attention blocks' products (context rows read and written in
    place by one Triton kernel; a bias falls back to the unfused path where it must) in bf16
    against the fp32 reference, forward and input gradient, through the ops and autograd, on
    a mixed split, bucketed or not. Free pool blocks hold NaN first: an unwritten element fails."""
    g = torch.Generator().manual_seed(bucket + bias)
    dev, hidden, n_out, k = torch.device("cuda"), 512, 256, 64
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dev)  # noqa: E731
    x, w = r(3, 80, hidden), r(n_out, hidden)
    b = r(n_out) if bias else None
    rows = (torch.rand(3, 80, generator=g) < 0.25).to(dev)
    run = Run()
    run.splits.bucket = bucket
    bf = lambda t: None if t is None else t.to(torch.bfloat16)  # noqa: E731
    for op, ref, inp, wt, idx in (
            (ops.out_sparse_linear, sparse_linear.out_sparse_reference, x, w,
             torch.randperm(n_out, generator=g)[:k].sort().values.to(dev)),
            (ops.in_sparse_linear, sparse_linear.in_sparse_reference, r(3, 80, n_out), w.t().contiguous(),
             torch.randperm(n_out, generator=g)[:k].sort().values.to(dev))):
        bb = b if op is ops.out_sparse_linear else (r(hidden) if bias else None)
        ref_x = inp.clone().requires_grad_(True)
        want = ref(ref_x, wt, bb, idx, rows)
        gy = torch.randn(want.shape, generator=g).to(dev)
        want.backward(gy)
        torch.empty(64 * 2**20, device=dev).fill_(float("nan"))  # freed at once: NaN in the pool
        xb = bf(inp).requires_grad_(True)
        y = op(xb, bf(wt), bf(bb), idx, rows, run.handle)
        y.backward(bf(gy))
        for got, exp in ((y, want), (xb.grad, ref_x.grad)):
            assert not got.isnan().any()
            torch.testing.assert_close(got.float(), exp.detach(), rtol=0, atol=2e-2 * exp.abs().max().item())


@settings(max_examples=40, deadline=None)
@given(op_case(), st.integers(1, 5), st.integers(0, 10**9))
def test_bucketed_splits_give_the_reference_products(case, bucket, all_rows_max_k):
    """Index lists rounded to capacities (copies of a row, for CUDA graphs) change nothing:
    every sparse op, forward and input gradient, still equals its reference."""
    from sparselora_compile.runtime.sparse_mlp import sparse_mlp_reference
    x, w, b, idx, rows = case
    run = Run(mlp_all_rows_max_k=all_rows_max_k % 64)
    run.splits.bucket = bucket
    _check(lambda x, *a: ops.out_sparse_linear(x, *a, run.handle),
           sparse_linear.out_sparse_reference, x, w, b, idx, rows)
    wt = w.t().contiguous()
    h = torch.randn(*x.shape[:-1], wt.shape[1], dtype=x.dtype)
    _check(lambda h, *a: ops.in_sparse_linear(h, *a, run.handle),
           sparse_linear.in_sparse_reference, h, wt, None, idx, rows)
    g = torch.Generator().manual_seed(bucket)
    wu = torch.randn(*w.shape, generator=g, dtype=x.dtype)
    wd = torch.randn(w.shape[1], w.shape[0], generator=g, dtype=x.dtype)
    _check(lambda x, *a: ops.sparse_mlp(x, *a, run.handle)[0], sparse_mlp_reference,
           x, w, wu, wd, None, None, None, idx, rows, tol=1e-4)
    split = run.splits.of(rows)
    if split.n_dense and not split.all_dense:  # capacities: a function of the dense rows' bucket
        from sparselora_compile.runtime.row_split import DENSE_SHARE, bucket_step
        step = bucket_step(split.n_dense, max(1, bucket // DENSE_SHARE))
        cap = -(-split.n_dense // step) * step
        assert split.capacities == (cap, rows.numel() - cap + step - 1)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 30), st.integers(1, 5), st.integers(0, 2**16), st.booleans())
def test_score_weights_skip_padding_and_copies(tokens, bucket, seed, residual):
    """Scores over a bucketed split with padding equal scores over the real, unpadded
    context rows alone (the zeroed rows' residual term is taken out)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, 6, generator=g, dtype=torch.float32)
    rows = torch.rand(1, tokens, generator=g) < 0.3
    padding = torch.rand(1, tokens, generator=g) < 0.3
    ag, au = torch.randn(6, 2, generator=g, dtype=torch.float32), torch.randn(6, 2, generator=g, dtype=torch.float32)
    bg, bu = torch.randn(2, 9, generator=g, dtype=torch.float32), torch.randn(2, 9, generator=g, dtype=torch.float32)
    rg, ru = (torch.rand(9, generator=g, dtype=torch.float32) for _ in range(2)) if residual else (None, None)
    split = compute_split(rows, padding, bucket)
    got = selection.mlp_scores(x, ag, bg, au, bu, rg, ru, split).double()
    real = (~rows & ~padding).reshape(-1)
    want = selection.mlp_scores(x[:, real], ag, bg, au, bu, rg, ru,
                                compute_split(torch.zeros(1, int(real.sum()), dtype=torch.bool))).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    qn = selection.gram_column_sq_norms(x, [(ag, bg)], split)[0].double()
    qw = selection.gram_column_sq_norms(x[:, real], [(ag, bg)], compute_split(
        torch.zeros(1, int(real.sum()), dtype=torch.bool)))[0].double()
    torch.testing.assert_close(qn, qw, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 30), st.integers(1, 12), st.integers(1, 5), st.integers(0, 12), st.integers(0, 2**16))
def test_a_kept_capacity_takes_filler_rows_as_dense(tokens, filler, bucket, extra, seed):
    """A filled row's split in a kept graph set's capacities (more dense rows than its own
    rounding): trailing filler rows fill the dense list before copies do, every row is in
    one list, and the scores still equal scores over the real context rows alone."""
    g = torch.Generator().manual_seed(seed)
    n = tokens + filler
    rows = torch.zeros(1, n, dtype=torch.bool)
    rows[0, :tokens] = torch.rand(tokens, generator=g) < 0.3
    rows[0, 0] = False  # at least one real context row
    padding = torch.zeros(1, n, dtype=torch.bool)
    padding[0, tokens:] = True
    n_dense = int(rows.sum())
    if n_dense == 0:
        rows[0, tokens - 1] = True
        n_dense = 1
    own = compute_split(rows, padding, bucket)
    d_cap = own.capacities[0] + extra
    c_cap = n - n_dense - min(filler, d_cap - n_dense) + extra % 3
    split = compute_split(rows, padding, bucket, filler, kept=((d_cap, c_cap),))
    assert split.capacities == (d_cap, c_cap) and split.n_dense == n_dense
    moved = min(filler, d_cap - n_dense)
    dense, ctx = set(split.dense.tolist()), set(split.ctx.tolist())
    assert dense | ctx == set(range(n))
    assert set(split.dense[n_dense:n_dense + moved].tolist()) == set(range(n - moved, n))
    assert not dense & (set(range(n)) - set(rows[0].nonzero()[:, 0].tolist()) - set(range(n - moved, n)))
    x = torch.randn(1, n, 6, generator=g, dtype=torch.float32)
    ag, au = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    bg, bu = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
    rg, ru = torch.rand(9, generator=g), torch.rand(9, generator=g)
    real = (~rows & ~padding).reshape(-1)
    want = selection.mlp_scores(x[:, real], ag, bg, au, bu, rg, ru,
                                compute_split(torch.zeros(1, int(real.sum()), dtype=torch.bool))).double()
    got = selection.mlp_scores(x, ag, bg, au, bu, rg, ru, split).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a kept set with fewer dense rows than the row has does not fit: the row's own rounding
    assert compute_split(rows, padding, bucket, filler, kept=((n_dense - 1, n),)).capacities == own.capacities
