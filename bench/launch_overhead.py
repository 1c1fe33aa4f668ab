"""Host time per call of each kind of launch the sparse training step makes (H200).

The 32-layer step is bound by the host on slower machines (bench/README.md): this times,
on shapes so small that the GPU never falls behind, what one call costs the host:
cuBLAS and ATen launches, our Triton GEMM through its autotuner (the public path), the
same kernel through `JITFunction.run` with the tuned config (no autotuner or heuristics
layer), the compiled kernel's own launcher, our direct launch (runtime/kernels/launch.py),
our SwiGLU kernel both ways, the sparse MLP op through the dispatcher, and a small
Inductor-compiled function (guards + wrapper + 1 kernel).

    python3 bench/launch_overhead.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def per_call_us(fn, n=3000, warm=200):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("launch_overhead.py needs CUDA")
    import triton
    from train_step import env_info
    from sparselora_compile.runtime import row_split
    from sparselora_compile.runtime.kernels import gathered_gemm as gg
    from sparselora_compile.runtime.kernels.swiglu import swiglu
    from sparselora_compile.runtime.state import new_state
    import sparselora_compile.runtime.ops  # noqa: F401  (registers the ops)

    dev, dt = torch.device("cuda"), torch.bfloat16
    m, h, f, k = 64, 256, 1024, 256
    x = torch.randn(m, h, device=dev, dtype=dt)
    w = torch.randn(f, h, device=dev, dtype=dt)
    idx = torch.randperm(f, device=dev)[:k].sort().values
    out = torch.empty(m, k, device=dev, dtype=dt)
    res = {}
    res["torch.mm"] = per_call_us(lambda: torch.mm(x, w.t()))
    rows = torch.arange(0, m, 2, device=dev)
    res["index_select"] = per_call_us(lambda: x.index_select(0, rows))
    res["empty"] = per_call_us(lambda: torch.empty(m, k, device=dev, dtype=dt))
    from sparselora_compile.runtime.kernels import launch
    launch.ENABLED = False  # Triton's own launch path
    res["triton_gathered_public"] = per_call_us(lambda: gg.out_sparse_matmul(x, w, idx, out=out))
    launch.ENABLED = True  # runtime/kernels/launch.py: the compiled kernel's launcher
    res["triton_gathered_direct"] = per_call_us(lambda: gg.out_sparse_matmul(x, w, idx, out=out))
    torch.testing.assert_close(out, gg.out_sparse_matmul_reference(x, w, idx), rtol=2e-2, atol=2e-2)

    # the same launch below the autotuner and heuristics layers, with the tuned config
    autotuner = gg._gathered_gemm_kernel
    cfg = next(iter(autotuner.cache.values()))
    jit = autotuner.fn.fn
    kw = dict(cfg.all_kwargs(), EVEN_K=h % cfg.kwargs["BLOCK_K"] == 0, GATHER_R=False,
              GATHER_N=True, HAS_ROWS=False, PRECISION="tf32")
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(k, cfg.kwargs["BLOCK_N"]),)
    call_args = (x, w, out, idx, idx, idx, m, k, h, x.stride(0), x.stride(1), w.stride(1),
                 w.stride(0), out.stride(0), out.stride(1), triton.next_power_of_2(m))
    res["triton_gathered_jit_run"] = per_call_us(lambda: jit.run(*call_args, grid=grid, warmup=False, **kw))
    ref = gg.out_sparse_matmul_reference(x, w, idx)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    try:  # the compiled kernel's launcher (Triton-version dependent)
        ck = jit.run(*call_args, grid=grid, warmup=False, **kw)
        stream = torch.cuda.current_stream().cuda_stream
        bound = list(call_args) + [kw[n] for n in ("GATHER_R", "GATHER_N", "HAS_ROWS", "PRECISION",
                                                  "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K")]
        run = ck.run
        fn_handle, packed = ck.function, ck.packed_metadata
        res["triton_compiled_kernel_run"] = per_call_us(
            lambda: run(grid[0], 1, 1, stream, fn_handle, packed, None, None, None, *bound))
    except Exception as e:  # noqa: BLE001
        res["triton_compiled_kernel_run_error"] = f"{type(e).__name__}: {e}"[:300]

    g, u = torch.randn(m, f, device=dev, dtype=dt), torch.randn(m, f, device=dev, dtype=dt)
    launch.ENABLED = False
    res["triton_swiglu_public"] = per_call_us(lambda: swiglu(g, u))
    launch.ENABLED = True
    res["triton_swiglu_direct"] = per_call_us(lambda: swiglu(g, u))

    st = new_state()
    xb = torch.randn(2, m // 2, h, device=dev, dtype=dt)
    wu, wd = torch.randn(f, h, device=dev, dtype=dt), torch.randn(h, f, device=dev, dtype=dt)
    rows = torch.zeros(2, m // 2, dtype=torch.bool, device=dev)
    rows[:, -4:] = True
    row_split.compute(rows)
    op = torch.ops.sparselora.sparse_mlp.default
    with torch.no_grad():  # k = 256 < 512: slice + cuBLAS and the SwiGLU kernel
        res["op_sparse_mlp"] = per_call_us(
            lambda: op(xb, w, wu, wd, None, None, None, idx, rows, st.state_id), n=1000)

    fn = torch.compile(lambda a, b: torch.nn.functional.silu(a) * b + 1.0)
    res["inductor_one_kernel_fn"] = per_call_us(lambda: fn(g, u))

    info = env_info(dev)
    run = {"what": "host microseconds per call (perf_counter over 3000 calls, no sync inside)",
           "shapes": {"m": m, "h": h, "f": f, "k": k, "dtype": "bf16"}, "env": info,
           "command": "python3 bench/launch_overhead.py", "host_us_per_call": res}
    for name, v in res.items():
        print(f"{name:32s} {v if isinstance(v, str) else f'{v:8.2f} us'}")
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / "launch_overhead.json"
    path.write_text(json.dumps(run, indent=1))
    print("wrote", path, platform.node())


if __name__ == "__main__":
    main()
