"""Triton kernels against their plain-PyTorch references.

CPU: TRITON_INTERPRET=1 (set here, before the kernel modules are imported, since @triton.jit
decides at decoration time), fp32 and fp16 (tl.dot is wrong in bf16 under the interpreter).
GPU: bf16 (and fp16/fp32) on real shapes; skipped without CUDA.
Outputs are poisoned with NaN first, so an element the kernel never writes fails the test.

Tolerances (output vs fp32-math reference rounded to the same dtype):
fp32 rtol=atol=1e-4; fp16 rtol=atol=1e-2; bf16 rtol=atol=2e-2 (one bf16 ulp is 0.8%).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
# One config per kernel: every autotune config compiles per specialization, too slow for a test run.
# bench/kernels.py checks the autotuned configs against the references on the GPU.
os.environ.setdefault("SPARSELORA_KERNELS_TUNE", "0")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparselora_compile.runtime.kernels import fused_estimator as fe  # noqa: E402
from sparselora_compile.runtime.kernels import gathered_gemm as gg  # noqa: E402
from sparselora_compile.runtime.kernels import rows as rk  # noqa: E402
from sparselora_compile.runtime.kernels import swiglu as sw  # noqa: E402
from sparselora_compile.runtime.kernels import top_k as tk  # noqa: E402
from sparselora_compile.runtime.kernels import triton_available  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
PRODUCTS = ["gather_rows_mm_t", "gather_cols_mm_t", "gather_rows_mm", "gather_cols_mm"]
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter tests run on CPU-only machines; see TestGPU")


def nan_empty(shape, **kw):
    return torch.full(shape, float("nan"), **kw)


def make_case(product, M, K, N, k, dtype, device, seed, pad=0):
    """Operands for one product: A (maybe a column slice of a wider buffer: row stride != width), W, idx."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    gathered_dim = N if product in ("gather_rows_mm_t", "gather_rows_mm") else K
    k = min(k, gathered_dim)
    idx = torch.randperm(gathered_dim, generator=g)[:k].sort().values
    idx = idx.to(torch.int32 if seed % 2 else torch.int64).to(device)
    a_cols = {"gather_rows_mm_t": K, "gather_cols_mm_t": k, "gather_rows_mm": k,
              "gather_cols_mm": N}[product]
    a = torch.randn(M, a_cols + pad, generator=g).to(device, dtype)[:, :a_cols]
    return a, W, idx


def out_width(product, W, idx):
    return {"gather_rows_mm_t": idx.numel(), "gather_cols_mm_t": W.shape[0],
            "gather_rows_mm": W.shape[1], "gather_cols_mm": idx.numel()}[product]


def check_product(product, a, W, idx, rows, dtype):
    fn, ref = getattr(gg, product), getattr(gg, product + "_reference")
    # Poisoned caller buffer: rows the kernel writes must lose their NaN, the others keep it.
    poison = torch.full((a.shape[0], out_width(product, W, idx)), float("nan"), device=a.device, dtype=dtype)
    got = fn(a, W, idx, rows=rows, out=poison.clone())
    want = ref(a, W, idx, rows=rows, out=poison.clone())
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)
    # Fresh output (no `out`): everything defined, unselected rows zero.
    got = fn(a, W, idx, rows=rows)
    torch.testing.assert_close(got, ref(a, W, idx, rows=rows), rtol=TOL[dtype], atol=TOL[dtype])
    assert not got.isnan().any()


def draw_rows(data, M, device):
    mode = data.draw(st.sampled_from(["all", "span", "index"]))
    if mode == "all":
        return None
    if mode == "span":
        start = data.draw(st.integers(0, M))
        return (start, data.draw(st.integers(start, M)))
    sel = data.draw(st.lists(st.integers(0, M - 1), min_size=0, max_size=M, unique=True))
    return torch.tensor(sorted(sel), dtype=torch.int32, device=device)


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Fresh kernel outputs start as NaN instead of whatever torch.empty returns."""
    monkeypatch.setattr(gg, "_empty", nan_empty)
    monkeypatch.setattr(fe, "_empty", nan_empty)


def check_swiglu(n_rows, width, dtype, device, seed, monkeypatch):
    """Forward and gradient against the references; outputs poisoned with NaN first."""
    monkeypatch.setattr(sw, "_empty", lambda t: torch.full_like(t, float("nan")))
    g = torch.Generator(device=device).manual_seed(seed)
    gate, up, dh = (torch.randn(n_rows, width, generator=g, device=device, dtype=torch.float32).mul(3).to(dtype)
                    for _ in range(3))
    tol = dict(rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(sw.swiglu(gate, up), sw.swiglu_reference(gate, up), **tol)
    for got, want in zip(sw.swiglu_grad(dh, gate, up), sw.swiglu_grad_reference(dh, gate, up)):
        torch.testing.assert_close(got, want, **tol)


@cpu_only
@settings(max_examples=12, deadline=None)
@given(st.integers(0, 40), st.integers(1, 70), st.sampled_from([torch.float32, torch.float16]), st.integers(0, 99))
def test_swiglu_interpreter(n_rows, width, dtype, seed):
    # Sizes are ragged against the 1024-element block; 0 rows launches nothing.
    with pytest.MonkeyPatch.context() as mp:
        check_swiglu(n_rows, width, dtype, "cpu", seed, mp)


def test_swiglu_grad_is_autograd_of_the_reference():
    """The hand-written gradient reference is the derivative of silu(g) * u."""
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    dh = torch.randn(5, 7, dtype=torch.float64)
    (torch.nn.functional.silu(g) * u).backward(dh)
    dg, du = sw.swiglu_grad_reference(dh, g.detach(), u.detach())
    torch.testing.assert_close(dg, g.grad)
    torch.testing.assert_close(du, u.grad)


def test_triton_available():
    assert triton_available()


@pytest.mark.parametrize("k,multiple,limit,want", [
    (1433, 64, None, 1472), (144, 64, None, 192), (128, 64, None, 128), (1, 128, None, 128),
    (0, 64, None, 0), (14300, 128, 14336, 14336), (4000, 128, 4096, 4096),
])
def test_round_k(k, multiple, limit, want):
    assert gg.round_k(k, multiple, limit) == want


@cpu_only
@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gathered_products_interpreter(poisoned_alloc, product, dtype, data):
    # Sizes cross the 32x32x16 interpreter tile with ragged tails on every axis.
    M = data.draw(st.integers(1, 70), label="M")
    K = data.draw(st.integers(1, 70), label="K")
    N = data.draw(st.integers(1, 70), label="N")
    k = data.draw(st.integers(1, 70), label="k")
    pad = data.draw(st.sampled_from([0, 3]), label="pad")
    a, W, idx = make_case(product, M, K, N, k, dtype, "cpu", data.draw(st.integers(0, 999)), pad)
    if data.draw(st.booleans(), label="column_major_W"):
        W = W.t().contiguous().t()
    check_product(product, a, W, idx, draw_rows(data, M, "cpu"), dtype)


def check_scatter(M, K, N, k, dtype, device, seed, rows):
    """gather_rows_mm_t(..., scatter=True) against its reference: into a caller's buffer
    poisoned with NaN (what the kernel writes loses its NaN, the rest keeps it) and into a
    fresh output (unwritten entries zero)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    idx = torch.randperm(N, generator=g)[:min(k, N)].sort().values.to(device)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    tol = dict(rtol=TOL[dtype], atol=TOL[dtype])
    poison = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    torch.testing.assert_close(gg.gather_rows_mm_t(x, W, idx, rows, poison.clone(), scatter=True),
                               gg.gather_rows_mm_t_scatter_reference(x, W, idx, rows, poison.clone()),
                               equal_nan=True, **tol)
    got = gg.gather_rows_mm_t(x, W, idx, rows, scatter=True)
    torch.testing.assert_close(got, gg.gather_rows_mm_t_scatter_reference(x, W, idx, rows), **tol)
    assert not got.isnan().any()


@cpu_only
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_scattered_product_interpreter(poisoned_alloc, data):
    M, K, N, k = (data.draw(st.integers(lo, 70), label=n) for lo, n in ((1, "M"), (1, "K"), (1, "N"), (0, "k")))
    check_scatter(M, K, N, k, data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype"),
                  "cpu", data.draw(st.integers(0, 999)), draw_rows(data, M, "cpu"))


def check_fused_sparse_linear(M, K, N, k, n_dense, bucket, dtype, device, seed):
    """The fused out-sparse linear (context rows read and written in place) against the
    reference: forward, and the input gradient autograd of the reference gives; dense rows
    drawn at random, the split maybe bucketed (index lists padded with copies of a row)."""
    from sparselora_compile.runtime import sparse_linear as sl
    from sparselora_compile.runtime.row_split import compute_split
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(M, dtype=torch.bool)
    rows[torch.randperm(M, generator=g)[:n_dense]] = True
    split = compute_split(rows.to(device), bucket=bucket)
    x, gy = torch.randn(M, K, generator=g).to(device, dtype), torch.randn(M, N, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    idx = torch.randperm(N, generator=g)[:k].sort().values.to(device)
    xr = x.float().clone().requires_grad_()
    want = sl.out_sparse_reference(xr, w.float(), None, idx, rows.to(device))
    want.backward(gy.float())
    tol = dict(rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(sl.out_sparse_forward_fused(x, w, idx, split).float(), want.detach(), **tol)
    torch.testing.assert_close(sl.out_sparse_grad_input_fused(gy, w, idx, split).float(), xr.grad, **tol)


@cpu_only
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fused_sparse_linear_interpreter(poisoned_alloc, data):
    M, K, N = (data.draw(st.integers(1, 60), label=n) for n in "MKN")
    check_fused_sparse_linear(M, K, N, data.draw(st.integers(0, N), label="k"),
                              data.draw(st.integers(0, M), label="n_dense"),
                              data.draw(st.sampled_from([0, 8]), label="bucket"),
                              data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype"),
                              "cpu", data.draw(st.integers(0, 999)))


def test_m_bucket():
    from sparselora_compile.runtime.kernels._common import m_bucket
    assert [m_bucket(m) for m in (0, 1, 2, 3, 128, 129, 3000, 4096, 4097)] == [1, 1, 2, 4, 128, 256, 4096, 4096, 8192]


@pytest.fixture
def two_configs(monkeypatch):
    """Give a kernel's autotuner two configs and a fake benchmark that runs the kernel once
    and counts: the count is the number of (key, config) pairs tuned."""
    def setup(kernel, configs):
        calls = []
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})

        def bench(kernel_call, quantiles):
            kernel_call()
            calls.append(1)
            return [1.0, 1.0, 1.0]
        monkeypatch.setattr(kernel, "_do_bench", bench)
        return calls
    return setup


@cpu_only
def test_autotune_keys_follow_row_buckets(two_configs):
    """A new row count in a seen power-of-two bucket reuses the tuned config (on an H200 each
    re-tune cost ~100 ms per kernel, paid at every first-seen padded length); both configs
    still give the reference's result."""
    import triton
    c = triton.Config
    est = two_configs(fe._channel_scores_kernel, [c({"BLOCK_M": 16, "BLOCK_F": 32}, num_warps=4, num_stages=1),
                                                  c({"BLOCK_M": 32, "BLOCK_F": 32}, num_warps=4, num_stages=1)])
    # One bucket (1024) and two token splits (ROWS_PER_PROG 384 and 512 under the interpreter).
    # Keys: gated with residuals, gated, and plain (channel_sq_norms), each tuned once.
    for M in (600, 900, 700, 1000):
        check_scores(M, 16, 8, 40, torch.float32, "cpu", M, residual=M % 200 == 0)
    assert len(fe._channel_scores_kernel.cache) == 3 and len(est) == 6
    check_scores(1100, 16, 8, 40, torch.float32, "cpu", 1)  # the next bucket tunes again
    assert len(fe._channel_scores_kernel.cache) == 5

    gem = two_configs(gg._gathered_gemm_kernel,
                      [c({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1),
                       c({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)])
    for M in (33, 40, 64):
        a, W, idx = make_case("gather_rows_mm_t", M, 24, 40, 20, torch.float32, "cpu", seed=0)
        torch.testing.assert_close(gg.gather_rows_mm_t(a, W, idx), gg.gather_rows_mm_t_reference(a, W, idx),
                                   rtol=1e-4, atol=1e-4)
    assert len(gg._gathered_gemm_kernel.cache) == 1 and len(gem) == 2


@cpu_only
def test_empty_selection_gives_zeros():
    W = torch.randn(9, 7)
    none = torch.empty(0, dtype=torch.int64)
    assert gg.gather_cols_mm_t(torch.randn(5, 0), W, none).eq(0).all()
    assert gg.gather_rows_mm(torch.randn(5, 0), W, none).eq(0).all()
    assert gg.gather_rows_mm_t(torch.randn(5, 7), W, none).shape == (5, 0)


def check_scores(M, H, r, F, dtype, device, seed, residual=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(device, dtype)
    Ag, Au = ((torch.randn(H, r, generator=g) / H**0.5).to(device, dtype) for _ in range(2))
    Bg, Bu = (torch.randn(r, F, generator=g).to(device, dtype) for _ in range(2))
    # Residual variances [F] fp32, on the scale of g^2 and u^2 (about r / H), some zero.
    res = [(torch.rand(F, generator=g) * 2 * r / H * (torch.rand(F, generator=g) > 0.2)).to(device)
           for _ in range(2)] if residual else [None, None]
    got = fe.mlp_channel_scores(x, Ag, Bg, Au, Bu, *res)
    want = fe.mlp_channel_scores_reference(x, Ag, Bg, Au, Bu, *res)
    assert got.dtype == torch.float32 and got.shape == (F,)
    # Sums of M squares: relative error about twice the products' (the reference rounds x@A like the kernel).
    tol = 2 * TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.max()) + 1e-6)
    # As the CUDA path calls it: fp32 B with x A in x's dtype, rows weighted 0 or 1.
    w = (torch.rand(M, generator=g) > 0.3).float().to(device)
    got = fe.mlp_channel_scores(x, Ag, Bg.float(), Au, Bu.float(), *res, row_weight=w)
    want = fe.mlp_channel_scores_reference(x, Ag, Bg.float(), Au, Bu.float(), *res, row_weight=w)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.max()) + 1e-6)
    xa = x @ Ag
    got = fe.channel_sq_norms(xa, Bg)
    torch.testing.assert_close(got, fe.channel_sq_norms_reference(xa, Bg), rtol=tol, atol=1e-5)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 80), H=st.integers(1, 40), r=st.integers(1, 32), F=st.integers(1, 90),
       seed=st.integers(0, 999), residual=st.booleans())
def test_estimator_interpreter(poisoned_alloc, dtype, M, H, r, F, seed, residual):
    # M up to 80 with 128-row chunks per program: the 2-way token split sees an empty second half too.
    check_scores(M, H, r, F, dtype, "cpu", seed, residual)


@cpu_only
@pytest.mark.parametrize("residual", [False, True])
def test_estimator_token_split(poisoned_alloc, residual):
    # 300 tokens = three 128-row chunks: partial sums from several programs must add up. With
    # residuals, the rows past each program's end (g = u = 0) must not add silu'(0)^2 σg σu.
    check_scores(300, 24, 8, 40, torch.float32, "cpu", 0, residual)


def draw_zero_rows(data, M):
    """Which rows weigh 0, in runs as real batches have them: none, all, random runs (whole
    16-row interpreter tiles among them) or the tail of each fixed-length sequence."""
    zero = torch.zeros(M, dtype=torch.bool)
    mode = data.draw(st.sampled_from(["none", "all", "runs", "tails"]), label="zero_rows")
    if mode == "all":
        zero[:] = True
    elif mode == "runs":
        for _ in range(data.draw(st.integers(1, 4), label="n_runs")):
            start = data.draw(st.integers(0, M - 1), label="start")
            zero[start:start + data.draw(st.integers(1, M), label="length")] = True
    elif mode == "tails":
        period = data.draw(st.integers(1, M), label="period")
        tail = data.draw(st.integers(0, period), label="tail")
        zero = torch.arange(M) % period >= period - tail
    return zero


def check_weighted_scores(M, H, r, F, dtype, device, seed, zero, residual):
    """Row-weighted scores, gated and not, against the references, which drop weight-0 rows.
    Weight-0 rows hold NaN/inf in x: the kernel must not read them, so its result is bit for
    bit the one with finite values there. Tolerance as in check_scores (sums of M squares):
    rtol = 2x the dtype's, atol = that times the largest score."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(device, dtype)
    Ag, Au = ((torch.randn(H, r, generator=g) / H**0.5).to(device, dtype) for _ in range(2))
    Bg, Bu = (torch.randn(r, F, generator=g).to(device) for _ in range(2))  # fp32, as the CUDA path
    res = [(torch.rand(F, generator=g) * 2 * r / H).to(device) for _ in range(2)] if residual else [None, None]
    w = torch.where(zero, 0.0, 0.25 + torch.rand(M, generator=g)).to(device)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    poisoned = x.clone()
    poisoned[zero.to(device)] = bad[torch.randint(3, (int(zero.sum()), H), generator=g)].to(device, dtype)
    tol = 2 * TOL[dtype]

    def check(got, want, clean):
        assert torch.equal(got, clean)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.max()) + 1e-6)
        if zero.all():
            assert got.eq(0).all()

    check(fe.mlp_channel_scores(poisoned, Ag, Bg, Au, Bu, *res, row_weight=w),
          fe.mlp_channel_scores_reference(poisoned, Ag, Bg, Au, Bu, *res, row_weight=w),
          fe.mlp_channel_scores(x, Ag, Bg, Au, Bu, *res, row_weight=w))
    check(fe.channel_sq_norms(poisoned @ Ag, Bg, row_weight=w),
          fe.channel_sq_norms_reference(poisoned @ Ag, Bg, row_weight=w),
          fe.channel_sq_norms(x @ Ag, Bg, row_weight=w))


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_estimator_zero_weight_runs_interpreter(poisoned_alloc, dtype, data):
    # Up to 300 rows: 16-row tiles, and two programs of 128 or 256 rows each.
    M = data.draw(st.integers(1, 300), label="M")
    check_weighted_scores(M, data.draw(st.integers(1, 24), label="H"), data.draw(st.integers(1, 16), label="r"),
                          data.draw(st.integers(1, 70), label="F"), dtype, "cpu", data.draw(st.integers(0, 999)),
                          draw_zero_rows(data, M), data.draw(st.booleans(), label="residual"))


@cpu_only
def test_estimator_residual_matches_selection(poisoned_alloc):
    """The kernel's corrected score is `selection.mlp_scores`' (the CPU path) on the same rows."""
    from sparselora_compile.runtime import selection
    from sparselora_compile.runtime.row_split import compute_split
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 37, 24, generator=g)
    Ag, Au = (torch.randn(24, 4, generator=g) / 5 for _ in range(2))
    Bg, Bu = (torch.randn(4, 50, generator=g) for _ in range(2))
    Rg, Ru = (torch.rand(50, generator=g) for _ in range(2))
    rows = torch.rand(1, 37, generator=g) > 0.6
    want = selection.mlp_scores(x, Ag, Bg, Au, Bu, Rg, Ru, compute_split(rows))
    got = fe.mlp_channel_scores(x[~rows], Ag, Bg, Au, Bu, Rg, Ru)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want, selection.mlp_scores(x, Ag, Bg, Au, Bu, None, None, compute_split(rows)))
    # Every row with the split's row weights (the CUDA path), padding and bucket copies included.
    padding = torch.zeros(1, 37, dtype=torch.bool)
    padding[0, 30:] = True
    for residual in (False, True):
        res = (Rg, Ru) if residual else (None, None)
        for bucket in (0, 4):
            split = compute_split(rows, padding, bucket)
            want = selection.mlp_scores(x, Ag, Bg, Au, Bu, *res, split)
            got = fe.mlp_channel_scores(x[0], Ag, Bg, Au, Bu, *res, row_weight=split.row_weight)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_launcher_meta_parameters(monkeypatch):
    """The fast launch path (kernels/launch.py) calls the compiled kernel with every
    parameter: what was given, the autotuner's choice and the heuristics computed from both."""
    from sparselora_compile.runtime.kernels.launch import Launcher
    kernel = gg._gathered_gemm_kernel
    launch = Launcher(kernel)
    assert launch.names[:3] == ["a_ptr", "b_ptr", "c_ptr"] and launch.names[-1] == "EVEN_K"
    assert [launch.names[i] for i in launch.tune_keys] == list(kernel.keys)
    cfg = kernel.configs[0]
    monkeypatch.setattr(kernel, "best_config", cfg, raising=False)
    t = torch.zeros(4)
    args = (t, t, t, t, t, t, 10, 20, cfg.kwargs["BLOCK_K"] * 3 + 1, 1, 1, 1, 1, 1, 1, 16)
    given = {"GATHER_R": True, "GATHER_N": False, "HAS_ROWS": False, "PRECISION": "ieee", "SCATTER_N": False}
    meta = launch._meta(args, given)
    assert set(launch.names[len(args):]) <= set(meta)
    assert meta["EVEN_K"] is False and meta["BLOCK_M"] == cfg.kwargs["BLOCK_M"] and meta["GATHER_R"] is True
    meta = launch._meta(args[:8] + (cfg.kwargs["BLOCK_K"] * 2,) + args[9:], given)
    assert meta["EVEN_K"] is True


# scores with many ties, both zeros, infinities and NaNs: the edge cases of the integer key
SCORE_VALUES = [0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 3e38, float("inf"),
                float("-inf"), float("nan")]


def scores_case(data, n_max):
    n = data.draw(st.integers(1, n_max), label="n")
    k = data.draw(st.integers(0, n), label="k")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans(), label="tied"):
        pool = torch.tensor(SCORE_VALUES)
        s = pool[torch.randint(len(SCORE_VALUES), (n,), generator=g)]
    else:
        s = torch.randn(n, generator=g) * 10 ** torch.randint(-20, 20, (n,), generator=g)
    return s, k


# (hist, digit_bits): every count and digit width of top_k_indices (bench/topk.py's ways)
TOP_K_VARIANTS = [(False, d) for d in (1, 2, 3, 4)] + [(True, d) for d in (1, 2, 3, 4, 5, 6, 8)]
top_k_variants = pytest.mark.parametrize(
    "variant", TOP_K_VARIANTS, ids=[f"{'hist' if h else 'cmp'}-d{d}" for h, d in TOP_K_VARIANTS])
# the two the kernel runs by default (top_k.defaults): on the GPU, where each compiles slowly
TOP_K_DEFAULTS = [(False, 1), (True, 5)]
top_k_defaults = pytest.mark.parametrize("variant", TOP_K_DEFAULTS, ids=["cmp-d1", "hist-d5"])


def check_top_k(s, k, variant=(None, None)):
    got = tk.top_k_indices(s, k, digit_bits=variant[1], hist=variant[0])
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert torch.equal(got, tk.top_k_reference(s, k))


@cpu_only
@top_k_variants
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_top_k_interpreter(variant, data):
    check_top_k(*scores_case(data, 3000), variant)


@cpu_only
@top_k_variants
def test_top_k_edge_cases(variant):
    """Every k (0 and N included) of tied special values, one value repeated, all NaN and
    only negatives, at N not a power of two; and the defaults."""
    g = torch.Generator().manual_seed(1)
    pool = torch.tensor(SCORE_VALUES)
    cases = [pool[torch.randint(len(SCORE_VALUES), (777,), generator=g)],
             torch.full((300,), -0.0), torch.full((33,), float("nan")),
             -torch.rand(1000, generator=g) * 10 ** torch.randint(-30, 30, (1000,), generator=g),
             torch.tensor([float("-inf"), -3e38, -1.0, -1e-30, -0.0])]
    for s in cases:
        n = s.numel()
        for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}):
            check_top_k(s, k, variant)
    check_top_k(cases[0], 100)


def test_top_k_reference_is_torch_topk_without_ties():
    s = torch.randperm(5000, generator=torch.Generator().manual_seed(0)).float() - 2500
    for k in (0, 1, 17, 2500, 5000):
        assert torch.equal(tk.top_k_reference(s, k), torch.topk(s, k).indices.sort().values)


@cpu_only
def test_top_k_bad_sizes():
    with pytest.raises(ValueError, match="k=4 of n=3"):
        tk.top_k_indices(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="at most"):
        tk.top_k_indices(torch.zeros(tk.MAX_N + 1), 1)


def check_rows(R, C, n, dtype, device, seed, pad=0):
    """take_rows / put_rows_ against index_select / index_copy_ (copies: equal bits), on
    tensors that may be column slices of wider buffers (row stride != width); put_rows_
    into a poisoned tensor writes exactly the indexed rows (distinct indices)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C + pad, generator=g).to(device, dtype)[:, :C]
    idx = torch.randint(R, (n,), generator=g)
    idx = idx.to(torch.int32 if seed % 2 else torch.int64).to(device)
    assert torch.equal(rk.take_rows(x, idx), x.index_select(0, idx))
    dst = torch.randperm(R, generator=g)[:min(n, R)].to(idx.dtype).to(device)
    src = torch.randn(dst.numel(), C + pad, generator=g).to(device, dtype)[:, :C]
    y = nan_empty((R, C + pad), dtype=dtype, device=device)[:, :C]
    want = y.clone().index_copy_(0, dst.long(), src)
    assert rk.put_rows_(y, dst, src) is y
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())


@cpu_only
@settings(max_examples=15, deadline=None)
@given(R=st.integers(1, 60), C=st.integers(1, 2500), n=st.integers(0, 70), pad=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 99))
def test_rows_interpreter(R, C, n, pad, dtype, seed):
    check_rows(R, C, n, dtype, "cpu", seed, pad)


def test_rows_refuse_what_they_cannot_copy():
    y = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="unit column stride"):
        rk.take_rows(y.t(), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"src must be \[2, 6\]"):
        rk.put_rows_(y, torch.tensor([0, 1]), torch.zeros(2, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestGPU:
    SHAPES = [  # (M, K, N, k): ragged k, odd K/N, one row, and one LLaMA-sized case
        (1, 64, 64, 7), (257, 520, 700, 333), (1000, 1001, 999, 500), (513, 4096, 1024, 77),
        (1024, 4096, 14336, 1433),
    ]

    @pytest.mark.parametrize("product", PRODUCTS)
    @pytest.mark.parametrize("shape", SHAPES)
    def test_products_bf16(self, poisoned_alloc, product, shape):
        M, K, N, k = shape
        a, W, idx = make_case(product, M, K, N, k, torch.bfloat16, "cuda", seed=sum(shape), pad=8)
        for rows in (None, (M // 3, M), torch.arange(0, M, 3, device="cuda", dtype=torch.int32)):
            check_product(product, a, W, idx, rows, torch.bfloat16)

    @pytest.mark.parametrize("shape", [(257, 520, 700, 333), (4096, 4096, 1024, 256), (4096, 4096, 4096, 1024)])
    def test_scattered_product_bf16(self, poisoned_alloc, shape):
        for rows in (None, torch.arange(0, shape[0], 3, device="cuda", dtype=torch.int32)):
            check_scatter(*shape, torch.bfloat16, "cuda", sum(shape), rows)

    @pytest.mark.parametrize("shape", [(4096, 4096, 4096, 1024, 1032), (4096, 4096, 1024, 256, 1032),
                                       (300, 520, 700, 333, 0), (300, 520, 700, 333, 77)])
    @pytest.mark.parametrize("bucket", [0, 64])
    def test_fused_sparse_linear_bf16(self, poisoned_alloc, shape, bucket):
        check_fused_sparse_linear(*shape, bucket, torch.bfloat16, "cuda", sum(shape))

    @pytest.mark.parametrize("product", PRODUCTS)
    def test_products_column_major_weight(self, poisoned_alloc, product):
        # W as Wt.t() (Wt cached contiguous): the column gathers become row gathers.
        a, W, idx = make_case(product, 300, 520, 700, 333, torch.bfloat16, "cuda", seed=2)
        check_product(product, a, W.t().contiguous().t(), idx, (10, 290), torch.bfloat16)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
    @pytest.mark.parametrize("product", PRODUCTS)
    def test_products_other_dtypes(self, poisoned_alloc, product, dtype):
        a, W, idx = make_case(product, 300, 333, 444, 111, dtype, "cuda", seed=1)
        check_product(product, a, W, idx, None, dtype)

    @pytest.mark.parametrize("shape", [(1, 1), (1021, 14336), (4096, 1433)])
    def test_swiglu_bf16(self, shape, monkeypatch):
        check_swiglu(*shape, torch.bfloat16, "cuda", seed=shape[0], monkeypatch=monkeypatch)

    @pytest.mark.parametrize("M,H,r,F", [(1, 64, 8, 100), (4096, 4096, 8, 14336), (777, 512, 32, 1000), (50, 64, 4, 17)])
    def test_estimator_bf16(self, poisoned_alloc, M, H, r, F):
        check_scores(M, H, r, F, torch.bfloat16, "cuda", seed=M)
        check_scores(M, H, r, F, torch.bfloat16, "cuda", seed=M, residual=True)

    @pytest.mark.parametrize("residual", [False, True])
    def test_estimator_zero_weight_runs_bf16(self, poisoned_alloc, residual):
        # Sequences of 512 whose last 128 rows weigh 0 (whole tiles skipped), and ragged runs.
        M = 4 * 512 + 77
        rows = torch.arange(M)
        for seed, zero in enumerate([rows % 512 >= 384, (rows % 97 < 40) | (rows >= 1500)]):
            check_weighted_scores(M, 512, 16, 1000, torch.bfloat16, "cuda", seed, zero, residual)

    @pytest.mark.parametrize("product", PRODUCTS)
    def test_products_fast_launch(self, poisoned_alloc, product):
        """Repeated calls take the direct launch (kernels/launch.py) and give the reference's
        results: a new row count in the same autotune bucket, and A at a 2-byte offset (a
        specialisation of its own, which must not reuse the aligned kernel)."""
        for M, shift in ((300, 0), (310, 0), (300, 1), (290, 1), (300, 0)):
            a, W, idx = make_case(product, M, 520, 700, 333, torch.bfloat16, "cuda", seed=M + shift)
            if shift:
                buf = torch.empty(M, a.shape[1] + 1, device="cuda", dtype=a.dtype)
                a = buf[:, 1:]
                a.copy_(make_case(product, M, 520, 700, 333, torch.bfloat16, "cuda", seed=M)[0])
                assert a.data_ptr() % 16 != 0
            check_product(product, a, W, idx, None, torch.bfloat16)
        aligned = {k[0][0][1] for k in gg._launch_gemm._compiled}
        assert aligned == {True, False}

    @pytest.mark.parametrize("R,C,n", [(1, 64, 1), (4096, 4096, 1032), (4096, 4096, 3064), (333, 1001, 77)])
    def test_rows_bf16(self, R, C, n):
        check_rows(R, C, n, torch.bfloat16, "cuda", seed=n, pad=R % 2)

    @top_k_defaults
    @settings(max_examples=40, deadline=None)
    @given(data=st.data())
    def test_top_k(self, variant, data):
        s, k = scores_case(data, tk.MAX_N)
        check_top_k(s.cuda(), k, variant)

    @pytest.mark.parametrize("n", [1024, 14336, 28672])
    def test_top_k_selects_as_torch_on_estimator_sizes(self, n):
        from sparselora_compile.runtime import selection
        s = torch.rand(n, device="cuda", generator=torch.Generator("cuda").manual_seed(n))
        for k in (1, n // 10, n // 4, n // 2, n - 1):
            got = selection.top_channels(s, k)
            assert torch.equal(got, torch.topk(s, k).indices.sort().values)
        assert tk._launch._compiled  # repeated calls took the direct launch

    def test_swiglu_and_estimator_fast_launch(self, poisoned_alloc, monkeypatch):
        for n in (1021, 1030, 1021):
            check_swiglu(n, 1433, torch.bfloat16, "cuda", seed=n, monkeypatch=monkeypatch)
        for M in (777, 800, 777):
            check_scores(M, 512, 8, 1000, torch.bfloat16, "cuda", seed=M, residual=True)
        assert sw._launch_fwd._compiled and sw._launch_bwd._compiled and fe._launch_scores._compiled
