"""bench/graph_keys.py: the keeping policy over a user-shaped stream, on CPU."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import graph_keys  # noqa: E402

from sparselora_compile import cuda_graphs  # noqa: E402
from sparselora_compile.cuda_graphs import LayerGraphs  # noqa: E402


def _patched():
    return LayerGraphs.needs_cuda, LayerGraphs.__dict__["make_graphed"], cuda_graphs.MAX_SETS


def test_a_step_replays_only_a_key_seen_before_and_the_stand_in_is_undone():
    before = _patched()
    r = graph_keys.run("padded", steps=4, bucket=1024, sets=2)
    assert _patched() == before
    keys, graphed = r["step_keys"], r["steps_graphed"]
    assert len(keys) == len(graphed) == graph_keys.WARMUP + 4 == sum(r["keys"].values()) + graph_keys.WARMUP
    assert r["graphed_steps"] == sum(graphed[graph_keys.WARMUP:]) and r["distinct_keys"] == len(r["keys"])
    # a key is captured on its second sighting: the step that first shows it runs ungraphed
    assert all(k in keys[:i] for i, (k, g) in enumerate(zip(keys, graphed)) if g)
    assert r["graphed_steps"] > 0 and r["captures"] >= 1  # one key carries most padded steps
