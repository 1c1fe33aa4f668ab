"""Host time per call of the sparse MLP's ops and of their parts.

A host-bound step pays each op's Python and launches in full. This calls each op the way a
compiled graph does (`torch.ops.sparselora.*`) on LLaMA-3-8B widths with few tokens, so
that the GPU keeps up and the wall time per call is the host's; the parts (a Triton launch,
a cuBLAS product, a gather) give the scale.

    python3 bench/op_host.py --out op_host.json                      # H200
    python3 bench/op_host.py --device cpu --hidden 64 --ffn 256      # CPU check of the script
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import sparselora_compile  # noqa: F401  (registers torch.ops.sparselora)
from sparselora_compile.runtime.run import Run


def per_call_us(fn, device, calls=200) -> dict:
    for _ in range(5):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    # host_us: the host's time per call; device_bound: the GPU was slower (host_us understates)
    return {"host_us": round((t1 - t0) * 1e6 / calls, 1), "wall_us": round((t2 - t0) * 1e6 / calls, 1),
            "device_bound": (t2 - t1) > 0.2 * (t1 - t0)}


def top_functions(fn, calls=100) -> list:
    """[self µs per call, cumulative µs per call, calls per call, function] by self time."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    rows = [(tt, ct, nc, f"{Path(f).name}:{line}:{func}")
            for (f, line, func), (_cc, nc, tt, ct, _c) in pstats.Stats(prof).stats.items()]
    return [[round(tt * 1e6 / calls, 1), round(ct * 1e6 / calls, 1), nc // calls, name]
            for tt, ct, nc, name in sorted(rows, reverse=True)[:40]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dense", type=int, default=128, help="dense (output-token) rows among --tokens")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ab", type=int, default=4, help="rounds of the launch-path A/B (CUDA)")
    ap.add_argument("--cprofile", type=int, default=0, help="print this many top functions of each op")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev, dt = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    h, f, m, r = args.hidden, args.ffn, args.tokens, args.rank
    k = max(1, int(f * (1 - args.sparsity)))
    x = torch.randn(m, h, device=dev, dtype=dt)
    wg, wu = (torch.randn(f, h, device=dev, dtype=dt) * 0.02 for _ in range(2))
    wd = torch.randn(h, f, device=dev, dtype=dt) * 0.02
    ag, au = (torch.randn(h, r, device=dev, dtype=dt) for _ in range(2))
    bg, bu = (torch.randn(r, f, device=dev) for _ in range(2))  # fp32, as the estimator keeps them
    rg, ru = (torch.rand(f, device=dev) for _ in range(2))
    run = Run()
    rows = torch.zeros(m, dtype=torch.bool, device=dev)
    rows[torch.randperm(m, device=dev)[:args.dense]] = True
    padding = torch.zeros(m, dtype=torch.bool, device=dev)
    padding[-m // 8:] = True  # a padded batch's tail
    run.splits.compute(rows, padding)
    ops = torch.ops.sparselora
    idx = ops.select_mlp(x, ag, bg, au, bu, rg, ru, rows, k, run.handle, "mlp")
    y, saved = ops.sparse_mlp(x, wg, wu, wd, None, None, None, idx, rows, run.handle)
    gy = torch.randn_like(y)
    g = torch.randn(m, k, device=dev, dtype=dt)
    sel = idx[: k]
    cases = {
        "select_mlp (op)": lambda: ops.select_mlp(x, ag, bg, au, bu, rg, ru, rows, k, run.handle, "mlp"),
        "sparse_mlp (op)": lambda: ops.sparse_mlp(x, wg, wu, wd, None, None, None, idx, rows, run.handle),
        "sparse_mlp_grad (op)": lambda: ops.sparse_mlp_grad(gy, saved, wg, wu, wd, idx, rows, run.handle),
        "torch.mm": lambda: torch.mm(x, wg[:k].t()),
        "index_select rows": lambda: x.index_select(0, sel[: m // 2] % m),
        "empty": lambda: torch.empty(m, k, device=dev, dtype=dt),
        "topk + msort": lambda: torch.topk(rg, k, sorted=False).indices.msort(),
    }
    if dev.type == "cuda":
        from sparselora_compile.runtime.kernels.gathered_gemm import gather_rows_mm_t
        from sparselora_compile.runtime.kernels.swiglu import swiglu
        cases["triton swiglu"] = lambda: swiglu(g, g)
        cases["triton gather_rows_mm_t"] = lambda: gather_rows_mm_t(x, wg, idx)
    res = {}
    for name, fn in cases.items():
        res[name] = per_call_us(fn, dev)
        print(f"{name:28s} {res[name]}", flush=True)
        if args.cprofile and "(op)" in name:
            res[name]["cprofile"] = top_functions(fn)
            for row in res[name]["cprofile"][:args.cprofile]:
                print("    ", row)
    if dev.type == "cuda" and args.ab:
        # Triton's ordinary launch path against ours (runtime/kernels/launch.py), interleaved
        from sparselora_compile.runtime.kernels import launch
        ab = {name: {"direct": [], "triton": []} for name in cases if "(op)" in name}
        for _ in range(args.ab):
            for mode in ("direct", "triton"):
                launch.ENABLED = mode == "direct"
                for name in ab:
                    ab[name][mode].append(per_call_us(cases[name], dev)["host_us"])
        launch.ENABLED = True
        for name, v in ab.items():
            v["direct_mean_us"], v["triton_mean_us"] = (round(sum(v[m]) / len(v[m]), 1) for m in ("direct", "triton"))
            print(f"{name:28s} launch A/B: direct {v['direct_mean_us']} us, triton's path {v['triton_mean_us']} us")
        res["launch_ab"] = ab
    out = {"command": "python3 " + " ".join(sys.argv), "torch": torch.__version__, "device": str(dev),
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
           "shape": vars(args) | {"k": k}, "per_call": res}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
