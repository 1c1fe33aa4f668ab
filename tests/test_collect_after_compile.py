"""The wrapper collects garbage once at the first training forward after a compile."""
import gc
import types

import torch

import sparselora_compile as slc
from sparselora_compile import collect_after_compile
from llama import ALL, batch, tiny_llama


def test_one_collection_after_each_compile(monkeypatch):
    monkeypatch.setattr(collect_after_compile, "ENABLED", True)  # conftest turns it off
    calls = []  # the wrapper's full collections (Dynamo's compile runs its own)
    monkeypatch.setattr(collect_after_compile, "gc",
                        types.SimpleNamespace(collect=lambda: calls.append(gc.collect())))
    wrapped = slc.compile(tiny_llama(ALL), slc.Policy(mlp=0.5, attention=0.5), inner="aot_eager",
                          dynamic=False)
    ids, labels = batch(t=10)

    def step(ids, labels):
        wrapped(input_ids=ids, labels=labels).loss.backward()
        return len(calls)

    assert step(ids, labels) == 0  # compiles: the next training forward collects
    assert step(ids, labels) == 1
    assert step(ids, labels) == 1  # nothing compiled since
    with torch.no_grad():
        wrapped(input_ids=ids)     # compiles its graphs, but only a training forward collects
    assert len(calls) == 1
    assert step(ids, labels) == 2
    ids, labels = batch(t=14)
    assert step(ids, labels) == 2  # a new static length compiles again
    assert step(ids, labels) == 3
    assert wrapped._collect.collections == 3
    monkeypatch.setattr(collect_after_compile, "ENABLED", False)
    ids, labels = batch(t=18)
    step(ids, labels)
    assert step(ids, labels) == 3  # off: Python's own thresholds only
