"""Accuracy of SparseLoRA policies at one FLOPs budget: dense LoRA vs uniform vs calibrated
vs the preset, same seed, same data order, same steps, real SmolLM2-135M weights.

Runs (through `sparselora_compile.finetune.run`, the main job's code):
- dense:      LoRA, the same inner compiler (aot_eager on CPU), no rewrite
- preset:     `presets.smollm2_default` (MLP and attention 0.5 on layers 3-27) with the
              paper's plain SVD estimator
- uniform:    one sparsity s on every block except the first 10% of layers and the last,
              s chosen so the context-token base FLOPs saved match the preset's
- calibrated: `calibrate()` on a calibration batch of the training data, budget = the
              preset's saving (written to a reference-format YAML for the run)
- aware:      the preset as shipped: the activation-aware estimator (moments streamed
              during the dense warm-up), same budget
All sparse runs keep output tokens dense and the first 5% of steps dense.

"base FLOPs saved (context)" is `explain`'s count: base products of all blocks, every
token a context token. "saved in training" is the policy's run statistic (output tokens
dense, warm-up dense): what the run actually skipped.

    /work/venv/bin/python bench/accuracy.py                 # shortened setting, ~25 min on 2 busy cores
    /work/venv/bin/python bench/accuracy.py --steps 60 --batch-size 8 --max-len 96 --eval-size 64   # the main job's
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def versions() -> dict:
    import peft
    import transformers

    import sparselora_compile
    return {"sparselora_compile": sparselora_compile.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def context_saved(policy, blocks) -> float:
    """explain's count (all tokens context), from the block shapes: no tracing needed."""
    from sparselora_compile.calibrate import block_flops
    dense = sparse = 0
    for b in blocks:
        d, _ = block_flops(policy, b.info, 0.0)
        _, s = block_flops(policy, b.info, policy.sparsity_for(b.info))
        dense, sparse = dense + d, sparse + s
    return 1 - sparse / dense


def uniform_for(budget, blocks, steps) -> tuple[float, float]:
    """The smallest uniform sparsity (grid 0.005) whose saving reaches `budget`."""
    from sparselora_compile.finetune import train as ft
    s = 0.0
    while s < 0.99:
        s = round(s + 0.005, 3)
        got = context_saved(ft.build_policy(ft.FinetuneConfig(sparsity=s, steps=steps)), blocks)
        if got >= budget:
            return s, got
    raise ValueError(f"no uniform sparsity reaches {budget}")


def calibration_batch(cfg, tok, n):
    """n training examples the fine-tune also trains on (a seeded subset)."""
    import random

    from sparselora_compile.finetune import train as ft
    from sparselora_compile.finetune import tasks
    train, _ = ft.load_data(cfg)
    ex = random.Random(cfg.seed + 1).sample(train, n)
    enc = [tasks.encode_example(tok, e.prompt, e.response, cfg.max_len) for e in ex]
    b = tasks.collate(enc, tok.pad_token_id, 8)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}


def write_yaml(policy, path: Path, warmup_fraction=0.05) -> None:
    import yaml
    path.write_text(yaml.safe_dump({
        "start_step": warmup_fraction, "mode": f"svd_{policy.rank}", "skip_output_tokens": True,
        "sparsity": {k: float(v) for k, v in policy.sparsity.items()}}, sort_keys=False))


def plot(record, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = record["runs"]
    names = [r["name"] for r in runs]
    colors = {"dense": "gray", "calibrated": "C0", "preset": "C1", "uniform": "C2", "aware": "C4"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for r in runs:
        axes[0].plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["name"],
                     color=colors.get(r["name"]))
    axes[0].set(xlabel="step", ylabel="train loss", title="training loss")
    axes[0].legend(fontsize=8)
    for ax, key, title in ((axes[1], "eval_loss", "eval loss"),
                           (axes[2], "exact_match", "eval exact-match"),
                           (axes[3], "context_flops_saved", "base FLOPs saved (context)")):
        vals = [r[key] if r[key] is not None else 0.0 for r in runs]
        ax.bar(names, vals, color=[colors.get(n, "C3") for n in names])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    c = record["config"]
    fig.suptitle(f"SmolLM2-135M LoRA, {c['steps']} steps x batch {c['batch_size']}, max_len "
                 f"{c['max_len']}, eval {c['eval_size']}, seed {c['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=16)
    ap.add_argument("--train-size", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib-examples", type=int, default=8)
    ap.add_argument("--metric", default="output", choices=("output", "loss"))
    ap.add_argument("--candidates", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--budget", type=float, default=None,
                    help="fraction of context base FLOPs to save; default: the preset's")
    ap.add_argument("--runs", default="dense,preset,uniform,calibrated")
    ap.add_argument("--calibration-from", default=None,
                    help="reuse the calibration (sparsity map and table) of an earlier accuracy JSON")
    ap.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    a = ap.parse_args(argv)

    from sparselora_compile.finetune import train as ft
    from sparselora_compile import presets
    from sparselora_compile.calibrate import calibrate, find_blocks

    t_all = time.perf_counter()
    base = ft.FinetuneConfig(steps=a.steps, batch_size=a.batch_size, max_len=a.max_len,
                             eval_size=a.eval_size, train_size=a.train_size, seed=a.seed, lr=a.lr)
    ft.set_threads(base.threads)
    model, tok = ft.load(base)
    model.config.use_cache = False
    model = ft.add_lora(model, base)
    blocks = find_blocks(model)
    preset = presets.smollm2_default(total_steps=a.steps)
    preset_saved = context_saved(preset, blocks)
    budget = a.budget if a.budget is not None else preset_saved
    s_uni, uni_saved = uniform_for(budget, blocks, a.steps)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([sys.executable, *sys.argv]), "versions": versions(),
              "config": {**vars(a), "model": "SmolLM2-135M (sparselora_compile.finetune.models.load_model)",
                         "task": "built-in arithmetic (tasks.arithmetic_task)", "lora_targets": base.lora_targets,
                         "lora_r": base.lora_r, "threads": torch.get_num_threads(),
                         "shortened": "fewer steps, smaller batch, shorter sequences and a smaller "
                                      "eval set than the main job's default (60 x 8 x 96, eval 64)"},
               "budget_context_flops": budget, "uniform_sparsity": s_uni, "runs": [], "calibration": None}

    def save():
        record["wall_s"] = time.perf_counter() - t_all
        out.write_text(json.dumps(record, indent=2))
        try:
            plot(record, out.with_suffix(".png"))
        except Exception as e:  # a plot must not lose the numbers
            print(f"plot failed: {e}", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="slc_acc_"))
    specs = {}
    if "calibrated" in a.runs and a.calibration_from:
        prev = json.loads(Path(a.calibration_from).read_text())
        from sparselora_compile import Policy
        from sparselora_compile.calibrate import resolve
        pol, table = resolve(prev["calibration"], budget, return_report=True)  # same table, this budget
        record["calibration"] = {**table, "reused_from": {
            "file": a.calibration_from, "config": prev["config"], "command": prev["command"]}}
        record["calibrated_sparsity"] = pol.sparsity
        yaml_path = tmp / "calibrated.yaml"
        write_yaml(pol, yaml_path)
        specs["calibrated"] = (dict(policy=str(yaml_path)), context_saved(pol, blocks))
    elif "calibrated" in a.runs:
        cands = tuple(float(c) for c in a.candidates.split(","))
        batch = calibration_batch(base, tok, a.calib_examples)
        t = time.perf_counter()
        pol, report = calibrate(model, batch, budget, candidates=cands, metric=metric_of(a),
                                return_report=True, warmup_fraction=0.05, total_steps=a.steps)
        report["wall_s"] = time.perf_counter() - t
        report["batch_shape"] = list(batch["input_ids"].shape)
        record["calibration"] = report
        yaml_path = tmp / "calibrated.yaml"
        write_yaml(pol, yaml_path)
        record["calibrated_sparsity"] = pol.sparsity
        specs["calibrated"] = (dict(policy=str(yaml_path)), context_saved(pol, blocks))
        save()
    del model
    specs["dense"] = (None, 0.0)
    specs["preset"] = (dict(policy="smollm2", estimator="svd"), preset_saved)
    specs["uniform"] = (dict(sparsity=s_uni), uni_saved)
    specs["aware"] = (dict(policy="smollm2", estimator="activation_aware"), preset_saved)

    for name in a.runs.split(","):
        over, saved = specs[name]
        cfg = ft.FinetuneConfig(**{**vars(base), **(over or {})})
        print(f"\n== {name} ==", file=sys.stderr)
        r = ft.run(cfg, dense=over is None)
        row = {k: v for k, v in r.items() if k not in ("model", "tokenizer")}
        row.update(name=name, context_flops_saved=saved, policy_arg=over)
        record["runs"].append(row)
        del r
        save()
        print(f"{name}: eval_loss {row['eval_loss']:.4f} exact_match {row['exact_match']:.3f} "
              f"saved(context) {saved:.3f} saved(train) {row['flops_saved']}", file=sys.stderr)

    dense = next((r for r in record["runs"] if r["name"] == "dense"), None)
    if dense:
        for r in record["runs"]:
            r["eval_loss_rel_to_dense"] = r["eval_loss"] / dense["eval_loss"] - 1
            r["exact_match_pts_vs_dense"] = 100 * (r["exact_match"] - dense["exact_match"])
            r["meets_target"] = (r["eval_loss_rel_to_dense"] <= 0.02 and r["exact_match_pts_vs_dense"] >= -2
                                 and r["context_flops_saved"] >= 0.4) if r is not dense else None
    save()
    print(f"\n{'run':<11} {'saved ctx':>9} {'saved train':>11} {'eval loss':>9} {'vs dense':>8} {'EM':>6}")
    for r in record["runs"]:
        st = r["flops_saved"]
        print(f"{r['name']:<11} {r['context_flops_saved']:>9.3f} {st if st is None else round(st, 3)!s:>11} "
              f"{r['eval_loss']:>9.4f} {100 * r.get('eval_loss_rel_to_dense', 0):>7.2f}% {r['exact_match']:>6.3f}")
    print(f"written {out} and {out.with_suffix('.png')}")
    return 0


def metric_of(a):
    return a.metric


if __name__ == "__main__":
    sys.exit(main())
