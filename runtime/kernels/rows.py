"""Whole rows by index: x[idx] and y[idx] = src, one Triton kernel each.

The sparse ops move the dense rows of a token split between full-height tensors and the
dense products. On the H200 torch's `index_copy_` (a per-element index computation) took
14 us for 1,032 rows of 4,096 bf16 values and `index_select` 7-8 us, against ~4 us that
reading and writing them takes; the sparse MLP makes one of each in its forward and its
backward. Here a program copies a slice of one row, its index read once.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv
from .launch import Launcher

BLOCK = 1024


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, idx_ptr, n_cols, src_stride, dst_stride,
                      GATHER: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    i = tl.load(idx_ptr + r).to(tl.int64)
    src_row = i if GATHER else r.to(tl.int64)
    dst_row = r.to(tl.int64) if GATHER else i
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_cols
    v = tl.load(src_ptr + src_row * src_stride + offs, mask=ok)
    tl.store(dst_ptr + dst_row * dst_stride + offs, v, mask=ok)


_launch = Launcher(_copy_rows_kernel)


def _check(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with unit column stride, got {tuple(t.shape)} "
                         f"strides {t.stride()}")


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for a 2-D x (unit column stride), contiguous."""
    _check(x, "take_rows: x")
    out = x.new_empty(idx.numel(), x.shape[1])
    if out.numel():
        _launch((idx.numel(), cdiv(x.shape[1], BLOCK)), x, out, idx, x.shape[1], x.stride(0),
                out.stride(0), GATHER=True, BLOCK=BLOCK)
    return out


def put_rows_(y: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """y[idx] = src in place (rows of src in idx's order; a repeated index must bring equal
    rows, as the split's padding copies do); returns y."""
    _check(y, "put_rows_: y")
    _check(src, "put_rows_: src")
    if src.shape != (idx.numel(), y.shape[1]) or src.dtype != y.dtype:
        raise ValueError(f"put_rows_: src must be [{idx.numel()}, {y.shape[1]}] {y.dtype}, got "
                         f"{tuple(src.shape)} {src.dtype}")
    if src.numel():
        _launch((idx.numel(), cdiv(y.shape[1], BLOCK)), src, y, idx, y.shape[1], src.stride(0),
                y.stride(0), GATHER=False, BLOCK=BLOCK)
    return y
