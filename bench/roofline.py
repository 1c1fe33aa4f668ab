"""What the training step's FLOPs allow, before it is measured: a roofline of the step.

Counts each step's FLOPs by kind over the benches' batch streams (bench/batches.py, the
seed and warm-up of train_step.py) for three steps:

    dense         Inductor as users run it: every position, padding included; masked
                  attention over whole rows (or packed rows' block-diagonal mask); the LM
                  head on every position (train_step.py's inductor_regional_bf16)
    dense_varlen  the same given what slc.compile's padding_free and varlen_attention do:
                  real tokens only, causal attention within each sequence (_varlen)
    sparse        slc.compile: as dense_varlen, the planned blocks' base products sparse on
                  context rows (the planner's own decisions and FLOP counts), the estimator,
                  and with --supervised-head the LM head on supervised positions only

The kinds: the frozen base products (forward and input gradient), the LoRA products
(forward, input and weight gradients), the LM head (forward and input gradient), the
attention core (flash's backward ~2.5x its forward) and the estimator. Time is FLOPs at
a rate per kind plus a per-token cost for everything else (norms, rotary, SwiGLU, residual
adds, the loss). The default rates are the H200's, read from profiles in bench/results (see
bench/README.md, "Roofline"); no host time: a graphed step, the GPU setting the pace. What
a measured ratio falls short of the predicted one is what the narrow products' kernels,
the row split and the host cost.

    python bench/roofline.py --batches fixed padded long packed --supervised-head
    python bench/roofline.py --batches padded long packed --supervised-head \\
        --measured bench/results/train_step_32l_padded_long.json bench/results/train_step_32l_packed_varlen.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batches as user_batches  # noqa: E402
from train_step import llama_config  # noqa: E402  (the benches' LLaMA-3-8B shape)

import sparselora_compile as slc  # noqa: E402
from sparselora_compile import packing  # noqa: E402
from sparselora_compile.passes.blocks import base_flops_per_token, model_blocks  # noqa: E402
from sparselora_compile.passes.plan import Limits, decide  # noqa: E402
from sparselora_compile.runtime.row_split import compute_split  # noqa: E402
from sparselora_compile.runtime.token_rows import dense_token_rows  # noqa: E402

SEED, WARMUP = 7, 2  # train_step.py's batch seed and warm-up steps per mode
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
FLASH_BACKWARD = 2.5  # the backward's matrix work over the forward's (5 products against 2)
STEPS = ("dense", "dense_varlen", "sparse")
KINDS = ("base", "lora", "head", "attention", "estimator")
# which train_step.py variant measured each step (the sparse one by its prefix)
MEASURED = {"dense": "inductor_regional_bf16", "dense_varlen": "inductor_regional_bf16_varlen",
            "sparse": "sl_math10k_lora_model_graphs"}


@dataclass(frozen=True)
class Rates:
    """Per-kind rates of one GPU: FLOP/s of the matrix products, of causal (flash) attention
    and of attention under a mask (SDPA's memory-efficient kernel), seconds per token and
    layer for everything else."""
    matmul: float = 600e12
    attention: float = 160e12
    masked_attention: float = 117e12
    other_per_token_layer: float = 0.09e-6


@dataclass(frozen=True)
class Model:
    """What the FLOPs depend on: the planned blocks (info, k or None) and the shapes."""
    blocks: tuple        # (BlockInfo, k | None) per block, in layer order
    hidden: int
    vocab: int
    layers: int
    heads: int
    head_dim: int
    lora: tuple          # (in, out) of each adapted linear
    rank: int
    estimator_rank: int


def build_model(cfg, policy, targets=QKVO, rank: int = 32, cuda: bool = True,
                limits: Limits = Limits()) -> Model:
    """The model's blocks as the planner decides them (`cuda`: with its CUDA-only rules),
    from a PEFT model of config `cfg` built on the meta device (no weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        peft = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=rank, target_modules=list(targets)))
    return model_of(peft, policy, cuda, limits)


def model_of(peft, policy, cuda: bool = False, limits: Limits = Limits()) -> Model:
    """`Model` of a PEFT model (any device): its blocks planned by `policy`."""
    cfg = peft.get_base_model().config
    blocks = tuple((b.info, decide(b.info, policy, cuda=cuda, limits=limits)[1]) for b in model_blocks(peft))
    lora = tuple((m.in_features, m.out_features) for m in peft.modules()
                 if hasattr(m, "lora_A") and len(m.lora_A) and hasattr(m, "in_features"))
    rank = next((m.r[a] for m in peft.modules() if hasattr(m, "lora_A") and len(m.lora_A) for a in m.r), 0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Model(blocks, cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                 head_dim, lora, rank, policy.rank)


@dataclass(frozen=True)
class Batch:
    """One step's shapes: positions (padding included), real tokens, dense rows of the
    token split, supervised positions, and attention pairs (query-key) per head and layer,
    masked over whole rows and causal within sequences; then what the sparse step runs
    under a graph bucket: its rows (the filled row) and the token split's capacities
    (dense, context; copies of a row fill them, row_split.RowSplit)."""
    positions: int
    tokens: int
    dense_rows: int
    supervised: int
    pairs_masked: int
    pairs_causal: int
    sparse_rows: int
    capacities: tuple
    sparse_pairs: int


def _sequences(row: dict) -> list[int]:
    """Sequence lengths of a packed row, from its `cu_seq_lens_q`."""
    starts = row[packing.SEQ_STARTS].tolist()
    return [e - s for s, e in zip(starts, starts[1:])]


def _causal(lengths) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def batch_shape(b: dict, bucket: int = 0) -> Batch:
    """A bench batch as slc.compile runs it: padded rows become one packed row of their
    real tokens (packing.unpad, as padding_free does), packed rows get their boundaries,
    and under `bucket` both are filled up to it (as graph_bucket does); the row's labels
    give the token split (token_rows.dense_token_rows, row_split.compute_split, with its
    own rounding: a kept graph set's larger capacities, which a split may take, are not
    modelled). Unpadded, unpacked rows are left as they are (the benches' fixed batch
    already fits any bucket's rows)."""
    ids, labels = b["input_ids"], b["labels"]
    rows, t = ids.shape
    if b.get("attention_mask") is not None:
        packed, _ = packing.unpad(b, 0, user_batches.PAD_ID)
        filled, _ = packing.unpad(b, bucket, user_batches.PAD_ID)
        masked = rows * t * t
    elif b.get("position_ids") is not None:
        packed, _ = packing.add_sequence_starts(b)
        filled = packing.fill_packed(b, bucket, user_batches.PAD_ID)[0] if bucket else packed
        masked = t * t  # HF's block-diagonal mask over the whole row
    else:  # no padding, no packing: causal kernels over every row, nothing filled
        packed = filled = {**b, packing.SEQ_STARTS: torch.arange(0, rows * t + 1, t)}
        masked = rows * t * (t + 1) // 2
    dense = dense_token_rows(filled["labels"])
    split = compute_split(dense, None, bucket)
    return Batch(positions=rows * t, tokens=sum(_sequences(packed)), dense_rows=int(dense_token_rows(packed["labels"]).sum()),
                 supervised=int((labels != user_batches.IGNORE).sum()), pairs_masked=masked,
                 pairs_causal=_causal(_sequences(packed)), sparse_rows=filled["input_ids"].numel(),
                 capacities=split.capacities, sparse_pairs=_causal(_sequences(filled)))


def base_flops(model: Model, rows: int, dense_rows: int | None = None) -> tuple[int, int]:
    """(dense, executed) forward FLOPs of the planned blocks' base products over `rows`
    rows, `dense_rows` of them dense (None: all), as the runtime counts them (RunStats)."""
    d = rows if dense_rows is None else dense_rows
    return planned_flops(model, rows, 0), planned_flops(model, d, rows - d)


def planned_flops(model: Model, dense: int, context: int) -> int:
    """Forward FLOPs of the planned blocks' base products: `dense` rows at full width,
    `context` rows at the kept channels."""
    return sum(dense * full + context * sparse for full, sparse in
               (base_flops_per_token(info, k) for info, k in model.blocks if k is not None))


def step_flops(model: Model, b: Batch, step: str, supervised_head: bool = False) -> dict:
    """FLOPs of one training step by kind (the sparse step's split with its copies)."""
    rows = {"dense": b.positions, "dense_varlen": b.tokens, "sparse": b.sparse_rows}[step]
    every = sum(base_flops_per_token(info)[0] for info, _ in model.blocks)  # all blocks, dense
    base = rows * every
    if step == "sparse":
        base += planned_flops(model, *b.capacities) - planned_flops(model, rows, 0)
    lora = 3 * sum(2 * model.rank * (i + o) for i, o in model.lora) * rows
    head_rows = b.supervised if step == "sparse" and supervised_head else rows
    pairs = {"dense": b.pairs_masked, "dense_varlen": b.pairs_causal, "sparse": b.sparse_pairs}[step]
    attention = (1 + FLASH_BACKWARD) * 4 * model.head_dim * model.heads * pairs * model.layers
    estimator = 0
    if step == "sparse":  # the rank-r factors over the context rows
        estimator = sum(2 * b.capacities[1] * model.estimator_rank * (info.in_features + info.channels)
                        for info, k in model.blocks if k is not None)
    return {"base": 2 * base, "lora": lora, "head": 2 * 2 * head_rows * model.hidden * model.vocab,
            "attention": attention, "estimator": estimator, "rows": rows,
            "masked": step == "dense" and b.pairs_masked != b.pairs_causal}


def step_seconds(f: dict, model: Model, rates: Rates) -> float:
    matmul = f["base"] + f["lora"] + f["head"] + f["estimator"]
    attention = rates.masked_attention if f["masked"] else rates.attention
    return (matmul / rates.matmul + f["attention"] / attention
            + f["rows"] * model.layers * rates.other_per_token_layer)


def predict(model: Model, batches: list[dict], rates: Rates, supervised_head: bool, bucket: int = 0) -> dict:
    """Per step kind: mean predicted ms and TFLOPs per step by kind over the batches."""
    shapes = [batch_shape(b, bucket) for b in batches]
    out = {}
    for step in STEPS:
        flops = [step_flops(model, s, step, supervised_head) for s in shapes]
        out[step] = {"ms": 1e3 * sum(step_seconds(f, model, rates) for f in flops) / len(flops),
                     "tflop": {k: sum(f[k] for f in flops) / len(flops) / 1e12 for k in KINDS}}
    for step in ("dense", "dense_varlen"):
        out[f"sparse_vs_{step}"] = out[step]["ms"] / out["sparse"]["ms"]
    out["tokens_per_step"] = sum(s.tokens for s in shapes) / len(shapes)
    out["sparse_rows_per_step"] = sum(s.sparse_rows for s in shapes) / len(shapes)
    out["dense_row_share"] = sum(s.dense_rows for s in shapes) / sum(s.tokens for s in shapes)
    return out


def measured(paths, mode: str) -> dict:
    """Mean ms per step kind of `mode` in train_step.py result files (the first that has it)."""
    found = {}
    for path in paths:
        for layer in json.loads(Path(path).read_text())["layers"].values():
            for v in layer["variants"]:
                shape = v["shapes"].get(mode if mode != "fixed" else "math10k")  # fixed: by --shapes
                for step, name in MEASURED.items():
                    if shape and step not in found and (v["variant"] == name or
                                                        (step == "sparse" and v["variant"].startswith(name))):
                        found[step] = shape["mean_ms"] if mode != "fixed" else shape["median_ms"]
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", nargs="+", choices=user_batches.MODES, default=["fixed", "padded", "long", "packed"])
    ap.add_argument("--preset", default="math10k", choices=sorted(slc.presets.PRESETS))
    ap.add_argument("--steps", type=int, default=50, help="timed steps per mode (after the bench's warm-up)")
    ap.add_argument("--supervised-head", action="store_true", help="the sparse step runs the head on supervised positions")
    ap.add_argument("--graph-bucket", type=int, default=0,
                    help="the sparse step's rows filled as slc.compile(graph_bucket=N) fills them")
    ap.add_argument("--no-cuda-limits", action="store_true",
                    help="plan as on CPU: attention below min_attention_sparsity_cuda sparse too")
    ap.add_argument("--matmul-tflops", type=float, default=Rates.matmul / 1e12)
    ap.add_argument("--attention-tflops", type=float, default=Rates.attention / 1e12)
    ap.add_argument("--masked-attention-tflops", type=float, default=Rates.masked_attention / 1e12)
    ap.add_argument("--other-ns", type=float, default=Rates.other_per_token_layer * 1e9,
                    help="ns per token and layer outside matrix products and attention")
    ap.add_argument("--measured", nargs="*", default=[], help="train_step.py JSONs to set beside the prediction")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)

    rates = Rates(args.matmul_tflops * 1e12, args.attention_tflops * 1e12, args.masked_attention_tflops * 1e12,
                  args.other_ns * 1e-9)
    cfg = llama_config(32, smoke=False)
    model = build_model(cfg, slc.presets.PRESETS[args.preset](), cuda=not args.no_cuda_limits)
    sparse_blocks = {kind: sum(1 for i, k in model.blocks if k is not None and i.kind == kind)
                     for kind in ("mlp", "attention")}
    print(f"LLaMA-3-8B shape, preset {args.preset}: sparse blocks {sparse_blocks}; rates: matrix "
          f"{rates.matmul / 1e12:g} TFLOP/s, attention {rates.attention / 1e12:g} (masked "
          f"{rates.masked_attention / 1e12:g}), other {rates.other_per_token_layer * 1e9:g} ns per token and layer")
    result = {"command": "python " + " ".join(sys.argv), "args": vars(args),
              "what": "a prediction on CPU from FLOPs at the H200's rates (args); measured_ms are copied "
                      "from the --measured files",
              "env": {"torch": torch.__version__, "transformers": transformers.__version__},
              "sparse_blocks": sparse_blocks, "modes": {}}
    for mode in args.batches:
        steps = 1 if mode == "fixed" else WARMUP + args.steps
        stream = list(user_batches.make_batches(mode, cfg.vocab_size, steps, seed=SEED))[
            0 if mode == "fixed" else WARMUP:]
        p = predict(model, stream, rates, args.supervised_head, args.graph_bucket)
        m = measured(args.measured, mode)
        if m:
            p["measured_ms"] = m
            p["measured_sparse_vs"] = {s: m[s] / m["sparse"] for s in ("dense", "dense_varlen")
                                       if s in m and "sparse" in m}
        result["modes"][mode] = p
        line = "  ".join(f"{s} {p[s]['ms']:.1f} ms" for s in STEPS)
        seen = "  measured: " + "  ".join(f"{s} {v:.1f}" for s, v in m.items()) if m else ""
        print(f"{mode:7s} {p['tokens_per_step']:6.0f} tokens, {100 * p['dense_row_share']:4.1f}% dense rows | "
              f"{line} | sparse vs dense {p['sparse_vs_dense']:.2f}x, vs dense_varlen "
              f"{p['sparse_vs_dense_varlen']:.2f}x{seen}")
        if m.get("sparse"):
            print(" " * 8 + "measured ratios: " + ", ".join(f"vs {s} {r:.2f}x" for s, r in p["measured_sparse_vs"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
