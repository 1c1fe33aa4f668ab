"""Gathered GEMMs and the fused estimator vs cuBLAS, on LLaMA-3-8B shapes (H200, bf16).

For each layer, token count and sparsity, in one run: dense cuBLAS (F.linear on all
channels), the reference style (slice W[idx] or W[:, idx], then cuBLAS; the slice is timed)
and ours (the gather happens inside the kernel). Forward products and input-grad products.
TFLOP/s count the kept FLOPs; ours is also given as % of dense cuBLAS TFLOP/s. Every
variant is first checked against the fp32 reference (max abs / rel error recorded).

    python bench/kernels.py                      # H200: writes bench/results/kernels.json + .png
    python bench/kernels.py --smoke --out /tmp/b # CPU: tiny shapes under the Triton interpreter
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from sparselora_compile.runtime.kernels import fused_estimator as fe  # noqa: E402
from sparselora_compile.runtime.kernels import gathered_gemm as gg  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}  # of the output's largest magnitude
SPARSITIES = [0.5, 0.75, 0.9, 0.97, 0.99]
# name: (N, K, which side is gathered). "out": kept output rows; "in": kept input columns.
LAYERS = {"mlp.gate_up": (14336, 4096, "out"), "mlp.down": (4096, 14336, "in"),
          "attn.q": (4096, 4096, "out"), "attn.kv": (1024, 4096, "out"), "attn.o": (4096, 4096, "in")}
SMOKE_LAYERS = {"mlp.gate_up": (96, 64, "out"), "mlp.down": (64, 96, "in"),
                "attn.q": (64, 64, "out"), "attn.kv": (32, 64, "out"), "attn.o": (64, 64, "in")}


def timer(fn):
    """Median milliseconds."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def errors(got, want, tol=None):
    """Max abs error and max error relative to the largest |want|; ok: within tol of that scale."""
    d = (got.float() - want.float()).abs().max()
    scale = want.float().abs().max().clamp_min(1e-12)
    out = {"max_abs": float(d), "max_rel": float(d / scale)}
    if tol is not None:
        out["ok"] = bool(d <= tol * max(1.0, float(scale)))
    return out


def variants(kind, x_full, x_kept, dy_full, dy_kept, W, idx):
    """(forward, backward) x (dense, reference style, ours), plus the fp32 references to check them."""
    if kind == "out":  # y_kept = x @ W[idx].T ; dx = dy_kept @ W[idx]
        fwd = {"dense": lambda: F.linear(x_full, W), "ref": lambda: F.linear(x_full, W[idx]),
               "ours": lambda: gg.gather_rows_mm_t(x_full, W, idx)}
        bwd = {"dense": lambda: dy_full @ W, "ref": lambda: dy_kept @ W[idx],
               "ours": lambda: gg.gather_rows_mm(dy_kept, W, idx)}
        truth = (lambda: gg.gather_rows_mm_t_reference(x_full, W, idx),
                 lambda: gg.gather_rows_mm_reference(dy_kept, W, idx))
    else:  # y = h_kept @ W[:, idx].T ; dh_kept = dy @ W[:, idx]
        Wcm = W.t().contiguous().t()  # column-major view of a transposed copy made once (W is frozen)
        fwd = {"dense": lambda: F.linear(x_full, W), "ref": lambda: F.linear(x_kept, W[:, idx]),
               "ours": lambda: gg.gather_cols_mm_t(x_kept, W, idx),
               "ours_wt": lambda: gg.gather_cols_mm_t(x_kept, Wcm, idx)}
        bwd = {"dense": lambda: dy_full @ W, "ref": lambda: dy_full @ W[:, idx],
               "ours": lambda: gg.gather_cols_mm(dy_full, W, idx),
               "ours_wt": lambda: gg.gather_cols_mm(dy_full, Wcm, idx)}
        truth = (lambda: gg.gather_cols_mm_t_reference(x_kept, W, idx),
                 lambda: gg.gather_cols_mm_reference(dy_full, W, idx))
    return fwd, bwd, truth


def bench_products(layers, tokens, sparsities, dtype, dev, check_tokens, records, flush):
    for M in tokens:  # all layers at the first token count first: a run cut short still covers it
        for name, (N, K, kind) in layers.items():
            W = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
            gathered = N if kind == "out" else K
            x_full = torch.randn(M, K, device=dev, dtype=dtype)
            dy_full = torch.randn(M, N, device=dev, dtype=dtype)
            dense_ms = {}
            for s in sparsities:
                k = max(1, int(gathered * (1 - s)))
                idx = torch.randperm(gathered, device=dev)[:k].sort().values
                x_kept = x_full[:, :k].contiguous() if kind == "in" else None
                dy_kept = dy_full[:, :k].contiguous() if kind == "out" else None
                fwd, bwd, truth = variants(kind, x_full, x_kept, dy_full, dy_kept, W, idx)
                for pname, fns, true_fn in (("forward", fwd, truth[0]), ("grad_input", bwd, truth[1])):
                    rec = {"layer": name, "N": N, "K": K, "gathered": kind, "tokens": M, "sparsity": s,
                           "k": k, "product": pname}
                    if M in check_tokens:
                        want = true_fn()
                        rec["errors"] = {v: errors(fns[v](), want, TOL[dtype]) for v in fns if v != "dense"}
                        del want
                    if pname not in dense_ms:
                        dense_ms[pname] = timer(fns["dense"])
                    kept_flops = 2.0 * M * k * (K if kind == "out" else N)
                    dense_flops = 2.0 * M * N * K
                    ms = {v: timer(f) for v, f in fns.items() if v != "dense"}
                    ms["dense"] = dense_ms[pname]
                    tf = {v: kept_flops / t / 1e9 for v, t in ms.items()}
                    tf["dense"] = dense_flops / ms["dense"] / 1e9
                    rec.update(ms=ms, tflops=tf, ours_pct_of_dense_tflops=100 * tf["ours"] / tf["dense"],
                               speedup_vs_dense=ms["dense"] / ms["ours"], speedup_vs_ref=ms["ref"] / ms["ours"])
                    records.append(rec)
                    print(f"{name:12s} {pname:10s} M={M:6d} s={s:.2f} k={k:6d}  dense {ms['dense']:.3f}  "
                          f"ref {ms['ref']:.3f}  ours {ms['ours']:.3f} ms  ours {tf['ours']:.0f} TF/s "
                          f"({rec['ours_pct_of_dense_tflops']:.0f}% of dense)"
                          + (f"  ours_wt {ms['ours_wt']:.3f} ms {tf['ours_wt']:.0f} TF/s" if "ours_wt" in ms else ""),
                          flush=True)
                flush()


def bench_estimator(H, F_, r, tokens, dtype, dev, records, flush):
    g = torch.Generator(device=dev).manual_seed(0)
    Ag, Au = (torch.randn(H, r, device=dev, generator=g).to(dtype) / H**0.5 for _ in range(2))
    Bg, Bu = (torch.randn(r, F_, device=dev, generator=g).to(dtype) for _ in range(2))

    def unfused(x):  # what the reference code does: materialise [M, F] twice, then silu*mul and a norm
        return (F.silu(x @ Ag @ Bg) * (x @ Au @ Bu)).norm(dim=0)

    for M in tokens:
        x = torch.randn(M, H, device=dev, dtype=dtype)
        want = fe.mlp_channel_scores_reference(x, Ag, Bg, Au, Bu)
        got = fe.mlp_channel_scores(x, Ag, Bg, Au, Bu)
        k = max(1, int(F_ * 0.1))
        overlap = len(set(got.topk(k).indices.tolist()) & set(want.topk(k).indices.tolist())) / k
        ms = {"unfused_torch": timer(lambda: unfused(x)), "fused": timer(lambda: fe.mlp_channel_scores(x, Ag, Bg, Au, Bu))}
        xa = x @ Ag
        ms_q = {"unfused_torch": timer(lambda: (xa @ Bg[:, :H]).norm(dim=0)),
                "fused": timer(lambda: fe.channel_sq_norms(xa, Bg[:, :H]))}
        rec = {"estimator": "mlp", "tokens": M, "H": H, "F": F_, "r": r, "ms": ms,
               "speedup": ms["unfused_torch"] / ms["fused"], "errors": errors(got, want),
               "top10pct_overlap_with_fp32_reference": overlap,
               "attn_q_channel_sq_norms_ms": ms_q}
        records.append(rec)
        print(f"estimator M={M}: unfused {ms['unfused_torch']:.3f} ms, fused {ms['fused']:.3f} ms "
              f"({rec['speedup']:.1f}x), q-norms {ms_q['unfused_torch']:.3f} -> {ms_q['fused']:.3f} ms, "
              f"top-10% overlap {overlap:.3f}", flush=True)
        flush()


def sweep_estimator_configs(H, F_, r, tokens, dev, records, flush, live=0.75):
    """The fused estimator's time per launch config (autotune candidates and more), as a
    training step calls it: xa = x @ [A_g | A_u] in bf16, row weights with `live` of the
    rows non-zero (the rest dense output rows or padding), residual term on and off."""
    import triton
    kernel = fe._channel_scores_kernel
    saved = kernel.configs
    grid = [triton.Config({"BLOCK_M": bm, "BLOCK_F": bf}, num_warps=w, num_stages=st)
            for bm in (32, 64, 128) for bf in (64, 128, 256) for w in (4, 8) for st in (1, 3)]
    g = torch.Generator(device=dev).manual_seed(0)
    Bg, Bu = (torch.randn(r, F_, device=dev, generator=g) for _ in range(2))
    Rg, Ru = (torch.rand(F_, device=dev, generator=g) for _ in range(2))
    try:
        for M in tokens:
            xa = torch.randn(M, 2 * r, device=dev, generator=g).to(torch.bfloat16)
            w = (torch.rand(M, device=dev, generator=g) < live).float()
            for residual in (False, True):
                res = (Rg, Ru) if residual else (None, None)
                times = []
                for cfg in grid:
                    kernel.configs, kernel.cache = [cfg], {}
                    fe._launch_scores._compiled.clear()
                    call = lambda: fe.mlp_channel_scores_projected(xa, Bg, Bu, *res, row_weight=w)  # noqa: E731
                    try:
                        call()
                        times.append((timer(call), str(cfg)))
                    except Exception as e:  # out of resources: not a candidate
                        times.append((float("inf"), f"{cfg}: {type(e).__name__}"))
                times.sort()
                rec = {"estimator_configs": True, "tokens": M, "F": F_, "r": r, "residual": residual,
                       "live_rows": live, "best": times[:5], "autotune_candidates": [
                           t for t in times if any(t[1].startswith(str(c)) for c in saved)]}
                records.append(rec)
                print(f"estimator configs M={M} residual={residual}: best {times[0]}, "
                      f"current candidates {rec['autotune_candidates']}", flush=True)
                flush()
    finally:
        kernel.configs, kernel.cache = saved, {}
        fe._launch_scores._compiled.clear()


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prods = [r for r in records if "product" in r]
    keys = sorted({(r["layer"], r["product"]) for r in prods})
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(4 * ((len(keys) + 1) // 2), 7), squeeze=False)
    for ax, (layer, product) in zip(axes.flat, keys):
        for M, style in zip(sorted({r["tokens"] for r in prods}), ("-", "--", ":")):
            rs = sorted((r for r in prods if (r["layer"], r["product"], r["tokens"]) == (layer, product, M)),
                        key=lambda r: r["sparsity"])
            sp = [r["sparsity"] for r in rs]
            ax.plot(sp, [r["tflops"]["ours"] for r in rs], "o" + style, color="C0", label=f"ours M={M}")
            ax.plot(sp, [r["tflops"]["ref"] for r in rs], "s" + style, color="C1", label=f"W[idx]+cuBLAS M={M}")
            if "ours_wt" in rs[0]["tflops"]:
                ax.plot(sp, [r["tflops"]["ours_wt"] for r in rs], "^" + style, color="C2", label=f"ours, W^T copy M={M}")
            ax.axhline(rs[0]["tflops"]["dense"], ls=style, color="gray", lw=0.8)
        ax.set_title(f"{layer} {product}", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("TFLOP/s on kept FLOPs")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("gathered GEMMs vs slice+cuBLAS (grey: dense cuBLAS)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096,16384)")
    p.add_argument("--skip-products", action="store_true")
    p.add_argument("--estimator-configs", action="store_true",
                   help="time the fused estimator under each of a grid of launch configs")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.smoke:
        sys.exit("no CUDA: use --smoke")
    # The interpreter's tl.dot is wrong in bf16, so the CPU smoke run uses fp16.
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else ([40, 72] if args.smoke else [4096, 16384])
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    records = []
    meta = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "command": " ".join(sys.argv),
            "layers": {k: {"N": v[0], "K": v[1], "gathered": v[2]} for k, v in layers.items()},
            "tokens": tokens, "sparsities": SPARSITIES, "timing": "triton.testing.do_bench median (ms)",
            "tflops_note": "dense: full FLOPs; ref/ours: kept FLOPs (2*M*k*other dim)",
            "variants": {"dense": "F.linear / matmul on all channels (cuBLAS)",
                         "ref": "slice W[idx] or W[:, idx] (timed), then cuBLAS",
                         "ours": "gathered Triton GEMM on row-major W",
                         "ours_wt": "in_sparse_* on W^T copied once (column-major view): row gathers"}}

    def flush():  # write after every case: a run cut short still leaves its numbers
        with open(path, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)

    torch.manual_seed(0)
    H, F_ = (64, 96) if args.smoke else (4096, 14336)
    bench_estimator(H, F_, 8, tokens, dtype, dev, records, flush)
    if args.estimator_configs:
        sweep_estimator_configs(H, F_, 8, tokens, dev, records, flush)
    if not args.skip_products:
        bench_products(layers, tokens, SPARSITIES, dtype, dev, check_tokens=tokens[:1], records=records, flush=flush)
    flush()
    if any("product" in r for r in records):
        plot(records, os.path.join(args.out, "kernels.png"))
    print("wrote", path)


if __name__ == "__main__":
    main()
