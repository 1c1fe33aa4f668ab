"""cuda_graphs=True: which keys (the token split's sizes, the autocast dtype) get graph
sets, which sets are kept and when graphs are dropped, with the stand-in capture
(graphed_training.py) on CPU.

The keeping policy does not depend on depth: these tests train two decoder layers (two
layer plans, one chained layer) rather than test_cuda_graphs.py's three.
"""
import logging

import pytest
import torch

from sparselora_compile import cuda_graphs
from sparselora_compile.graph_payoff import Payoff

from graphed_training import StandIn, assert_same, plain_run, split_batches, train

LAYERS = 2


class FakeSpan:
    """A forward's GPU span without a GPU: `ms_of[graphed]` milliseconds."""
    ms_of = {True: 10.0, False: 10.0}

    def __init__(self, device, graphed):
        self.graphed = graphed

    def close(self):
        pass

    def ms(self):
        return self.ms_of[self.graphed]


def _graphed(monkeypatch, sizes, seed, **kwargs):
    """Training with the stand-in capture on split_batches(sizes, seed), checked against
    ungraphed training on them; (losses, LoRA weights, stats, graphs)."""
    plain = plain_run(sizes, seed, layers=LAYERS)
    graphed = train(True, split_batches(sizes, seed), monkeypatch=monkeypatch, stand_in=StandIn(),
                    layers=LAYERS, **kwargs)
    assert_same(graphed, plain)
    assert graphed[2] == plain[2]  # FLOPs of replayed layers counted as ungraphed ones
    return graphed


def test_graph_sets_are_keyed_on_the_autocast_dtype(monkeypatch):
    """A replay repeats the casts autocast made at its capture: forwards under autocast
    and forwards without it get sets of their own, and one never replays the other's."""
    g = train(True, split_batches((3,) * 4), monkeypatch=monkeypatch, stand_in=StandIn(),
              casts=(torch.bfloat16,) * 2 + (None,) * 2, layers=LAYERS)[3]
    assert sorted(str(k[-1]) for k in g.sets) == ["None", "torch.bfloat16"]
    # each half: a record, then a capture that replays (a key blind to autocast: 1 capture
    # and 3 replays)
    assert g.captures == 2 and g.graphed_forwards == 2


@pytest.mark.parametrize("replayed_ms", [8.0, 9.8])
def test_graphs_whose_replays_are_not_faster_are_dropped(monkeypatch, caplog, replayed_ms):
    """Replayed steps that take 98% of an ungraphed step's GPU time (the GPU sets the
    pace) turn graphs off and drop their sets; at 80% they keep them, and timing stops."""
    monkeypatch.setattr(Payoff, "span", FakeSpan)
    monkeypatch.setattr(FakeSpan, "ms_of", {True: replayed_ms, False: 10.0})
    # steps that compile are not timed: step 1, and here the first replay (the stand-in
    # runs the layers). Key 5 is timed ungraphed at step 2, captured at 3, timed
    # replaying at 4-6, and judged when step 7 begins
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        g = _graphed(monkeypatch, (3, 5, 5, 5, 5, 5, 5), 60)[3]
    pays = replayed_ms == 8.0
    assert g.stats()["payoff"] == {"replayed_ms": replayed_ms, "ungraphed_ms": 10.0, "pays": pays}
    if pays:
        assert g.graphed_forwards == 5 and len(g.sets) == 1 and g.disabled is None
        assert "did not pay" not in caplog.text
    else:
        assert g.graphed_forwards == 4 and not g.sets and "9.8 ms on the GPU against 10.0" in g.disabled
        assert caplog.text.count("graph sets are dropped") == 1


def test_a_new_split_runs_ungraphed_until_it_repeats(monkeypatch):
    # output tokens 3, 3, 5, 3, 5, 5, 5: the split's sizes key the graph sets
    g = _graphed(monkeypatch, (3, 3, 5, 3, 5, 5, 5), 20)[3]
    # key 3 captured at forward 2 (replayed at 2 and 4); key 5, recorded at forward 3 and
    # seen again at 5, captured there (replayed at 5, 6, 7)
    assert g.captures == 2 and g.graphed_forwards == 5 and len(g.sets) == 2


def test_a_rare_key_does_not_evict_common_ones(monkeypatch):
    """Two sets kept: splits 3 and 5 come often and are captured; split 4, seen twice
    late in the window, is rarer than both and runs ungraphed instead of evicting one."""
    g = _graphed(monkeypatch, (3, 3, 5, 5, 3, 5, 3, 5, 4, 4, 3, 5), 80, graph_sets=2)[3]
    assert g.captures == 2 and g.graphed_forwards == 8 and len(g.sets) == 2


def test_one_kept_set_serves_the_commonest_key(monkeypatch):
    """graph_sets=1: split 3 is captured at forward 2; split 5 replaces it at forward 5,
    once it came more often in the window (at forward 4 both came twice); split 3 then runs
    ungraphed (forward 7) rather than evicting the commoner one."""
    g = _graphed(monkeypatch, (3, 3, 5, 5, 5, 5, 3, 5), 60, graph_sets=1)[3]
    assert g.max_sets == 1 and len(g.sets) == 1
    assert g.captures == 2 and g.graphed_forwards == 4  # forwards 2, 5, 6 and 8


def test_past_the_capture_limit_new_splits_run_ungraphed(monkeypatch, caplog):
    monkeypatch.setattr(cuda_graphs, "MAX_CAPTURES", 1)
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        g = train(True, split_batches((3, 3, 5, 5, 5), seed=40), monkeypatch=monkeypatch,
                  stand_in=StandIn(), layers=LAYERS)[3]
    # split size 3 captured at forward 2; size 5 would be at forward 4, past the limit
    assert g.captures == 1 and g.graphed_forwards == 1 and len(g.sets) == 1
    assert caplog.text.count("1 CUDA graph captures made") == 1  # said once, not per forward
    # said at forward 4, with what spreads the keys
    assert "the last 4 forwards had 2 distinct keys for 3 kept sets" in caplog.text
    assert g.stats()["window"] == {"forwards": 5, "keys": 2, "graphed": 1}
