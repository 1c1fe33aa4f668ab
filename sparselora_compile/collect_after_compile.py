"""One full garbage collection at the first training forward after a compile.

A compile leaves hundreds of thousands to millions of Python objects behind (FX graphs,
generated code, guards). CPython's oldest generation is collected once the objects that
reached it since its last collection exceed a quarter of those it held then, so the
compile's objects trigger a full collection a few steps later, wherever the allocation
counts put it: on an 8B-shaped model a 0.8-0.9 s pause, which in a 50-step window moves
the mean step by 16-18 ms. Collecting right after the compile, in the step that already
waits for it, settles those objects in the oldest generation; the next full collection
then waits for a quarter as many new long-lived objects again, which steps that compile
nothing are slow to make.
"""
from __future__ import annotations

import gc

from .graph_payoff import compiled

# False leaves collections to Python: for a process that runs its own (a training loop
# that calls gc.collect() itself, or a test suite that compiles hundreds of times).
ENABLED = True


class CollectAfterCompile:
    """`step()` at each training forward: gc.collect() when Dynamo compiled since the
    last call (the backward of the compiling step included)."""

    def __init__(self):
        self.seen = compiled()
        self.collections = 0

    def step(self) -> None:
        now = compiled()
        if now != self.seen:  # != : torch._dynamo.reset() zeroes the counter
            self.seen = now
            if ENABLED:
                gc.collect()
                self.collections += 1
