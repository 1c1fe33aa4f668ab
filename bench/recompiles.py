"""Dynamo compiles over user-shaped batches (CPU, a tiny random Llama): how many graphs each
way of compiling makes when the sequence length and token split change every step.

    python bench/recompiles.py    # one compiled model per variant: padded, then packed, 12 batches each
    TORCH_LOGS=recompiles python bench/recompiles.py  # with Dynamo's reason for each recompile

Variants: `regional` (each decoder layer `m.compile(backend=inner)`, as train_step.py's
`inductor_regional`), `sl` (`slc.compile(model, policy, inner=inner)`), `sl_whole`
(`torch.compile(model, backend="sparselora")`), `sl_wrapper_whole` (`slc.compile(...,
regional=False)`), `whole` (plain `torch.compile` of the model). Counts, not timings: Dynamo frames compiled (`frames`, every compile or recompile
of a frame) and graphs handed to a backend (`graphs`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import batches as user_batches  # noqa: E402

VARIANTS = ("regional", "sl", "sl_wrapper_whole", "sl_whole", "whole")


def tiny_model(layers=4, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      use_cache=False)
    peft = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft.train()
    return peft


def policy():
    import sparselora_compile as slc
    # deeper layers sparse, layer 0 dense: two plans, as the sampled Math10K preset has
    return slc.Policy(mlp=0.75, attention=0.5, dense_layers=[0], warmup_steps=0)


def compiled(variant, model, inner):
    import sparselora_compile as slc
    from sparselora_compile.passes.blocks import decoder_layers
    if variant == "regional":
        for _, m in decoder_layers(model):
            m.compile(backend=inner)
        return model
    if variant == "whole":
        return torch.compile(model, backend=inner)
    if variant in ("sl", "sl_wrapper_whole"):
        return slc.compile(model, policy(), inner=inner,
                           regional=variant == "sl")
    return torch.compile(model, backend="sparselora",
                         options={"policy": policy(), "inner": inner})


def count(variant, modes, steps, inner, layers=4, seq=64):
    """Compile once, then step through each mode's batches in turn (as train_step.py does);
    per mode: frames compiled (after each step, since the mode began) and lengths."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(layers)
    fn = compiled(variant, model, inner)
    out = {"variant": variant, "modes": {}}
    for mode in modes:
        f0 = counters["frames"]["ok"]
        lens, frames = [], []
        for b in user_batches.make_batches(mode, 256, steps, batch=8, seq=seq, seed=7):
            fn(**b).loss.backward()
            lens.append(b["input_ids"].shape[-1])
            frames.append(counters["frames"]["ok"] - f0)
        out["modes"][mode] = {"lengths": lens, "frames": frames[-1], "frames_per_step": frames}
    out["frames"] = counters["frames"]["ok"]
    out["graphs"] = counters["stats"]["unique_graphs"]
    out["graph_breaks"] = sum(counters["graph_break"].values())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batches", nargs="+", default=["padded", "packed"], choices=user_batches.MODES)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--inner", default="aot_eager", choices=("aot_eager", "eager"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch._dynamo.config.recompile_limit = 64  # count every recompile, never fall back to eager
    out = []
    for v in args.variants:
        r = count(v, args.batches, args.steps, args.inner, args.layers)
        out.append(r)
        print(f"{v:9s} frames {r['frames']:3d} graphs {r['graphs']:3d} breaks {r['graph_breaks']}", flush=True)
        for mode, m in r["modes"].items():
            print(f"  {mode:7s} frames {m['frames']:3d}  after each step {m['frames_per_step']}  "
                  f"T {m['lengths']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
