"""How many training steps CUDA graph sets would serve on a batch stream, without a GPU.

A set of graphs serves one key (the filled row's shape, its token-split capacities and
sequence count), so what share of a stream replays depends on the stream's lengths and
on the keeping policy (`graph_bucket`, MAX_SETS, MAX_CAPTURES), not on the GPU. This runs
the real policy (`slc.compile(..., cuda_graphs=True, graph_bucket=...)`) on a tiny Llama
on CPU, with the capture replaced by a stand-in that returns the layers as they are, over
the benches' batch streams (bench/batches.py, the seeds of train_step.py), and reports
per mode: steps that replayed, captures, distinct keys and how often each came.

    python bench/graph_keys.py --batches padded long packed --steps 60 200 \\
        --sets 3 4 6 --out bench/results/graph_keys_cpu.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batches as user_batches  # noqa: E402

import sparselora_compile as slc  # noqa: E402
from sparselora_compile import cuda_graphs  # noqa: E402
from sparselora_compile.cuda_graphs import LayerGraphs  # noqa: E402

SEED = 7      # train_step.py's batch seed
WARMUP = 2    # train_step.py's warm-up steps per mode, before the timed ones
VOCAB = 256


def tiny_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      use_cache=False)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "k_proj",
                                                                                 "v_proj", "o_proj"]))


def stand_in(fns, samples, **kwargs):
    """The capture without a GPU: the layer functions, unchanged."""
    return fns


@contextlib.contextmanager
def stand_in_capture(sets: int, capture_after: int = cuda_graphs.CAPTURE_AFTER):
    """LayerGraphs on CPU with the stand-in, `sets` kept sets and a key captured once it
    came `capture_after` times, restored afterwards."""
    saved = (LayerGraphs.needs_cuda, LayerGraphs.__dict__["make_graphed"], cuda_graphs.MAX_SETS,
             cuda_graphs.CAPTURE_AFTER)
    LayerGraphs.needs_cuda, LayerGraphs.make_graphed = False, staticmethod(stand_in)
    cuda_graphs.MAX_SETS, cuda_graphs.CAPTURE_AFTER = sets, capture_after
    try:
        yield
    finally:
        (LayerGraphs.needs_cuda, LayerGraphs.make_graphed, cuda_graphs.MAX_SETS,
         cuda_graphs.CAPTURE_AFTER) = saved


def run(mode: str, steps: int, bucket: int, sets: int,
        capture_after: int = cuda_graphs.CAPTURE_AFTER, inner: str = "aot_eager") -> dict:
    """`steps` training steps of the `mode` stream after WARMUP; the counts are of those,
    `step_keys` (each step's key, numbered by first appearance) and `steps_graphed` hold
    every step, the warm-up first. The keys do not depend on `inner` (the backend's inner
    compiler); "eager" compiles faster."""
    torch._dynamo.reset()
    with stand_in_capture(sets, capture_after):
        wrapped = slc.compile(tiny_model(), slc.Policy(mlp=0.5, attention=0.5), inner=inner,
                              cuda_graphs=True, graph_bucket=bucket)
        graphs = wrapped.graphs
        numbers, step_keys, graphed = {}, [], []
        t0 = time.perf_counter()
        for b in user_batches.make_batches(mode, VOCAB, WARMUP + steps, seed=SEED):
            before = graphs.graphed_forwards
            wrapped(**b).loss.backward()
            key = repr(graphs.last_key[0]) + " " + repr(graphs.last_key[2:])
            step_keys.append(numbers.setdefault(key, len(numbers)))
            graphed.append(graphs.graphed_forwards > before)
    names = {n: k for k, n in numbers.items()}
    counts = collections.Counter(step_keys[WARMUP:])
    return {"mode": mode, "steps": steps, "graph_bucket": bucket, "max_sets": sets,
            "capture_after": capture_after, "max_captures": cuda_graphs.MAX_CAPTURES, "graphed_steps": sum(graphed[WARMUP:]),
            "graphed_share": round(sum(graphed[WARMUP:]) / steps, 3), "captures": graphs.captures,
            "longer_fills": graphs.longer_fills,
            "distinct_keys": len(counts), "keys": {names[n]: c for n, c in counts.most_common()},
            "step_keys": step_keys, "steps_graphed": graphed,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", nargs="+", default=["padded", "long", "packed"],
                    choices=[m for m in user_batches.MODES if m != "fixed"])
    ap.add_argument("--steps", nargs="+", type=int, default=[60])
    ap.add_argument("--bucket", nargs="+", type=int, default=[1024], help="graph_bucket values")
    ap.add_argument("--sets", nargs="+", type=int, default=[cuda_graphs.MAX_SETS], help="MAX_SETS values")
    ap.add_argument("--capture-after", nargs="+", type=int, default=[cuda_graphs.CAPTURE_AFTER],
                    help="CAPTURE_AFTER values: sightings of a key before its capture")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.getLogger("sparselora_compile").setLevel(logging.ERROR)
    results = []
    for steps in args.steps:
        for mode in args.batches:
            for bucket in args.bucket:
                for sets, after in itertools.product(args.sets, args.capture_after):
                    r = run(mode, steps, bucket, sets, after)
                    results.append(r)
                    print(f"{mode:7s} steps {steps:4d} bucket {bucket:5d} sets {sets} after {after}: "
                          f"{r['graphed_steps']:4d} graphed ({r['graphed_share']:.0%}), "
                          f"{r['captures']} captures, {r['distinct_keys']} keys, {r['longer_fills']} "
                          f"filled to a longer set  [{r['wall_s']} s]",
                          flush=True)
    if args.out:
        out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
               "what": "CPU stand-in for the capture: which steps a kept graph set serves, not speed",
               "seed": SEED, "warmup_steps": WARMUP, "results": results}
        Path(args.out).write_text(json.dumps(out, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
