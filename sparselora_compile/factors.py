"""Estimator factors for the rewrite: computed from the real weights at compile time,
cached on disk by weight content, rank, estimator kind and calibration statistics.

The graph passes add a placeholder per factor and describe it in a
`passes.rewrite.FactorRequest`; `factor_inputs` makes the tensors from the real weights.

The activation-aware estimator needs input second moments. Rule: moments the user gives
(the `moments` option, from `collect_moments`) are used at compile time; otherwise the
compiled graph starts with plain SVD factors, the select ops stream each block's input
moment during the dense warm-up, and when the warm-up ends the factors are recomputed and
copied in place (same shapes: no recompile), residual variances included (zeros under
the plain SVD placeholder). So the first step pays nothing beyond the SVDs, and each
warm-up step one x^T x per block.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from sparselora_compile.runtime.estimator import Factors, estimator_factors
from sparselora_compile.runtime.factor_cache import FactorCache
from sparselora_compile.runtime.second_moment import SecondMoment


def _lookup(moments: dict, path: str):
    """Moments are keyed by the model's module names; graph paths may carry more or
    fewer prefixes (PEFT wrappers, or a graph traced from an inner module)."""
    hits = [k for k in moments if k == path or k.endswith("." + path) or path.endswith("." + k)]
    return moments[max(hits, key=len)] if hits else None


class FactorSlot(NamedTuple):
    """The estimator tensors one site's graph inputs hold (refreshed in place after the
    warm-up)."""
    block: str
    path: str
    weight: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    residual: Optional[torch.Tensor]  # a graph input for MLP gate/up only, else None


def factor_provider(policy, moments=None, cache_dir=None):
    """fn(weight, site path) -> Factors, for `policy`'s estimator and rank."""
    cache = FactorCache(cache_dir)
    moments = moments or {}
    kind = policy.estimator
    if kind == "activation_aware" and not moments:
        kind = "svd"  # placeholder until the warm-up's moments arrive (see module doc)

    def factors(weight: torch.Tensor, path: str) -> Factors:
        with torch.no_grad():  # plan_blocks checked the rank against the weights
            return estimator_factors(weight.detach(), policy.rank, kind=kind,
                                     moment=_lookup(moments, path), cache=cache)
    return factors


def factor_inputs(requests, weights, factor_fn, rename=None) -> "FactorInputs":
    """The factor tensors of `requests` (one compiled graph's), made from `weights`, a
    list with each request's real weight; `rename(path)` maps a request's path to the
    layer that runs the graph (regional compilation)."""
    rename = rename or (lambda p: p)
    inputs, slots = [], []
    for req, w in zip(requests, weights):
        w = req.estimator_weight(w)  # [out, in]: Conv1D's transposed, one half of a fused gate_up
        path, block = rename(req.path), rename(req.block)
        a, b, r = factor_fn(w, path)
        made = (a, b, r)[: len(req.placeholders)]
        inputs += made
        slots.append(FactorSlot(block, path, w, a, b, r if req.residual else None))
    return FactorInputs(inputs, slots)


def refresh_from_warmup(run, slots, cache_dir=None) -> int:
    """Recompute activation-aware factors from the moments the warm-up collected and copy
    them (and the residual variances, where the graph reads them) into the compiled graph's
    factor inputs. `slots`: `passes.rewrite.FactorSlot`s. Returns how many were refreshed."""
    cache = FactorCache(cache_dir)
    done = 0
    for slot in slots:
        moment: SecondMoment | None = run.moments.get(slot.block)
        if moment is None or moment.count == 0:
            continue
        with torch.no_grad():
            new = estimator_factors(slot.weight.detach(), slot.a.shape[1], kind="activation_aware",
                                    moment=moment, cache=cache)
            slot.a.copy_(new.a)
            slot.b.copy_(new.b)
            if slot.residual is not None:
                slot.residual.copy_(new.residual)
        done += 1
    if not done:
        warnings.warn("activation_aware estimator: no warm-up moments were collected; "
                      "keeping plain SVD factors", stacklevel=2)
    return done


@dataclass
class FactorInputs:
    """The factor graph inputs of one compiled graph (or, regionally, of one layer running
    it) with their slots; refreshed in place once, when the dense warm-up ends."""
    inputs: list
    slots: list
    refreshed: bool = False

    def refresh_if_due(self, run, cache_dir=None) -> None:
        if run.collect_moments and not self.refreshed and run.sparse_now():
            refresh_from_warmup(run, self.slots, cache_dir)
            self.refreshed = True


def collect_moments(model: torch.nn.Module, batches, *, max_batches: int | None = None) -> dict:
    """Input second moments of every frozen linear, streamed over `batches` (dicts of
    model kwargs, or tensors passed positionally), for the activation-aware estimator:
    `slc.compile(model, policy, moments=...)`. Runs the model eagerly under no_grad; nothing is kept but [in, in]."""
    moments: dict[str, SecondMoment] = {}
    handles = []
    for name, mod in model.named_modules():
        conv1d = type(mod).__name__ == "Conv1D"  # transformers' (GPT-2): weight [in, out]
        if (isinstance(mod, torch.nn.Linear) or conv1d) and not mod.weight.requires_grad:
            key = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
            moments[key] = SecondMoment(mod.weight.shape[0] if conv1d else mod.in_features)
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, key=key: moments[key].update(args[0]) and None))
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
                n += 1
                if max_batches is not None and n >= max_batches:
                    break
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("collect_moments: the calibration set is empty")
    return {k: m for k, m in moments.items() if m.count}
