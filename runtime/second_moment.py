"""Streamed second moment E[x^T x] of a layer's input activations.

The activation-aware estimator needs only this [dim, dim] statistic of the
calibration inputs, so it is accumulated batch by batch and the activations
themselves are never kept.
"""

from __future__ import annotations

import hashlib

import torch


class SecondMoment:
    """Running `sum x^T x` and row count over activations of shape [..., dim]."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"SecondMoment dim must be >= 1, got {dim}")
        self.dim = int(dim)
        # float64 so that millions of streamed rows do not lose the small channels
        # next to huge-magnitude ones; allocated lazily on the first batch's device.
        self._sum: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor, row_mask: torch.Tensor | None = None) -> "SecondMoment":
        """Add the rows of `x` ([..., dim]); `row_mask` ([...], bool) keeps only some rows."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"SecondMoment(dim={self.dim}) got activations of shape {tuple(x.shape)}: "
                f"last dimension must be {self.dim}"
            )
        rows = x.detach().reshape(-1, self.dim)
        if row_mask is not None:
            if row_mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"row_mask shape {tuple(row_mask.shape)} does not match the rows of "
                    f"x {tuple(x.shape[:-1])}"
                )
            rows = rows[row_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        if self._sum is None:
            self._sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=rows.device)
        if rows.shape[0] == 0:
            return self
        # fp32 product per batch (fast on GPUs), float64 across batches.
        rows = rows.to(torch.float32)
        self._sum += (rows.T @ rows).to(device=self._sum.device, dtype=torch.float64)
        self.count += rows.shape[0]
        return self

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's statistics into this one (e.g. from another rank)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge SecondMoment(dim={other.dim}) into dim={self.dim}")
        if other._sum is not None:
            if self._sum is None:
                self._sum = other._sum.clone()
            else:
                self._sum += other._sum.to(self._sum.device)
            self.count += other.count
        return self

    def matrix(self) -> torch.Tensor:
        """E[x^T x] as fp32 [dim, dim]; raises if nothing was accumulated."""
        if self.count == 0 or self._sum is None:
            raise ValueError("SecondMoment is empty (count 0): no rows were accumulated")
        return (self._sum / self.count).to(torch.float32)

    def is_finite(self) -> bool:
        return self._sum is None or bool(torch.isfinite(self._sum).all())

    def fingerprint(self) -> str:
        """Short hex digest of (dim, count, sum); changes when the calibration data does."""
        h = hashlib.sha256(f"SecondMoment:{self.dim}:{self.count}".encode())
        if self._sum is not None:
            h.update(self._sum.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count})"
