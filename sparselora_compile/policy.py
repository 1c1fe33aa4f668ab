"""The sensitivity policy: which block gets how much sparsity, and when.

A policy is configuration only, immutable once made: it answers one question per block,
`sparsity_for(block) -> float`, plus a few global switches (warm-up, dense output tokens,
estimator). What changes while training (the step, statistics, the token split) belongs
to the run of a compiled model (`runtime.run.Run`). Subclass it, or pass `decide=fn`, to
write your own rule; see README "Custom policies".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Collection, Mapping

from sparselora_compile.passes.blocks import BLOCK_KEY, BlockInfo
from sparselora_compile.runtime.estimator import KINDS as ESTIMATORS

from .yaml_policy import policy_kwargs_from_yaml

__all__ = ["Policy", "BlockInfo", "ESTIMATORS"]


class FrozenMap(dict):
    """A dict that refuses changes (the policy's per-block map)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a Policy is immutable; make a new one (dataclasses.replace)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self):
        return FrozenMap, (dict(self),)

    def __hash__(self):
        return hash(frozenset(self.items()))


@dataclass(frozen=True)
class Policy:
    """SparseLoRA policy.

    mlp, attention: default sparsity of every MLP / attention block (fraction of channels
        dropped, in [0, 1)).
    sparsity: per-block overrides in the reference's key format, e.g.
        {"layers.29.mlp": 0.99, "layers.29.self_attn": 0.75}.
    dense_layers: layer indices always left dense.
    dense_edges: keep the first 10% of layers (at least one) and the last layer dense.
    rank, estimator: the low-rank estimator ("svd": the paper's; "activation_aware").
    dense_output_tokens: compute output tokens (labels != -100) densely.
    warmup_steps or warmup_fraction (+ total_steps): dense training steps first.
    dense_eval: no sparsity under torch.no_grad() / inference mode.
    k_multiple: round each kept-channel count up to this multiple (GEMM tiles).
    decide: optional fn(BlockInfo) -> sparsity | None (None falls back to the rules).
    """

    mlp: float = 0.0
    attention: float = 0.0
    sparsity: Mapping[str, float] = field(default_factory=dict)
    dense_layers: Collection[int] = ()
    dense_edges: bool = False
    rank: int = 8
    estimator: str = "svd"
    dense_output_tokens: bool = True
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    total_steps: int | None = None
    dense_eval: bool = True
    k_multiple: int = 8
    decide: Callable[[BlockInfo], float | None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "sparsity", FrozenMap(self.sparsity))
        object.__setattr__(self, "dense_layers", frozenset(int(i) for i in self.dense_layers))
        self._validate()

    # ---- the per-block decision -------------------------------------------------------
    def sparsity_for(self, block: BlockInfo) -> float:
        if self.decide is not None:
            s = self.decide(block)
            if s is not None:
                _check_fraction(f"decide({block.name})", s)
                return float(s)
        if block.layer is not None:
            if self.forced_dense(block):
                return 0.0
            if block.key in self.sparsity:
                return float(self.sparsity[block.key])
        return float(self.mlp if block.kind == "mlp" else self.attention)

    def forced_dense(self, block: BlockInfo) -> bool:
        """The layer rules (`dense_layers`, `dense_edges`) keep this block dense whatever
        the sparsity map says."""
        if block.layer is None:
            return False
        if block.layer in self.dense_layers:
            return True
        if self.dense_edges and block.num_layers:
            n_first = max(1, math.ceil(0.1 * block.num_layers))
            return block.layer < n_first or block.layer == block.num_layers - 1
        return False

    def kept_channels(self, block: BlockInfo, sparsity: float) -> int:
        k = int(block.channels * (1.0 - sparsity))
        k = max(1, math.ceil(k / self.k_multiple) * self.k_multiple)
        return min(k, block.channels)

    def warmup(self) -> int:
        if self.warmup_fraction is None:
            return self.warmup_steps
        return int(math.ceil(self.warmup_fraction * self.total_steps))

    # ---- checks ------------------------------------------------------------------------
    def _validate(self) -> None:
        _check_fraction("mlp", self.mlp)
        _check_fraction("attention", self.attention)
        for key, s in self.sparsity.items():
            if not BLOCK_KEY.match(key):
                raise ValueError(
                    f"Policy.sparsity key {key!r} is not of the form 'layers.N.mlp' or "
                    f"'layers.N.self_attn'")
            _check_fraction(f"sparsity[{key!r}]", s)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Policy.estimator={self.estimator!r}; expected one of {ESTIMATORS}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"Policy.rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.k_multiple, int) and self.k_multiple >= 1):
            raise ValueError(f"Policy.k_multiple must be a positive int, got {self.k_multiple!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"Policy.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_fraction is not None:
            if not 0.0 <= self.warmup_fraction <= 1.0:
                raise ValueError(f"Policy.warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
            if self.total_steps is None:
                raise ValueError(
                    f"Policy.warmup_fraction={self.warmup_fraction} needs total_steps: pass "
                    f"Policy(..., total_steps=N) or the preset's total_steps=N, or use warmup_steps")

    def referenced_layers(self) -> set[int]:
        layers = set(self.dense_layers)
        layers |= {int(BLOCK_KEY.match(k).group(1)) for k in self.sparsity}
        return layers

    def check_layers(self, found: Collection[int]) -> None:
        """A policy naming layers the model does not have is a mistake, not a no-op."""
        found = set(found)
        if not found:
            return
        missing = sorted(i for i in self.referenced_layers() if i > max(found))
        if missing and min(found) == 0:
            raise ValueError(
                f"Policy names layer(s) {missing}, but the model has layers 0..{max(found)}")

    def check_rank(self, blocks) -> None:
        """The estimator factors each sparse block's gate/up or q/k/v weight at this rank, and a
        [out, in] weight has no rank above min(out, in): asking for one is a mistake."""
        for b in blocks:
            limit = min(b.in_features, b.channels)
            if self.rank > limit:
                raise ValueError(f"Policy.rank={self.rank} exceeds min(in, out)={limit} of the weights "
                                 f"of {b.name} ({b.in_features} inputs, {b.channels} channels); "
                                 f"use rank <= {limit}")

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Policy option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, source: str, total_steps: int | None = None) -> "Policy":
        """The reference SparseLoRA YAML format (`start_step`, `mode: svd_8`,
        `skip_output_tokens`, `sparsity:`), from a file path or YAML text."""
        return cls(**policy_kwargs_from_yaml(source, total_steps=total_steps))


def _check_fraction(name, s) -> None:
    if not isinstance(s, (int, float)) or not (0.0 <= float(s) < 1.0):
        raise ValueError(f"sparsity {name}={s!r} is outside [0, 1)")
