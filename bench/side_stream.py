"""One frozen MLP block's forward (select_mlp + sparse_mlp) with its selection on a side
stream against the selection in line, replayed from a CUDA graph, LLaMA-3-8B widths.

Per variant: the mean replay time over --replays, and one replay traced with the kernels'
offsets and durations, so that it shows whether the selection's kernels ran beside the
dense rows' products.

    python3 bench/side_stream.py --out bench/results/side_stream.json        # H200
    python3 bench/side_stream.py --smoke                                      # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (environment facts)

import sparselora_compile  # noqa: E402,F401  registers torch.ops.sparselora
from sparselora_compile.runtime.row_split import compute_split  # noqa: E402,F401
from sparselora_compile.runtime.run import Run  # noqa: E402

ops = torch.ops.sparselora


def case(tokens, dense, hidden, d_ff, rank, dev, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dev, dtype)  # noqa: E731
    x = r(1, tokens, hidden)
    factors = (r(hidden, rank), r(rank, d_ff), r(hidden, rank), r(rank, d_ff),
               torch.rand(d_ff, generator=g).to(dev), torch.rand(d_ff, generator=g).to(dev))
    weights = (r(d_ff, hidden), r(d_ff, hidden), r(hidden, d_ff))
    rows = torch.zeros(1, tokens, dtype=torch.bool)
    rows[0, torch.randperm(tokens, generator=g)[:dense]] = True
    return x, factors, weights, rows.to(dev)


def block(x, factors, weights, rows, k, run, overlap):
    idx = ops.select_mlp(x, *factors, rows, k, run.handle, "blk", "silu", overlap)
    return ops.sparse_mlp(x, *weights, None, None, None, idx, rows, run.handle)[0]


def measure(args, overlap, dev, dtype) -> dict:
    x, factors, weights, rows = case(args.tokens, args.dense, args.hidden, args.d_ff, args.rank, dev, dtype)
    run = Run()
    run.step = 10**6
    if dev.type != "cuda":  # the CPU check: the ops run, no stream, no graph
        block(x, factors, weights, rows, args.k, run, overlap)
        return {"overlap": overlap}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            block(x, factors, weights, rows, args.k, run, overlap)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(args.layers):
            block(x, factors, weights, rows, args.k, run, overlap)
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    per_block = start.elapsed_time(end) / args.replays / args.layers
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    t0 = ev[0][0] if ev else 0
    first = [e for e in ev if e[0] < ev[0][0] + (ev[-1][1] - t0) / args.layers] if ev else []
    return {"overlap": overlap, "ms_per_block": round(per_block, 4),
            "first_block_kernels": [{"at_us": round(a - t0, 1), "us": round(b - a, 1), "name": n[:90]}
                                    for a, b, n in first]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dense", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--k", type=int, default=143)
    ap.add_argument("--layers", type=int, default=8, help="blocks per captured graph")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.dense, args.hidden, args.d_ff, args.rank, args.k = 64, 16, 32, 128, 4, 8
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res = {"command": "python3 " + " ".join(sys.argv), "env": ts.env_info(dev),
           "shape": {k: getattr(args, k) for k in ("tokens", "dense", "hidden", "d_ff", "rank", "k", "layers")},
           "variants": [measure(args, o, dev, dtype) for o in (True, False, True, False)]}
    for v in res["variants"]:
        print(v["overlap"], v.get("ms_per_block"))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
