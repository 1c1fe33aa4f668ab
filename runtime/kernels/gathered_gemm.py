"""Gathered GEMMs: products with a frozen nn.Linear weight W [N, K] restricted to kept channels.

One Triton kernel computes C[rows] = A[rows] @ B, where B is a *view* of W whose row index
(the reduction axis) or column index (the output axis) may go through `idx`. The four
products of a sparse linear are the four ways to read W:

    gather_rows_mm_t       x  [M,K] @ W[idx].T      gather output rows of W  (coalesced)
    gather_cols_mm_t        h  [M,k] @ W[:,idx].T    gather reduction cols    (strided)
    gather_rows_mm   dy [M,k] @ W[idx]        gather reduction rows    (coalesced)
    gather_cols_mm    dy [M,N] @ W[:,idx]      gather output cols       (strided)

W is never copied or sliced on the host. W may be any strided [N, K] view: a column gather
(in_sparse_*) reads scattered elements of a row-major W, which is slow; pass `Wt.t()` with
`Wt = W.t().contiguous()` cached once (W is frozen) and the same kernel reads whole rows of Wt.
`rows` (int tensor, or a (start, stop) span) picks the rows of A that are read and of C
that are written, so context tokens need no copy of x; rows outside it are zero unless
`out` is given, in which case they are left as they were.

`gather_rows_mm_t(..., scatter=True)` writes the kept outputs into columns idx of a
full-width [M,N] output instead, so the context rows of an out-sparse linear need no
zero-padded temporary and copy (runtime/sparse_linear.py's fused path). A gather of A's
reduction columns inside the kernel was 2.2-6.2x slower than gathering them first from
144 kept channels up (bench/results/sparse_linear_paths_gather_in_kernel.json), so there
is none.
Every product has a `*_reference` next to it in plain PyTorch: the definition it is tested against.
"""
import os

import torch
import triton
import triton.language as tl

from ._common import autotune_bench, cdiv, dot_precision, interpreting, m_bucket
from .launch import Launcher


_empty = torch.empty  # module attribute so tests can poison fresh outputs with NaN


def round_k(k: int, multiple: int = 64, limit: int | None = None) -> int:
    """Round a kept-channel count up to the GEMM tile (so no tile runs half empty), capped at `limit`."""
    if k <= 0:
        return 0
    k = -(-k // multiple) * multiple
    return min(k, limit) if limit is not None else k


def _configs():
    if os.environ.get("SPARSELORA_KERNELS_TUNE", "1") == "0":  # tests: one config, fewer compiles
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4)]
    if interpreting():  # one small config: CPU tests stay fast and still cross tile edges
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    c = triton.Config
    return [  # Hopper; few configs because every new (M bucket, N, R) key re-tunes, and each compiles
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "R", "GATHER_R", "GATHER_N", "SCATTER_N"],
                 do_bench=autotune_bench)
@triton.heuristics({"EVEN_K": lambda a: a["R"] % a["BLOCK_K"] == 0})
# M changes every step: no recompiles for it. N and R stay specialized: `% N` and `< R` keep their
# vector width only when N, R % 16 == 0 is known at compile time (unspecialized N cost 8x on H200).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gathered_gemm_kernel(
    a_ptr, b_ptr, c_ptr, ridx_ptr, nidx_ptr, rows_ptr,
    M, N, R,
    stride_am, stride_ar, stride_br, stride_bn, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only: M changes every step, its power-of-two bucket rarely does
    GATHER_R: tl.constexpr, GATHER_N: tl.constexpr, HAS_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    SCATTER_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grouped tile order so neighbouring programs share B tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap (not mask) M/N tails on loads: the loop stays mask-free along M/N, the store masks.
    m_in = offs_m % M
    n_in = offs_n % N
    if HAS_ROWS:
        a_row = tl.load(rows_ptr + m_in).to(tl.int64)
    else:
        a_row = m_in.to(tl.int64)
    if GATHER_N or SCATTER_N:
        n_idx = tl.load(nidx_ptr + n_in).to(tl.int64)
    if GATHER_N:
        b_col = n_idx * stride_bn
    else:
        b_col = n_in.to(tl.int64) * stride_bn
    a_base = a_ptr + a_row[:, None] * stride_am
    b_base = b_ptr + b_col[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if GATHER_R:
            if EVEN_K:
                b_row = tl.load(ridx_ptr + offs_k).to(tl.int64) * stride_br
            else:  # wrap the tail index; its B row is masked to zero below
                b_row = tl.load(ridx_ptr + offs_k % R).to(tl.int64) * stride_br
        else:
            b_row = offs_k * stride_br
        a_ptrs = a_base + offs_k[None, :] * stride_ar
        b_ptrs = b_base + b_row[:, None]
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < R
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_ROWS:
        c_row = a_row
    else:
        c_row = offs_m.to(tl.int64)
    if SCATTER_N:
        c_col = n_idx
    else:
        c_col = offs_n.to(tl.int64)
    c_ptrs = c_ptr + c_row[:, None] * stride_cm + c_col[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_launch_gemm = Launcher(_gathered_gemm_kernel)


def _rows_view(a, out, rows):
    """Turn `rows` into (A view, C view, row-index tensor or None, count); a span is a pure view."""
    if rows is None:
        return a, out, None
    if isinstance(rows, (tuple, list)):
        start, stop = rows
        return a[start:stop], out[start:stop], None
    return a, out, rows


def _launch(a, w, idx, n_out, gather_r, gather_n, w_r_stride, w_n_stride, rows, out,
            scatter=False, out_width=None):
    """C = A @ B with B[r, n] = W[gr(r) * w_r_stride + gn(n) * w_n_stride] (strides in elements).
    `scatter`: C's column n is idx[n] of an output `out_width` wide (columns outside idx are
    left as they are)."""
    assert a.dim() == 2 and w.dim() == 2 and a.dtype == w.dtype, "A and W: 2-D, same dtype"
    assert a.stride(-1) == 1, "A must have contiguous rows"
    idx = idx.contiguous()
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int64)
    m_total, width = a.shape[0], out_width or n_out
    if out is None:
        # Zero only when some rows or columns will not be written.
        alloc = torch.zeros if rows is not None or scatter else _empty
        out = alloc((m_total, width), device=a.device, dtype=a.dtype)
    assert out.shape == (m_total, width) and out.dtype == a.dtype
    a_v, c_v, row_idx = _rows_view(a, out, rows)
    m = row_idx.numel() if row_idx is not None else a_v.shape[0]
    r = a_v.shape[1]
    if m == 0 or n_out == 0:
        return out
    if r == 0:  # an empty reduction: the written part is zero
        sel = slice(None) if row_idx is None else row_idx.long()[:, None]
        c_v[sel, idx.long()[None, :] if scatter else slice(None)] = 0
        return out
    if row_idx is not None:
        row_idx = row_idx.contiguous()
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n_out, meta["BLOCK_N"]),)
    _launch_gemm(
        grid, a_v, w, c_v, idx, idx, row_idx if row_idx is not None else idx,
        m, n_out, r,
        a_v.stride(0), a_v.stride(1), w_r_stride, w_n_stride, c_v.stride(0), c_v.stride(1),
        m_bucket(m),
        GATHER_R=gather_r, GATHER_N=gather_n, HAS_ROWS=row_idx is not None,
        PRECISION=dot_precision(a.dtype), SCATTER_N=scatter,
    )
    return out


def gather_rows_mm_t(x, W, idx, rows=None, out=None, scatter=False):
    """x [M,K] @ W[idx].T -> [M,k]: only the kept output channels of the linear. `scatter`:
    into columns idx of an [M,N] output instead (the others zero, or as they were in `out`)."""
    return _launch(x, W, idx, idx.numel(), False, True, W.stride(1), W.stride(0), rows, out,
                   scatter=scatter, out_width=W.shape[0] if scatter else None)


def gather_cols_mm_t(h_kept, W, idx, rows=None, out=None):
    """h_kept [M,k] @ W[:, idx].T -> [M,N]: the reduction runs over the kept input channels only."""
    assert h_kept.shape[1] == idx.numel()
    return _launch(h_kept, W, idx, W.shape[0], True, False, W.stride(1), W.stride(0), rows, out)


def gather_rows_mm(dy_kept, W, idx, rows=None, out=None):
    """dy_kept [M,k] @ W[idx] -> [M,K]: input gradient of gather_rows_mm_t."""
    assert dy_kept.shape[1] == idx.numel()
    return _launch(dy_kept, W, idx, W.shape[1], True, False, W.stride(0), W.stride(1), rows, out)


def gather_cols_mm(dy, W, idx, rows=None, out=None):
    """dy [M,N] @ W[:, idx] -> [M,k]: input gradient of gather_cols_mm_t."""
    return _launch(dy, W, idx, idx.numel(), False, True, W.stride(0), W.stride(1), rows, out)


# ---- plain-PyTorch references: the definitions (fp32 math, output in the input dtype) ----

def _ref(a, b, rows, out, n_out):
    if out is None:
        out = torch.zeros((a.shape[0], n_out), device=a.device, dtype=a.dtype)
    else:
        out = out.clone()
    if rows is None:
        sel = slice(None)
    elif isinstance(rows, (tuple, list)):
        sel = slice(*rows)
    else:
        sel = rows.long()
    out[sel] = (a[sel].float() @ b.float()).to(a.dtype)
    return out


def gather_rows_mm_t_reference(x, W, idx, rows=None, out=None):
    return _ref(x, W[idx.long()].T, rows, out, idx.numel())


def gather_cols_mm_t_reference(h_kept, W, idx, rows=None, out=None):
    return _ref(h_kept, W[:, idx.long()].T, rows, out, W.shape[0])


def gather_rows_mm_reference(dy_kept, W, idx, rows=None, out=None):
    return _ref(dy_kept, W[idx.long()], rows, out, W.shape[1])


def gather_cols_mm_reference(dy, W, idx, rows=None, out=None):
    return _ref(dy, W[:, idx.long()], rows, out, idx.numel())


def _scatter_ref(a, b, idx, rows, out, width):
    full = torch.zeros((a.shape[0], width), device=a.device, dtype=a.dtype)
    kept = _ref(a, b, rows, None, idx.numel())
    full[:, idx.long()] = kept
    written = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    written[slice(*rows) if isinstance(rows, (tuple, list)) else (slice(None) if rows is None else rows.long())] = True
    if out is None:
        return full
    out = out.clone()
    cols = torch.zeros(width, dtype=torch.bool, device=a.device)
    cols[idx.long()] = True
    return torch.where(written[:, None] & cols[None, :], full, out)


def gather_rows_mm_t_scatter_reference(x, W, idx, rows=None, out=None):
    return _scatter_ref(x, W[idx.long()].T, idx, rows, out, W.shape[0])
