"""The dense MLP's products when the row count lives on the device (H200).

Under `graph_bucket` a CUDA graph serves every token split of a bucket, so the dense rows'
products run at the bucket's capacity: today cuBLAS computes the padding copies as if they
were rows (row_split.RowSplit). A product that reads the real count from the device at run
time would skip them inside a graph. This times, on the four dense products of one
LLaMA-3-8B MLP (gate/up and down forward, their input gradients backward):

- `mm_real`: cuBLAS at the real row count (what no copies would cost; not graphable),
- `mm_cap`: cuBLAS at the capacity (what a graphed step pays today),
- `grouped_cap`: `torch._grouped_mm` with one group ending at the real count (read on the
  device), at the same capacity,
- `grouped_all`: the same with the capacity at every row of the bucket (a graph key that
  would not hold the split at all).

Each is checked against cuBLAS on the real rows (relative Frobenius error), on fresh random
data. Medians of `triton.testing.do_bench`.

    python bench/counted_rows_gemm.py --out counted_rows_gemm.json
"""
import argparse
import json
import platform
import sys

import torch

# (name, K, N, B laid out as W.t() or W): x[M, K] @ B[K, N]
HIDDEN, FF = 4096, 14336
PRODUCTS = (("gate_up_fwd", HIDDEN, FF, "t"), ("down_fwd", FF, HIDDEN, "t"),
            ("down_grad", HIDDEN, FF, "n"), ("gate_up_grad", FF, HIDDEN, "n"))
STEP = 256  # row_split.bucket_step at graph_bucket=1024


def weight(k, n, layout, dev):
    w = torch.randn((n, k) if layout == "t" else (k, n), device=dev, dtype=torch.bfloat16) / k ** 0.5
    return w.t() if layout == "t" else w


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[540, 660, 850, 1032])
    ap.add_argument("--bucket-rows", type=int, default=3072)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        from triton.testing import do_bench
        time = lambda f: do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    else:  # a smoke run: the calls and checks, no timing
        time = lambda f: (f(), 0.0)[1]  # noqa: E731
    rows = []
    for name, k, n, layout in PRODUCTS:
        b = weight(k, n, layout, dev)
        g = b.unsqueeze(0)  # one group: [1, K, N]
        for m in args.rows:
            cap = min(-(-m // STEP) * STEP, args.bucket_rows)  # as row_split.compute_split rounds
            x = torch.randn(args.bucket_rows, k, device=dev, dtype=torch.bfloat16)
            offs = torch.tensor([m], device=dev, dtype=torch.int32)
            ref = x[:m] @ b
            got = torch._grouped_mm(x[:cap], g, offs=offs)
            got_all = torch._grouped_mm(x, g, offs=offs)
            r = {"product": name, "K": k, "N": n, "rows": m, "capacity": cap,
                 "err_grouped_cap": rel(got[:m], ref), "err_grouped_all": rel(got_all[:m], ref),
                 "mm_real_ms": time(lambda: torch.mm(x[:m], b)),
                 "mm_cap_ms": time(lambda: torch.mm(x[:cap], b)),
                 "grouped_cap_ms": time(lambda: torch._grouped_mm(x[:cap], g, offs=offs)),
                 "grouped_all_ms": time(lambda: torch._grouped_mm(x, g, offs=offs))}
            if r["mm_real_ms"]:
                r["tflops_real"] = 2 * m * k * n / r["mm_real_ms"] / 1e9
                r["tflops_grouped_cap"] = 2 * m * k * n / r["grouped_cap_ms"] / 1e9
            rows.append(r)
            print(" ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in r.items()),
                  flush=True)
    total = {key: sum(r[key] for r in rows) for key in ("mm_real_ms", "mm_cap_ms", "grouped_cap_ms", "grouped_all_ms")}
    print("sums over products and row counts:", json.dumps(total))
    if args.out:
        env = {"torch": torch.__version__, "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name() if dev == "cuda" else None}
        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "env": env, "rows": rows, "sums": total}, f, indent=1)


if __name__ == "__main__":
    main()
