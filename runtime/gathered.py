"""Dispatch for the gathered GEMMs: Triton kernels on CUDA, plain PyTorch elsewhere.

Plain PyTorch slices the frozen weight (`W[idx]`) and calls the dense GEMM; the Triton
kernels read the kept rows/columns inside the kernel and copy nothing.

Rule (from bench/results/kernels.json, H200 bf16): the row-gathering kernels
(out-sparse forward and its input gradient) win over slice + cuBLAS once k >= 512 kept
channels; below that too few output tiles fill the GPU. Column gathers on a row-major W
(in-sparse) read scattered 2-byte words and lose 5-10x, so they slice + cuBLAS.
"""
from __future__ import annotations

import os

import torch


MIN_TRITON_K = 512


def _use_triton(t: torch.Tensor, k: int | None = None) -> bool:
    if not t.is_cuda or os.environ.get("SPARSELORA_DISABLE_TRITON") == "1":
        return False
    if k is not None and k < MIN_TRITON_K:
        return False
    from .kernels import triton_available
    return triton_available()


def out_sparse_matmul(x, w, idx, out=None):
    """x @ W[idx]^T -> [M, k], written into `out` when given"""
    if _use_triton(x, idx.numel()):
        from .kernels.gathered_gemm import out_sparse_matmul as kernel
        return kernel(x, w, idx, out=out)
    return torch.mm(x, w[idx].t(), out=out)


def out_sparse_grad_input(gy_kept, w, idx):
    """gy_kept @ W[idx] -> [M, K]"""
    if _use_triton(gy_kept, idx.numel()):
        from .kernels.gathered_gemm import out_sparse_grad_input as kernel
        return kernel(gy_kept, w, idx)
    return gy_kept @ w[idx]


def out_sparse_grad_input_pair(gy_a, w_a, gy_b, w_b, idx):
    """gy_a @ W_a[idx] + gy_b @ W_b[idx] (the gate and up products share their channels)"""
    if _use_triton(gy_a, idx.numel()):
        return out_sparse_grad_input(gy_a, w_a, idx).add_(out_sparse_grad_input(gy_b, w_b, idx))
    return (gy_a @ w_a[idx]).addmm_(gy_b, w_b[idx])  # no [M, K] temporary and add


def in_sparse_matmul(h_kept, w, idx):
    """h_kept @ W[:, idx]^T -> [M, N]"""
    return h_kept @ w[:, idx].t()


def in_sparse_grad_input(gy, w, idx):
    """gy @ W[:, idx] -> [M, k]"""
    return gy @ w[:, idx]
