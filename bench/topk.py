"""Top-k of the estimator's channel scores: our one-program Triton top-k, in each of its
variants, against `torch.topk` and a full sort (H200).

`selection.top_channels` picks the k largest of a block's d_ff (or kv) scores once per
block per step. Each way gives the kept indices ascending (the torch ways with the index
sort that follows them), on the LLaMA-3-8B sizes, and is checked to give the same set as
`torch.topk` on untied scores. Two timings per way: calls launched one after another
(`_us`, what an ungraphed step pays, host launch time included when it exceeds the
kernels') and the same calls replayed from one CUDA graph (`_graph_us`, the GPU time a
graphed step pays).

Triton ways: `triton` is `top_k_indices` with its defaults; `triton_{cmp,hist}_d{D}_w{W}`
count with a comparison or a histogram, settle D bits a round and run W warps
(runtime/kernels/top_k.py; not timed where that is over 64 scores a thread). `fastest` in
each row names the quickest Triton way (by `_graph_us` on a GPU). `--ways REGEX` keeps the
ways it matches; `--smoke` (CPU: the interpreter) runs one sparsity a size, two calls a way.

    python bench/topk.py --out bench/results
"""
import argparse
import json
import os
import platform
import re
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sparselora_compile.runtime.kernels.top_k import top_k_indices  # noqa: E402

SIZES = {"mlp": 14336, "kv": 1024}
SPARSITIES = [0.5, 0.75, 0.9, 0.97, 0.99]


def by_topk(s, k):
    return torch.topk(s, k, sorted=False).indices.sort().values


def by_sort(s, k):
    return torch.sort(s, descending=True).indices[:k].sort().values


def triton_way(hist, d, w):
    return lambda s, k: top_k_indices(s, k, digit_bits=d, hist=hist, num_warps=w)


DIGIT_BITS = {"cmp": (1, 2, 3, 4), "hist": (2, 3, 4, 5, 6, 8)}
WAYS = {"topk": by_topk, "sort": by_sort, "triton": top_k_indices,
        **{f"triton_{count}_d{d}_w{w}": triton_way(count == "hist", d, w)
           for count, ds in DIGIT_BITS.items() for d in ds for w in (4, 8, 16)}}


def spills(way, n):
    """More than 64 keys a thread (4 warps at 14,336 scores) spill registers, and each such
    kernel takes a minute to compile: not timed."""
    w = re.search(r"_w(\d+)$", way)
    return w is not None and n > 64 * 32 * int(w.group(1))


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


def graph_ms(fn, reps):
    """Mean GPU time per call of `reps` calls captured into one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_ms(graph.replay, 5, torch.device("cuda")) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--ways", default="", help="a regex: time only the ways it matches")
    ap.add_argument("--smoke", action="store_true", help="one sparsity a size, two calls a way")
    args = ap.parse_args()
    ways = {w: fn for w, fn in WAYS.items() if re.search(args.ways, w)}
    sparsities = [0.75] if args.smoke else SPARSITIES
    reps = 2 if args.smoke else args.reps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, n in SIZES.items():
        s = torch.rand(n, device=device, generator=g)  # untied: every way gives one set
        for sp in sparsities:
            k = max(1, round(n * (1 - sp)))
            ref = by_topk(s, k)
            row = {"scores": name, "n": n, "sparsity": sp, "k": k}
            for way, fn in ways.items():
                if spills(way, n):
                    continue
                assert torch.equal(fn(s, k), ref), (way, n, k)
                row[f"{way}_us"] = 1e3 * time_ms(lambda: fn(s, k), reps, device)
                if device.type == "cuda":
                    row[f"{way}_graph_us"] = 1e3 * graph_ms(lambda: fn(s, k), reps)
            timed = [w for w in ways if w.startswith("triton") and not spills(w, n)]
            if timed:
                unit = "_graph_us" if device.type == "cuda" else "_us"
                row["fastest"] = min(timed, key=lambda w: row[w + unit])
            rows.append(row)
            print(row, flush=True)
    out = {"command": " ".join(["python bench/topk.py", *sys.argv[1:]]),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
           "torch": torch.__version__,
           "timing": "CUDA events; _us: mean of --reps calls after 10 warm-up calls, one stream; "
                     "_graph_us: the same calls captured in one CUDA graph, mean of 5 replays",
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "topk.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
