"""The whole gated MLP as one sparse product, for blocks whose three linears are frozen
and carry no LoRA (the reference's default puts LoRA on q, k, v, o only).

Context rows never materialise a [tokens x d_ff] tensor: g = x W_g[S]^T, u = x W_u[S]^T,
h = silu(g) * u, y = h W_d[:, S]^T, all of width k. Output-token rows run the dense MLP.
The forward also returns g and u of every row, packed into one flat tensor whose length
depends on the token split (dense rows at width d_ff, context rows at width k): the
backward reads them instead of recomputing two GEMMs (on dense rows that recompute was
as costly as the forward's gate/up). That is what autograd saves for the dense MLP too,
so memory stays at most the dense step's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gathered
from .row_split import split_of
from .selection import dsilu


def _add_bias(t, b, idx=None):
    """t + b (b[idx] with idx); t itself when there is no bias (no extra pass over t)."""
    if b is None:
        return t
    return t + (b if idx is None else b[idx])


def sparse_mlp_reference(x, wg, wu, wd, bg, bu, bd, idx, dense_rows):
    """The definition: dense MLP with h ⊙ 1_S on context rows."""
    from .sparse_linear import mask_reference
    h = F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    return F.linear(mask_reference(h, idx, dense_rows), wd, bd)


def _swiglu(g, u):
    if gathered._use_triton(g) and g.is_contiguous() and u.is_contiguous():
        from .kernels.swiglu import swiglu
        return swiglu(g, u)
    return F.silu(g) * u


def _swiglu_grad(dh, g, u):
    """(dg, du) of h = silu(g) * u."""
    if gathered._use_triton(g) and all(t.is_contiguous() for t in (dh, g, u)) and dh.dtype == g.dtype:
        from .kernels.swiglu import swiglu_grad
        return swiglu_grad(dh, g, u)
    return dh * u * dsilu(g), dh * F.silu(g)


def _parts(n_rows, split, idx):
    """(row indices or None for all rows, kept channels or None for dense) per part."""
    if split.all_dense:
        return [(None, None)]
    if split.all_context:
        return [(None, idx)]
    return [(split.dense, None), (split.ctx, idx)]


def _take(t, rows):
    return t if rows is None else t.index_select(0, rows)


def _put(out, rows, value):
    if rows is None:
        out.copy_(value)
    else:
        out.index_copy_(0, rows, value)


def _saved_layout(n_rows, split, idx, d_ff):
    """Per part: (rows, kept channels, offset of g in the flat buffer, width); and the total."""
    layout, off = [], 0
    for rows, sel in _parts(n_rows, split, idx):
        n = n_rows if rows is None else rows.numel()
        width = d_ff if sel is None else sel.numel()
        layout.append((rows, sel, off, n, width))
        off += 2 * n * width
    return layout, off


def _views(saved, off, n, width):
    g = saved[off: off + n * width].view(n, width)
    return g, saved[off + n * width: off + 2 * n * width].view(n, width)


def sparse_mlp_forward(x, wg, wu, wd, bg, bu, bd, idx, dense_rows):
    """(y, saved): the MLP output and the flat (g, u) buffer the backward reads."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = x2.new_empty(x2.shape[0], wd.shape[0])
    layout, total = _saved_layout(x2.shape[0], split_of(dense_rows), idx, wg.shape[0])
    saved = x2.new_empty(total)
    for rows, sel, off, n, width in layout:
        g, u = _views(saved, off, n, width)
        xr = _take(x2, rows)
        if sel is None:
            torch.mm(xr, wg.t(), out=g)
            torch.mm(xr, wu.t(), out=u)
        else:  # straight into the saved buffer: no [rows x k] temporaries and copies
            gathered.out_sparse_matmul(xr, wg, sel, out=g)
            gathered.out_sparse_matmul(xr, wu, sel, out=u)
        if bg is not None:
            g += bg if sel is None else bg[sel]
        if bu is not None:
            u += bu if sel is None else bu[sel]
        h = _swiglu(g, u)
        yr = F.linear(h, wd) if sel is None else gathered.in_sparse_matmul(h, wd, sel)
        _put(y, rows, _add_bias(yr, bd))
    return y.reshape(*lead, wd.shape[0]), saved


def sparse_mlp_grad_input(gy, saved, wg, wu, wd, idx, dense_rows):
    lead = gy.shape[:-1]
    g2 = gy.reshape(-1, gy.shape[-1])
    gx = g2.new_empty(g2.shape[0], wg.shape[1])
    layout, _ = _saved_layout(g2.shape[0], split_of(dense_rows), idx, wg.shape[0])
    for rows, sel, off, n, width in layout:
        g, u = _views(saved, off, n, width)
        gyr = _take(g2, rows)
        dh = gyr @ wd if sel is None else gathered.in_sparse_grad_input(gyr, wd, sel)
        dg, du = _swiglu_grad(dh, g, u)
        if sel is None:
            _put(gx, rows, (dg @ wg).addmm_(du, wu))
        else:
            _put(gx, rows, gathered.out_sparse_grad_input_pair(dg, wg, du, wu, sel))
    return gx.reshape(*lead, wg.shape[1])
