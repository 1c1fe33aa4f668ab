"""Batch and sequence dimensions marked dynamic before the first compile.

Real fine-tuning data changes the sequence length every step (and the batch size between
data sets). Left to Dynamo's automatic dynamic, every graph compiles once static, then
again dynamic at the second length, and again at the first new batch size. Regional
compilation has a few graphs per model (one per distinct layer plan, layer 0's, the loss),
so each such event costs several compiles; marking the dims up front costs one compile
per graph, and a new length or batch size (other than 1, which Dynamo always
specialises) none.

`maybe_mark_dynamic`, not `mark_dynamic`: a dim the graph needs static (a coincidence
with a feature size) is specialised instead of being an error.
"""
from __future__ import annotations

import torch

DEFAULT = True  # `slc.compile(dynamic=None)`; the CPU tests compile static (tests/conftest.py)


def _dims(t: torch.Tensor, batch: int, seq: int) -> list[int]:
    # The last dim of a float activation of rank <= 3 holds features (hidden states,
    # rotary cos/sin, logits), even when its size equals the sequence length; masks
    # ([B, 1, T, T], [B, T]) and position ids end in a sequence dim.
    n = t.dim()
    feature = n - 1 if t.is_floating_point() and n <= 3 else None
    out = []
    for d, size in enumerate(t.shape):
        if d == feature or size <= 1:
            continue
        if size == seq or (d == 0 and size == batch):
            out.append(d)
    return out


def _tensors(obj, depth=0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o, depth + 1)


def mark_batch_and_sequence(args, kwargs, batch: int, seq: int) -> None:
    """Mark the batch dim (0) and every sequence dim of the tensors in `args`/`kwargs`
    (one level of tuples, e.g. the rotary (cos, sin)) as maybe-dynamic. Tensors already
    marked (shared by every layer of one forward, or marked by the user) are left alone."""
    for obj in (*args, *kwargs.values()):
        for t in _tensors(obj):
            if hasattr(t, "_dynamo_weak_dynamic_indices") or hasattr(t, "_dynamo_dynamic_indices"):
                continue
            dims = _dims(t, batch, seq)
            if dims:
                torch._dynamo.maybe_mark_dynamic(t, dims)


def mark_call_inputs(args, kwargs, first: str) -> None:
    """A call whose first input (positional, or the keyword `first`) is [B, T, features]:
    a decoder layer's hidden states, the loss function's logits."""
    h = args[0] if args else kwargs.get(first)
    if isinstance(h, torch.Tensor) and h.dim() == 3:
        mark_batch_and_sequence(args, kwargs, h.shape[0], h.shape[1])


def mark_model_inputs(kwargs) -> None:
    """A whole model's call: `input_ids` (or `labels`) [B, T] give B and T."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = kwargs.get("labels")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        mark_batch_and_sequence((), kwargs, ids.shape[0], ids.shape[1])
