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
    """Row indices of one forward's dense and context rows.

    `bucket` > 0 rounds the two index lists to fixed capacities, so that a CUDA graph
    captured for one split serves every split of the same bucket: the dense list is
    padded with copies of its first row up to a multiple of `bucket_step(count, bucket //
    DENSE_SHARE)` (a finer step than the sequence lengths': a dense row costs several
    context rows), the context list with copies of its first row to the complement. A
    copy computes the same row again and every sparse op writes rows by index (a repeated
    index writes that same row), so the result is unchanged. A split may instead take the
    capacities of a kept graph set (`kept`) whose dense list is longer than its own
    rounding: a filled row's filler rows (its last context rows, which no real token reads
    and the loss skips) then fill the dense list before copies do, so that one set serves
    more counts of dense rows.

    The estimator scores the context rows with weight 1 and skips padding positions and
    copies (weight 0: `score_weight`, None when every context row counts); `n_unscored`
    counts the weight-0 rows, on the device (no host sync). `row_weight` gives the same
    weights in row order, 0 on dense rows ([n_rows] fp32, None when every row is a scored
    context row): the fused estimator reads every row with it instead of gathering.
    """
    dense: torch.Tensor   # row indices computed densely
    ctx: torch.Tensor     # context row indices
    n_rows: int
    n_dense_rows: int     # real dense rows (without the copies)
    score_weight: torch.Tensor | None = None
    n_unscored: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None

    @property
    def n_dense(self) -> int:
        return self.n_dense_rows

    @property
    def all_dense(self) -> bool:
        return self.ctx.numel() == 0

    @property
    def all_context(self) -> bool:
        return self.dense.numel() == 0

    @property
    def capacities(self) -> tuple[int, int]:
        return self.dense.numel(), self.ctx.numel()


DENSE_SHARE = 4


def bucket_step(n: int, bucket: int) -> int:
    """The rounding step for a size n: `bucket`, or an eighth of n's power of two when that
    is larger, so that rounding up adds at most 12.5% and a few buckets span a wide range."""
    return max(bucket, (1 << max(n.bit_length() - 1, 0)) // 8)


def _pad_to(idx: torch.Tensor, n: int) -> torch.Tensor:
    if idx.numel() >= n or idx.numel() == 0:
        return idx
    return torch.cat([idx, idx[:1].expand(n - idx.numel())])


def kept_fit(n_dense: int, n_ctx: int, filler: int, kept) -> tuple | None:
    """(dense capacity, context capacity, rows moved) of the kept graph set with the fewest
    dense rows that a split of `n_dense` dense and `n_ctx` context rows fits, up to
    `filler` trailing context rows moving to the dense list; None when none fits."""
    for d_cap, c_cap in sorted(kept):
        moved = min(filler, max(d_cap - n_dense, 0))
        if d_cap >= n_dense and 0 < n_ctx - moved <= c_cap:
            return d_cap, c_cap, moved
    return None


def _fit_kept(dense: torch.Tensor, ctx: torch.Tensor, filler: int, kept) -> tuple | None:
    """(dense, context, real context rows): the index lists in the (dense, context)
    capacities of a kept graph set (`kept_fit`): the moved filler rows join the dense
    list, copies of a row fill the rest; None when none fits."""
    n_ctx = ctx.numel()
    fit = kept_fit(dense.numel(), n_ctx, filler, kept)
    if fit is None:
        return None
    d_cap, c_cap, moved = fit
    return (_pad_to(torch.cat([dense, ctx[n_ctx - moved:]]), d_cap),
            _pad_to(ctx[:n_ctx - moved], c_cap), n_ctx - moved)


def compute_split(rows: torch.Tensor, padding: torch.Tensor | None = None, bucket: int = 0,
                  filler: int = 0, kept=()) -> RowSplit:
    """`padding`: bool mask of padded positions, left out of the estimator's scores (their
    hidden states are not text; they still run sparse, as nothing reads them). `bucket`:
    round the index lists to fixed capacities (see RowSplit); `filler`: the row's trailing
    filler rows, which `kept` (capacity pairs of kept graph sets) may take as dense rows."""
    r = rows.reshape(-1)
    # one sync for both lists (nonzero syncs once per call; nonzero_static does not)
    n_dense = int(r.sum())
    n_ctx = r.numel() - n_dense
    not_r = ~r
    dense = torch.nonzero_static(r, size=n_dense).squeeze(1)
    ctx = torch.nonzero_static(not_r, size=n_ctx).squeeze(1)
    step = bucket_step(n_dense, max(1, bucket // DENSE_SHARE)) if bucket > 0 else 0
    n_real_ctx = n_ctx  # context rows that are not copies (the first ones of the list)
    if step and n_dense and n_ctx:
        fit = _fit_kept(dense, ctx, filler, kept) if kept else None
        if fit is not None:
            dense, ctx, n_real_ctx = fit
        else:
            # every count of dense rows in (cap - step, cap] gets the same two capacities
            cap = -(-n_dense // step) * step
            dense, ctx = _pad_to(dense, cap), _pad_to(ctx, r.numel() - cap + step - 1)
    split = RowSplit(dense, ctx, r.numel(), n_dense)
    if n_dense or padding is not None:
        scored = not_r if padding is None else ~(r | padding.reshape(-1))
        split.row_weight = scored.float()
    if padding is not None or ctx.numel() > n_real_ctx:
        weight = torch.zeros(ctx.numel(), dtype=torch.float32, device=r.device)
        keep = torch.ones(n_real_ctx, dtype=torch.float32, device=r.device)
        if padding is not None:
            keep = (~padding.reshape(-1)).index_select(0, ctx[:n_real_ctx]).float()
        weight[:n_real_ctx] = keep
        split.score_weight = weight
        split.n_unscored = weight.numel() - weight.sum()
    return split


class SplitCache:
    """The splits of one run's recent row masks, keyed by the mask's storage; `bucket`
    rounds them to capacities (RowSplit; set for CUDA graphs)."""

    KEEP = 256

    def __init__(self, bucket: int = 0):
        self.bucket = bucket
        self.fit: tuple = (0, ())  # (filler rows, kept capacities) for the next compute
        self._entries: "OrderedDict[tuple[int, int], tuple[torch.Tensor, RowSplit]]" = OrderedDict()

    def compute(self, rows: torch.Tensor, padding: torch.Tensor | None = None) -> RowSplit:
        split = compute_split(rows, padding, self.bucket, *self.fit)
        self.remember(rows, split)
        return split

    def alias(self, copy: torch.Tensor, rows: torch.Tensor) -> None:
        """`copy` (a clone of `rows`) has the same split, without another nonzero."""
        self.remember(copy, self.of(rows))

    def of(self, rows: torch.Tensor) -> RowSplit:
        hit = self._entries.get((rows.data_ptr(), rows.numel()))
        return hit[1] if hit is not None else self.compute(rows)

    def remember(self, rows: torch.Tensor, split: RowSplit) -> None:
        key = (rows.data_ptr(), rows.numel())
        self._entries[key] = (rows, split)
        self._entries.move_to_end(key)
        while len(self._entries) > self.KEEP:
            self._entries.popitem(last=False)


def context_rows(x2: torch.Tensor, split: RowSplit) -> torch.Tensor:
    return x2 if split.all_context else x2.index_select(0, split.ctx)


def scored_rows(x2: torch.Tensor, split: RowSplit) -> torch.Tensor:
    """The context rows in fp32, those the estimator must skip zeroed
    (`RowSplit.score_weight`, fp32: the cast comes first, so the weight needs none)."""
    rows = context_rows(x2, split).float()
    return rows if split.score_weight is None else rows * split.score_weight[:, None]
