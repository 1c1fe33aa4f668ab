"""torch.library ops that the rewritten graph calls.

Everything data-dependent (the token split, the dense warm-up switch, top-k) happens
inside these opaque ops, so the compiled graph keeps static shapes and never recompiles
when the step schedule flips from dense to sparse. Each op has a fake (meta) kernel;
the sparse products have autograd (their backward is an op too, so AOT tracing never
sees the data-dependent row split) and an autocast rule that follows the active
autocast dtype.

The ops are registered with the plain torch.library calls (define, impl, register_fake,
register_autograd), not `torch.library.custom_op`: its per-call Python layers (an autograd
wrapper that redispatches, also for ops without a backward; a Dynamo-disable context; an
output-aliasing check) cost tens of microseconds of host time, and the graph calls these
ops per layer per step. The kernels run eagerly or inside compiled graphs, which Dynamo and
AOT autograd already run with Dynamo off, and no output aliases an input. Ops without a
backward (selections, token split, input gradients) take PyTorch's autograd fallback:
backprop through an input gradient (double backward, unsupported) warns where custom_op
raised.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import scores, selection, sparse_linear
from . import sparse_mlp as mlp_impl
from .run import Run, run_of

_lib = torch.library.Library("sparselora", "FRAGMENT")


def _define(fn, kernel):
    """`sparselora::<fn's name>` with the schema of fn's annotations (inferred as custom_op
    does, with its pt2_compliant tag) and `kernel` for every device; returns its OpOverload."""
    name = fn.__name__
    _lib.define(name + torch.library.infer_schema(fn, mutates_args=()),
                tags=(torch.Tag.pt2_compliant_tag,))
    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    return getattr(torch.ops.sparselora, name).default


def _op(fn):
    """An op with a backward (register_autograd): its autograd layer runs fn below autograd."""
    return _define(fn, fn)


def _op_no_grad(fn):
    """An op without a backward: PyTorch's autograd fallback calls the kernel with autograd
    on, so the kernel turns it off, as custom_op's autograd layer did (nothing in it may
    record a graph: out= products, moments, recorded selections)."""
    def kernel(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        with torch.no_grad():
            return fn(*args)
    return _define(fn, kernel)


def _fake(op):
    return torch.library.register_fake(op, lib=_lib)


# ---- token split ----------------------------------------------------------------------

def dense_token_rows(labels: Tensor) -> Tensor:
    """Output tokens: supervised positions (labels != -100) and the position before each
    of them, which predicts it (HF shifts labels inside the loss)."""
    sup = labels != -100
    nxt = torch.zeros_like(sup)
    nxt[..., :-1] = sup[..., 1:]
    return sup | nxt


def _from_state(t, shape, device):
    return t.to(device) if t is not None and tuple(t.shape) == tuple(shape) else None


def shared_token_rows(st: Run, labels, attention_mask, shape, device) -> Tensor:
    """This forward's dense-row mask with its split computed (one `nonzero` sync), shared
    by every layer's graph; made on first use, or by the wrapper before the model runs,
    when the GPU queue is short and the sync costs least."""
    key = (st.forward_id, tuple(shape), device, st.sparse_now())
    if st.forward_id and st.shared_rows is not None and st.shared_rows[0] == key:
        return st.shared_rows[1]
    if labels is None:
        labels = _from_state(st.labels, shape, device)
    if attention_mask is None:
        attention_mask = _from_state(st.attention_mask, shape, device)
    if not st.sparse_now():
        rows = torch.ones(shape, dtype=torch.bool, device=device)
    elif labels is None or not st.dense_output_tokens:
        if labels is None and st.dense_output_tokens and "no labels" not in st.said:
            st.said.add("no labels")
            warnings.warn("sparselora: the batch's labels did not reach the sparse layers, so "
                          "output tokens are computed sparse as well; use slc.compile(model, "
                          "policy), which hands them over, or run.set_labels(labels) before "
                          "the forward", stacklevel=2)
        rows = torch.zeros(shape, dtype=torch.bool, device=device)
    else:
        rows = dense_token_rows(labels).reshape(shape).clone()
    st.splits.compute(rows, None if attention_mask is None else attention_mask.reshape(shape) == 0)
    if st.forward_id:
        st.shared_rows = (key, rows)
    return rows


@_op_no_grad
def token_rows(labels: Optional[Tensor], attention_mask: Optional[Tensor], x: Tensor,
               run: int) -> Tensor:
    """Bool [*x.shape[:-1]]: True for rows computed densely. Labels and the attention mask
    come from the graph, or from the state when the graph does not see them."""
    st = run_of(run)
    rows = shared_token_rows(st, labels, attention_mask, x.shape[:-1], x.device)
    if st.forward_id:  # an op's output must not alias another call's: a clone, same split
        copy = rows.clone()
        st.splits.alias(copy, rows)
        return copy
    return rows


@_fake(token_rows)
def _(labels, attention_mask, x, run):
    return x.new_empty(x.shape[:-1], dtype=torch.bool)


# ---- selection ----------------------------------------------------------------------

def _record(st, name, **tensors):
    # not a checkpoint's recomputation in backward: same values, and a regional graph's
    # layer path is only known during the forward
    if st.record is not None and torch._C._current_graph_task_id() == -1:
        st.record[name] = {k: v.detach().clone() for k, v in tensors.items()}


@_op_no_grad
def select_mlp(x: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor, b_up: Tensor,
               res_gate: Tensor, res_up: Tensor, dense_rows: Tensor, k: int, run: int,
               name: str) -> Tensor:
    """Top-k intermediate channels by the estimator score; `res_gate`/`res_up` [d_ff] are
    the residual variances (`estimator.residual_variance`, zeros for plain SVD)."""
    st = run_of(run)
    name = st.block_name(name)
    st.collect_input(name, x)
    if st.sparse_now():
        s = scores.mlp_scores(x, a_gate, b_gate, a_up, b_up, res_gate, res_up,
                              st.splits.of(dense_rows), st.joined)
        idx = selection.top_channels(s, k)
    else:  # every row is dense (token_rows): no op reads the selection, skip the estimator
        idx = torch.arange(k, device=x.device)
    _record(st, name, idx=idx, dense_rows=dense_rows)
    return idx


@_fake(select_mlp)
def _(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, dense_rows, k, run, name):
    return x.new_empty((k,), dtype=torch.int64)


@_op_no_grad
def select_attention(x: Tensor, a_q: Tensor, b_q: Tensor, a_k: Tensor, b_k: Tensor,
                     a_v: Tensor, b_v: Tensor, dense_rows: Tensor, k_qk: int, k_v: int,
                     n_heads: int, n_kv_heads: int, head_dim: int, run: int,
                     name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = run_of(run)
    name = st.block_name(name)
    st.collect_input(name, x)
    if st.sparse_now():
        out = selection.attention_selection(
            x, ((a_q, b_q), (a_k, b_k), (a_v, b_v)), st.splits.of(dense_rows), k_qk, k_v,
            n_heads, n_kv_heads, head_dim, st.joined)
    else:  # all rows dense, as in select_mlp
        out = selection.placeholder_attention_selection(x.device, k_qk, k_v, n_heads, n_kv_heads, head_dim)
    _record(st, name, idx_q=out[0], idx_k=out[1], idx_v=out[2], idx_o=out[3],
            dense_rows=dense_rows)
    return out


@_fake(select_attention)
def _(x, a_q, b_q, a_k, b_k, a_v, b_v, dense_rows, k_qk, k_v, n_heads, n_kv_heads,
      head_dim, run, name):
    n_rep = n_heads // n_kv_heads
    e = lambda n: x.new_empty((n,), dtype=torch.int64)  # noqa: E731
    return e(k_qk * n_rep), e(k_qk), e(k_v), e(k_v * n_rep)


# ---- sparse products ------------------------------------------------------------------

def _split_and_count(st: Run, dense_rows, m_cols, n_full, k):
    """The rows' split; counts the FLOPs of one base product (dense rows pay n_full,
    context rows pay k)."""
    split = st.splits.of(dense_rows)
    rows, n_dense = dense_rows.numel(), split.n_dense
    st.count_flops(2 * rows * n_full * m_cols, 2 * (n_dense * n_full + (rows - n_dense) * k) * m_cols)
    return split


@_op
def out_sparse_linear(x: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor,
                      dense_rows: Tensor, run: int) -> Tensor:
    split = _split_and_count(run_of(run), dense_rows, w.shape[1], w.shape[0], idx.numel())
    return sparse_linear.out_sparse_forward(x, w, b, idx, split)


@_fake(out_sparse_linear)
def _(x, w, b, idx, dense_rows, run):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@_op_no_grad
def out_sparse_grad(gy: Tensor, w: Tensor, idx: Tensor, dense_rows: Tensor, run: int) -> Tensor:
    split = run_of(run).splits.of(dense_rows)
    return sparse_linear.out_sparse_grad_input(gy, w.to(gy.dtype), idx, split)


@_fake(out_sparse_grad)
def _(gy, w, idx, dense_rows, run):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@_op
def in_sparse_linear(h: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor,
                     dense_rows: Tensor, run: int) -> Tensor:
    split = _split_and_count(run_of(run), dense_rows, w.shape[0], w.shape[1], idx.numel())
    return sparse_linear.in_sparse_forward(h, w, b, idx, split)


@_fake(in_sparse_linear)
def _(h, w, b, idx, dense_rows, run):
    return h.new_empty((*h.shape[:-1], w.shape[0]))


@_op_no_grad
def in_sparse_grad(gy: Tensor, w: Tensor, idx: Tensor, dense_rows: Tensor, run: int) -> Tensor:
    split = run_of(run).splits.of(dense_rows)
    return sparse_linear.in_sparse_grad_input(gy, w.to(gy.dtype), idx, split)


@_fake(in_sparse_grad)
def _(gy, w, idx, dense_rows, run):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@_op
def mask_channels(h: Tensor, idx: Tensor, dense_rows: Tensor) -> Tensor:
    return sparse_linear.mask_forward(h, idx, dense_rows)


@_fake(mask_channels)
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


torch.library.register_autograd(out_sparse_linear, _out_backward, setup_context=_save_wd, lib=_lib)
torch.library.register_autograd(in_sparse_linear, _in_backward, setup_context=_save_wd, lib=_lib)
torch.library.register_autograd(mask_channels, _mask_backward, setup_context=_mask_setup, lib=_lib)


# ---- the whole frozen gated MLP (no LoRA on gate, up, down) ----------------------------

@_op
def sparse_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor],
               b_up: Optional[Tensor], b_down: Optional[Tensor], idx: Tensor, dense_rows: Tensor,
               run: int) -> tuple[Tensor, Tensor]:
    """(y, saved): `saved` is the flat (g, u) buffer for the backward (see sparse_mlp.py);
    its length depends on the token split, so the fake reports a data-dependent size."""
    h, f = w_gate.shape[1], w_gate.shape[0]
    st = run_of(run)
    split = _split_and_count(st, dense_rows, h, 3 * f, 3 * idx.numel())
    return mlp_impl.sparse_mlp_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, idx,
                                       split, st.mlp_all_rows_max_k)


@_fake(sparse_mlp)
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, idx, dense_rows, run):
    return x.new_empty((*x.shape[:-1], w_down.shape[0])), x.new_empty((_data_dependent_size(),))


def _data_dependent_size():
    """An unbacked size for a fake output. `new_dynamic_size` refuses unless Dynamo was told
    to capture dynamic-output ops (fullgraph or a global config flag), which does not
    concern an op our pass inserts after Dynamo; create the symbol on the ShapeEnv the way
    torch's own device-mesh op does."""
    from torch.fx.experimental.symbolic_shapes import _constrain_range_for_size
    ctx = torch.library.get_ctx()
    env = ctx._shape_env
    if env is None:
        return ctx.new_dynamic_size()  # raises with torch's own message
    n = env.create_unbacked_symint()
    _constrain_range_for_size(n, min=0)
    return n


@_op_no_grad
def sparse_mlp_grad(gy: Tensor, saved: Tensor, w_gate: Tensor, w_up: Tensor,
                    w_down: Tensor, idx: Tensor, dense_rows: Tensor, run: int) -> Tensor:
    st = run_of(run)
    return mlp_impl.sparse_mlp_grad_input(gy, saved, w_gate, w_up, w_down, idx,
                                          st.splits.of(dense_rows), st.mlp_all_rows_max_k)


@_fake(sparse_mlp_grad)
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


torch.library.register_autograd(sparse_mlp, _mlp_backward, setup_context=_mlp_setup, lib=_lib)


# ---- autocast: follow the active autocast dtype, like F.linear does ----------------------

def _autocast_kernel(op, device_type):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    exclude = torch._C.DispatchKeySet(key)

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        # `.to` only where the dtype changes (else it returns the tensor, after a dispatch)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != dtype
                else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return op(*cast)
    return kernel


for _op_name in ("out_sparse_linear", "in_sparse_linear", "sparse_mlp"):
    for _dev in ("cpu", "cuda"):
        _lib.impl(_op_name, _autocast_kernel(getattr(torch.ops.sparselora, _op_name).default, _dev),
                  "Autocast" + torch._C._dispatch_key_for_device(_dev), with_keyset=True)
