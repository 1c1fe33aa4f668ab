"""bench/graph_keys.py: the keeping policy over a user-shaped stream, on CPU."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import graph_keys  # noqa: E402

from sparselora_compile import cuda_graphs, dynamic_dims  # noqa: E402
from sparselora_compile.cuda_graphs import LayerGraphs  # noqa: E402


def _patched():
    return LayerGraphs.needs_cuda, LayerGraphs.__dict__["make_graphed"], cuda_graphs.MAX_SETS


@pytest.fixture(scope="module")
def padded():
    """One run for the tests below: (result, patched before, patched after). Several tests,
    not one: xdist's loadfile queues the files with the fewest tests last, and this run
    (~10 s) would then end the suite on one core. Static shapes, as conftest.py sets them
    for each test."""
    before = _patched()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_dims, "DEFAULT", False)
        r = graph_keys.run("padded", steps=4, bucket=1024, sets=2, inner="eager")
    return r, before, _patched()


def test_the_stand_in_is_undone(padded):
    _, before, after = padded
    assert after == before


def test_every_step_is_counted(padded):
    r = padded[0]
    keys, graphed = r["step_keys"], r["steps_graphed"]
    assert len(keys) == len(graphed) == graph_keys.WARMUP + 4 == sum(r["keys"].values()) + graph_keys.WARMUP
    assert r["graphed_steps"] == sum(graphed[graph_keys.WARMUP:]) and r["distinct_keys"] == len(r["keys"])


def test_a_step_replays_only_a_key_seen_before(padded):
    r = padded[0]
    keys, graphed = r["step_keys"], r["steps_graphed"]
    # a key is captured on its second sighting: the step that first shows it runs ungraphed
    assert all(k in keys[:i] for i, (k, g) in enumerate(zip(keys, graphed)) if g)
    assert r["graphed_steps"] > 0 and r["captures"] >= 1  # one key carries most padded steps
