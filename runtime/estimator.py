"""Low-rank estimator factors of a frozen linear weight: `x @ A @ B ≈ x @ W^T`.

SparseLoRA scores channels with this cheap product instead of the full one.
Two ways to build (A, B):

- "svd": truncated SVD of W^T, the best rank-r approximation of the weight itself.
- "activation_aware": the best rank-r approximation of the *output* x W^T in
  expectation over calibration inputs, using their second moment C = E[x^T x].
  Real LLM activations have a few huge-magnitude channels, which plain SVD ignores.
"""

from __future__ import annotations

import warnings

import torch

from .factor_cache import FactorCache, factor_key
from .second_moment import SecondMoment

KINDS = ("svd", "activation_aware")
# Ridge added to C, relative to its mean diagonal: keeps Cholesky well conditioned
# when some input channels never fire in the calibration set.
DEFAULT_DAMPING = 1e-2
# Each failed Cholesky multiplies the damping by 10, at most this many times.
_MAX_DAMPING_RETRIES = 6


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimator factors (A [in, r], B [r, out]) of `weight`, fp32 on its device.

    `kind` is "svd" or "activation_aware". Raises ValueError for an unknown kind or a
    rank outside [1, min(out, in)]. The activation-aware kind falls back to plain SVD
    with a warning when `moment` is missing, empty or non-finite, or when its result
    is not finite. With `cache`, factors are loaded from / stored to disk.
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
        if hit is not None and _finite(*hit):
            return hit

    a = b = None
    if kind == "activation_aware":
        try:
            a, b = activation_aware_factors(weight, rank, moment, damping)
        except ValueError as err:
            warnings.warn(f"activation_aware estimator failed ({err}); falling back to plain SVD", stacklevel=2)
        if a is not None and not _finite(a, b):
            warnings.warn("activation_aware estimator gave non-finite factors; falling back to plain SVD", stacklevel=2)
            a = b = None
    if a is None:
        a, b = plain_svd_factors(weight, rank)
        if cache is not None and kind != "svd":
            key = factor_key(weight, rank, "svd")  # store what was actually computed
    if not _finite(a, b):
        raise ValueError(f"estimator factors of the weight of shape {tuple(weight.shape)} are not finite")
    if cache is not None:
        cache.put(key, a, b)
    return a, b
