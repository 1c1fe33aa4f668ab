"""(`accuracy.py study --help`: the multi-seed study with confidence intervals, issue 18.)

Accuracy of SparseLoRA policies at one FLOPs budget: dense LoRA vs uniform vs calibrated
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

STUDY_DOC = """The accuracy study of issue 18: `python bench/accuracy.py study [options]`.

Runs, for each seed (3 by default), LoRA r=8 on q,k,v,o, same data order, eval set and
adapter init within a seed (`sparselora_compile.finetune.run`, the main job's code):
- dense:         LoRA, no rewrite (the inner compiler alone)
- aware30/50/70: one uniform sparsity on every MLP and attention block (first 10% of the
                 layers and the last dense), the smallest on a 0.005 grid that saves 30 /
                 50 / 70% of the context tokens' base FLOPs (`explain`'s count), with the
                 activation_aware estimator (moments streamed in the 5% dense warm-up);
                 aware50 is also the uniform side of calibrated-vs-uniform
- svd50:         the same policy as aware50 with the paper's plain SVD estimator
- calibrated50:  `calibrate(model, batch, budget, return_report=True)` on 16 training
                 examples of that seed (metric loss, candidates 0.25-0.95, all blocks
                 allowed), budget = aware50's achieved saving (so it saves at least as
                 much), activation_aware estimator
All sparse runs keep output tokens and the first 5% of steps dense. Each run is a
subprocess (`--parallel N` at a time; on several GPUs each run sees one, in turn); its
result is `<results>/runs/<name>-s<seed>.json`, written only when complete, so a later call resumes
(runs with a result are skipped; `--rerun` forces). `study.json` (per seed: exact-match
hits/n with the Wilson 95% interval, eval loss; across seeds: mean ± Student-t 95%
interval, pooled Wilson; paired differences for the issue's targets; the command) and
`study.png` (FLOPs saved vs exact-match, and vs eval loss, with CI bars) are rewritten at
the end of every call from all results present.

Smoke (CPU, no download, ~2 min on 2 cores: tiny random 4-layer Llama, 6 steps x 4, eval
16, seeds 0,1, aware at 50 and 70% (plus svd50, calibrated50, dense: 10 runs), every layer
sparsifiable, results in a temp folder):

    python bench/accuracy.py study --smoke --parallel 2

The real study on one H200 (nothing can be downloaded there):
1. Here: get the GGUF and the `gguf` wheel (transformers needs it to read a GGUF; the
   GPU image has torch, transformers, peft, matplotlib, yaml, but not gguf):
       python -c "from sparselora_compile.finetune.models import fetch_default_gguf as f; print(f())"
       pip download --no-deps gguf -d .carry/wheels
       mkdir -p .carry && split -b 48M ~/.cache/sparselora_compile/models/SmolLM2-135M-Instruct.Q4_1.gguf .carry/gguf.part-
       echo /.carry/ >> .git/info/exclude
   The working tree that travels is capped at 64 MiB and the GGUF is 94 MB: carry
   `.carry/gguf.part-aa` and `.carry/wheels` in one call and `.carry/gguf.part-ab` in the
   next (carried ignored paths stay on a warm machine between calls), then on the device:
       cat .carry/gguf.part-* > /tmp/smollm2.gguf && pip install --no-index --no-deps .carry/wheels/gguf-*.whl
2. Each call (10 min at most): resume, stop starting runs after --deadline, tar the
   results back (at most 8 files come back from $OUT):
       pip install -q --no-index --no-deps .carry/wheels/gguf-*.whl; \
       [ -f /tmp/smollm2.gguf ] || cat .carry/gguf.part-* > /tmp/smollm2.gguf; \
       PYTHONPATH=. timeout 570 python3 bench/accuracy.py study --model /tmp/smollm2.gguf \
         --parallel 6 --deadline 300 --work /tmp/slc_model; \
       tar czf $OUT/study.tgz bench/results/accuracy_study
   then unpack study.tgz here into the repo (results persist by travelling with the
   working tree) and call again until `missing` is empty. Runs of the same graph (same
   policy, other seed) reuse Inductor's on-disk cache (/tmp/torchinductor_root) while the
   machine stays warm. Measured on two H200s with `--inner aot_eager --parallel 14`: the
   18 runs took 400 s (150-215 s each, side by side), one call after the one that carries
   the first GGUF part.
"""


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
    _save(fig, f"SmolLM2-135M LoRA, {c['steps']} steps x batch {c['batch_size']}, max_len "
               f"{c['max_len']}, eval {c['eval_size']}, seed {c['seed']}", path)


def _save(fig, title: str, path) -> None:
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=9)
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


# =========================================================================================
# The study (issue 18): `python bench/accuracy.py study ...`
# =========================================================================================

STUDY_DIR = RESULTS / "accuracy_study"
STUDY_BUDGETS = (0.3, 0.5, 0.7)     # activation_aware, fraction of context base FLOPs
SVD_BUDGETS = (0.5,)                # the paper's estimator
CALIB_BUDGETS = (0.5,)              # calibrate()'s policy vs uniform at the same FLOPs
CALIB_CANDIDATES = (0.25, 0.5, 0.75, 0.9, 0.95)

# two-sided 95% Student t quantiles t_{0.975, df}; df > 30 uses the normal's 1.96 (within
# 4% at df 30); no scipy needed
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074,
         23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
         30: 2.042}


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion hits/n."""
    if n <= 0:
        raise ValueError("wilson: n must be >= 1")
    if not 0 <= hits <= n:
        raise ValueError(f"wilson: hits={hits} not in [0, {n}]")
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    lo = 0.0 if hits == 0 else max(0.0, mid - half)  # exact at the edges (no rounding dust)
    hi = 1.0 if hits == n else min(1.0, mid + half)
    return lo, hi


def t_quantile(df: int) -> float:
    if df < 1:
        raise ValueError("t_quantile: df must be >= 1")
    return _T975.get(df, 1.959964)


def t_interval(xs) -> dict:
    """Mean and its 95% Student t interval across seeds (sample sd, n-1 df); with one
    value the interval is None."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "n": 1, "sd": None, "half": None, "lo": None, "hi": None}
    sd = (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5
    half = t_quantile(n - 1) * sd / n ** 0.5
    return {"mean": mean, "n": n, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def run_matrix(seeds, budgets=STUDY_BUDGETS, svd_budgets=SVD_BUDGETS,
               calib_budgets=CALIB_BUDGETS) -> list[dict]:
    """The study's runs, per seed: dense LoRA; a uniform policy with activation_aware at
    each budget (its 50% run is also the uniform side of calibrated-vs-uniform); svd at
    each svd budget; calibrate()'s policy at each calib budget (matched to the uniform
    run's achieved saving, which therefore must exist)."""
    out = []
    for seed in seeds:
        out.append({"name": "dense", "seed": seed, "kind": "dense", "estimator": None, "budget": 0.0})
        for b in budgets:
            out.append({"name": f"aware{round(100 * b)}", "seed": seed, "kind": "uniform",
                        "estimator": "activation_aware", "budget": b})
        for b in svd_budgets:
            out.append({"name": f"svd{round(100 * b)}", "seed": seed, "kind": "uniform",
                        "estimator": "svd", "budget": b})
        for b in calib_budgets:
            if b not in budgets:
                raise ValueError(f"calibrated budget {b} needs the uniform activation_aware run "
                                 f"at the same budget (budgets {list(budgets)})")
            out.append({"name": f"calibrated{round(100 * b)}", "seed": seed, "kind": "calibrated",
                        "estimator": "activation_aware", "budget": b,
                        "uniform_pair": f"aware{round(100 * b)}"})
    for r in out:
        r["id"] = f"{r['name']}-s{r['seed']}"
    return out


def uniform_policy(s: float, steps: int, estimator: str, dense_edges: bool = True):
    """One sparsity on every MLP and attention block (the first 10% of layers and the last
    dense with dense_edges), 5% dense warm-up, output tokens dense."""
    from sparselora_compile import Policy
    return Policy(mlp=s, attention=s, dense_edges=dense_edges, warmup_fraction=0.05,
                  total_steps=steps, estimator=estimator)


def uniform_sparsity_for(budget: float, blocks, dense_edges: bool = True, step: float = 0.005):
    """(s, saved): the smallest uniform sparsity on the grid whose context-token base FLOPs
    saving reaches `budget` (k rounding makes the saving a step function of s)."""
    n = 1
    while n * step < 0.995:
        s = round(n * step, 4)
        got = context_saved(uniform_policy(s, 100, "svd", dense_edges), blocks)
        if got >= budget - 1e-9:
            return s, got
        n += 1
    raise ValueError(f"no uniform sparsity saves {budget} of the context FLOPs "
                     f"(dense_edges={dense_edges})")


def resolve_matrix(matrix: list[dict], blocks, dense_edges: bool = True) -> list[dict]:
    """Fill in each uniform run's sparsity and context saving; a calibrated run's budget
    becomes the achieved saving of its uniform pair (so it saves at least as much)."""
    cache, out = {}, []
    for r in matrix:
        r = dict(r)
        if r["kind"] == "uniform":
            if r["budget"] not in cache:
                cache[r["budget"]] = uniform_sparsity_for(r["budget"], blocks, dense_edges)
            r["sparsity"], r["context_flops_saved"] = cache[r["budget"]]
        elif r["kind"] == "dense":
            r["context_flops_saved"] = 0.0
        out.append(r)
    by_id = {r["id"]: r for r in out}
    for r in out:
        if r["kind"] == "calibrated":
            r["calib_budget"] = by_id[f"{r['uniform_pair']}-s{r['seed']}"]["context_flops_saved"]
    return out


# ---- one run (a subprocess: `accuracy.py _one --spec F --out G`) ---------------------------

def one_main(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    job = json.loads(Path(a.spec).read_text())
    row = run_one(job["run"], job["common"])
    tmp = Path(a.out + ".partial")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(a.out)  # a result file exists only when complete
    return 0


def run_one(r: dict, common: dict) -> dict:
    import random

    from sparselora_compile import Policy  # noqa: F401
    from sparselora_compile.calibrate import calibrate, find_blocks
    from sparselora_compile.finetune import tasks
    from sparselora_compile.finetune import train as ft

    cfg = ft.FinetuneConfig(**{**common["config"], "seed": r["seed"]})
    steps = cfg.steps
    extra, policy, calib = {}, None, {}
    if r["kind"] == "uniform":
        policy = uniform_policy(r["sparsity"], steps, r["estimator"], common["dense_edges"])

    def before_train(model, tok, train_set):
        if r["kind"] != "calibrated":
            return None
        ex = random.Random(r["seed"] + 1).sample(train_set, common["calib_examples"])
        enc = [tasks.encode_example(tok, e.prompt, e.response, cfg.max_len) for e in ex]
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in tasks.collate(enc, tok.pad_token_id, 8).items()}
        t = time.perf_counter()
        pol, rep = calibrate(model, batch, r["calib_budget"], candidates=tuple(common["calib_candidates"]),
                             metric=common["calib_metric"], return_report=True, progress=False,
                             warmup_fraction=0.05, total_steps=steps, estimator=r["estimator"])
        calib.update(seconds=time.perf_counter() - t, flops_budget=rep["flops_budget"],
                     flops_saved=rep["flops_saved"], metric=rep["metric"], dense_loss=rep["dense_loss"],
                     batch_shape=list(batch["input_ids"].shape),
                     chosen={b["block"]: b["chosen"] for b in rep["blocks"]},
                     context_flops_saved=context_saved(pol, find_blocks(model)))
        return pol

    t0 = time.perf_counter()
    res = ft.run(cfg, dense=r["kind"] == "dense", progress=False, policy=policy,
                 before_train=before_train)
    row = {k: v for k, v in res.items() if k not in ("model", "tokenizer")}
    del res
    if r["kind"] == "calibrated":
        extra = {"calibration": calib, "context_flops_saved": calib["context_flops_saved"]}
    row.update(r)
    row.update(extra)
    row["wilson"] = wilson(row["exact_match_hits"], row["eval_n"])
    row["wall_s"] = time.perf_counter() - t0
    return row


# ---- the driver ------------------------------------------------------------------------

def _prepare_model(a, work: Path):
    """(model argument for the runs, blocks). A GGUF is converted once into a
    from_pretrained folder (each run then loads in ~1 s instead of parsing the GGUF);
    --smoke saves a tiny random 4-layer Llama there."""
    from sparselora_compile.calibrate import find_blocks
    from sparselora_compile.finetune import train as ft
    from sparselora_compile.finetune.models import load_model, tiny_llama

    if a.smoke:
        path = work / "tiny4"
        if not (path / "config.json").is_file():
            m, tok = tiny_llama(num_layers=4, seed=0)
            m.save_pretrained(path)
            tok.save_pretrained(path)
    elif a.model and a.model.endswith(".gguf"):
        path = work / (Path(a.model).stem + "-hf")
        if not (path / "config.json").is_file():
            print(f"converting {a.model} into {path} ...", file=sys.stderr, flush=True)
            m, tok = load_model(a.model)
            m.save_pretrained(path)
            tok.save_pretrained(path)
    else:
        path = a.model  # a from_pretrained folder, or None: the default (downloads once)
    m, _ = load_model(path)
    m = ft.add_lora(m, ft.FinetuneConfig(model=str(path) if path else None, lora_targets=a.lora_targets))
    return (str(path) if path else None), find_blocks(m)


def _launch(todo, common, rdir: Path, parallel: int, deadline: float | None, t_start: float,
            threads: int | None):
    import concurrent.futures as cf
    import os
    import subprocess

    import itertools

    (rdir / "logs").mkdir(parents=True, exist_ok=True)
    (rdir / "runs").mkdir(parents=True, exist_ok=True)
    skipped = []
    # several GPUs: each run sees one, in turn (unless the caller already chose)
    gpus = torch.cuda.device_count() if "CUDA_VISIBLE_DEVICES" not in os.environ else 0
    slots = itertools.count()

    def one(r):
        if deadline is not None and time.perf_counter() - t_start > deadline:
            skipped.append(r["id"])
            return r["id"], None, 0.0
        spec = rdir / "logs" / f"{r['id']}.spec.json"
        spec.write_text(json.dumps({"run": r, "common": common}))
        out = rdir / "runs" / f"{r['id']}.json"
        env = dict(os.environ)
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(next(slots) % gpus)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            # N concurrent Inductor compiles must not each start a worker per core
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
        t = time.perf_counter()
        print(f"[{time.perf_counter() - t_start:6.0f} s] start {r['id']}", file=sys.stderr, flush=True)
        with open(rdir / "logs" / f"{r['id']}.log", "w") as log:
            rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), "_one",
                                  "--spec", str(spec), "--out", str(out)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        dt = time.perf_counter() - t
        print(f"[{time.perf_counter() - t_start:6.0f} s] {'done' if rc == 0 else f'FAILED rc={rc}'} "
              f"{r['id']} in {dt:.0f} s", file=sys.stderr, flush=True)
        return r["id"], rc, dt

    with cf.ThreadPoolExecutor(max_workers=parallel) as ex:
        done = list(ex.map(one, todo))
    return done, skipped


def aggregate(rows: list[dict], matrix: list[dict]) -> dict:
    """Per run name: per-seed exact-match (Wilson 95%) and eval loss; across seeds mean ±
    t-interval; paired differences (same seed: same data order, eval set and adapter init)
    for the issue's targets."""
    by = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["seed"]] = r
    names = list(dict.fromkeys(m["name"] for m in matrix))
    summary = {}
    for name in names:
        per = by.get(name, {})
        if not per:
            continue
        seeds = sorted(per)
        em = [per[s]["exact_match"] for s in seeds]
        hits, n = sum(per[s]["exact_match_hits"] for s in seeds), sum(per[s]["eval_n"] for s in seeds)
        summary[name] = {
            "seeds": seeds,
            "context_flops_saved": t_interval([per[s]["context_flops_saved"] for s in seeds])["mean"],
            "train_flops_saved": t_interval([per[s]["flops_saved"] or 0.0 for s in seeds])["mean"],
            "per_seed": [{"seed": s, "exact_match": per[s]["exact_match"],
                          "hits": per[s]["exact_match_hits"], "n": per[s]["eval_n"],
                          "wilson95": list(wilson(per[s]["exact_match_hits"], per[s]["eval_n"])),
                          "eval_loss": per[s]["eval_loss"], "train_loss": per[s]["train_loss"],
                          "context_flops_saved": per[s]["context_flops_saved"],
                          "train_flops_saved": per[s]["flops_saved"]} for s in seeds],
            "exact_match": t_interval(em),
            "exact_match_pooled": {"hits": hits, "n": n, "p": hits / n, "wilson95": list(wilson(hits, n))},
            "eval_loss": t_interval([per[s]["eval_loss"] for s in seeds]),
        }

    def paired(a, b, key):
        seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
        if not seeds:
            return None
        d = [by[a][s][key] - by[b][s][key] for s in seeds]
        return {**t_interval(d), "seeds": seeds, "diffs": d}

    targets = {}
    dense = summary.get("dense")
    for name, s in summary.items():
        if name == "dense" or not dense:
            continue
        within = []
        for ps in s["per_seed"]:
            dps = next((d for d in dense["per_seed"] if d["seed"] == ps["seed"]), None)
            if dps:
                lo, hi = dps["wilson95"]
                within.append(lo <= ps["exact_match"] <= hi)
        dm = dense["exact_match"]
        targets[f"{name}_vs_dense"] = {
            "context_flops_saved": s["context_flops_saved"],
            "em_diff": paired(name, "dense", "exact_match"),
            "eval_loss_diff": paired(name, "dense", "eval_loss"),
            "em_within_dense_wilson_per_seed": within,
            "mean_em_within_dense_t_interval": (None if dm["lo"] is None else
                                                dm["lo"] <= s["exact_match"]["mean"] <= dm["hi"]),
            "mean_em_at_least_dense_pooled_wilson_lo":
                s["exact_match"]["mean"] >= dense["exact_match_pooled"]["wilson95"][0],
        }
    for m in matrix:
        if m["kind"] == "uniform" and m["estimator"] == "svd":
            aw = f"aware{round(100 * m['budget'])}"
            if m["name"] in summary and aw in summary:
                targets[f"{aw}_vs_{m['name']}"] = {"em_diff": paired(aw, m["name"], "exact_match"),
                                                   "eval_loss_diff": paired(aw, m["name"], "eval_loss")}
        if m["kind"] == "calibrated" and m["name"] in summary and m["uniform_pair"] in summary:
            targets[f"{m['name']}_vs_{m['uniform_pair']}"] = {
                "em_diff": paired(m["name"], m["uniform_pair"], "exact_match"),
                "eval_loss_diff": paired(m["name"], m["uniform_pair"], "eval_loss"),
                "context_flops_saved": [summary[m["name"]]["context_flops_saved"],
                                        summary[m["uniform_pair"]]["context_flops_saved"]]}
    return {"runs": summary, "targets": targets}


def plot_pareto(study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = study["summary"]["runs"]
    colors = {"dense": "black", "svd": "C3", "aware": "C0", "calibrated": "C2"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    groups = {}  # runs at (about) the same saving are spread apart so their bars stay visible
    for name, s in runs.items():
        groups.setdefault(round(100 * s["context_flops_saved"] / 3), []).append(name)
    for name, s in runs.items():
        c = next((v for k, v in colors.items() if name.startswith(k)), "C7")
        g = groups[round(100 * s["context_flops_saved"] / 3)]
        x = 100 * s["context_flops_saved"] + 1.2 * (g.index(name) - (len(g) - 1) / 2)
        for ax, key, scale in ((axes[0], "exact_match", 100), (axes[1], "eval_loss", 1)):
            t = s[key]
            yerr = None if t["half"] is None else scale * t["half"]
            ax.errorbar(x, scale * t["mean"], yerr=yerr, fmt="o", color=c, capsize=4, label=name)
            ax.annotate(name, (x, scale * t["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
            for ps in s["per_seed"]:
                ax.plot(x, scale * ps[key], ".", color=c, alpha=0.35)
        lo, hi = s["exact_match_pooled"]["wilson95"]
        axes[0].plot([x, x], [100 * lo, 100 * hi], "-", color=c, alpha=0.25, lw=6)
    d = runs.get("dense")
    if d and d["exact_match"]["lo"] is not None:
        axes[0].axhspan(100 * d["exact_match"]["lo"], 100 * d["exact_match"]["hi"], color="gray", alpha=0.12)
    axes[0].set(xlabel="context tokens' base FLOPs saved (%; runs at one saving spread apart)",
                ylabel="eval exact-match (%)",
                title="exact-match: mean over seeds ± 95% t (bars), pooled Wilson (wide)")
    axes[1].set(xlabel="context tokens' base FLOPs saved (%)", ylabel="eval loss",
                title="eval loss: mean ± 95% t; dots: seeds")
    for ax in axes:
        ax.grid(alpha=0.3)
    c = study["config"]
    _save(fig, f"{c['model_label']}, task {c['task']}, {c['steps']} steps x {c['batch_size']}, eval "
               f"{c['eval_size']}, seeds {c['seeds']}", path)


def print_summary(study: dict) -> None:
    runs = study["summary"]["runs"]
    print(f"\n{'run':<14} {'ctx saved':>9} {'train saved':>11} {'EM mean ±95% t':>18} "
          f"{'EM pooled [Wilson]':>24} {'eval loss ±95% t':>18}  per-seed EM [Wilson] / loss")
    for name, s in runs.items():
        em, el, po = s["exact_match"], s["eval_loss"], s["exact_match_pooled"]
        pm = lambda t, k=1, f=".1f": (f"{k * t['mean']:{f}}" + ("" if t["half"] is None else f" ± {k * t['half']:{f}}"))
        seeds = "; ".join(f"s{p['seed']} {100 * p['exact_match']:.1f} [{100 * p['wilson95'][0]:.1f},"
                          f"{100 * p['wilson95'][1]:.1f}] / {p['eval_loss']:.3f}" for p in s["per_seed"])
        print(f"{name:<14} {100 * s['context_flops_saved']:>8.1f}% {100 * s['train_flops_saved']:>10.1f}% "
              f"{pm(em, 100):>18} {100 * po['p']:>7.1f} [{100 * po['wilson95'][0]:.1f}, "
              f"{100 * po['wilson95'][1]:.1f}] {pm(el, 1, '.4f'):>18}  {seeds}")
    print("\ntargets (paired by seed: mean difference ± 95% t):")
    for k, v in study["summary"]["targets"].items():
        em = v.get("em_diff")
        el = v.get("eval_loss_diff")
        f = lambda t, k=1, fm=".1f": ("n/a" if not t else f"{k * t['mean']:+{fm}}" +
                                      ("" if t["half"] is None else f" ± {k * t['half']:{fm}}"))
        extra = ""
        if "em_within_dense_wilson_per_seed" in v:
            extra = (f"; within dense's Wilson per seed {v['em_within_dense_wilson_per_seed']}, "
                     f"mean within dense's t-interval {v['mean_em_within_dense_t_interval']}")
        print(f"  {k:<24} EM {f(em, 100)} pts, eval loss {f(el, 1, '.4f')}{extra}")


def study_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="accuracy.py study", description=STUDY_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file (converted once into a folder under --work) or "
                    "a from_pretrained folder (default: the SmolLM2-135M GGUF, downloaded once)")
    ap.add_argument("--smoke", action="store_true",
                    help="the whole pipeline on a tiny random 4-layer Llama on CPU, minutes at most")
    ap.add_argument("--task", default="chain")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=None, help="default: the task's")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-size", type=int, default=None, help="default: steps x batch (one epoch)")
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default=",".join(map(str, STUDY_BUDGETS)))
    ap.add_argument("--svd-budgets", default=",".join(map(str, SVD_BUDGETS)))
    ap.add_argument("--calib-budgets", default=",".join(map(str, CALIB_BUDGETS)))
    ap.add_argument("--calib-examples", type=int, default=16)
    ap.add_argument("--calib-metric", default="loss", choices=("loss", "output"))
    ap.add_argument("--calib-candidates", default=",".join(map(str, CALIB_CANDIDATES)))
    ap.add_argument("--no-dense-edges", action="store_true",
                    help="uniform policies sparsify every layer (default: first 10%% and last dense)")
    ap.add_argument("--lora-targets", default="attn", choices=("attn", "all"))
    ap.add_argument("--inner", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default=None, help="comma-separated run names or ids to run (others "
                    "are only reported if their results exist)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (subprocesses; on "
                    "several GPUs each run sees one, in turn)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (default: cores / parallel)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which no new run starts (runs in flight finish)")
    ap.add_argument("--report-only", action="store_true", help="only aggregate existing results")
    ap.add_argument("--rerun", action="store_true", help="run again runs whose result exists")
    ap.add_argument("--results", default=None, help=f"results folder (default {STUDY_DIR}; "
                    "--smoke: a temp folder)")
    ap.add_argument("--work", default=None, help="where the converted model goes (default: a "
                    "folder under the temp dir)")
    a = ap.parse_args(argv)
    import os

    t_start = time.perf_counter()
    if a.smoke:
        a.steps, a.batch_size, a.eval_size = min(a.steps, 6), min(a.batch_size, 4), min(a.eval_size, 16)
        a.seeds = a.seeds if a.seeds != "0,1,2" else "0,1"
        if a.budgets == ",".join(map(str, STUDY_BUDGETS)):
            a.budgets = "0.5,0.7"  # every kind of run, two aware points, 10 runs in all
        a.inner = "eager" if a.inner == "auto" else a.inner
        a.device = "cpu" if a.device == "auto" else a.device  # --device cuda: the GPU path
        a.max_len = a.max_len or 160
        a.calib_examples = min(a.calib_examples, 4)
        a.no_dense_edges = True  # 4 layers: dense edges would leave only 2 sparse layers
    rdir = Path(a.results or (tempfile.mkdtemp(prefix="slc_study_smoke_") if a.smoke else STUDY_DIR))
    rdir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or Path(tempfile.gettempdir()) / "slc_study_model")
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in a.seeds.split(",")]
    fl = lambda s: tuple(float(x) for x in s.split(",") if x)
    matrix = run_matrix(seeds, fl(a.budgets), fl(a.svd_budgets), fl(a.calib_budgets))

    model_arg, blocks = _prepare_model(a, work)
    matrix = resolve_matrix(matrix, blocks, dense_edges=not a.no_dense_edges)
    train_size = a.train_size or max(a.steps * a.batch_size, 64)
    config = dict(model=model_arg, tiny=False, task=a.task, steps=a.steps, batch_size=a.batch_size,
                  max_len=a.max_len, lr=a.lr, lora_targets=a.lora_targets, inner=a.inner,
                  train_size=train_size, eval_size=a.eval_size, device=a.device)
    common = {"config": config, "dense_edges": not a.no_dense_edges,
              "calib_examples": a.calib_examples, "calib_metric": a.calib_metric,
              "calib_candidates": list(fl(a.calib_candidates))}
    only = set(a.only.split(",")) if a.only else None
    todo = [r for r in matrix if (only is None or r["name"] in only or r["id"] in only)
            and (a.rerun or not (rdir / "runs" / f"{r['id']}.json").is_file())]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = a.threads or max(1, cores // max(1, a.parallel))
    config["threads"] = threads
    launched = []
    if not a.report_only and todo:
        print(f"{len(todo)} runs to do of {len(matrix)} ({a.parallel} at a time, {threads} threads "
              f"each); results in {rdir}", file=sys.stderr, flush=True)
        launched, skipped = _launch(todo, common, rdir, a.parallel, a.deadline, t_start, threads)
        if skipped:
            print(f"deadline: not started {skipped}", file=sys.stderr)

    rows = []
    for r in matrix:
        f = rdir / "runs" / f"{r['id']}.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    missing = [r["id"] for r in matrix if not (rdir / "runs" / f"{r['id']}.json").is_file()]
    study = {
        "command": " ".join(["python", "bench/accuracy.py", "study", *(argv if argv is not None else sys.argv[2:])]),
        "versions": versions(),
        "config": {**config, "seeds": seeds, "smoke": a.smoke, "dense_edges": not a.no_dense_edges,
                   "model_label": "tiny random 4-layer Llama (smoke)" if a.smoke else
                   f"SmolLM2-135M ({a.model or 'default GGUF'})", "lora_r": 8,
                   "calib": {k: common[k] for k in ("calib_examples", "calib_metric", "calib_candidates")}},
        "matrix": matrix, "missing": missing,
        "this_call": {"launched": [{"id": i, "rc": rc, "seconds": dt} for i, rc, dt in launched],
                      "wall_s": time.perf_counter() - t_start},
        "summary": aggregate(rows, matrix) if rows else None,
    }
    out = rdir / "study.json"
    out.write_text(json.dumps(study, indent=1))
    if rows:
        plot_pareto(study, rdir / "study.png")
        print_summary(study)
    print(f"\n{len(rows)}/{len(matrix)} runs have results (missing: {missing or 'none'}); "
          f"wall {time.perf_counter() - t_start:.0f} s; written {out} and {rdir / 'study.png'}")
    failed = [i for i, rc, _ in launched if rc not in (0, None)]
    if failed:
        print(f"FAILED runs (see {rdir / 'logs'}): {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "study":
        sys.exit(study_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        sys.exit(one_main(sys.argv[2:]))
    sys.exit(main())
