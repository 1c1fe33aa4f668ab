"""The sparse base products, their input gradients, and slow references.

Rows flagged in `dense_rows` (output tokens, or all rows during the dense warm-up) take
the dense product; the other (context) rows use only the kept channels `idx`:

- out-sparse  y = x W^T, context rows keep output channels idx (others are zero);
- in-sparse   y = h W^T, context rows read only input channels idx;
- mask        h with channels outside idx zeroed on context rows.

The `*_reference` functions state the semantics the slow way (dense, then mask); the
others are the fast path. Elsewhere than CUDA: gathers plus dense GEMMs of width k, rows
and columns moved with index_select / index_copy_ (same values as advanced indexing, less
host time). On CUDA whole rows move by one Triton kernel (kernels/rows.py), and the
out-sparse products (`*_fused`) run the dense rows by cuBLAS, copied into their rows,
and the context rows by one Triton kernel (kernels/gathered_gemm.py) that reads them
from the full-width input and writes them into the full-width output in place: no
copies of the context rows (3/4 of the tokens) in or out. On the H200 that was 0.96-1.76x
the speed of moving the rows on the LLaMA-3-8B shapes measured (1.1x or more on 12 of
18), and slower on the in-sparse products, which stay unfused
(bench/results/sparse_linear_paths*.json).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gathered
from .library import fake, op, op_no_grad, register_autocast, register_autograd
from .row_split import RowSplit, context_rows
from .run import Run, run_of


def _channel_mask(idx, n, like):
    return torch.zeros(n, dtype=like.dtype, device=like.device).index_fill_(0, idx, 1)


def _rows_where(dense_rows, dense, sparse):
    return torch.where(dense_rows.unsqueeze(-1), dense, sparse)


# ---- references: the semantics, computed densely ----------------------------------

def out_sparse_reference(x, w, b, idx, dense_rows):
    y = F.linear(x, w, b)
    return _rows_where(dense_rows, y, y * _channel_mask(idx, w.shape[0], y))


def in_sparse_reference(h, w, b, idx, dense_rows):
    return F.linear(mask_reference(h, idx, dense_rows), w, b)


def mask_reference(h, idx, dense_rows):
    return _rows_where(dense_rows, h, h * _channel_mask(idx, h.shape[-1], h))


# ---- fast path ----------------------------------------------------------------------

def _assemble(like, n_out, split, dense_part, idx, kept):
    """[rows, n_out]: `dense_part` on the dense rows; on context rows `kept` in columns idx
    and zeros elsewhere. Not all context: context rows are built apart and copied in, two
    row copies instead of one 2-D scatter (each of its index tensors costs host time)."""
    if split.all_context:
        return like.new_zeros(like.shape[0], n_out).index_copy_(1, idx, kept)
    ctx = like.new_zeros(kept.shape[0], n_out).index_copy_(1, idx, kept)
    out = gathered.put_rows_(like.new_empty(like.shape[0], n_out), split.dense, dense_part)
    return gathered.put_rows_(out, split.ctx, ctx)


def _stack(like, n_out, split, dense_part, ctx_part):
    """[rows, n_out]: `dense_part` on the dense rows, `ctx_part` on the context rows."""
    if split.all_context:
        return ctx_part
    out = gathered.put_rows_(like.new_empty(like.shape[0], n_out), split.dense, dense_part)
    return gathered.put_rows_(out, split.ctx, ctx_part)


# ---- fused path (CUDA, out-sparse): context rows read and written in place -----------------

def _fused(t, w) -> bool:
    return gathered.use_triton(t) and t.stride(-1) == 1 and t.dtype == w.dtype


def _ctx_rows(split: RowSplit):
    return None if split.all_context else split.ctx


def _dense_rows_into(out, t2, w, split: RowSplit, transposed: bool = False):
    """Rows `split.dense` of `out` <- those rows of t2 times W^T (W with `transposed`)."""
    if not split.all_context:
        t = gathered.take_rows(t2, split.dense)
        gathered.put_rows_(out, split.dense, t @ w if transposed else F.linear(t, w))
    return out


def out_sparse_forward_fused(x2, w, idx, split: RowSplit):
    from .kernels.gathered_gemm import gather_rows_mm_t
    out = gather_rows_mm_t(x2, w, idx, rows=_ctx_rows(split), out=x2.new_zeros(x2.shape[0], w.shape[0]),
                           scatter=True)
    return _dense_rows_into(out, x2, w, split)


def out_sparse_grad_input_fused(g2, w, idx, split: RowSplit):
    # the kept columns of every row gathered first: [rows, k] is narrow, and gathering them
    # inside the kernel was slower
    from .kernels.gathered_gemm import gather_rows_mm
    gx = gather_rows_mm(g2.index_select(1, idx), w, idx, rows=_ctx_rows(split),
                        out=g2.new_empty(g2.shape[0], w.shape[1]))
    return _dense_rows_into(gx, g2, w, split, transposed=True)


def out_sparse_forward(x, w, b, idx, split: RowSplit):
    if split.all_dense:  # the warm-up, or a batch of output tokens only
        return F.linear(x, w, b)
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if b is None and _fused(x2, w):  # a bias only on the kept columns of context rows: unfused
        return out_sparse_forward_fused(x2, w, idx, split).view(*lead, w.shape[0])
    dense = None if split.all_context else F.linear(gathered.take_rows(x2, split.dense), w, b)
    yk = gathered.gather_rows_mm_t(context_rows(x2, split), w, idx)
    if b is not None:
        yk = yk + b.index_select(0, idx)
    return _assemble(x2, w.shape[0], split, dense, idx, yk).view(*lead, w.shape[0])


def out_sparse_grad_input(gy, w, idx, split: RowSplit):
    if split.all_dense:
        return gy @ w
    lead, g2 = gy.shape[:-1], gy.reshape(-1, gy.shape[-1])
    if _fused(g2, w):
        return out_sparse_grad_input_fused(g2, w, idx, split).view(*lead, w.shape[1])
    dense = None if split.all_context else gathered.take_rows(g2, split.dense) @ w
    ctx = gathered.gather_rows_mm(context_rows(g2.index_select(1, idx), split), w, idx)
    return _stack(g2, w.shape[1], split, dense, ctx).view(*lead, w.shape[1])


def in_sparse_forward(h, w, b, idx, split: RowSplit):
    if split.all_dense:
        return F.linear(h, w, b)
    lead, h2 = h.shape[:-1], h.reshape(-1, h.shape[-1])
    dense = None if split.all_context else F.linear(gathered.take_rows(h2, split.dense), w, b)
    ctx = gathered.gather_cols_mm_t(context_rows(h2.index_select(1, idx), split), w, idx)
    if b is not None:
        ctx = ctx + b
    return _stack(h2, w.shape[0], split, dense, ctx).view(*lead, w.shape[0])


def in_sparse_grad_input(gy, w, idx, split: RowSplit):
    if split.all_dense:
        return gy @ w
    lead, g2 = gy.shape[:-1], gy.reshape(-1, gy.shape[-1])
    dense = None if split.all_context else gathered.take_rows(g2, split.dense) @ w
    kept = gathered.gather_cols_mm(context_rows(g2, split), w, idx)
    return _assemble(g2, w.shape[1], split, dense, idx, kept).view(*lead, w.shape[1])


def mask_forward(h, idx, dense_rows):
    return mask_reference(h, idx, dense_rows)


# ---- the ops: forward, input gradient, autograd, autocast ------------------------------

def split_and_count(st: Run, dense_rows, m_cols, n_full, k):
    """The rows' split; counts the FLOPs of one base product (dense rows pay n_full,
    context rows pay k)."""
    split = st.splits.of(dense_rows)
    rows, n_dense = dense_rows.numel(), split.n_dense
    st.count_flops(2 * rows * n_full * m_cols, 2 * (n_dense * n_full + (rows - n_dense) * k) * m_cols)
    return split


@op
def out_sparse_linear(x: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor,
                      dense_rows: Tensor, run: int) -> Tensor:
    split = split_and_count(run_of(run), dense_rows, w.shape[1], w.shape[0], idx.numel())
    return out_sparse_forward(x, w, b, idx, split)


@fake(out_sparse_linear)
def _(x, w, b, idx, dense_rows, run):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@op_no_grad
def out_sparse_grad(gy: Tensor, w: Tensor, idx: Tensor, dense_rows: Tensor, run: int) -> Tensor:
    split = run_of(run).splits.of(dense_rows)
    return out_sparse_grad_input(gy, w.to(gy.dtype), idx, split)


@fake(out_sparse_grad)
def _(gy, w, idx, dense_rows, run):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@op
def in_sparse_linear(h: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor,
                     dense_rows: Tensor, run: int) -> Tensor:
    split = split_and_count(run_of(run), dense_rows, w.shape[0], w.shape[1], idx.numel())
    return in_sparse_forward(h, w, b, idx, split)


@fake(in_sparse_linear)
def _(h, w, b, idx, dense_rows, run):
    return h.new_empty((*h.shape[:-1], w.shape[0]))


@op_no_grad
def in_sparse_grad(gy: Tensor, w: Tensor, idx: Tensor, dense_rows: Tensor, run: int) -> Tensor:
    split = run_of(run).splits.of(dense_rows)
    return in_sparse_grad_input(gy, w.to(gy.dtype), idx, split)


@fake(in_sparse_grad)
def _(gy, w, idx, dense_rows, run):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@op
def mask_channels(h: Tensor, idx: Tensor, dense_rows: Tensor) -> Tensor:
    return mask_forward(h, idx, dense_rows)


@fake(mask_channels)
def _(h, idx, dense_rows):
    return torch.empty_like(h)


# ---- autograd: the frozen weight passes dY @ W_kept back to its input ---------------------

def _save_wd(ctx, inputs, output):
    x, w, b, idx, dense_rows, run = inputs
    ctx.save_for_backward(w, idx, dense_rows)
    ctx.x_dtype, ctx.run = x.dtype, run


def _out_backward(ctx, gy):
    w, idx, dense_rows = ctx.saved_tensors
    return out_sparse_grad(gy, w, idx, dense_rows, ctx.run).to(ctx.x_dtype), None, None, None, None, None


def _in_backward(ctx, gy):
    w, idx, dense_rows = ctx.saved_tensors
    return in_sparse_grad(gy, w, idx, dense_rows, ctx.run).to(ctx.x_dtype), None, None, None, None, None


def _mask_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _mask_backward(ctx, gy):
    idx, dense_rows = ctx.saved_tensors
    return mask_channels(gy, idx, dense_rows), None, None


register_autograd(out_sparse_linear, _out_backward, setup_context=_save_wd)
register_autograd(in_sparse_linear, _in_backward, setup_context=_save_wd)
register_autograd(mask_channels, _mask_backward, setup_context=_mask_setup)
register_autocast(out_sparse_linear)
register_autocast(in_sparse_linear)
