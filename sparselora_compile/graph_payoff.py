"""Whether CUDA graphs pay for this model and these batches, measured while training.

A replay saves the host the time to queue a layer's kernels; it saves nothing when the
GPU, not the host, sets the step's pace (packed rows of ~4,096 tokens on an H200), and
then the graph sets only cost captures and memory. So each training step is timed on the
GPU, from an event at its forward's start to one at the next training forward's start
(forward, backward, optimizer and the host's time in between: what a user waits for),
ungraphed before its key's capture and replayed after. A step during which Dynamo
compiled is not timed (its host time would flatter the graphs). Once a key has TIMED
replayed steps and an ungraphed one, their median is compared with the fastest
ungraphed one: under PAYOFF of it (a gain above noise), the graphs pay and timing stops;
else `LayerGraphs` turns graphs off and drops their sets.
"""
from __future__ import annotations

import statistics
from collections import deque

import torch
from torch._dynamo.utils import counters

PAYOFF = 0.95  # a replayed step must take less than this share of an ungraphed one
TIMED = 3      # replayed steps of a key timed before the verdict


class GpuSpan:
    """The GPU time between two events, readable once the GPU got to the second."""

    def __init__(self, device: torch.device, graphed: bool):
        self.stream = torch.cuda.current_stream(device)  # the model's device, not the current one
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record(self.stream)
        self.end = None

    def close(self) -> None:
        self.end = torch.cuda.Event(enable_timing=True)
        self.end.record(self.stream)

    def ms(self) -> float | None:
        if self.end is None or not self.end.query():
            return None
        return self.start.elapsed_time(self.end)


class Payoff:
    """The timings of one model's training steps per graph key, and the verdict once there
    is one: None (still timing), True (graphs pay) or the reason they do not."""

    span = GpuSpan  # a class attribute, so that CPU tests can time with a stand-in

    def __init__(self):
        self.verdict: bool | str | None = None
        self.figures: dict | None = None  # the compared times, once judged
        self._open = None                 # (key, graphed, span, compiles) of the running step
        self._pending: deque = deque()    # closed spans the GPU has not reached yet
        self._ms: dict = {}               # key -> {True: replays' ms, False: ungraphed ms}

    def boundary(self) -> None:
        """A training forward begins: the previous one's step, if timed, ends here."""
        if self._open is not None:
            key, graphed, span, before = self._open
            span.close()
            if compiled() == before:
                self._pending.append((key, graphed, span))
            self._open = None

    def start(self, key, graphed: bool) -> None:
        """The step of a training forward of `key` begins; `graphed`: it replays."""
        if self.verdict is None and (key[1].type == "cuda" or self.span is not GpuSpan):
            self._open = (key, graphed, self.span(key[1], graphed), compiled())

    def judge(self) -> bool | str | None:
        """Reads the spans the GPU has reached; returns the verdict (see the class)."""
        while self._pending and self.verdict is None:
            key, graphed, span = self._pending[0]
            ms = span.ms()
            if ms is None:
                break
            self._pending.popleft()
            times = self._ms.setdefault(key, {True: deque(maxlen=8), False: deque(maxlen=8)})
            times[graphed].append(ms)
            if len(times[True]) >= TIMED and times[False]:
                self._decide(statistics.median(times[True]), min(times[False]))
        return self.verdict

    def forget(self, key) -> None:
        """`key`'s graphs were evicted: its replays so far no longer decide anything."""
        self._ms.get(key, {}).get(True, []).clear()

    def _decide(self, replayed: float, ungraphed: float) -> None:
        self.figures = {"replayed_ms": round(replayed, 2), "ungraphed_ms": round(ungraphed, 2)}
        if replayed < PAYOFF * ungraphed:
            self.verdict = True
        else:
            self.verdict = (f"a replayed step took {replayed:.1f} ms on the GPU against "
                            f"{ungraphed:.1f} ms ungraphed: the GPU, not the host, sets the pace")
        self._pending.clear()
        self._ms.clear()


def compiled() -> int:
    """Graphs Dynamo has compiled in this process."""
    return counters["stats"]["unique_graphs"]
