"""W[:, idx] of a row-major matrix, by one Triton kernel.

The sparse MLP slices W_down's kept columns once per block per step. `index_select` along
dim 1 runs torch's generic gather (an index computation per element): 14.6 us for 144 of
14,336 columns of a [4,096 x 14,336] bf16 weight in the graphed step on the H200. Here a
program copies a tile of rows for a tile of kept columns; each column index is loaded
once per tile.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv
from .launch import Launcher

BLOCK_R, BLOCK_K = 32, 64


@triton.jit
def _select_cols_kernel(w_ptr, idx_ptr, out_ptr, R, K, stride_w, stride_out,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.load(idx_ptr + ks, mask=ks < K, other=0)
    ok = (rows[:, None] < R) & (ks[None, :] < K)
    r64 = rows[:, None].to(tl.int64)
    v = tl.load(w_ptr + r64 * stride_w + cols[None, :], mask=ok)
    tl.store(out_ptr + r64 * stride_out + ks[None, :], v, mask=ok)


_launch = Launcher(_select_cols_kernel)


def select_cols(w: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """w[:, idx] ([R, k], row-major) for a 2-D w with unit column stride; into `out` (its
    columns unit-strided too) when given."""
    r, k = w.shape[0], idx.numel()
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"select_cols: a 2-D weight with unit column stride, got {tuple(w.shape)} "
                         f"strides {w.stride()}")
    if out is None:
        out = w.new_empty(r, k)
    elif tuple(out.shape) != (r, k) or out.stride(1) != 1 or out.dtype != w.dtype:
        raise ValueError(f"select_cols: out must be [{r}, {k}] {w.dtype} with unit column stride")
    if r and k:
        _launch((cdiv(r, BLOCK_R), cdiv(k, BLOCK_K)), w, idx, out, r, k, w.stride(0), out.stride(0),
                BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return out
