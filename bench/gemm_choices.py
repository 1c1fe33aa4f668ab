"""What the GEMM choices cost in the attention half of a LLaMA-3-8B decoder layer (H200).

The half that a sparse step shares with Inductor's dense one: the input RMSNorm, q/k/v/o
with LoRA adapters (r=32, bf16 adapters, PEFT's layers), SDPA and the residual add. Its
LoRA products are skinny (32 or 96 columns, or a reduction over the tokens), for which
cuBLAS picks split-K kernels with a memset and a reduction kernel each. This compiles
that block with Inductor (dynamic=False, the batch of the fixed bench: 8 x 512) and
measures, per forward + backward, the GPU's kernel time and kernel count (from the
profiler; inside a CUDA graph each kernel also costs a ~1-2 us gap) and the wall time:

- `default`: Inductor's choices (cuBLAS for every product);
- `max_autotune`: Inductor's max-autotune GEMMs (Triton templates or cuBLAS, whichever
  its benchmark finds faster per product; epilogues fuse into the Triton ones);
- `no_workspace`: the default with cuBLAS's workspace at zero (`CUBLAS_WORKSPACE_CONFIG=:0:0`,
  `CUBLASLT_WORKSPACE_SIZE=0`), which leaves cuBLAS no room for split-K partial sums.

Each variant runs in its own process (cuBLAS reads its workspace size once); each checks
the block's output and LoRA gradients against the default's on the same inputs.

    python bench/gemm_choices.py --out bench/results/gemm_choices.json
    python bench/gemm_choices.py --small --variants default     # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "default": ({}, {}),
    "max_autotune": ({}, {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"}),
    "no_workspace": ({"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}, {}),
}
SHAPES = {"8b": dict(hidden=4096, heads=32, kv_heads=8, batch=8, seq=512, r=32),
          "small": dict(hidden=64, heads=4, kv_heads=2, batch=2, seq=16, r=4)}


class AttentionHalf:
    """x -> x + self_attn(input_layernorm(x)) of one HF LlamaDecoderLayer with PEFT LoRA."""

    def __init__(self, shape: dict, device):
        import torch
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], intermediate_size=64,
                          num_hidden_layers=1, max_position_embeddings=8192)
        cfg._attn_implementation = "sdpa"
        layer = LlamaDecoderLayer(cfg, 0)
        layer = inject_adapter_in_model(LoraConfig(r=shape["r"], lora_alpha=2 * shape["r"],
                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), layer)
        for n, p in layer.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.layer = layer.to(device, dtype)  # bf16 adapters: Inductor's fair baseline
        self.rope = LlamaRotaryEmbedding(cfg).to(device)
        b, t = shape["batch"], shape["seq"]
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(b, t, shape["hidden"], generator=g).to(device, dtype).requires_grad_()
        self.probe = torch.randn(b, t, shape["hidden"], generator=g).to(device, dtype)
        pos = torch.arange(t, device=device)[None].expand(b, -1)
        self.cos_sin = self.rope(self.x, pos)

    def forward(self, x, cos, sin):
        attn = self.layer.self_attn(self.layer.input_layernorm(x), position_embeddings=(cos, sin),
                                    attention_mask=None)[0]
        return x + attn

    def params(self):
        return [p for p in self.layer.parameters() if p.requires_grad]


def run_one(name: str, shape: dict, iters: int, ref_path: str) -> dict:
    """One variant in this process: compile, check against the reference file, time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    block = AttentionHalf(shape, device)
    config = VARIANTS[name][1]
    fn = torch.compile(block.forward, dynamic=False, options=config or None)
    params = block.params()

    def step():
        out = fn(block.x, *block.cos_sin)
        loss = (out.float() * block.probe.float()).sum()
        grads = torch.autograd.grad(loss, [block.x, *params])
        return out, grads

    t0 = time.perf_counter()
    out, grads = step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    compile_s = time.perf_counter() - t0
    got = {"out": out.detach().float().cpu(), "grads": [g.float().cpu() for g in grads]}
    if name == "default":
        torch.save(got, ref_path)
    ref = torch.load(ref_path)
    check = {"out_max_rel": float((got["out"] - ref["out"]).norm() / ref["out"].norm()),
             "grad_max_rel": max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                 for a, b in zip(got["grads"], ref["grads"]))}
    for _ in range(5):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    rec = {"variant": name, "env": VARIANTS[name][0], "inductor_config": config,
           "compile_s": round(compile_s, 1), "wall_ms": round(wall_ms, 3), "check": check}
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                step()
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict = {}
        for e in kernels:
            d = by_name.setdefault(e.name, [0, 0.0])
            d[0] += 1
            d[1] += e.device_time
        rec["kernel_ms"] = round(sum(e.device_time for e in kernels) / iters / 1e3, 4)
        rec["kernels"] = len(kernels) / iters
        rec["by_kernel"] = sorted(([n[:110], c / iters, round(us / iters, 2)] for n, (c, us) in by_name.items()),
                                  key=lambda r: -r[2])
    return rec


def environment() -> dict:
    import torch
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers
        import triton
        info.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this variant, print JSON
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = SHAPES["small" if args.small else "8b"]
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, shape, args.iters, args.ref)), flush=True)
        return
    names = ["default"] + [v for v in args.variants if v != "default"]  # the reference first
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.pt")
        for name in names:
            env = {**os.environ, **VARIANTS[name][0]}
            cmd = [sys.executable, __file__, "--one", name, "--ref", ref, "--iters", str(args.iters)]
            cmd += ["--small"] if args.small else []
            print(f"[gemm_choices] {name} ...", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"variant {name} failed (rc {proc.returncode})")
            rec = json.loads(line[len("RESULT "):])
            results.append(rec)
            print(f"  compile {rec['compile_s']} s, wall {rec['wall_ms']} ms, kernels "
                  f"{rec.get('kernel_ms')} ms / {rec.get('kernels')}, check {rec['check']}", flush=True)
    out = {"command": "python " + " ".join(sys.argv), "shape": shape, "environment": environment(),
           "variants": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
