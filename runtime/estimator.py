"""Low-rank estimator factors of a frozen linear weight: `x @ A @ B ≈ x @ W^T`.

SparseLoRA scores channels with this cheap product instead of the full one.
Two ways to build (A, B):

- "svd": truncated SVD of W^T, the best rank-r approximation of the weight itself.
- "activation_aware": the best rank-r approximation of the *output* x W^T in
  expectation over calibration inputs, using their second moment C = E[x^T x].
  Real LLM activations have a few huge-magnitude channels, which plain SVD ignores.

Each kind also gives a per-output-channel residual variance (`residual_variance`): the
expected energy E[(x (w_j - (AB)_j))^2] the rank-r product misses. The MLP score uses it
(`selection.mlp_scores`); plain SVD keeps it zero, so "svd" stays the paper's estimator.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .factor_cache import FactorCache, factor_key
from .second_moment import SecondMoment

KINDS = ("svd", "activation_aware")
# Ridge added to C, relative to its mean diagonal: keeps Cholesky well conditioned
# when some input channels never fire in the calibration set.
DEFAULT_DAMPING = 1e-2
# Each failed Cholesky multiplies the damping by 10, at most this many times.
_MAX_DAMPING_RETRIES = 6


class Factors(NamedTuple):
    """Estimator of one linear: x @ a @ b ≈ x @ W^T, and the variance it misses per output."""

    a: torch.Tensor         # [in, r] fp32
    b: torch.Tensor         # [r, out] fp32
    residual: torch.Tensor  # [out] fp32 >= 0; zeros for plain SVD (the paper's estimator)


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"estimator weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    limit = min(weight.shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise ValueError(
            f"estimator rank must be an int in [1, min(out, in)] = [1, {limit}] for a weight of "
            f"shape {tuple(weight.shape)}, got rank={rank!r}"
        )


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _truncated_factors(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T of the float64 matrix m = U S V^T.

    Uses eigh of the Gram matrix of m's smaller side instead of `torch.linalg.svd`: the
    full SVD of a 576 x 1536 matrix took 1-10 s on a 2-core CPU, eigh of the 576 x 576
    Gram well under 1 s. In float64 this is at least as accurate as an fp32 SVD for every
    singular value above ~1e-8 of the largest, and A B = U_r U_r^T m stays exact
    (a projection) even where the split between A and B is ill-determined.
    """
    p, q = m.shape
    tall = p > q
    evals, vecs = torch.linalg.eigh(m.T @ m if tall else m @ m.T)
    vecs = vecs[:, -rank:].flip(-1)  # eigh sorts ascending
    s = evals[-rank:].flip(-1).clamp_min(0).sqrt()
    # Directions with (numerically) zero singular value contribute nothing: zero them
    # rather than divide by ~0.
    alive = s > s.max() * 1e-12  # all False for a zero matrix
    root = torch.where(alive, s, 1.0).sqrt()
    keep = alive.to(m.dtype)
    if tall:  # vecs = V_r; U_r sqrt(S_r) = m V_r / sqrt(S_r)
        return (m @ vecs) / root * keep, (root * keep)[:, None] * vecs.T
    return vecs * (root * keep), (vecs.T @ m) / root[:, None] * keep[:, None]


def plain_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of W^T: A = U_r sqrt(S_r) [in, r], B = sqrt(S_r) V_r^T [r, out].

    Computed in float64 whatever the weight's dtype; returned fp32, contiguous, on its device.
    sqrt(S) is split over both factors so A and B have comparable scales.
    """
    _check_rank(weight, rank)
    a, b = _truncated_factors(weight.detach().to(torch.float64).T, rank)
    return a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()


def activation_aware_factors(
    weight: torch.Tensor,
    rank: int,
    moment: SecondMoment | torch.Tensor,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors minimising E||x W^T - x A B||^2 over inputs with E[x^T x] = C.

    With C + λ·mean(diag C)·I = L L^T (λ = `damping`, default 1e-2, raised x10 on each
    failed Cholesky): SVD L^T W^T = U S V^T, then A = L^-T U_r sqrt(S_r), B = sqrt(S_r) V_r^T,
    since E||x E||^2 = ||L^T E||_F^2 for any error E. Returned fp32, contiguous.
    """
    _check_rank(weight, rank)
    c = moment.matrix() if isinstance(moment, SecondMoment) else moment
    n_in = weight.shape[1]
    if c.shape != (n_in, n_in):
        raise ValueError(
            f"second moment of shape {tuple(c.shape)} does not match the weight's input "
            f"dimension {n_in} (weight shape {tuple(weight.shape)})"
        )
    # float64 throughout: C spans many orders of magnitude on real activations.
    c = c.detach().to(device=weight.device, dtype=torch.float64)
    scale = c.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError("second moment has a non-positive or non-finite mean diagonal")
    eye = torch.eye(n_in, dtype=torch.float64, device=c.device)
    lam = damping
    for _ in range(_MAX_DAMPING_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(c + lam * scale * eye)
        if int(info) == 0:
            break
        tried, lam = lam, max(lam * 10.0, 1e-6)  # a zero damping starts rising from 1e-6
    else:
        raise ValueError(f"Cholesky of the damped second moment failed up to damping {tried:g}")
    wt = weight.detach().to(torch.float64).T
    a_white, b = _truncated_factors(chol.T @ wt, rank)
    a = torch.linalg.solve_triangular(chol.T, a_white, upper=True)
    return a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()


def residual_variance(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    moment: SecondMoment | torch.Tensor,
) -> torch.Tensor:
    """σ²_j = e_j^T C e_j with e_j = w_j - (A B)_{:, j}: per output channel j, the expected
    squared error E[(x w_j - x (AB)_j)^2] of the low-rank product over inputs with second
    moment C = E[x^T x] (undamped). float64 inside; returns fp32 [out], clamped >= 0.

    Why the MLP score adds it: write u_j = x w_j = û_j + ε_j with û_j = x (AB)_j. For the
    activation-aware factors (the C-whitened truncated SVD), L^T e_j is orthogonal to the
    kept subspace that L^T (AB)_j lies in (C = L L^T), so E[û_j ε_j] = 0 and
    E[u_j^2] = E[û_j^2] + σ²_j (exact for the undamped C, close under the small damping):
    the rank-r product alone under-scores channels whose energy lies in the discarded
    directions. The score adds σ²_j to each token's û_j^2, treating ε as zero-mean noise
    independent of x; for the gate, first order around ĝ:
    E[silu(g)^2] ≈ silu(ĝ)^2 + silu'(ĝ)^2 σ²_gate. (For plain SVD factors the cross term is
    not zero; they keep a zero residual.)
    """
    c = moment.matrix() if isinstance(moment, SecondMoment) else moment
    n_in = weight.shape[1]
    if c.shape != (n_in, n_in) or a.shape[0] != n_in or b.shape[1] != weight.shape[0]:
        raise ValueError(
            f"residual_variance: weight {tuple(weight.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)} "
            f"and second moment {tuple(c.shape)} do not fit together"
        )
    c = c.detach().to(device=weight.device, dtype=torch.float64)
    a64, b64 = a.detach().to(weight.device, torch.float64), b.detach().to(weight.device, torch.float64)
    wt = weight.detach().to(torch.float64).T
    out = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    step = 4096  # bound the [in, step] float64 temporaries on large layers
    for j in range(0, weight.shape[0], step):
        e = wt[:, j : j + step] - a64 @ b64[:, j : j + step]
        out[j : j + step] = ((c @ e) * e).sum(0)
    return out.clamp_min(0).to(torch.float32)


def zero_residual(weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)


def _usable_moment(moment: SecondMoment | None) -> str | None:
    """Why `moment` cannot drive the activation-aware estimator, or None if it can."""
    if moment is None:
        return "no second moment was given"
    if moment.count == 0:
        return "the second moment is empty (count 0)"
    if not moment.is_finite():
        return "the second moment has non-finite entries"
    return None


def estimator_factors(
    weight: torch.Tensor,
    rank: int,
    kind: str = "svd",
    moment: SecondMoment | None = None,
    cache: FactorCache | None = None,
    damping: float = DEFAULT_DAMPING,
) -> Factors:
    """Estimator factors `Factors(a [in, r], b [r, out], residual [out])` of `weight`, fp32
    on its device.

    `kind` is "svd" or "activation_aware". Raises ValueError for an unknown kind or a
    rank outside [1, min(out, in)]. The activation-aware kind falls back to plain SVD
    with a warning when `moment` is missing, empty or non-finite, or when its result
    is not finite. `residual` is `residual_variance` under the (undamped) moment for the
    activation-aware kind, zeros for plain SVD (including a fallback to it). With
    `cache`, factors are loaded from / stored to disk.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown estimator kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    _check_rank(weight, rank)
    if not _finite(weight):
        raise ValueError(f"weight of shape {tuple(weight.shape)} has non-finite entries")
    if kind == "activation_aware":
        reason = _usable_moment(moment)
        if reason is not None:
            warnings.warn(f"activation_aware estimator: {reason}; falling back to plain SVD", stacklevel=2)
            kind = "svd"
        elif moment.dim != weight.shape[1]:
            raise ValueError(
                f"second moment of dim {moment.dim} does not match the weight's input "
                f"dimension {weight.shape[1]} (weight shape {tuple(weight.shape)})"
            )

    key = None
    if cache is not None:
        moment_fp = moment.fingerprint() if kind == "activation_aware" else ""
        key = factor_key(weight, rank, kind, moment_fp)
        hit = cache.get(key, device=weight.device)
        if hit is not None and _finite(*hit) and hit[2].shape == (weight.shape[0],):
            return Factors(*hit)

    a = b = residual = None
    if kind == "activation_aware":
        try:
            a, b = activation_aware_factors(weight, rank, moment, damping)
            if _finite(a, b):
                residual = residual_variance(weight, a, b, moment)
        except ValueError as err:
            warnings.warn(f"activation_aware estimator failed ({err}); falling back to plain SVD", stacklevel=2)
            a = None
        if a is not None and (residual is None or not _finite(a, b, residual)):
            warnings.warn("activation_aware estimator gave non-finite factors; falling back to plain SVD", stacklevel=2)
            a = b = residual = None
    if a is None:
        a, b = plain_svd_factors(weight, rank)
        residual = zero_residual(weight)
        if cache is not None and kind != "svd":
            key = factor_key(weight, rank, "svd")  # store what was actually computed
    if not _finite(a, b):
        raise ValueError(f"estimator factors of the weight of shape {tuple(weight.shape)} are not finite")
    if cache is not None:
        cache.put(key, a, b, residual)
    return Factors(a, b, residual)
