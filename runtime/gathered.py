"""Dispatch for the gathered GEMMs: Triton kernels on CUDA, plain PyTorch elsewhere.

Plain PyTorch slices the frozen weight (`W[idx]`) and calls the dense GEMM; the Triton
kernels read the kept rows/columns inside the kernel and copy nothing.
"""
from __future__ import annotations

import os

import torch


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda or os.environ.get("SPARSELORA_DISABLE_TRITON") == "1":
        return False
    from .kernels import triton_available
    return triton_available()


def out_sparse_matmul(x, w, idx):
    """x @ W[idx]^T -> [M, k]"""
    if _use_triton(x):
        from .kernels.gathered_gemm import out_sparse_matmul as kernel
        return kernel(x, w, idx)
    return x @ w[idx].t()


def out_sparse_grad_input(gy_kept, w, idx):
    """gy_kept @ W[idx] -> [M, K]"""
    if _use_triton(gy_kept):
        from .kernels.gathered_gemm import out_sparse_grad_input as kernel
        return kernel(gy_kept, w, idx)
    return gy_kept @ w[idx]


def in_sparse_matmul(h_kept, w, idx):
    """h_kept @ W[:, idx]^T -> [M, N]"""
    if _use_triton(h_kept):
        from .kernels.gathered_gemm import in_sparse_matmul as kernel
        return kernel(h_kept, w, idx)
    return h_kept @ w[:, idx].t()


def in_sparse_grad_input(gy, w, idx):
    """gy @ W[:, idx] -> [M, k]"""
    if _use_triton(gy):
        from .kernels.gathered_gemm import in_sparse_grad_input as kernel
        return kernel(gy, w, idx)
    return gy @ w[:, idx]
