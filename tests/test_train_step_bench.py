"""bench/train_step.py's figures that the docs cite, computed from step times."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import train_step  # noqa: E402


def test_new_shape_cost_sums_first_seen_steps_beyond_the_median_seen_step():
    # timed: seen steps 100 and 102 ms (median 101), first-seen 300 and 95; warm-up: the
    # cold compile (not new) and a recompile at a second shape (new)
    cost = train_step.new_shape_cost_s([100, 300, 102, 95], [False, True, False, True],
                                       [9000, 4000], [False, True])
    assert cost == pytest.approx(((300 - 101) + (95 - 101) + (4000 - 101)) / 1e3)


def test_new_shape_cost_needs_a_seen_step():
    assert train_step.new_shape_cost_s([300, 200], [True, True], [], []) is None


@pytest.mark.parametrize("name, ok", [
    ("sl_math10k_lora_model_rowloop_graphs_suphead", True),
    ("inductor_regional_bf16_prow", True),
    ("sl_math10k_lora_model_prow", False),       # ours has our heuristics already
    ("inductor_regional_bf16_rowloop", False),   # plain Inductor has its own already
    ("sl_math10k_lora_model_graphs_firstwarm1", True),
    ("sl_math10k_lora_model_firstwarm1", False),  # a capture setting needs _graphs
])
def test_variant_names_take_the_suffixes_their_kind_has(name, ok):
    import argparse
    if ok:
        assert train_step.variant_name(name) == name
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            train_step.variant_name(name)
