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


def plain_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of W^T: A = U_r sqrt(S_r) [in, r], B = sqrt(S_r) V_r^T [r, out].

    Computed in fp32 whatever the weight's dtype; returned fp32, contiguous, on its device.
    """
    _check_rank(weight, rank)
    wt = weight.detach().to(torch.float32).T
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)
    # Split sqrt(S) over both factors so A and B have comparable scales (fp16/bf16 safe).
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).contiguous()
    b = (root[:, None] * vh[:rank]).contiguous()
    return a, b


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
    # float64 for the [in, in] Cholesky and triangular solve: C spans many orders of
    # magnitude on real activations, and these are cheap next to the SVD.
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
    whitened = (chol.T @ wt).to(torch.float32)
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    root = s[:rank].sqrt()
    a = torch.linalg.solve_triangular(chol.T, (u[:, :rank] * root).to(torch.float64), upper=True)
    return a.to(torch.float32).contiguous(), (root[:, None] * vh[:rank]).contiguous()


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
