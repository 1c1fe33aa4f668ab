"""Where a training step synchronises the host with the GPU.

A step the host cannot queue ahead of the GPU is bound by host time; every
`cudaStreamSynchronize` (an `.item()`, a `nonzero`, a device-to-host copy) stops the
queue. This runs a few steps of a small LLaMA-3-8B-shaped model per variant, then one
step under `torch.cuda.set_sync_debug_mode("warn")`, and records the Python stack of
each synchronising call (counted by stack).

    python bench/sync_points.py --layers 2 --out bench/results       # CUDA only
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_step as ts  # noqa: E402  (same model, batches and variants)


def probe(fn, opt, ids, labels):
    stacks = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
            stacks["\n".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-8:])] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            ts.train_step(fn, opt, ids, labels)
            torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = old
    return [{"count": c, "stack": s} for s, c in stacks.most_common()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lora", choices=("qkvo", "all"), default="qkvo")
    ap.add_argument("--variants", nargs="+", default=["inductor", "sl_math10k", "sl_sparsity0"])
    ap.add_argument("--out", default=str(ts.RESULTS))
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    cfg = ts.llama_config(args.layers, smoke=False)
    peft = ts.add_lora(ts.build_model(cfg, device), ts.ALL if args.lora == "all" else ts.QKVO, False)
    ids, labels = ts.make_batch(cfg, 8, 512, 128, device, seed=7)
    out = {"env": ts.env_info(device), "layers": args.layers, "lora": args.lora, "variants": {}}
    for name in args.variants:
        ts.free(device)
        if name == "inductor":
            fn, layers = torch.compile(peft), []
        else:
            if name == "sl_sparsity0":
                policy = ts.slc.Policy(mlp=0.5, attention=0.5, warmup_steps=10**9)
            else:
                policy = ts.sampled_policy(name[3:], args.layers, 1000)[0]
            fn = ts.slc_compile(peft, policy)
            if name != "sl_sparsity0":
                fn.set_step(10**6)  # past the dense warm-up
            layers = []
        opt = torch.optim.AdamW(ts.lora_params(peft), lr=1e-5)
        for _ in range(3):
            ts.train_step(fn, opt, ids, labels)
        torch.cuda.synchronize()
        syncs = probe(fn, opt, ids, labels)
        out["variants"][name] = {"syncs": sum(s["count"] for s in syncs), "stacks": syncs}
        print(f"{name}: {out['variants'][name]['syncs']} synchronising calls in one step", flush=True)
        for s in syncs[:6]:
            print(f"  x{s['count']}\n    " + s["stack"].replace("\n", "\n    "), flush=True)
        for m in layers:
            m._compiled_call_impl = None
        if hasattr(fn, "uncompile"):
            fn.uncompile()
    path = Path(args.out) / f"sync_points_{args.lora}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
