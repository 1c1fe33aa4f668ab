"""Training-step speed on one and several GPUs, dense and sparse, DDP and FSDP2.

Launch one process per GPU with torchrun; every engine given runs in that one launch:

    torchrun --nproc-per-node 1 bench/dist_step.py --engines single --out /tmp/one.json
    torchrun --nproc-per-node 2 bench/dist_step.py --engines ddp fsdp --out /tmp/two.json \\
        --reference /tmp/one.json
    python bench/dist_step.py --merge /tmp/one.json /tmp/two.json --out bench/results/dist_step.json

Each rank trains on its own stream of user-shaped batches (bench/batches.py, seed = rank),
so N GPUs see N times the tokens of one (weak scaling); a step's time is the slowest
rank's. Variants per engine:
- dense:  Inductor per decoder layer (`layer.compile()`), bf16 adapters (the fair
          baseline for `lora_dtype="model"`)
- dense_unmasked: the same, with right-padded batches' attention masks dropped before the
          call, as the sparse variant's `causal_right_padding` does (fused causal attention)
- dense_varlen: the same, with right-padded batches run as one packed row of their real
          tokens under variable-length attention, as the sparse variant's `padding_free`
          does (the dense step given the same saving)
- sparse: `slc.compile(model, math10k preset, lora_dtype="model")`, past the warm-up
- sparse_graphs: the same with `cuda_graphs=True` on the fixed batch (graphs serve one
          shape)
- sparse_graphs_bucket: `cuda_graphs=True, graph_bucket=1024` on the --batches stream
          (padding-free rows filled to a few shapes)
Engines: single (no wrapper), ddp (`DistributedDataParallel(model)` after compiling),
ddp_view (the same with `gradient_as_bucket_view=True`: the gradients live in DDP's
all-reduce buckets, so no copy into the buckets and back per parameter and step),
fsdp (`fully_shard` on each decoder layer, then the root, then compile: torchtitan's
order; --fsdp-unit K shards K layers as one unit), fsdp_keep (the same with
`reshard_after_forward=False`: one all-gather of the frozen weights per step instead of
two, for the memory of unsharded weights).

Each rank draws its own lengths, so a step waits on the rank with the longest batch;
--same-lengths gives every rank the lengths of one stream (tokens of its own), as a
length-grouped sampler does, which measures the engines without that wait.

Variants run one after another in a launch, and the first meets each length first: with
cuDNN attention (SDPA's default on the H200) it pays a graph build per new length that
later variants find done. --no-cudnn-attention turns that backend off for all of them;
--warm-stream runs each variant's timed batches once untimed first, so that every variant
is timed at lengths it has seen (the regime of a long run).

Correctness (`--check-layers`, before the timing): a few steps of the sparse variant on a
small model of the same widths. The single engine runs every rank's micro-batch in turn
(loss / N each: the global batch, as gradient accumulation), and writes its losses and
LoRA weights into --out; the N-GPU engines compare against --reference: per-rank losses,
LoRA weights (gathered under FSDP2) against the one-GPU run, and equal across ranks.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batches as user_batches  # noqa: E402
from train_step import (ALL, QKVO, add_lora, build_model, graph_stats, unmasked,  # noqa: E402
                        llama_config, sampled_policy, sync, varlen)

import sparselora_compile as slc  # noqa: E402
from sparselora_compile.passes.blocks import decoder_layers  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
T0 = time.perf_counter()


def log(msg):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def device_of(rank) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lora_state(model) -> dict:
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu()
            for n, p in model.named_parameters() if p.requires_grad}


def build(args, layers, device, targets):
    cfg = llama_config(layers, args.smoke)
    peft = add_lora(build_model(cfg, device), targets, bf16_adapters=True)
    return cfg, peft


def wrap(engine, variant, peft, args, layers):
    """Compile and wrap as the engine's users do; returns (callable, slc wrapper or None)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if engine in ("fsdp", "fsdp_keep"):
        from torch.distributed.fsdp import fully_shard
        keep = engine == "fsdp_keep"  # the gathered weights stay for the backward
        all_layers = [layer for _, layer in decoder_layers(peft)]
        for i in range(0, len(all_layers), args.fsdp_unit):  # one unit: one gather, one set of hooks
            group = all_layers[i:i + args.fsdp_unit]
            fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=not keep)
        fully_shard(peft, reshard_after_forward=not keep)
    if variant.startswith("dense"):
        for _, layer in decoder_layers(peft):
            layer.compile(backend=args.inner)
        wrapped = None
    else:
        policy, _ = sampled_policy(args.preset, layers, total_steps=args.total_steps)
        wrapped = slc.compile(peft, policy, inner=args.inner, lora_dtype="model",
                              cuda_graphs=variant.startswith("sparse_graphs"),
                              graph_bucket=1024 if variant == "sparse_graphs_bucket" else 0)
        wrapped.set_step(10**6)  # past the dense warm-up
    fn = peft  # slc.compile compiled its layers in place: the model runs the glue
    if engine in ("ddp", "ddp_view"):
        fn = DDP(peft, gradient_as_bucket_view=engine == "ddp_view")
    if variant == "dense_unmasked":
        fn = unmasked(fn)
    if variant == "dense_varlen":
        fn, _ = varlen(fn, peft)  # the model is built anew for every variant: no undo
    return fn, wrapped


def step(fn, opt, batch, scale=1.0, update=True):
    loss = fn(**batch).loss
    (loss * scale).backward()
    if update:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def stream(mode, cfg, args, n, base, rank, device):
    """`n` batches of `mode` for one rank, seed `base + rank`; with --same-lengths every
    rank's batches have the shapes of seed `base` (lengths, padding, supervised positions)
    with tokens of their own."""
    if not args.same_lengths:
        batches = user_batches.make_batches(mode, cfg.vocab_size, n, args.batch, args.seq, seed=base + rank)
    else:
        g = torch.Generator().manual_seed(10_000 + base + rank)
        batches = [user_batches.retokened(b, cfg.vocab_size, g) for b in user_batches.make_batches(
            mode, cfg.vocab_size, n, args.batch, args.seq, seed=base)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def timed(engine, variant, args, device):
    """Compile, warm up, then time args.steps steps; the slowest rank's time per step."""
    rank, n = world()
    torch._dynamo.reset()
    gc.collect()  # the previous variant's model, so that the peak below is this one's
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mode = "fixed" if variant == "sparse_graphs" else args.batches
    cfg, peft = build(args, args.layers, device, QKVO)
    fn, wrapped = wrap(engine, variant, peft, args, args.layers)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-5)
    batches = stream(mode, cfg, args, args.warmup + args.steps, 0, rank, device)
    t = time.perf_counter()
    # --warm-stream: the timed batches once untimed too, so that every variant is timed at
    # lengths it has seen, whatever ran before it (caches that outlive a variant: cuDNN's)
    for b in batches[: args.warmup] + (batches[args.warmup:] if args.warm_stream else []):
        step(fn, opt, b)
    sync(device)
    first_s = time.perf_counter() - t
    times, tokens, losses, lengths = [], 0, [], []
    for b in batches[args.warmup:]:
        t = time.perf_counter()
        losses.append(step(fn, opt, b))
        sync(device)
        dt = torch.tensor([time.perf_counter() - t], device=device, dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(dt.item() * 1e3)
        tokens += user_batches.real_tokens(b)
        lengths.append(int(b["input_ids"].shape[-1]))  # a new length costs more (cuDNN's builds)
    total = torch.tensor([tokens], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    mean_ms = sum(times) / len(times)
    res = {"engine": engine, "variant": variant, "world": n, "batches": mode,
           "steps": len(times), "warmup_steps": args.warmup, "warm_stream": args.warm_stream,
           "same_lengths": args.same_lengths,
           "warmup_s": round(first_s, 1),
           "mean_ms": round(mean_ms, 2), "median_ms": round(sorted(times)[len(times) // 2], 2),
           "max_ms": round(max(times), 2), "step_ms": [round(x, 2) for x in times], "step_lengths": lengths,
           "tokens_per_s": round(total.item() / (sum(times) / 1e3), 1),
           "final_loss": round(float(torch.stack(losses[-5:]).float().mean()), 4)}
    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.host_profile:
        # every rank steps (collectives), rank 0's profile is kept
        from host_profile import host_profile
        extra = stream(mode, cfg, args, args.host_profile, 1000, rank, device)
        prof = host_profile(lambda b: step(fn, opt, b), extra)
        res["host_profile"] = {k: prof[k] for k in ("total_ms", "by_group_ms", "top_self")}
        log(f"{engine} {variant}: host {prof['total_ms']} ms/step (cProfile): {prof['by_group_ms']}")
    if args.gpu_timeline and device.type == "cuda":
        from host_profile import gpu_timeline
        seen = batches[args.warmup:args.warmup + args.gpu_timeline]  # lengths met already
        res["gpu_timeline"] = [gpu_timeline(lambda b: step(fn, opt, b), b, device) for b in seen]
        log(f"{engine} {variant}: GPU busy/idle ms per traced step " + ", ".join(
            f"{t['gpu_busy_ms']}/{t['gpu_idle_ms']}" for t in res["gpu_timeline"]))
    if wrapped is not None:
        res["policy_stats"] = wrapped.stats.as_dict()
        if variant.startswith("sparse_graphs"):
            res["cuda_graphs"] = graph_stats(wrapped)
    del fn, opt, peft, wrapped
    torch._dynamo.reset()
    return res


def check(engine, args, device, reference):
    """Sparse steps on a small model; the single engine writes the reference, the others
    compare against it (see the module docstring)."""
    rank, n = world()
    torch._dynamo.reset()
    cfg, peft = build(args, args.check_layers, device, ALL)
    fn, _ = wrap(engine, "sparse", peft, args, args.check_layers)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=args.check_lr)
    init = lora_state(peft)
    ranks = args.check_world if engine == "single" else n
    shards = {r: stream(args.batches, cfg, args, args.check_steps, 100, r, device)
              for r in (range(ranks) if engine == "single" else [rank])}
    losses = {r: [] for r in shards}
    for i in range(args.check_steps):
        for r in shards:  # the single engine: every micro-batch, accumulated
            losses[r].append(step(fn, opt, shards[r][i], scale=1 / len(shards) if engine == "single"
                                  else 1.0, update=False).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = lora_state(peft)
    out = {"engine": engine, "layers": args.check_layers, "steps": args.check_steps,
           # the LoRA weights must move for their comparison to mean anything
           "lora_max_change": max((state[k] - init[k]).abs().max().item() for k in state)}
    if engine == "single":
        out["losses"] = losses
        out["lora_file"] = f"{args.out}.lora.pt"  # too large for the JSON
        torch.save(state, out["lora_file"])
        return out
    gathered = [None] * n
    dist.all_gather_object(gathered, losses[rank])
    out["losses"] = {r: gathered[r] for r in range(n)}
    flat = torch.cat([v.flatten() for v in state.values()]).to(device)
    others = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(others, flat)
    out["lora_max_diff_across_ranks"] = max((o - others[0]).abs().max().item() for o in others)
    if reference:
        ref = reference["losses"]
        out["loss_max_abs_diff_vs_one_gpu"] = max(
            abs(a - b) for r in range(n) for a, b in zip(out["losses"][r], ref[str(r)]))
        ref_lora = torch.load(reference["lora_file"])
        ref_flat = torch.cat([ref_lora[k].flatten() for k in state])
        diff = (flat.cpu() - ref_flat).abs().max().item()
        out["lora_max_abs_diff_vs_one_gpu"] = diff
        out["lora_max_abs"] = ref_flat.abs().max().item()
    torch._dynamo.reset()
    return out


def allgather_ms(device, numel: int, iters: int = 5) -> float:
    """Mean time of one all-gather whose output is `numel` bf16 elements (one decoder
    layer's weights): what FSDP2 waits on per layer and pass when it cannot overlap."""
    n = dist.get_world_size()
    shard = torch.ones(numel // n, device=device, dtype=torch.bfloat16)
    full = torch.empty(shard.numel() * n, device=device, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(full, shard)
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dist.all_gather_into_tensor(full, shard)
    sync(device)
    return (time.perf_counter() - t) / iters * 1e3


def env(device) -> dict:
    import peft
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "sparselora_compile": slc.__version__, "device": str(device),
            "env": {k: os.environ.get(k) for k in (*NO_MULTICAST, "OMP_NUM_THREADS")},
            "intra_op_threads": torch.get_num_threads()}
    if device.type == "cuda":
        import triton
        info.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                    triton=triton.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())))
    return info


def _tokens_per_s_at_median(timed: dict) -> float:
    """A step's tokens over the median step time: one slow step (a capture, a stall) moves
    the mean, not this."""
    return timed["tokens_per_s"] * timed["mean_ms"] / timed["median_ms"]


def merge(paths, out):
    """One file from the 1-GPU and N-GPU launches, with the ratios the issue asks for:
    tokens/s against one GPU, and sparse against dense, per engine and batch stream."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for run in runs:  # launches differ in FSDP unit size and attention backend too
        shape = run.get("shape", {})
        for r in run["timed"]:
            r.setdefault("fsdp_unit", shape.get("fsdp_unit", 1) if r["engine"].startswith("fsdp") else 1)
            r.setdefault("cudnn_attention", shape.get("cudnn_attention", True))
            r.setdefault("warm_stream", False)
            r.setdefault("same_lengths", False)
            r.setdefault("omp_num_threads", run.get("env", {}).get("env", {}).get("OMP_NUM_THREADS"))
    timed_all = [r for run in runs for r in run["timed"] if "error" not in r]

    def key(r, engine=None, variant=None):
        single = (engine or r["engine"]) == "single"  # one rank: --same-lengths changes nothing
        return (engine or r["engine"], variant or r["variant"], r["batches"],
                1 if single else r["fsdp_unit"], r["cudnn_attention"], r["warm_stream"],
                None if single else r["same_lengths"], None if single else r["omp_num_threads"])

    def label(r):
        unit = f" ({r['fsdp_unit']} layers per unit)" if r["fsdp_unit"] > 1 else ""
        notes = (("" if r["cudnn_attention"] else ", no cuDNN") + (", seen lengths" if r["warm_stream"] else "")
                 + (", same lengths on every rank" if r["same_lengths"] else "")
                 + (f", OMP_NUM_THREADS={r['omp_num_threads']}" if r["omp_num_threads"] else ""))
        return f"{r['engine']}{unit}/{r['variant']} [{r['batches']}{notes}]"

    by = {key(r): r for r in timed_all}
    ratios, medians = {}, {}
    for r in by.values():
        one = by.get(key(r, engine="single"))
        if r["engine"] != "single" and one:
            ratios[f"{label(r)}: tokens/s vs one GPU"] = round(r["tokens_per_s"] / one["tokens_per_s"], 3)
            medians[f"{label(r)}: tokens/s vs one GPU"] = round(
                _tokens_per_s_at_median(r) / _tokens_per_s_at_median(one), 3)
        if r["variant"].startswith("dense"):
            continue
        for dense in ("dense", "dense_unmasked"):
            base = by.get(key(r, variant=dense))
            if base:
                ratios[f"{label(r)} vs {dense}"] = round(base["mean_ms"] / r["mean_ms"], 3)
        base = by.get(key(r, variant="sparse"))
        if r["variant"] != "sparse" and base:
            ratios[f"{label(r)} vs sparse"] = round(base["mean_ms"] / r["mean_ms"], 3)
    merged = {"launches": [{k: v for k, v in run.items() if k != "timed"} for run in runs],
              "timed": [r for run in runs for r in run["timed"]], "ratios": ratios,
              "ratios_by_median_step": medians}
    Path(out).write_text(json.dumps(merged, indent=1))
    for k, v in ratios.items():
        print(f"{k}: {v}")
    for k, v in medians.items():
        print(f"{k}, by median step: {v}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", nargs="+", default=["single"], choices=("single", "ddp", "ddp_view", "fsdp", "fsdp_keep"))
    ap.add_argument("--variants", nargs="*", default=["dense", "sparse"],
                    choices=("dense", "dense_unmasked", "dense_varlen", "sparse", "sparse_graphs",
                             "sparse_graphs_bucket"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="padded", choices=user_batches.MODES)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compiles included)")
    ap.add_argument("--preset", default="math10k")
    ap.add_argument("--total-steps", type=int, default=1000)
    ap.add_argument("--inner", default=None, help="default: inductor on CUDA, aot_eager on CPU")
    ap.add_argument("--check-layers", type=int, default=2, help="0: no correctness check")
    ap.add_argument("--check-steps", type=int, default=4)
    ap.add_argument("--check-lr", type=float, default=0.5)
    ap.add_argument("--check-world", type=int, default=2, help="micro-batches per step (single)")
    ap.add_argument("--reference", default=None, help="the single engine's --out, to compare with")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds: start no variant after")
    ap.add_argument("--fsdp-unit", type=int, default=1, metavar="K",
                    help="decoder layers per FSDP2 unit (fully_shard of a list of K layers)")
    ap.add_argument("--same-lengths", action="store_true",
                    help="every rank's step has the same lengths (as a length-grouped sampler "
                         "gives), so that no rank waits on a longer one; tokens differ")
    ap.add_argument("--warm-stream", action="store_true",
                    help="run the timed batches once untimed first: every variant timed at seen lengths")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="SDPA without cuDNN, which builds a graph at each new length (once per process)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths (CPU, gloo)")
    ap.add_argument("--host-profile", type=int, default=0, metavar="STEPS",
                    help="after timing, this many steps under cProfile (host_profile.py), rank 0's kept")
    ap.add_argument("--gpu-timeline", type=int, default=0, metavar="STEPS",
                    help="after timing, this many steps each traced on the GPU (host_profile.gpu_timeline: "
                         "busy and idle time, longest gaps, kernels by group), rank 0's kept")
    ap.add_argument("--merge", nargs="+", default=None, help="merge launch files into --out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    for k, v in NO_MULTICAST.items():  # also for any child process
        os.environ.setdefault(k, v)
    cuda = torch.cuda.is_available() and not args.smoke
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = world()
    device = device_of(rank) if cuda else torch.device("cpu")
    args.inner = args.inner or ("inductor" if cuda else "aot_eager")
    if "single" in args.engines and n != 1:
        raise SystemExit("--engines single runs with --nproc-per-node 1")
    reference = json.loads(Path(args.reference).read_text())["check"].get("single") \
        if args.reference else None
    out = {"command": " ".join(sys.argv), "world": n, "env": env(device),
           "shape": {"layers": args.layers, "batch": args.batch, "seq": args.seq,
                     "batches": args.batches, "preset": args.preset, "lora": "r=32 q,k,v,o, bf16",
                     "fsdp_unit": args.fsdp_unit, "cudnn_attention": not args.no_cudnn_attention},
           "check": {}, "timed": [], "skipped": []}

    if n > 1 and device.type == "cuda":
        cfg = llama_config(1, args.smoke)
        numel = sum(p.numel() for p in build_model(cfg, "meta").model.layers[0].parameters())
        ms = allgather_ms(device, numel)
        out["allgather_one_layer"] = {"bytes": 2 * numel, "ms": round(ms, 3),
                                      "gb_per_s": round(2 * numel / ms / 1e6, 1)}
        log(f"all-gather of one layer's weights ({2 * numel / 2**20:.0f} MiB): {ms:.2f} ms")

    def save():
        if rank == 0:
            Path(args.out).write_text(json.dumps(out, indent=1))

    if args.check_layers:
        for engine in args.engines:
            out["check"][engine] = c = check(engine, args, device, reference)
            log(f"check {engine}: " + ", ".join(f"{k} {v:.3g}" for k, v in c.items()
                                                if isinstance(v, float)))
            save()
    for variant in args.variants:  # variant-major: past the budget, the last variant goes
        for engine in args.engines:
            if args.time_budget and time.perf_counter() - T0 > args.time_budget:
                out["skipped"].append(f"{engine}/{variant}")
                continue
            try:
                r = timed(engine, variant, args, device)
            except Exception as e:  # recorded, and the other variants still run
                r = {"engine": engine, "variant": variant, "error": f"{type(e).__name__}: {e}"[:2000]}
                log(f"{engine}/{variant} failed: {r['error']}")
                torch._dynamo.reset()
            out["timed"].append(r)
            if "mean_ms" in r:
                log(f"{engine}/{variant} x{n}: mean {r['mean_ms']} ms, median {r['median_ms']}, "
                    f"{r['tokens_per_s']:.0f} tokens/s, first steps {r['warmup_s']} s, "
                    f"peak {r.get('peak_mem_gib')} GiB")
            save()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
