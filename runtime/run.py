"""The run: everything that changes while one compiled model trains.

The compiled graphs call opaque ops (ops.py) that cannot take Python objects, so each op
gets an int handle and looks its `Run` up here. The table holds its runs weakly: a run
lives exactly as long as the compiled model that owns it (the wrapper, or the backend's
graphs) and its entry disappears with it.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch

from .row_split import SplitCache
from .selection import JoinedFactors

_LIVE: "weakref.WeakValueDictionary[int, Run]" = weakref.WeakValueDictionary()
_handles = itertools.count(1)


@dataclass
class RunStats:
    """Base-product FLOPs of the rewritten blocks in training forwards (the backward's
    input-gradient products keep the same ratio). `saved_fraction` is what sparsity
    removed from those blocks; blocks a policy leaves dense are not rewritten and not
    counted (use `explain` for a whole-model figure). `unmasked_forwards`: training
    forwards that ran causal attention without their right-padding mask (the wrapper's
    `causal_right_padding`); `varlen_forwards`: forwards whose packed rows ran
    variable-length attention (`varlen_attention`), `padding_free_forwards` those of them
    that ran a right-padded batch as one packed row (`padding_free`)."""

    steps: int = 0
    base_flops_dense: int = 0
    base_flops_executed: int = 0
    unmasked_forwards: int = 0
    varlen_forwards: int = 0
    padding_free_forwards: int = 0

    @property
    def saved_fraction(self) -> float:
        if self.base_flops_dense == 0:
            return 0.0
        return 1.0 - self.base_flops_executed / self.base_flops_dense

    def as_dict(self) -> dict:
        return {"steps": self.steps, "base_flops_dense": self.base_flops_dense,
                "base_flops_executed": self.base_flops_executed,
                "saved_fraction": self.saved_fraction, "unmasked_forwards": self.unmasked_forwards,
                "varlen_forwards": self.varlen_forwards,
                "padding_free_forwards": self.padding_free_forwards}

    def reset(self) -> None:
        self.steps = self.base_flops_dense = self.base_flops_executed = 0
        self.unmasked_forwards = self.varlen_forwards = self.padding_free_forwards = 0


@dataclass(eq=False)
class Run:
    """The state of one compiled model's training run (see the module doc).

    warmup_steps, dense_output_tokens: copied from the policy when the run is made.
    mlp_all_rows_max_k: the sparse MLP's layout switch (runtime/sparse_mlp.py).
    """

    warmup_steps: int = 0
    dense_output_tokens: bool = True
    mlp_all_rows_max_k: int = 512
    handle: int = field(init=False)
    step: int = 0        # index of the current training forward
    next_step: int = 0
    force_dense: bool = False     # eval() under the wrapper
    labels: torch.Tensor | None = None  # the batch, handed in when the graph does not see it
    attention_mask: torch.Tensor | None = None
    first_layer: int | str | None = None  # the graph holding this layer (or block) counts the steps
    stats: RunStats = field(default_factory=RunStats)
    record: dict | None = None  # block name -> selections, when recording
    collect_moments: bool = False  # activation-aware estimator fed by the dense warm-up
    zero_residuals: bool = False  # plain SVD factors: the scores skip their zero residual term
    moments: dict = field(default_factory=dict)  # block name -> SecondMoment of its input
    # Regional compilation (one graph serves many decoder layers): the running layer's
    # module path, set by the eager glue around each layer call, and the token split of
    # the current forward, shared by every layer's graph (`forward_id` set by the wrapper).
    layer_prefix: str | None = None
    forward_id: int = 0
    shared_rows: tuple | None = None  # (key, rows)
    splits: SplitCache = field(default_factory=SplitCache)
    joined: JoinedFactors = field(default_factory=JoinedFactors)
    said: set = field(default_factory=set)  # one-time messages already given

    def __post_init__(self):
        self.handle = next(_handles)
        _LIVE[self.handle] = self

    def sparse_now(self) -> bool:
        return not self.force_dense and self.step >= self.warmup_steps

    def set_step(self, step: int) -> None:
        """Set the index of the current and next training forward (e.g. when resuming)."""
        self.step = self.next_step = int(step)

    def set_labels(self, labels, attention_mask=None) -> None:
        """Hand the batch's labels (and padding mask) to the compiled layers when their
        graph does not receive them (`slc.compile`'s wrapper does this itself)."""
        self.labels, self.attention_mask = labels, attention_mask

    def block_name(self, name: str) -> str:
        return f"{self.layer_prefix}.{name}" if self.layer_prefix else name

    def begin_forward(self) -> None:
        self.step = self.next_step
        self.next_step += 1
        self.stats.steps += 1

    def count_flops(self, dense: int, executed: int) -> None:
        # Forward products only: skip recomputation inside a backward (checkpointing).
        if torch._C._current_graph_task_id() == -1:
            self.stats.base_flops_dense += dense
            self.stats.base_flops_executed += executed

    def collect_input(self, name: str, x: torch.Tensor) -> None:
        """During the dense warm-up, stream the block input's second moment."""
        if not self.collect_moments or self.sparse_now() or torch._C._current_graph_task_id() != -1:
            return
        from .second_moment import SecondMoment
        if name not in self.moments:
            self.moments[name] = SecondMoment(x.shape[-1])
        self.moments[name].update(x)


def run_of(handle: int) -> Run:
    try:
        return _LIVE[handle]
    except KeyError:
        raise RuntimeError(f"sparselora: run {handle} no longer exists (its compiled model was "
                           "freed); compile the model again") from None
