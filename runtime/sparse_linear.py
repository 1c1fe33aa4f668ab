"""The sparse base products, their input gradients, and slow references.

Rows flagged in `dense_rows` (output tokens, or all rows during the dense warm-up) take
the dense product; the other (context) rows use only the kept channels `idx`:

- out-sparse  y = x W^T, context rows keep output channels idx (others are zero);
- in-sparse   y = h W^T, context rows read only input channels idx;
- mask        h with channels outside idx zeroed on context rows.

The `*_reference` functions state the semantics the slow way (dense, then mask); the
others are the fast path: gathers plus dense GEMMs of width k, or the Triton kernels on
CUDA (see dispatch in `gathered`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gathered
from .row_split import context_rows, split_of


def _channel_mask(idx, n, like):
    m = torch.zeros(n, dtype=like.dtype, device=like.device)
    m[idx] = 1
    return m


def _rows_where(dense_rows, dense, sparse):
    return torch.where(dense_rows.reshape(*dense_rows.shape, 1), dense, sparse)


# ---- references: the semantics, computed densely ----------------------------------

def out_sparse_reference(x, w, b, idx, dense_rows):
    y = F.linear(x, w, b)
    return _rows_where(dense_rows, y, y * _channel_mask(idx, w.shape[0], y))


def in_sparse_reference(h, w, b, idx, dense_rows):
    return F.linear(mask_reference(h, idx, dense_rows), w, b)


def mask_reference(h, idx, dense_rows):
    return _rows_where(dense_rows, h, h * _channel_mask(idx, h.shape[-1], h))


# ---- fast path ----------------------------------------------------------------------

def _split(dense_rows):
    s = split_of(dense_rows)
    return s.dense, s.ctx


def out_sparse_forward(x, w, b, idx, dense_rows):
    lead, k_in = x.shape[:-1], x.shape[-1]
    split = split_of(dense_rows)
    if split.all_dense:  # the warm-up, or a batch of output tokens only
        return F.linear(x, w, b)
    x2 = x.reshape(-1, k_in)
    y = x2.new_zeros(x2.shape[0], w.shape[0])
    if not split.all_context:
        y[split.dense] = F.linear(x2[split.dense], w, b)
    yk = gathered.out_sparse_matmul(context_rows(x2, split), w, idx)
    if b is not None:
        yk = yk + b[idx]
    if split.all_context:
        y[:, idx] = yk
    else:
        y[split.ctx[:, None], idx[None, :]] = yk
    return y.reshape(*lead, w.shape[0])


def out_sparse_grad_input(gy, w, idx, dense_rows):
    if split_of(dense_rows).all_dense:
        return gy @ w
    lead = gy.shape[:-1]
    g2 = gy.reshape(-1, gy.shape[-1])
    dense, ctx = _split(dense_rows)
    gx = g2.new_zeros(g2.shape[0], w.shape[1])
    if dense.numel():
        gx[dense] = g2[dense] @ w
    if ctx.numel():
        gx[ctx] = gathered.out_sparse_grad_input(g2[ctx][:, idx], w, idx)
    return gx.reshape(*lead, w.shape[1])


def in_sparse_forward(h, w, b, idx, dense_rows):
    if split_of(dense_rows).all_dense:
        return F.linear(h, w, b)
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    dense, ctx = _split(dense_rows)
    y = h2.new_empty(h2.shape[0], w.shape[0])
    if dense.numel():
        y[dense] = F.linear(h2[dense], w, b)
    if ctx.numel():
        yc = gathered.in_sparse_matmul(h2[ctx][:, idx], w, idx)
        y[ctx] = yc if b is None else yc + b
    return y.reshape(*lead, w.shape[0])


def in_sparse_grad_input(gy, w, idx, dense_rows):
    if split_of(dense_rows).all_dense:
        return gy @ w
    lead = gy.shape[:-1]
    g2 = gy.reshape(-1, gy.shape[-1])
    dense, ctx = _split(dense_rows)
    gh = g2.new_zeros(g2.shape[0], w.shape[1])
    if dense.numel():
        gh[dense] = g2[dense] @ w
    if ctx.numel():
        gh[ctx[:, None], idx[None, :]] = gathered.in_sparse_grad_input(g2[ctx], w, idx)
    return gh.reshape(*lead, w.shape[1])


def mask_forward(h, idx, dense_rows):
    return mask_reference(h, idx, dense_rows)
