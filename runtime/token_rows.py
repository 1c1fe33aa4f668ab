"""The `token_rows` op: which rows of a forward are computed densely.

Output tokens (those the loss supervises, and the position predicting each) are dense;
the others (context tokens) are sparse; during the dense warm-up every row is dense. The
split is made once per forward and shared by every layer's graph (`Run.shared_rows`).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .library import fake, op_no_grad
from .run import Run, run_of


def dense_token_rows(labels: Tensor) -> Tensor:
    """Output tokens: supervised positions (labels != -100) and the position before each
    of them, which predicts it (HF shifts labels inside the loss)."""
    rows = labels != -100
    rows[..., :-1] |= (labels[..., 1:] != -100)  # a fresh mask: written in place
    return rows


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
        rows = dense_token_rows(labels).reshape(shape)  # fresh: nothing else holds it
    padding = None if attention_mask is None else attention_mask.reshape(shape) == 0
    st.splits.compute(rows, padding)
    if st.forward_id:
        st.shared_rows = (key, rows)
    return rows


@op_no_grad
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


@fake(token_rows)
def _(labels, attention_mask, x, run):
    return x.new_empty(x.shape[:-1], dtype=torch.bool)


