"""The sensitivity policy: which block gets how much sparsity, and when.

A policy answers one question per block, `sparsity_for(block) -> float`, plus a few
global switches (warm-up, dense output tokens, estimator). Subclass it, or pass
`decide=fn`, to write your own rule; see README "Custom policies".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Collection

ESTIMATORS = ("svd", "activation_aware")
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(mlp|self_attn|attention)$")


@dataclass(frozen=True)
class BlockInfo:
    """What a policy sees of one block found in the graph."""

    name: str            # module path, e.g. "model.layers.3.mlp"
    layer: int | None    # decoder layer index read from the module names
    kind: str            # "mlp" or "attention"
    in_features: int     # hidden size feeding the block
    channels: int        # selectable channels: d_ff (mlp) or n_kv_heads * head_dim (attention)
    num_layers: int | None = None  # layers seen in this graph (max index + 1)
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None


@dataclass
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
    moments: input second moments for the activation-aware estimator, from
        `collect_moments(model, batches)`; without them the moments are collected during
        the dense warm-up and the factors refreshed when it ends (needs warmup > 0).
    """

    mlp: float = 0.0
    attention: float = 0.0
    sparsity: dict[str, float] = field(default_factory=dict)
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
    moments: dict | None = None  # activation_aware: {linear path: SecondMoment}, see collect_moments

    def __post_init__(self):
        self.sparsity = dict(self.sparsity)
        self.dense_layers = frozenset(int(i) for i in self.dense_layers)
        self.validate()

    # ---- the per-block decision -------------------------------------------------------
    def sparsity_for(self, block: BlockInfo) -> float:
        if self.decide is not None:
            s = self.decide(block)
            if s is not None:
                _check_fraction(f"decide({block.name})", s)
                return float(s)
        if block.layer is not None:
            if block.layer in self.dense_layers:
                return 0.0
            if self.dense_edges and block.num_layers:
                n_first = max(1, math.ceil(0.1 * block.num_layers))
                if block.layer < n_first or block.layer == block.num_layers - 1:
                    return 0.0
            key_kind = "mlp" if block.kind == "mlp" else "self_attn"
            key = f"layers.{block.layer}.{key_kind}"
            if key in self.sparsity:
                return float(self.sparsity[key])
        return float(self.mlp if block.kind == "mlp" else self.attention)

    def kept_channels(self, block: BlockInfo, sparsity: float) -> int:
        k = int(block.channels * (1.0 - sparsity))
        k = max(1, math.ceil(k / self.k_multiple) * self.k_multiple)
        return min(k, block.channels)

    def warmup(self) -> int:
        if self.warmup_fraction is None:
            return self.warmup_steps
        return int(math.ceil(self.warmup_fraction * self.total_steps))

    # ---- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        _check_fraction("mlp", self.mlp)
        _check_fraction("attention", self.attention)
        for key, s in self.sparsity.items():
            if not _KEY.match(key):
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
        layers |= {int(_KEY.match(k).group(1)) for k in self.sparsity}
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
        from .yaml_policy import policy_from_yaml
        return policy_from_yaml(source, total_steps=total_steps, cls=cls)


def _check_fraction(name, s) -> None:
    if not isinstance(s, (int, float)) or not (0.0 <= float(s) < 1.0):
        raise ValueError(f"sparsity {name}={s!r} is outside [0, 1)")


def _state_of(policy: Policy):
    """The runtime state the compiled ops read (one per Policy object)."""
    from sparselora_compile.runtime.state import new_state
    st = policy.__dict__.get("_runtime_state")
    if st is None:
        st = new_state(warmup_steps=policy.warmup(), dense_output_tokens=policy.dense_output_tokens)
        policy.__dict__["_runtime_state"] = st
    return st


Policy.runtime_state = _state_of
Policy.stats = property(lambda self: _state_of(self).stats,
                        doc="RunStats: steps and base FLOPs of training forwards.")
Policy.step = property(lambda self: _state_of(self).step,
                       doc="Index of the current (last started) training step.")


def _set_step(self: Policy, step: int) -> None:
    """Set the index of the next training forward (e.g. when resuming, or when your
    model's graph breaks make per-forward counting unreliable)."""
    st = _state_of(self)
    st.next_step = int(step)
    st.step = int(step)


Policy.set_step = _set_step
