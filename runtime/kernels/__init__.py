"""Triton kernels for the sparse products and the fused estimator.

Importing this package does not import triton (TRITON_INTERPRET must be set before that
happens); import `.gathered_gemm` / `.fused_estimator` once `triton_available()` says so.
Dispatch (Triton on CUDA, plain PyTorch on CPU) lives in runtime/ops.py.
"""
from ._common import triton_available

__all__ = ["triton_available"]
