"""The whole gated MLP as one sparse product, for blocks whose three linears are frozen
and carry no LoRA (the reference's default puts LoRA on q, k, v, o only).

Context rows never materialise a [tokens x d_ff] tensor: g = x W_g[S]^T, u = x W_u[S]^T,
h = silu(g) * u, y = h W_d[:, S]^T, all of width k. Output-token rows run the dense MLP.
The forward also returns g and u of every row, packed into one flat tensor whose length
depends on the token split (dense rows at width d_ff, context rows at width k): the
backward reads them instead of recomputing two GEMMs (on dense rows that recompute was
as costly as the forward's gate/up). That is what autograd saves for the dense MLP too,
so memory stays at most the dense step's. Where the kept channels' products slice the
weights (below gathered.MIN_TRITON_K, and off CUDA), the three slices W_g[S], W_u[S] and
W_d[:, S] follow in that buffer (3 k x hidden, 3.4 MiB a layer at k = 144 on LLaMA-3-8B):
the backward reads them instead of gathering them again (W_d's column gather is the
slowest of the three: it reads scattered 2-byte words).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gathered
from .library import data_dependent_size, fake, op, op_no_grad, register_autocast, register_autograd
from .row_split import RowSplit
from .run import run_of
from .selection import dsilu
from .sparse_linear import split_and_count


def sparse_mlp_reference(x, wg, wu, wd, bg, bu, bd, idx, dense_rows):
    """The definition: dense MLP with h ⊙ 1_S on context rows."""
    from .sparse_linear import mask_reference
    h = F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    return F.linear(mask_reference(h, idx, dense_rows), wd, bd)


def _swiglu(g, u):
    if gathered.use_triton(g) and g.is_contiguous() and u.is_contiguous():
        from .kernels.swiglu import swiglu
        return swiglu(g, u)
    return F.silu(g) * u


def _swiglu_grad(dh, g, u):
    """(dg, du) of h = silu(g) * u."""
    if (gathered.use_triton(g) and dh.is_contiguous() and g.is_contiguous() and u.is_contiguous()
            and dh.dtype == g.dtype):
        from .kernels.swiglu import swiglu_grad
        return swiglu_grad(dh, g, u)
    return dh * u * dsilu(g), dh * F.silu(g)


# Below this many kept channels the context part runs on every row (dense rows too) and
# the dense rows are overwritten afterwards: their extra k columns cost less than copying
# the context rows out of x and back into y (and the same in the backward), two launches
# and two passes over [context rows x hidden] each. By the H200's rates (bf16 GEMMs ~750
# TFLOP/s, copies ~4.3 TB/s) with 1024 of 4096 rows dense on LLaMA-3-8B, the extra FLOPs
# cost as much as the copies near k = 700; 512 keeps a margin and is where the gathered
# GEMMs switch from slice + cuBLAS to Triton (gathered.MIN_TRITON_K). Measured at k = 144:
# 1-3 ms less kernel time per step on the H200. The FLOP statistics (ops._count) count the method's products, not these extra columns (< 1% at k = 144).
ALL_ROWS_MAX_K = 512  # the default of the `mlp_all_rows_max_k` option


def _layout(n_rows, split, idx, d_ff, all_rows_max_k):
    """Per part, in the order they run: (row indices or None for all rows, kept channels or
    None for dense, offset of g in the flat buffer, rows, width); and the buffer's length.
    g and u of a part lie back to back. A part over all rows writes the output directly; a
    part over some rows is copied into it afterwards (over whatever an earlier part wrote)."""
    if split.all_dense or split.all_context:
        sel = None if split.all_dense else idx
        width = d_ff if sel is None else sel.numel()
        return ((None, sel, 0, n_rows, width),), 2 * n_rows * width
    n_dense, k = split.dense.numel(), idx.numel()  # capacities: see RowSplit
    if k < all_rows_max_k:
        off = 2 * n_rows * k
        return ((None, idx, 0, n_rows, k), (split.dense, None, off, n_dense, d_ff)), off + 2 * n_dense * d_ff
    n_ctx, off = split.ctx.numel(), 2 * n_dense * d_ff
    parts = (split.dense, None, 0, n_dense, d_ff), (split.ctx, idx, off, n_ctx, k)
    return parts, off + 2 * n_ctx * k


def _views(saved, off, n, width):
    """g and u of one part, [n, width] each (one as_strided each: slice + view is two ops)."""
    if saved.stride(0) != 1:  # the backward's input; always dense in practice
        saved = saved.contiguous()
    base = saved.storage_offset() + off
    return (saved.as_strided((n, width), (width, 1), base),
            saved.as_strided((n, width), (width, 1), base + n * width))


def _kept(b, sel):
    return b if sel is None else b.index_select(0, sel)


def _sliced(x, idx, parts) -> bool:
    """Whether the kept channels' products slice the weights (see the module doc)."""
    return any(sel is not None for _, sel, *_ in parts) and not gathered.use_triton(x, idx.numel())


def _slices(saved, total, k, n_in, n_out):
    """The saved W_g[S], W_u[S] [k, n_in] and W_d[:, S] [n_out, k] after the (g, u) parts
    (None when the forward did not slice)."""
    if saved.numel() == total:
        return None
    base = saved.storage_offset() + total
    return (saved.as_strided((k, n_in), (n_in, 1), base),
            saved.as_strided((k, n_in), (n_in, 1), base + k * n_in),
            saved.as_strided((n_out, k), (k, 1), base + 2 * k * n_in))


def sparse_mlp_forward(x, wg, wu, wd, bg, bu, bd, idx, split: RowSplit, all_rows_max_k: int = 512):
    """(y, saved): the MLP output and the flat buffer the backward reads ((g, u) of every
    part, then the weight slices when the products slice)."""
    lead, n_out = x.shape[:-1], wd.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    y = x2.new_empty(x2.shape[0], n_out)
    parts, total = _layout(x2.shape[0], split, idx, wg.shape[0], all_rows_max_k)
    sliced = _sliced(x2, idx, parts)
    k = idx.numel()
    saved = x2.new_empty(total + (k * (2 * wg.shape[1] + n_out) if sliced else 0))
    if sliced:
        wg_s, wu_s, wd_s = _slices(saved, total, k, wg.shape[1], n_out)
        torch.index_select(wg, 0, idx, out=wg_s)
        torch.index_select(wu, 0, idx, out=wu_s)
        torch.index_select(wd, 1, idx, out=wd_s)
    for rows, sel, off, n, width in parts:
        g, u = _views(saved, off, n, width)
        xr = x2 if rows is None else gathered.take_rows(x2, rows)
        if sel is None:
            torch.mm(xr, wg.t(), out=g)
            torch.mm(xr, wu.t(), out=u)
        elif sliced:  # straight into the saved buffer: no [rows x k] temporaries and copies
            torch.mm(xr, wg_s.t(), out=g)
            torch.mm(xr, wu_s.t(), out=u)
        else:
            gathered.gather_rows_mm_t(xr, wg, sel, out=g)
            gathered.gather_rows_mm_t(xr, wu, sel, out=u)
        if bg is not None:
            g += _kept(bg, sel)
        if bu is not None:
            u += _kept(bu, sel)
        h = _swiglu(g, u)
        out = y if rows is None else None  # one part: straight into y
        if sel is None:
            yr = torch.mm(h, wd.t(), out=out)
        elif sliced:
            yr = torch.mm(h, wd_s.t(), out=out)
        else:
            yr = gathered.gather_cols_mm_t(h, wd, sel, out=out)
        if bd is not None:
            yr += bd
        if rows is not None:
            gathered.put_rows_(y, rows, yr)
    return y.view(*lead, n_out), saved


def sparse_mlp_grad_input(gy, saved, wg, wu, wd, idx, split: RowSplit, all_rows_max_k: int = 512):
    lead, n_in = gy.shape[:-1], wg.shape[1]
    g2 = gy.reshape(-1, gy.shape[-1])
    gx = g2.new_empty(g2.shape[0], n_in)
    parts, total = _layout(g2.shape[0], split, idx, wg.shape[0], all_rows_max_k)
    if saved.stride(0) != 1:  # the backward's input; always dense in practice
        saved = saved.contiguous()
    slices = _slices(saved, total, idx.numel(), n_in, wd.shape[0])
    for rows, sel, off, n, width in parts:
        g, u = _views(saved, off, n, width)
        gyr = g2 if rows is None else gathered.take_rows(g2, rows)
        if sel is None:
            dh = gyr @ wd
        else:
            dh = gyr @ slices[2] if slices else gathered.gather_cols_mm(gyr, wd, sel)
        dg, du = _swiglu_grad(dh, g, u)
        out = gx if rows is None else None
        if sel is None:
            gxr = torch.mm(dg, wg, out=out).addmm_(du, wu)
        elif slices:
            gxr = torch.mm(dg, slices[0], out=out).addmm_(du, slices[1])
        else:
            gxr = gathered.gather_rows_mm_pair(dg, wg, du, wu, sel, out=out)
        if rows is not None:
            gathered.put_rows_(gx, rows, gxr)
    return gx.view(*lead, n_in)


# ---- the op: forward, input gradient, autograd, autocast --------------------------------

@op
def sparse_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor],
               b_up: Optional[Tensor], b_down: Optional[Tensor], idx: Tensor, dense_rows: Tensor,
               run: int) -> tuple[Tensor, Tensor]:
    """(y, saved): `saved` is the flat (g, u) buffer for the backward (see sparse_mlp.py);
    its length depends on the token split, so the fake reports a data-dependent size."""
    h, f = w_gate.shape[1], w_gate.shape[0]
    st = run_of(run)
    split = split_and_count(st, dense_rows, h, 3 * f, 3 * idx.numel())
    return sparse_mlp_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, idx,
                                       split, st.mlp_all_rows_max_k)


@fake(sparse_mlp)
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, idx, dense_rows, run):
    return x.new_empty((*x.shape[:-1], w_down.shape[0])), x.new_empty((data_dependent_size(),))


@op_no_grad
def sparse_mlp_grad(gy: Tensor, saved: Tensor, w_gate: Tensor, w_up: Tensor,
                    w_down: Tensor, idx: Tensor, dense_rows: Tensor, run: int) -> Tensor:
    st = run_of(run)
    return sparse_mlp_grad_input(gy, saved, w_gate, w_up, w_down, idx,
                                          st.splits.of(dense_rows), st.mlp_all_rows_max_k)


@fake(sparse_mlp_grad)
def _(gy, saved, w_gate, w_up, w_down, idx, dense_rows, run):
    return gy.new_empty((*gy.shape[:-1], w_gate.shape[1]))


def _mlp_setup(ctx, inputs, output):
    # x itself is not saved: the backward needs only g and u (in `saved`).
    x, wg, wu, wd, _bg, _bu, _bd, idx, dense_rows, run = inputs
    ctx.save_for_backward(output[1], wg, wu, wd, idx, dense_rows)
    ctx.x_dtype, ctx.run = x.dtype, run


def _mlp_backward(ctx, gy, _gsaved):
    saved, wg, wu, wd, idx, dense_rows = ctx.saved_tensors
    gx = sparse_mlp_grad(gy, saved, wg, wu, wd, idx, dense_rows, ctx.run).to(ctx.x_dtype)
    return gx, None, None, None, None, None, None, None, None, None


register_autograd(sparse_mlp, _mlp_backward, setup_context=_mlp_setup)
register_autocast(sparse_mlp)
