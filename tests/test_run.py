"""Who owns the run: one Run per compiled model, reachable from what compile returns,
freed with it; the policy stays configuration."""
import gc

import pytest
import torch

import sparselora_compile as slc
from sparselora_compile.runtime.run import Run, run_of

from llama import ALL, batch, tiny_llama

POLICY = slc.Policy(mlp=0.5, attention=0.5)


def test_two_models_with_one_policy_have_their_own_runs():
    ids, labels = batch(n_out=3)
    a = slc.compile(tiny_llama(ALL, layers=1), POLICY, inner="aot_eager")
    b = slc.compile(tiny_llama(ALL, layers=1), POLICY, inner="aot_eager")
    for _ in range(2):
        a(input_ids=ids, labels=labels).loss.backward()
    b(input_ids=ids, labels=labels).loss.backward()
    assert a.run is not b.run and slc.run_of(a) is a.run
    assert (a.stats.steps, b.stats.steps) == (2, 1)
    a.set_step(7)
    assert a.step == 7 and b.step == 0


def test_run_of_a_plain_torch_compile():
    ids, labels = batch(n_out=3)
    compiled = torch.compile(tiny_llama(ALL, layers=1), backend="sparselora",
                             options={"policy": POLICY, "inner": "aot_eager"})
    with pytest.raises(RuntimeError, match="not run a forward"):
        slc.run_of(compiled)
    compiled(input_ids=ids, labels=labels).loss.backward()
    run = slc.run_of(compiled)
    assert isinstance(run, Run) and run.stats.steps == 1 and run.stats.saved_fraction > 0
    with pytest.raises(ValueError, match="no run found"):
        slc.run_of(torch.nn.Linear(2, 2))


def test_a_run_is_freed_with_its_owner():
    run = Run()
    handle = run.handle
    assert run_of(handle) is run
    del run
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        run_of(handle)
