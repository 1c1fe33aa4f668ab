"""The token split of one forward, computed once.

`token_rows` makes the [B, T] bool mask of dense rows; every sparse op of that forward
and its backward needs the row indices and counts. `nonzero` synchronises the GPU, so
the split is computed once when the mask is made and looked up by the mask's storage
afterwards (saved-for-backward tensors keep their storage). Each entry holds its mask,
so no other tensor can take that address while the entry exists: a hit is always the
same storage. A run keeps its most recent entries (masks are tiny).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class RowSplit:
    dense: torch.Tensor   # row indices computed densely
    ctx: torch.Tensor     # context row indices
    n_rows: int
    scored: torch.Tensor | None = None  # context rows the estimator scores (no padding); None: ctx

    @property
    def n_dense(self) -> int:
        return self.dense.numel()

    @property
    def all_dense(self) -> bool:
        return self.ctx.numel() == 0

    @property
    def all_context(self) -> bool:
        return self.dense.numel() == 0


def compute_split(rows: torch.Tensor, padding: torch.Tensor | None = None) -> RowSplit:
    """`padding`: bool mask of padded positions, left out of the estimator's scores (their
    hidden states are not text; they still run sparse, as nothing reads them)."""
    r = rows.reshape(-1)
    split = RowSplit(r.nonzero().squeeze(1), (~r).nonzero().squeeze(1), r.numel())
    if padding is not None:
        split.scored = (~r & ~padding.reshape(-1)).nonzero().squeeze(1)
    return split


class SplitCache:
    """The splits of one run's recent row masks, keyed by the mask's storage."""

    KEEP = 256

    def __init__(self):
        self._entries: "OrderedDict[tuple[int, int], tuple[torch.Tensor, RowSplit]]" = OrderedDict()

    def compute(self, rows: torch.Tensor, padding: torch.Tensor | None = None) -> RowSplit:
        split = compute_split(rows, padding)
        self._remember(rows, split)
        return split

    def alias(self, copy: torch.Tensor, rows: torch.Tensor) -> None:
        """`copy` (a clone of `rows`) has the same split, without another nonzero."""
        self._remember(copy, self.of(rows))

    def of(self, rows: torch.Tensor) -> RowSplit:
        hit = self._entries.get((rows.data_ptr(), rows.numel()))
        return hit[1] if hit is not None else self.compute(rows)

    def _remember(self, rows: torch.Tensor, split: RowSplit) -> None:
        key = (rows.data_ptr(), rows.numel())
        self._entries[key] = (rows, split)
        self._entries.move_to_end(key)
        while len(self._entries) > self.KEEP:
            self._entries.popitem(last=False)


def context_rows(x2: torch.Tensor, split: RowSplit) -> torch.Tensor:
    return x2 if split.all_context else x2.index_select(0, split.ctx)


def scored_rows(x2: torch.Tensor, split: RowSplit) -> torch.Tensor:
    """The rows the estimator scores: context rows that are not padding."""
    if split.scored is None:
        return context_rows(x2, split)
    return x2.index_select(0, split.scored)
