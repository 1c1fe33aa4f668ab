"""Where the host's time goes in one ungraphed training step.

Ungraphed, the sparse step waits on the host (bench/README.md): the GPU could finish the
step's kernels sooner than Python queues them. This runs a few full-width decoder layers
(LLaMA-3-8B shape by default) on padded SFT batches and reports, for sparselora and for
Inductor per decoder layer with bf16 adapters:

- step_ms: device-synchronised wall time per step (mean over the timed steps);
- host_ms: how long the host takes to queue a step (the call returns before the GPU is done);
  the step is host bound when this is close to step_ms;
- the host time by function (cProfile, with autograd's backward run on the calling thread so
  that the backward's Python is profiled too), grouped by where the code lives (our
  package, Inductor's generated wrappers, Triton's launcher, torch) and the top functions;
- the self CPU time of each op (torch.profiler, CPU only);
- per step of --timeline-steps (CUDA only): the GPU's busy and idle time within the step,
  kernel time by group (matrix products, attention, ours, Inductor's Triton, ...), the
  top kernels and the longest waits (offset in the step, the kernels either side),
  traced without CPU op tracing, with whether each traced step replayed graphs; variants
  as bench/train_step.py names them (`_graphs`, `_bucket*`, `_suphead` apply);
- per timed step: its length, time and the allocator's cudaMalloc/cudaFree counts
  (`per_step`); with --op-profile-steps, one torch.profiler capture per step, so that a
  slow step shows its op; with --sync-steps, where the host waited for the GPU; with
  --trace DIR, one step's CPU ops and kernels as a Chrome trace (DIR/<variant>.json.gz)
  and each kernel's calls and time in it (`trace_kernels`).

A length new to the process is slower for whichever variant meets it first (cuDNN
attention builds a graph per length): --no-cudnn-attention turns that backend off.

    python3 bench/host_profile.py --layers 8 --steps 20 --out host.json          # H200
    python3 bench/host_profile.py --smoke --device cpu --inner aot_eager --steps 3  # CPU check
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (bench/train_step.py: model, batches, policy)


def where(filename: str) -> str:
    f = filename.replace("\\", "/")
    # Inductor's own runtime (torch/_inductor/runtime/) before ours (runtime/ in this repo)
    for key, group in (("/triton/", "triton"), ("sparselora_compile", "sparselora_compile"),
                       ("torchinductor", "inductor generated code"),
                       ("torch/_inductor", "torch._inductor"), ("/runtime/", "sparselora runtime"),
                       ("/passes/", "sparselora passes"),
                       ("torch/distributed/fsdp", "torch.distributed.fsdp"),
                       ("torch/nn/parallel", "DDP"), ("torch/distributed", "torch.distributed other"),
                       ("torch/_dynamo", "torch._dynamo"), ("torch/_functorch", "torch._functorch (AOT)"),
                       ("torch/autograd", "torch.autograd"), ("torch/optim", "torch.optim"),
                       ("torch/nn", "torch.nn"), ("transformers", "transformers"), ("peft", "peft"),
                       ("torch/", "torch other")):
        if key in f:
            return group
    return "builtins / C" if f.startswith("~") else "other"


def host_profile(step, batches) -> dict:
    """cProfile over the batches' steps, backward on this thread."""
    prof = cProfile.Profile()
    torch.autograd.set_multithreading_enabled(False)
    try:
        prof.enable()
        for b in batches:
            step(b)
        prof.disable()
    finally:
        torch.autograd.set_multithreading_enabled(True)
    stats = pstats.Stats(prof)
    n = len(batches)
    groups: dict = {}
    rows = []
    for (fname, line, func), (_cc, ncalls, tt, ct, _callers) in stats.stats.items():
        g = where(fname)
        groups[g] = groups.get(g, 0.0) + tt
        rows.append((tt, ct, ncalls, f"{Path(fname).name}:{line}:{func}", g))
    rows.sort(reverse=True)
    by_cum = sorted(rows, key=lambda r: -r[1])
    fmt = lambda r: {"fn": r[3], "group": r[4], "self_ms": round(r[0] * 1e3 / n, 3),  # noqa: E731
                     "cum_ms": round(r[1] * 1e3 / n, 3), "calls": r[2] // n}
    return {"total_ms": round(sum(groups.values()) * 1e3 / n, 2),
            "by_group_ms": {k: round(v * 1e3 / n, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_self": [fmt(r) for r in rows[:40]],
            "top_cum": [fmt(r) for r in by_cum[:60]]}


def op_profile(step, batch, device, top=40) -> dict:
    """Self and total CPU ms of the top ops, and the device's busy time (kernels, copies)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step(batch)
        ts.sync(device)
    wall = (time.perf_counter() - t0) * 1e3
    ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else None
    return {"wall_ms": round(wall, 2), "kernel_ms": kernel_us / 1e3 if cuda else None,
            "ops_self_cpu_ms": [[e.key[:90], round(e.self_cpu_time_total / 1e3, 3),
                                 round(e.cpu_time_total / 1e3, 3), e.count] for e in ka],
            "kernels_by_op": kernels_by_op(prof) if cuda else None}


def _op_path(e) -> str:
    """The op that launched a kernel, under the nearest of our ops (sparselora::) or
    autograd function above it: 'sparselora::sparse_mlp > aten::mm'."""
    outer, p = None, e.cpu_parent
    while p is not None and outer is None:
        if p.name.startswith("sparselora::") or "Backward" in p.name or p.name.startswith("autograd::"):
            outer = p.name
        p = p.cpu_parent
    return f"{outer} > {e.name}" if outer else e.name


def kernels_by_op(prof, top=60) -> list:
    """[kernel, launching op path, ms, calls] for the kernels that took the most time: which
    op (and which of ours around it) each one belongs to."""
    acc: dict = {}
    for e in prof.events():
        for k in getattr(e, "kernels", ()):
            key = (k.name[:100], _op_path(e))
            ms, n = acc.get(key, (0.0, 0))
            acc[key] = (ms + k.duration / 1e3, n + 1)
    rows = sorted(acc.items(), key=lambda kv: -kv[1][0])[:top]
    return [[name, path[:160], round(ms, 3), n] for (name, path), (ms, n) in rows]


KERNEL_GROUPS = (  # kernel-name fragments, first match wins
    ("ours: gathered GEMM", ("_gathered_gemm",)), ("ours: estimator", ("_channel_scores",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")), ("collectives (NCCL)", ("nccl",)),
    ("matrix products (cuBLAS/CUTLASS)", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")),
    ("Inductor Triton", ("triton_",)), ("top-k / sort", ("topk", "sort", "radix")),
    ("index gather / scatter", ("index", "gather", "scatter")),
    ("copies / fills", ("memcpy", "memset", "copy", "fill")),
    ("foreach (optimizer)", ("foreach", "multi_tensor")),
)


def kernel_group(name: str) -> str:
    n = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in n for k in keys)), "other")


def gpu_timeline(step, batch, device) -> dict:
    """One step under CUPTI only (no CPU op tracing, so the host runs near its own speed):
    the GPU's busy time (union of kernel and copy intervals), its idle time inside the step
    (the GPU waiting on the host), kernel time by group and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    ts.sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batch)
        ts.sync(device)
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in ev)
    busy, idle, gaps, end, last, waits = 0.0, 0.0, 0, None, None, []
    for a, b, name in spans:
        if end is not None and a > end:
            idle += a - end
            gaps += (a - end) > 20
            waits.append((a - end, end - spans[0][0], last, name))
        lo = a if end is None else max(a, end)
        if b > lo:
            busy += b - lo
        if end is None or b >= end:
            end, last = b, name
    groups, names = {}, {}
    for e in ev:
        us = e.time_range.elapsed_us()
        g = kernel_group(e.name)
        groups[g] = groups.get(g, 0.0) + us
        names[e.name] = names.get(e.name, 0.0) + us
    top = sorted(names.items(), key=lambda kv: -kv[1])[:40]
    return {"gpu_span_ms": round((end - spans[0][0]) / 1e3, 2) if spans else 0.0,
            "gpu_busy_ms": round(busy / 1e3, 2), "gpu_idle_ms": round(idle / 1e3, 2),
            "gpu_gaps_over_20us": gaps, "kernels": len(ev),
            # where the GPU waited: the longest gaps, at their offset in the step, between
            # which kernels (the host's work in between is what to look for)
            "longest_gaps": [{"us": round(w), "at_ms": round(t / 1e3, 2), "after": x[:80], "before": y[:80]}
                             for w, t, x, y in sorted(waits, reverse=True)[:12]],
            "kernel_ms_by_group": {k: round(v / 1e3, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[n[:100], round(v / 1e3, 3)] for n, v in top]}


def traced_timeline(fn, step, batch, device) -> dict:
    """gpu_timeline of one step, and for a graphed variant whether that step replayed."""
    graphs = getattr(fn, "graphs", None)
    before = graphs.graphed_forwards if graphs is not None else None
    res = gpu_timeline(step, batch, device)
    if graphs is not None:
        res["replayed"] = graphs.graphed_forwards > before
    return res


def chrome_trace(step, batch, device, path: Path) -> str:
    """One step's CPU ops and kernels, for chrome://tracing or Perfetto: what the host
    does while the GPU waits (the gaps gpu_timeline lists)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ts.sync(device)
    with profile(activities=acts) as prof:
        step(batch)
        ts.sync(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return str(path)


def trace_kernels(path: Path, top=80) -> list:
    """[name, calls, total us, us a call] of each GPU kernel, copy and memset of a
    `chrome_trace` file, the largest totals first: per-kernel figures the result keeps
    (the trace itself is too large to commit)."""
    import gzip
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    sums: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            calls, us = sums.get(e["name"], (0, 0.0))
            sums[e["name"]] = (calls + 1, us + e["dur"])
    rows = sorted(sums.items(), key=lambda kv: -kv[1][1])[:top]
    return [[n[:100], c, round(us, 1), round(us / c, 2)] for n, (c, us) in rows]


ALLOC_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def alloc_counters(device) -> dict:
    """The caching allocator's cudaMalloc/cudaFree/retry counts: a new size class costs a
    cudaMalloc, and a retry frees cached blocks (cudaFree synchronises the device)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ALLOC_COUNTERS}


def sync_sites(step, batches) -> dict:
    """Where the step synchronises the host with the GPU: torch's sync debug mode warns at
    each synchronising call; counted by the Python line that made it."""
    import warnings
    sites: dict = {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in batches:
                step(b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    return {k: v / len(batches) for k, v in sorted(sites.items(), key=lambda kv: -kv[1])}


def measure(name, peft, init, batches, args, device, log) -> dict:
    res = {"variant": name}
    stem, flags = ts.runtime_flags(name.replace("_cgt", ""))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if n in init:
                p.data = init[n].clone().to(torch.bfloat16)  # bf16 adapters for every variant
    compiled, undo_varlen = [], None
    if stem == "inductor_regional_bf16":
        from sparselora_compile.passes.blocks import decoder_layers
        fn, compiled = peft, [m for _, m in decoder_layers(peft)]
        for m in compiled:
            m.compile(backend=args.inner)
        if "_varlen" in flags:  # given what slc.compile's varlen_attention and padding_free do
            fn, undo_varlen = ts.varlen(fn, peft)
    else:
        policy, _ = ts.sampled_policy("math10k", args.layers, total_steps=10**6)
        extra = {}
        if "_cgt" in name:  # Inductor's CUDA graph trees around our ops (graph partitions)
            extra = {"inductor_config": {"triton.cudagraphs": True, "graph_partition": True,
                                         "triton.cudagraph_unexpected_rerecord_limit": 100000},
                     "pad_to_multiple_of": args.pad}
        fn = ts.slc_compile(peft, policy, inner=args.inner, lora_dtype="model",
                            cuda_graphs="_graphs" in flags, supervised_head="_suphead" in flags,
                            graph_bucket=next((ts.GRAPH_BUCKETS[f] for f in flags if f in ts.GRAPH_BUCKETS), 0),
                            **extra)
        fn.set_step(10**6)
    opt = torch.optim.AdamW(ts.lora_params(peft), lr=1e-5)

    def step(b):
        return ts.train_step(fn, opt, b)

    try:
        t0 = time.perf_counter()
        for b in batches[:args.warmup]:
            step(b)
        ts.sync(device)
        res["warmup_s"] = round(time.perf_counter() - t0, 1)
        timed = batches[args.warmup:args.warmup + args.steps]
        steps, hosts, per_step = [], [], []
        for b in timed:
            ts.sync(device)
            before = alloc_counters(device)
            t0 = time.perf_counter()
            step(b)
            t1 = time.perf_counter()
            ts.sync(device)
            hosts.append((t1 - t0) * 1e3)
            steps.append((time.perf_counter() - t0) * 1e3)
            after = alloc_counters(device)
            per_step.append({"T": int(b["input_ids"].shape[1]), "ms": round(steps[-1], 2),
                             "host_ms": round(hosts[-1], 2)}
                            | {k: after[k] - before[k] for k in after if after[k] != before[k]})
        res["step_ms"] = round(sum(steps) / len(steps), 2)
        res["host_ms"] = round(sum(hosts) / len(hosts), 2)
        res["steps_ms"] = [round(x, 2) for x in steps]
        res["per_step"] = per_step
        log(f"{name}: step {res['step_ms']} ms, host {res['host_ms']} ms (warm-up {res['warmup_s']} s)")
        if args.profile_steps:
            res["cprofile"] = host_profile(step, timed[:args.profile_steps])
            ts.sync(device)
            log(f"{name}: cProfile {res['cprofile']['total_ms']} ms/step: {res['cprofile']['by_group_ms']}")
        res.update(op_profile(step, timed[0], device))
        log(f"{name}: kernels {res['kernel_ms']} ms of the profiled step")
        if device.type == "cuda":
            res["gpu_timeline"] = [traced_timeline(fn, step, b, device)
                                   for b in timed[:args.timeline_steps]]
            for t in res["gpu_timeline"]:
                log(f"{name}: GPU busy {t['gpu_busy_ms']} ms, idle {t['gpu_idle_ms']} ms of a "
                    f"{t['gpu_span_ms']} ms span; {t['kernel_ms_by_group']}")
        if args.op_profile_steps:  # one torch.profiler capture per step: slow steps show their op
            res["op_profile_steps"] = [op_profile(step, b, device, top=12)
                                       for b in timed[:args.op_profile_steps]]
            log(f"{name}: profiled steps {[p['wall_ms'] for p in res['op_profile_steps']]} ms")
        if args.sync_steps and device.type == "cuda":
            res["sync_sites_per_step"] = sync_sites(step, timed[:args.sync_steps])
            log(f"{name}: synchronising calls per step {res['sync_sites_per_step']}")
        if args.trace:
            res["trace"] = chrome_trace(step, timed[0], device, Path(args.trace) / f"{name}.json.gz")
            res["trace_kernels"] = trace_kernels(Path(res["trace"]))
        if getattr(fn, "graphs", None) is not None:
            res["graph_stats"] = fn.graphs.stats()
    finally:
        for m in compiled:
            m._compiled_call_impl = None
        if hasattr(fn, "uncompile"):
            fn.uncompile()
        if undo_varlen is not None:
            undo_varlen()
        del fn, opt
        ts.free(device)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["inductor_regional_bf16", "sl_math10k_lora_model"])
    ap.add_argument("--batches", default="padded", choices=["fixed", "padded", "long", "packed"])
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--op-profile-steps", type=int, default=0,
                    help="this many steps under torch.profiler, one capture each (top ops per step)")
    ap.add_argument("--timeline-steps", type=int, default=3,
                    help="steps profiled on the GPU only (busy/idle time, kernel groups)")
    ap.add_argument("--sync-steps", type=int, default=0,
                    help="this many steps under torch's sync debug mode: where the host waits (CUDA)")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="SDPA without its cuDNN backend (which builds a graph per new shape)")
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny widths (a CPU check of the script)")
    ap.add_argument("--pad", type=int, default=64, help="pad_to_multiple_of of the _cgt variants")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="write one step's CPU ops and kernels as a Chrome trace under DIR")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.batch, args.seq = (8, 64) if args.smoke else (8, 512)
    device = torch.device(args.device)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    log = lambda m: print(m, flush=True)  # noqa: E731
    cfg = ts.llama_config(args.layers, args.smoke)
    peft = ts.add_lora(ts.build_model(cfg, device), ["q_proj", "k_proj", "v_proj", "o_proj"], True)
    init = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    n_out = 128 if not args.smoke else 16
    batches = ts.make_stream(args.batches, cfg, args, n_out, device, args.warmup + args.steps)
    if args.batches == "fixed":
        batches = batches * (args.warmup + args.steps)
    out = {"command": "python3 " + " ".join(sys.argv), "env": ts.env_info(device), "layers": args.layers,
           "batches": args.batches, "batch": args.batch, "seq": args.seq, "adapters": "bf16",
           "variants": []}
    for name in args.variants:
        out["variants"].append(measure(name, peft, init, batches, args, device, log))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
