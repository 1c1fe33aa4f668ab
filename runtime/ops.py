"""torch.library custom ops that the rewritten graph calls.

Everything data-dependent (the token split, the dense warm-up switch, top-k) happens
inside these opaque ops, so the compiled graph keeps static shapes and never recompiles
when the step schedule flips from dense to sparse. Each op has a fake (meta) kernel;
the sparse products have autograd (their backward is an op too, so AOT tracing never
sees the data-dependent row split) and an autocast rule that follows the active
autocast dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import row_split, selection, sparse_linear
from .state import collect_input, get_state

_lib = torch.library.Library("sparselora", "FRAGMENT")


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


def shared_token_rows(st, labels, attention_mask, shape, device) -> Tensor:
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
        rows = torch.zeros(shape, dtype=torch.bool, device=device)
    else:
        rows = dense_token_rows(labels).reshape(shape).clone()
    row_split.compute(rows, None if attention_mask is None else attention_mask.reshape(shape) == 0)
    if st.forward_id:
        st.shared_rows = (key, rows)
    return rows


@torch.library.custom_op("sparselora::token_rows", mutates_args=())
def token_rows(labels: Optional[Tensor], attention_mask: Optional[Tensor], x: Tensor,
               state_id: int) -> Tensor:
    """Bool [*x.shape[:-1]]: True for rows computed densely. Labels and the attention mask
    come from the graph, or from the state when the graph does not see them."""
    st = get_state(state_id)
    rows = shared_token_rows(st, labels, attention_mask, x.shape[:-1], x.device)
    if st.forward_id:  # an op's output must not alias another call's: a clone, same split
        copy = rows.clone()
        row_split.alias(copy, rows)
        return copy
    return rows


@token_rows.register_fake
def _(labels, attention_mask, x, state_id):
    return x.new_empty(x.shape[:-1], dtype=torch.bool)


# ---- selection ----------------------------------------------------------------------

def _record(state_id, name, **tensors):
    st = get_state(state_id)
    # not a checkpoint's recomputation in backward: same values, and a regional graph's
    # layer path is only known during the forward
    if st.record is not None and torch._C._current_graph_task_id() == -1:
        st.record[name] = {k: v.detach().clone() for k, v in tensors.items()}


@torch.library.custom_op("sparselora::select_mlp", mutates_args=())
def select_mlp(x: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor, b_up: Tensor,
               res_gate: Tensor, res_up: Tensor, dense_rows: Tensor, k: int, state_id: int,
               name: str) -> Tensor:
    """Top-k intermediate channels by the estimator score; `res_gate`/`res_up` [d_ff] are
    the residual variances (`estimator.residual_variance`, zeros for plain SVD)."""
    from .scores import mlp_scores
    st = get_state(state_id)
    name = st.block_name(name)
    collect_input(state_id, name, x)
    if st.sparse_now():
        scores = mlp_scores(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, dense_rows)
        idx = selection.top_channels(scores, k)
    else:  # every row is dense (token_rows): no op reads the selection, skip the estimator
        idx = torch.arange(k, device=x.device)
    _record(state_id, name, idx=idx, dense_rows=dense_rows)
    return idx


@select_mlp.register_fake
def _(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, dense_rows, k, state_id, name):
    return x.new_empty((k,), dtype=torch.int64)


@torch.library.custom_op("sparselora::select_attention", mutates_args=())
def select_attention(x: Tensor, a_q: Tensor, b_q: Tensor, a_k: Tensor, b_k: Tensor,
                     a_v: Tensor, b_v: Tensor, dense_rows: Tensor, k_qk: int, k_v: int,
                     n_heads: int, n_kv_heads: int, head_dim: int, state_id: int,
                     name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = get_state(state_id)
    name = st.block_name(name)
    collect_input(state_id, name, x)
    if st.sparse_now():
        out = selection.attention_selection(
            x, ((a_q, b_q), (a_k, b_k), (a_v, b_v)), dense_rows, k_qk, k_v,
            n_heads, n_kv_heads, head_dim)
    else:  # all rows dense, as in select_mlp
        out = selection.placeholder_attention_selection(x.device, k_qk, k_v, n_heads, n_kv_heads, head_dim)
    _record(state_id, name, idx_q=out[0], idx_k=out[1], idx_v=out[2], idx_o=out[3],
            dense_rows=dense_rows)
    return out


@select_attention.register_fake
def _(x, a_q, b_q, a_k, b_k, a_v, b_v, dense_rows, k_qk, k_v, n_heads, n_kv_heads,
      head_dim, state_id, name):
    n_rep = n_heads // n_kv_heads
    e = lambda n: x.new_empty((n,), dtype=torch.int64)  # noqa: E731
    return e(k_qk * n_rep), e(k_qk), e(k_v), e(k_v * n_rep)


# ---- sparse products ------------------------------------------------------------------

def _count(state_id, dense_rows, m_cols, n_full, k):
    """FLOPs of one base product: dense rows pay n_full, context rows pay k."""
    rows = dense_rows.numel()
    n_dense = row_split.split_of(dense_rows).n_dense
    get_state(state_id).count_flops(2 * rows * n_full * m_cols,
                                    2 * (n_dense * n_full + (rows - n_dense) * k) * m_cols)


@torch.library.custom_op("sparselora::out_sparse_linear", mutates_args=())
def out_sparse_linear(x: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor,
                      dense_rows: Tensor, state_id: int) -> Tensor:
    _count(state_id, dense_rows, w.shape[1], w.shape[0], idx.numel())
    return sparse_linear.out_sparse_forward(x, w, b, idx, dense_rows)


@out_sparse_linear.register_fake
def _(x, w, b, idx, dense_rows, state_id):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("sparselora::out_sparse_grad", mutates_args=())
def out_sparse_grad(gy: Tensor, w: Tensor, idx: Tensor, dense_rows: Tensor) -> Tensor:
    return sparse_linear.out_sparse_grad_input(gy, w.to(gy.dtype), idx, dense_rows)


@out_sparse_grad.register_fake
def _(gy, w, idx, dense_rows):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@torch.library.custom_op("sparselora::in_sparse_linear", mutates_args=())
def in_sparse_linear(h: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor,
                     dense_rows: Tensor, state_id: int) -> Tensor:
    _count(state_id, dense_rows, w.shape[0], w.shape[1], idx.numel())
    return sparse_linear.in_sparse_forward(h, w, b, idx, dense_rows)


@in_sparse_linear.register_fake
def _(h, w, b, idx, dense_rows, state_id):
    return h.new_empty((*h.shape[:-1], w.shape[0]))


@torch.library.custom_op("sparselora::in_sparse_grad", mutates_args=())
def in_sparse_grad(gy: Tensor, w: Tensor, idx: Tensor, dense_rows: Tensor) -> Tensor:
    return sparse_linear.in_sparse_grad_input(gy, w.to(gy.dtype), idx, dense_rows)


@in_sparse_grad.register_fake
def _(gy, w, idx, dense_rows):
    return gy.new_empty((*gy.shape[:-1], w.shape[1]))


@torch.library.custom_op("sparselora::mask_channels", mutates_args=())
def mask_channels(h: Tensor, idx: Tensor, dense_rows: Tensor) -> Tensor:
    return sparse_linear.mask_forward(h, idx, dense_rows)


@mask_channels.register_fake
def _(h, idx, dense_rows):
    return torch.empty_like(h)


# ---- autograd: the frozen weight passes dY @ W_kept back to its input ---------------------

def _save_wd(ctx, inputs, output):
    x, w, b, idx, dense_rows = inputs[:5]
    ctx.save_for_backward(w, idx, dense_rows)
    ctx.x_dtype = x.dtype


def _out_backward(ctx, gy):
    w, idx, dense_rows = ctx.saved_tensors
    return out_sparse_grad(gy, w, idx, dense_rows).to(ctx.x_dtype), None, None, None, None, None


def _in_backward(ctx, gy):
    w, idx, dense_rows = ctx.saved_tensors
    return in_sparse_grad(gy, w, idx, dense_rows).to(ctx.x_dtype), None, None, None, None, None


def _mask_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _mask_backward(ctx, gy):
    idx, dense_rows = ctx.saved_tensors
    return mask_channels(gy, idx, dense_rows), None, None


out_sparse_linear.register_autograd(_out_backward, setup_context=_save_wd)
in_sparse_linear.register_autograd(_in_backward, setup_context=_save_wd)
mask_channels.register_autograd(_mask_backward, setup_context=_mask_setup)


# ---- the whole frozen gated MLP (no LoRA on gate, up, down) ----------------------------

@torch.library.custom_op("sparselora::sparse_mlp", mutates_args=())
def sparse_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor],
               b_up: Optional[Tensor], b_down: Optional[Tensor], idx: Tensor, dense_rows: Tensor,
               state_id: int) -> tuple[Tensor, Tensor]:
    """(y, saved): `saved` is the flat (g, u) buffer for the backward (see sparse_mlp.py);
    its length depends on the token split, so the fake reports a data-dependent size."""
    h, f = w_gate.shape[1], w_gate.shape[0]
    _count(state_id, dense_rows, h, 3 * f, 3 * idx.numel())
    from .sparse_mlp import sparse_mlp_forward
    return sparse_mlp_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, idx, dense_rows)


@sparse_mlp.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, idx, dense_rows, state_id):
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


@torch.library.custom_op("sparselora::sparse_mlp_grad", mutates_args=())
def sparse_mlp_grad(gy: Tensor, saved: Tensor, w_gate: Tensor, w_up: Tensor,
                    w_down: Tensor, idx: Tensor, dense_rows: Tensor) -> Tensor:
    from .sparse_mlp import sparse_mlp_grad_input
    return sparse_mlp_grad_input(gy, saved, w_gate, w_up, w_down, idx, dense_rows)


@sparse_mlp_grad.register_fake
def _(gy, saved, w_gate, w_up, w_down, idx, dense_rows):
    return gy.new_empty((*gy.shape[:-1], w_gate.shape[1]))


def _mlp_setup(ctx, inputs, output):
    # x itself is not saved: the backward needs only g and u (in `saved`).
    x, wg, wu, wd, _bg, _bu, _bd, idx, dense_rows, _sid = inputs
    ctx.save_for_backward(output[1], wg, wu, wd, idx, dense_rows)
    ctx.x_dtype = x.dtype


def _mlp_backward(ctx, gy, _gsaved):
    saved, wg, wu, wd, idx, dense_rows = ctx.saved_tensors
    gx = sparse_mlp_grad(gy, saved, wg, wu, wd, idx, dense_rows).to(ctx.x_dtype)
    return gx, None, None, None, None, None, None, None, None, None


sparse_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ---- autocast: follow the active autocast dtype, like F.linear does ----------------------

def _autocast_kernel(op, device_type):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast)
    return kernel


for _op in (out_sparse_linear, in_sparse_linear, sparse_mlp):
    for _dev in ("cpu", "cuda"):
        _lib.impl(_op._name, _autocast_kernel(_op._opoverload, _dev),
                  "Autocast" + torch._C._dispatch_key_for_device(_dev), with_keyset=True)
