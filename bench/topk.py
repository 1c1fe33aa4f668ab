"""Top-k of the estimator's channel scores: `torch.topk` against a full sort (H200).

`selection.top_channels` picks the k largest of a block's d_ff (or kv) scores once per
block per step; in the 32-layer profile `torch.topk` took 1.5 of the estimator's 5.1 ms.
Each way is timed with the index sort that follows it (kept indices ascending), on the
LLaMA-3-8B sizes, and checked to give the same set as `torch.topk` on untied scores.

    python bench/topk.py --out bench/results
"""
import argparse
import json
import os
import platform

import torch

SIZES = {"mlp": 14336, "kv": 1024}
SPARSITIES = [0.5, 0.75, 0.9, 0.97, 0.99]


def by_topk(s, k):
    return torch.topk(s, k, sorted=False).indices.sort().values


def by_sort(s, k):
    return torch.sort(s, descending=True).indices[:k].sort().values


WAYS = {"topk": by_topk, "sort": by_sort}


def time_ms(fn, reps, device):
    if device.type != "cuda":
        import time
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, n in SIZES.items():
        s = torch.rand(n, device=device, generator=g)  # untied: every way gives one set
        for sp in SPARSITIES:
            k = max(1, round(n * (1 - sp)))
            ref = by_topk(s, k)
            row = {"scores": name, "n": n, "sparsity": sp, "k": k}
            for way, fn in WAYS.items():
                assert torch.equal(fn(s, k), ref), (way, n, k)
                row[f"{way}_us"] = 1e3 * time_ms(lambda: fn(s, k), args.reps, device)
            rows.append(row)
            print(row, flush=True)
    out = {"command": "python bench/topk.py", "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "timing": "CUDA events, mean of --reps calls after 10 warm-up calls, one stream",
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "topk.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
