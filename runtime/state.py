"""Per-policy runtime state read by the custom ops at run time.

The ops are opaque to the compiler, so anything data-dependent that may change between
steps without a recompile lives here: the step counter (dense warm-up), labels handed in
from outside the graph, FLOP counters, and optional recording for equivalence tests.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

_STATES: dict[int, "RuntimeState"] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


@dataclass
class RunStats:
    """Base-product FLOPs of the rewritten blocks in training forwards (the backward's
    input-gradient products keep the same ratio). `saved_fraction` is what sparsity
    removed from those blocks; blocks a policy leaves dense are not rewritten and not
    counted (use `explain` for a whole-model figure)."""

    steps: int = 0
    base_flops_dense: int = 0
    base_flops_executed: int = 0

    @property
    def saved_fraction(self) -> float:
        if self.base_flops_dense == 0:
            return 0.0
        return 1.0 - self.base_flops_executed / self.base_flops_dense

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "base_flops_dense": self.base_flops_dense,
            "base_flops_executed": self.base_flops_executed,
            "saved_fraction": self.saved_fraction,
        }

    def reset(self) -> None:
        self.steps = self.base_flops_dense = self.base_flops_executed = 0


@dataclass
class RuntimeState:
    state_id: int
    warmup_steps: int = 0
    dense_output_tokens: bool = True
    step: int = 0        # index of the current training forward
    next_step: int = 0
    force_dense: bool = False
    labels: torch.Tensor | None = None  # set from outside the graph when it has none
    attention_mask: torch.Tensor | None = None
    first_layer: int | None = None  # the graph holding this layer counts the steps
    stats: RunStats = field(default_factory=RunStats)
    record: dict | None = None  # block name -> selections, when recording
    collect_moments: bool = False  # activation-aware estimator fed by the dense warm-up
    moments: dict = field(default_factory=dict)  # block name -> SecondMoment of its input
    # Regional compilation (one graph serves many decoder layers): the running layer's
    # module path, set by the eager glue around each layer call, and the token split of
    # the current forward, shared by every layer's graph (`forward_id` set by the wrapper).
    layer_prefix: str | None = None
    forward_id: int = 0
    shared_rows: tuple | None = None  # (key, rows)

    def block_name(self, name: str) -> str:
        return f"{self.layer_prefix}.{name}" if self.layer_prefix else name

    def begin_forward(self) -> None:
        self.step = self.next_step
        self.next_step += 1
        self.stats.steps += 1

    def sparse_now(self) -> bool:
        return not self.force_dense and self.step >= self.warmup_steps

    def count_flops(self, dense: int, executed: int) -> None:
        # Forward products only: skip recomputation inside a backward (checkpointing).
        if torch._C._current_graph_task_id() == -1:
            self.stats.base_flops_dense += dense
            self.stats.base_flops_executed += executed


def collect_input(state_id: int, name: str, x: torch.Tensor) -> None:
    """During the dense warm-up, stream the block input's second moment."""
    st = get_state(state_id)
    if not st.collect_moments or st.sparse_now() or torch._C._current_graph_task_id() != -1:
        return
    from .second_moment import SecondMoment
    if name not in st.moments:
        st.moments[name] = SecondMoment(x.shape[-1])
    st.moments[name].update(x)


def new_state(**kwargs) -> RuntimeState:
    with _lock:
        sid = next(_ids)
        state = RuntimeState(state_id=sid, **kwargs)
        _STATES[sid] = state
    return state


def get_state(state_id: int) -> RuntimeState:
    try:
        return _STATES[state_id]
    except KeyError:
        raise RuntimeError(f"sparselora: unknown runtime state {state_id}") from None
