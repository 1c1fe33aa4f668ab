"""Dispatch for the gathered GEMMs: Triton kernels on CUDA, plain PyTorch elsewhere.

Plain PyTorch slices the frozen weight (`W[idx]`) and calls the dense GEMM; the Triton
kernels read the kept rows/columns inside the kernel and copy nothing. The slices use
`index_select` (same values and layout as `W[idx]`; advanced indexing costs more host time).

Rule: the row-gathering kernels run from k = 512 kept channels; below that, on narrow
weights (q, k, v), too few output tiles fill the GPU and slicing plus cuBLAS wins
(bench/README.md, "Kernels", has the measurements and what they leave open). This serves
the frozen MLP (sparse_mlp.py) and the out-sparse linears with a bias; without a bias
those take sparse_linear.py's fused path, which calls the kernel at any k (it saves the
row copies). Column gathers on a row-major W (in-sparse) read scattered 2-byte words and
lose 5-15x, so they slice + cuBLAS.
"""
from __future__ import annotations

import functools
import os

import torch


MIN_TRITON_K = 512


def use_triton(t: torch.Tensor, k: int | None = None) -> bool:
    # Called several times per op: the cheap attribute tests first, the environment (read
    # at call time, so a test or a run can switch it) only on the way to a kernel.
    if not t.is_cuda or (k is not None and k < MIN_TRITON_K):
        return False
    return _triton_imports() and os.environ.get("SPARSELORA_DISABLE_TRITON") != "1"


@functools.cache
def _triton_imports() -> bool:
    # On a CUDA tensor triton_available() is whether triton imports: fixed for the process,
    # and a failing import costs tens of microseconds each time.
    from .kernels import triton_available
    return triton_available()


def gather_rows_mm_t(x, w, idx, out=None):
    """x @ W[idx]^T -> [M, k], written into `out` when given"""
    if use_triton(x, idx.numel()):
        from .kernels.gathered_gemm import gather_rows_mm_t as kernel
        return kernel(x, w, idx, out=out)
    return torch.mm(x, w.index_select(0, idx).t(), out=out)


def gather_rows_mm(gy_kept, w, idx, out=None):
    """gy_kept @ W[idx] -> [M, K], written into `out` when given"""
    if use_triton(gy_kept, idx.numel()):
        from .kernels.gathered_gemm import gather_rows_mm as kernel
        return kernel(gy_kept, w, idx, out=out)
    return torch.mm(gy_kept, w.index_select(0, idx), out=out)


def gather_rows_mm_pair(gy_a, w_a, gy_b, w_b, idx, out=None):
    """gy_a @ W_a[idx] + gy_b @ W_b[idx] (the gate and up products share their channels),
    written into `out` when given"""
    if use_triton(gy_a, idx.numel()):
        out = gather_rows_mm(gy_a, w_a, idx, out=out)
        return out.add_(gather_rows_mm(gy_b, w_b, idx))
    # no [M, K] temporary and add
    return torch.mm(gy_a, w_a.index_select(0, idx), out=out).addmm_(gy_b, w_b.index_select(0, idx))


def _rows_by_kernel(*ts) -> bool:
    return use_triton(ts[0]) and all(t.dim() == 2 and t.stride(1) == 1 for t in ts)


def take_rows(x, rows):
    """x[rows] of a 2-D x: one Triton kernel on CUDA (kernels/rows.py), index_select elsewhere."""
    if _rows_by_kernel(x):
        from .kernels.rows import take_rows as kernel
        return kernel(x, rows)
    return x.index_select(0, rows)


def put_rows_(y, rows, src):
    """y[rows] = src in place, returns y: one Triton kernel on CUDA (kernels/rows.py),
    index_copy_ elsewhere."""
    if _rows_by_kernel(y, src) and src.dtype == y.dtype:
        from .kernels.rows import put_rows_ as kernel
        return kernel(y, rows, src)
    return y.index_copy_(0, rows, src)


def gather_cols_mm_t(h_kept, w, idx, out=None):
    """h_kept @ W[:, idx]^T -> [M, N], written into `out` when given"""
    return torch.mm(h_kept, w.index_select(1, idx).t(), out=out)


def gather_cols_mm(gy, w, idx):
    """gy @ W[:, idx] -> [M, k]"""
    return gy @ w.index_select(1, idx)
