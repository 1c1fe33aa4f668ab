"""bench/accuracy.py study: confidence intervals, the run matrix, aggregation (no training)."""
import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_accuracy", Path(__file__).resolve().parent.parent / "bench" / "accuracy.py")
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)


@pytest.mark.parametrize("hits,n,lo,hi", [
    (0, 10, 0.0, 0.2775),      # textbook values (z = 1.96)
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 32, 0.0055, 0.1575),
    (250, 500, 0.4563, 0.5437),
])
def test_wilson_known_values(hits, n, lo, hi):
    got = acc.wilson(hits, n)
    assert got == pytest.approx((lo, hi), abs=6e-4)


def test_wilson_properties():
    # symmetric under hits <-> misses; near the Wald interval for large n and mid p
    lo, hi = acc.wilson(30, 200)
    lo2, hi2 = acc.wilson(170, 200)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2))
    p, n = 0.4, 100000
    wl, wh = acc.wilson(int(p * n), n)
    half = 1.959964 * math.sqrt(p * (1 - p) / n)
    assert (wl, wh) == pytest.approx((p - half, p + half), abs=1e-5)
    assert acc.wilson(0, 500)[0] == 0.0 and acc.wilson(500, 500)[1] == 1.0
    with pytest.raises(ValueError):
        acc.wilson(3, 2)
    with pytest.raises(ValueError):
        acc.wilson(0, 0)


def test_t_interval():
    assert acc.t_quantile(1) == 12.706 and acc.t_quantile(2) == 4.303
    assert acc.t_quantile(500) == pytest.approx(1.96, abs=1e-3)
    t = acc.t_interval([1.0, 2.0, 3.0])
    assert t["mean"] == 2.0 and t["sd"] == pytest.approx(1.0)
    assert t["half"] == pytest.approx(4.303 / math.sqrt(3))
    assert (t["lo"], t["hi"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    t = acc.t_interval([0.1, 0.14])
    assert t["half"] == pytest.approx(12.706 * math.sqrt(0.0008) / math.sqrt(2))
    one = acc.t_interval([0.3])
    assert one["mean"] == 0.3 and one["half"] is None
    assert acc.t_interval([0.2, 0.2, 0.2])["half"] == pytest.approx(0.0, abs=1e-12)


def test_run_matrix_is_the_issues_design():
    m = acc.run_matrix([0, 1, 2])
    assert len(m) == 18 and len({r["id"] for r in m}) == 18
    for seed in (0, 1, 2):
        runs = {r["name"]: r for r in m if r["seed"] == seed}
        assert set(runs) == {"dense", "aware30", "aware50", "aware70", "svd50", "calibrated50"}
        assert runs["dense"]["kind"] == "dense"
        for b in (30, 50, 70):
            r = runs[f"aware{b}"]
            assert (r["kind"], r["estimator"], r["budget"]) == ("uniform", "activation_aware", b / 100)
        assert (runs["svd50"]["kind"], runs["svd50"]["estimator"], runs["svd50"]["budget"]) == \
            ("uniform", "svd", 0.5)
        c = runs["calibrated50"]
        assert (c["kind"], c["estimator"], c["uniform_pair"]) == ("calibrated", "activation_aware", "aware50")
    with pytest.raises(ValueError, match="uniform"):
        acc.run_matrix([0], budgets=(0.3,), calib_budgets=(0.5,))


@pytest.fixture(scope="module")
def blocks():
    from sparselora_compile.calibrate import find_blocks
    from sparselora_compile.finetune.models import tiny_llama
    return find_blocks(tiny_llama(num_layers=4, seed=0)[0])


def test_resolve_matrix_budgets(blocks):
    m = acc.resolve_matrix(acc.run_matrix([0, 1]), blocks, dense_edges=False)
    by = {r["id"]: r for r in m}
    for r in m:
        if r["kind"] == "uniform":
            s = r["sparsity"]
            assert r["context_flops_saved"] >= r["budget"] - 1e-9
            assert r["context_flops_saved"] == pytest.approx(
                acc.context_saved(acc.uniform_policy(s, 300, r["estimator"], False), blocks))
            # the smallest grid sparsity that reaches the budget
            below = acc.context_saved(acc.uniform_policy(round(s - 0.005, 4), 300, "svd", False), blocks)
            assert below < r["budget"]
        if r["kind"] == "calibrated":
            assert r["calib_budget"] == by[f"aware50-s{r['seed']}"]["context_flops_saved"]
        if r["kind"] == "dense":
            assert r["context_flops_saved"] == 0.0
    assert by["svd50-s0"]["sparsity"] == by["aware50-s1"]["sparsity"]
    pol = acc.uniform_policy(0.5, 300, "activation_aware")
    assert pol.dense_edges and pol.warmup() == 15 and pol.estimator == "activation_aware"
    # 4 layers with the edges dense leave 2 sparsifiable: 50% is already out of reach
    with pytest.raises(ValueError, match="no uniform sparsity saves 0.5"):
        acc.resolve_matrix(acc.run_matrix([0]), blocks, dense_edges=True)


def _row(name, seed, hits, loss, saved, n=500):
    return {"name": name, "seed": seed, "exact_match": hits / n, "exact_match_hits": hits,
            "eval_n": n, "eval_loss": loss, "train_loss": loss, "context_flops_saved": saved,
            "flops_saved": saved * 0.8}


def test_aggregate_intervals_and_targets():
    matrix = acc.run_matrix([0, 1, 2], budgets=(0.5,), svd_budgets=(0.5,), calib_budgets=(0.5,))
    rows = []
    for seed, (d, a, s, c) in enumerate([(100, 98, 60, 101), (110, 104, 70, 108), (90, 91, 50, 95)]):
        rows += [_row("dense", seed, d, 1.0 + seed / 100, 0.0), _row("aware50", seed, a, 1.02, 0.5),
                 _row("svd50", seed, s, 1.5, 0.5), _row("calibrated50", seed, c, 1.01, 0.51)]
    out = acc.aggregate(rows, matrix)
    d = out["runs"]["dense"]
    assert d["exact_match"]["mean"] == pytest.approx(0.2)
    assert d["exact_match"]["half"] == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert d["exact_match_pooled"]["hits"] == 300 and d["exact_match_pooled"]["n"] == 1500
    assert d["exact_match_pooled"]["wilson95"] == pytest.approx(list(acc.wilson(300, 1500)))
    assert [p["wilson95"] for p in d["per_seed"]] == [list(acc.wilson(h, 500)) for h in (100, 110, 90)]
    t = out["targets"]
    assert t["aware50_vs_dense"]["em_diff"]["diffs"] == pytest.approx([-0.004, -0.012, 0.002])
    assert t["aware50_vs_dense"]["em_within_dense_wilson_per_seed"] == [True, True, True]
    assert t["svd50_vs_dense"]["em_within_dense_wilson_per_seed"] == [False, False, False]
    assert t["aware50_vs_svd50"]["em_diff"]["mean"] == pytest.approx((38 + 34 + 41) / 1500)
    assert t["calibrated50_vs_aware50"]["context_flops_saved"] == [0.51, 0.5]
    assert t["calibrated50_vs_aware50"]["eval_loss_diff"]["mean"] == pytest.approx(-0.01)
