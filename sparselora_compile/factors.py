"""Estimator factors for the rewrite: computed from the real weights at compile time,
cached on disk by weight content, rank and estimator kind."""
from __future__ import annotations

import torch

from sparselora_compile.runtime.estimator import estimator_factors
from sparselora_compile.runtime.factor_cache import FactorCache


def factor_provider(policy, cache_dir=None):
    cache = FactorCache(cache_dir) if cache_dir is not None else FactorCache()
    moments = getattr(policy, "moments", None) or {}

    def factors(weight: torch.Tensor, path: str):
        moment = moments.get(path)
        with torch.no_grad():
            rank = min(policy.rank, *weight.shape)  # a tiny layer: full rank is exact
            return estimator_factors(weight.detach(), rank, kind=policy.estimator,
                                     moment=moment, cache=cache)
    return factors
