"""The sparse linears' CUDA paths, per product, on LLaMA-3-8B shapes (H200, bf16).

`unfused`: context rows gathered out of the input and copied back into the output
(index_select / index_copy_), products by cuBLAS or the gathered GEMM (runtime/gathered.py
rules). `fused` (out-sparse products only: q, k, v, gate, up): dense rows by cuBLAS,
context rows read and written in place by one Triton kernel (runtime/sparse_linear.py,
`*_fused`); `kernel`: that Triton product alone. `dense`: F.linear on every row, all
channels. The in-sparse products (o, down) have no fused path and are timed unfused
against dense. The split is the bench's fixed batch: 8 rows of 512 tokens, the last 129
of each dense (output tokens and the position before them). Both paths are checked
against each other before timing.

    python bench/sparse_linear_paths.py --out bench/results     # H200
    python bench/sparse_linear_paths.py --smoke --out /tmp/b    # CPU, Triton interpreter
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch.nn.functional as F  # noqa: E402

from sparselora_compile.runtime import sparse_linear as sl  # noqa: E402
from sparselora_compile.runtime.kernels import gathered_gemm as gg  # noqa: E402
from sparselora_compile.runtime.row_split import compute_split  # noqa: E402

# name: (N, K, kind) of W [N, K]; out: kept output channels (q, k, v, gate, up), in: kept input
# channels (o, down)
SHAPES = {"q": (4096, 4096, "out"), "kv": (1024, 4096, "out"), "o": (4096, 4096, "in"),
          "gate_up": (14336, 4096, "out"), "down": (4096, 14336, "in")}
SMOKE_SHAPES = {"q": (64, 64, "out"), "o": (64, 64, "in")}
PATHS = {"out": (sl.out_sparse_forward, sl.out_sparse_grad_input, sl.out_sparse_forward_fused,
                 sl.out_sparse_grad_input_fused),
         "in": (sl.in_sparse_forward, sl.in_sparse_grad_input, None, None)}


def timer(fn, reps):
    fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def unfused(fn):
    """Call a dispatching path with the fused branch turned off."""
    def call(*args):
        keep, sl._fused = sl._fused, lambda *a: False
        try:
            return fn(*args)
        finally:
            sl._fused = keep
    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9, 0.99])
    ap.add_argument("--reps", type=int, default=50, help="do_bench's milliseconds of repetitions")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    rows_per_seq, seq, dense_tail = (2, 24, 6) if args.smoke else (8, 512, 129)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dense_rows = torch.zeros(rows_per_seq, seq, dtype=torch.bool, device=dev)
    dense_rows[:, -dense_tail:] = True
    split = compute_split(dense_rows)
    M = dense_rows.numel()
    g = torch.Generator(device=dev).manual_seed(0)
    records = []
    for name, (N, K, kind) in shapes.items():
        w = (torch.randn(N, K, device=dev, generator=g) / K**0.5).to(dtype)  # [out, in]
        x = torch.randn(M, K, device=dev, generator=g).to(dtype)
        gy = torch.randn(M, N, device=dev, generator=g).to(dtype)
        fwd, grad, fwd_fused, grad_fused = PATHS[kind]
        for s in args.sparsities:
            gathered_dim = N if kind == "out" else K
            k = max(8, int(round(gathered_dim * (1 - s) / 8)) * 8)
            idx = torch.randperm(gathered_dim, device=dev, generator=g)[:k].sort().values
            cases = {
                "forward": (lambda: unfused(fwd)(x, w, None, idx, split),
                            fwd_fused and (lambda: fwd_fused(x, w, idx, split)),
                            lambda: F.linear(x, w)),
                "grad_input": (lambda: unfused(grad)(gy, w, idx, split),
                               grad_fused and (lambda: grad_fused(gy, w, idx, split)),
                               lambda: gy @ w),
            }
            # the context rows' Triton product alone, as the fused path calls it
            buf = torch.zeros(M, max(N, K), device=dev, dtype=dtype)
            kernel = {"forward": lambda: gg.gather_rows_mm_t(x, w, idx, split.ctx, buf[:, :N], scatter=True),
                      "grad_input": lambda: gg.gather_rows_mm(gy.index_select(1, idx), w, idx, split.ctx,
                                                              buf[:, :K])}
            for product, (a, b, dense) in cases.items():
                rec = {"layer": name, "N": N, "K": K, "kind": kind, "sparsity": s, "k": k, "product": product,
                       "rows": M, "dense_rows": split.n_dense,
                       "unfused_ms": timer(a, args.reps), "dense_ms": timer(dense, args.reps)}
                if b is not None:
                    ya, yb = a(), b()
                    rec["max_rel_diff"] = float((ya.float() - yb.float()).abs().max()
                                                / yb.float().abs().max().clamp_min(1e-12))
                    rec["fused_ms"], rec["kernel_ms"] = timer(b, args.reps), timer(kernel[product], args.reps)
                    rec["fused_vs_unfused"] = rec["unfused_ms"] / rec["fused_ms"]
                rec["best_vs_dense"] = rec["dense_ms"] / min(rec["unfused_ms"], rec.get("fused_ms", float("inf")))
                records.append(rec)
                print(f"{name:8s} s={s:<5} k={k:<6} {product:10s} unfused {rec['unfused_ms']:.4f} ms  "
                      f"fused {rec.get('fused_ms', float('nan')):.4f} ms (kernel {rec.get('kernel_ms', float('nan')):.4f})"
                      f"  dense {rec['dense_ms']:.4f} ms  best/dense {rec['best_vs_dense']:.2f}x", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sparse_linear_paths.json")
    meta = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "command": " ".join(["python"] + sys.argv),
            "split": {"rows": M, "dense_rows": split.n_dense, "sequences": rows_per_seq, "seq": seq},
            "timing": "triton.testing.do_bench median (ms)"}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
