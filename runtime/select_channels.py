"""The channel-selection ops: one top-k per block per forward, from the estimator
scores (scores.py, selection.py), recorded for the equivalence tests when asked."""
from __future__ import annotations

import torch
from torch import Tensor

from . import scores, selection
from .library import fake, op_no_grad
from .run import run_of


def _record(st, name, **tensors):
    # not a checkpoint's recomputation in backward: same values, and a regional graph's
    # layer path is only known during the forward
    if st.record is not None and torch._C._current_graph_task_id() == -1:
        st.record[name] = {k: v.detach().clone() for k, v in tensors.items()}


@op_no_grad
def select_mlp(x: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor, b_up: Tensor,
               res_gate: Tensor, res_up: Tensor, dense_rows: Tensor, k: int, run: int,
               name: str, activation: str = "silu") -> Tensor:
    """Top-k intermediate channels by the estimator score; `res_gate`/`res_up` [d_ff] are
    the residual variances (`estimator.residual_variance`, zeros for plain SVD);
    `activation`: the gate's (selection.ACTIVATIONS)."""
    st = run_of(run)
    name = st.block_name(name)
    st.collect_input(name, x)
    if st.sparse_now():
        if st.zero_residuals:  # the same scores, without a term of zeros
            res_gate = res_up = None
        s = scores.mlp_scores(x, a_gate, b_gate, a_up, b_up, res_gate, res_up,
                              st.splits.of(dense_rows), st.joined, act=activation)
        idx = selection.top_channels(s, k)
    else:  # every row is dense (token_rows): no op reads the selection, skip the estimator
        idx = torch.arange(k, device=x.device)
    _record(st, name, idx=idx, dense_rows=dense_rows)
    return idx


@fake(select_mlp)
def _(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, dense_rows, k, run, name, activation="silu"):
    return x.new_empty((k,), dtype=torch.int64)


@op_no_grad
def select_plain_mlp(x: Tensor, a: Tensor, b: Tensor, res: Tensor, dense_rows: Tensor, k: int,
                     run: int, name: str, activation: str = "gelu") -> Tensor:
    """Top-k intermediate channels of a non-gated MLP (fc -> act -> proj) by the estimator
    score of act(fc) (`selection.plain_mlp_scores`); `res` [d_ff]: fc's residual variance."""
    st = run_of(run)
    name = st.block_name(name)
    st.collect_input(name, x)
    if st.sparse_now():
        s = scores.plain_mlp_scores(x, a, b, None if st.zero_residuals else res, st.splits.of(dense_rows),
                                    st.joined, act=activation)
        idx = selection.top_channels(s, k)
    else:  # as in select_mlp
        idx = torch.arange(k, device=x.device)
    _record(st, name, idx=idx, dense_rows=dense_rows)
    return idx


@fake(select_plain_mlp)
def _(x, a, b, res, dense_rows, k, run, name, activation="gelu"):
    return x.new_empty((k,), dtype=torch.int64)


@op_no_grad
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


@fake(select_attention)
def _(x, a_q, b_q, a_k, b_k, a_v, b_v, dense_rows, k_qk, k_v, n_heads, n_kv_heads,
      head_dim, run, name):
    n_rep = n_heads // n_kv_heads
    e = lambda n: x.new_empty((n,), dtype=torch.int64)  # noqa: E731
    return e(k_qk * n_rep), e(k_qk), e(k_v), e(k_v * n_rep)


