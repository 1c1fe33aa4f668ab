"""bench/roofline.py: its shapes and FLOPs against what the library itself runs and counts."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import roofline  # noqa: E402

import sparselora_compile as slc  # noqa: E402

from graphed_training import padded_sft_batch  # noqa: E402
from llama import ALL, tiny_llama  # noqa: E402


def test_a_padded_batch_has_the_shapes_counted_by_hand():
    s = roofline.batch_shape(padded_sft_batch([3, 5], t=5, n_out=2))
    assert (s.positions, s.tokens, s.supervised) == (10, 8, 4)
    assert s.pairs_masked == 2 * 5 * 5 and s.pairs_causal == 3 * 4 // 2 + 5 * 6 // 2
    # each supervised token and the one before it: positions 0-2 of the first sequence, 2-4 of the second
    assert s.dense_rows == 3 + 3
    assert s.sparse_rows == s.tokens and sum(s.capacities) == s.tokens  # no bucket: no filler, no copies


def test_a_bucket_fills_the_row_and_rounds_the_split_as_the_wrapper_does():
    s = roofline.batch_shape(padded_sft_batch([9, 12, 7, 11], t=12), bucket=64)
    assert s.tokens == 39 and s.sparse_rows == 64 and s.sparse_pairs > s.pairs_causal
    dense_cap, ctx_cap = s.capacities
    assert dense_cap >= s.dense_rows and dense_cap + ctx_cap >= s.sparse_rows


def test_the_forward_flops_are_those_the_run_counts():
    """One sparse training forward of slc.compile (padding-free, both block kinds sparse on
    CPU): the run's counted base FLOPs equal the roofline's for the same batch and plan."""
    torch._dynamo.reset()
    model = tiny_llama(ALL, layers=2)
    policy = slc.Policy(mlp=0.5, attention=0.5)
    wrapped = slc.compile(model, policy, inner="aot_eager")
    b = padded_sft_batch([9, 12, 7, 11], t=12, n_out=4)
    wrapped(**b).loss.backward()
    stats = wrapped.stats.as_dict()
    m = roofline.model_of(model, policy)
    assert {i.kind for i, k in m.blocks if k is not None} == {"mlp", "attention"}
    s = roofline.batch_shape(b)
    assert stats["base_flops_dense"] > stats["base_flops_executed"] > 0
    assert (stats["base_flops_dense"], stats["base_flops_executed"]) == roofline.base_flops(m, s.tokens, s.dense_rows)


def test_sparse_blocks_lower_the_predicted_step_and_the_dense_steps_match_without_padding():
    m = roofline.model_of(tiny_llama(ALL, layers=2), slc.Policy(mlp=0.5, attention=0.5))
    fixed = {"input_ids": torch.ones(2, 16, dtype=torch.long),
             "labels": torch.full((2, 16), -100).index_fill_(1, torch.tensor([14, 15]), 1)}
    p = roofline.predict(m, [fixed], roofline.Rates(), supervised_head=True)
    assert p["dense"]["ms"] == p["dense_varlen"]["ms"] > p["sparse"]["ms"]
    assert p["sparse"]["tflop"]["base"] < p["dense"]["tflop"]["base"]
    assert p["sparse"]["tflop"]["head"] == p["dense"]["tflop"]["head"] * 4 / 32  # 4 of 32 positions supervised
