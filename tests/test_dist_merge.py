"""bench/dist_step.py --merge: the scaling and sparse/dense ratios from launch files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "dist_step.py"


def _timed(engine, variant, world, step_ms, tokens_per_step):
    mean = sum(step_ms) / len(step_ms)
    median = sorted(step_ms)[len(step_ms) // 2]
    return {"engine": engine, "variant": variant, "world": world, "batches": "padded",
            "mean_ms": mean, "median_ms": median, "tokens_per_s": tokens_per_step / mean * 1e3}


def _launch(path, world, timed, omp):
    path.write_text(json.dumps({"world": world, "env": {"env": {"OMP_NUM_THREADS": omp}},
                                "shape": {"cudnn_attention": False}, "timed": timed}))
    return str(path)


def test_merge_gives_scaling_by_mean_and_by_median_step(tmp_path):
    # one slow step (a capture) in the two-GPU graphed run: the mean moves, the median does not
    one = _launch(tmp_path / "one.json", 1, [
        _timed("single", "dense", 1, [200.0, 200.0, 200.0], 4000),
        _timed("single", "sparse_graphs_bucket", 1, [100.0, 100.0, 100.0], 4000)], None)
    ddp = _launch(tmp_path / "ddp.json", 2, [
        _timed("ddp", "dense", 2, [210.0, 210.0, 210.0], 8000),
        _timed("ddp", "sparse_graphs_bucket", 2, [105.0, 105.0, 405.0], 8000)], "8")
    out = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(SCRIPT), "--merge", one, ddp, "--out", str(out)],
                   check=True, capture_output=True)
    merged = json.loads(out.read_text())
    ratios, medians = merged["ratios"], merged["ratios_by_median_step"]
    graphs = "ddp/sparse_graphs_bucket [padded, no cuDNN, OMP_NUM_THREADS=8]: tokens/s vs one GPU"
    dense = "ddp/dense [padded, no cuDNN, OMP_NUM_THREADS=8]: tokens/s vs one GPU"
    assert ratios[graphs] == pytest.approx(2 * 100 / 205, abs=1e-3)
    assert medians[graphs] == pytest.approx(2 * 100 / 105, abs=1e-3)
    assert ratios[dense] == medians[dense] == pytest.approx(2 * 200 / 210, abs=1e-3)
    assert ratios["single/sparse_graphs_bucket [padded, no cuDNN] vs dense"] == 2.0
    assert ratios["ddp/sparse_graphs_bucket [padded, no cuDNN, OMP_NUM_THREADS=8] vs dense"] == (
        pytest.approx(210 / 205, abs=1e-3))
    assert len(merged["launches"]) == 2 and len(merged["timed"]) == 4
