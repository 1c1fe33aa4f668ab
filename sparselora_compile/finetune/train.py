"""The main job: PEFT LoRA fine-tuning under torch.compile(backend="sparselora"), with an
optional dense twin run (same seed, same data order) for comparison."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import sparselora_compile as slc

from . import tasks

LORA_TARGETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class FinetuneConfig:
    model: str | None = None        # None: the default SmolLM2-135M GGUF
    tiny: bool = False              # tiny random Llama (tests, smoke runs)
    data: str | None = None         # JSONL of {"prompt", "response"}; None: the built-in task
    task: str = tasks.DEFAULT_TASK  # built-in generated task (tasks.TASKS), when no data
    steps: int = 60
    batch_size: int = 8
    max_len: int | None = None      # None: the task's (96 arithmetic, 192 chain)
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = "attn"      # "attn" (q,k,v,o) or "all" linears
    backend: str = "sparselora"     # torch.compile backend; "eager": no compile
    inner: str = "auto"             # sparselora's inner compiler; auto: see resolve_inner
    policy: str | None = None       # preset name or YAML path
    sparsity: float | None = None   # uniform MLP+attention sparsity, overrides policy
    estimator: str | None = None    # None: the policy's; "svd" or "activation_aware"
    train_size: int = 2000
    eval_size: int = 64
    seed: int = 0
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        if self.max_len is None:
            self.max_len = tasks.get_task(self.task).max_len if not self.data else 96
        for k in ("steps", "batch_size", "max_len", "lora_r", "eval_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        tasks.get_task(self.task)  # an unknown task fails before anything loads


# ---- policy: the one place that maps CLI options onto the backend's API ---------------

def resolve_inner(inner: str, device: torch.device) -> str:
    """auto: Inductor on GPU; aot_eager on CPU, where Inductor's code generation for a
    30-layer model takes many minutes on 2 cores and CPU training is GEMM-bound anyway."""
    if inner != "auto":
        return inner
    return "inductor" if device.type == "cuda" else "aot_eager"


def compile_args(cfg: FinetuneConfig, dense: bool = False):
    """(backend, options) for torch.compile, or None for eager. The dense baseline of a
    sparselora run is the compiler sparselora hands its graph to (`--inner`, Inductor by
    default), so the two differ only by the rewrite; other backends are their own
    baseline."""
    inner = resolve_inner(cfg.inner, pick_device(cfg.device))
    backend = inner if cfg.backend == "sparselora" and dense else cfg.backend
    if backend == "eager":
        return None
    if backend != "sparselora":
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(f"--backend {backend!r}: not a torch.compile backend; "
                             f"known: eager, sparselora, {', '.join(sorted(known))}")
        return backend, {}
    return "sparselora", {"policy": build_policy(cfg), "inner": inner, "verbose": False}


def build_policy(cfg: FinetuneConfig):
    policy = _policy_by_name(cfg)
    if cfg.estimator is not None and cfg.estimator != policy.estimator:
        policy = dataclasses.replace(policy, estimator=cfg.estimator)  # Policy is immutable
    return policy


def _policy_by_name(cfg: FinetuneConfig):
    from sparselora_compile import Policy, presets

    if cfg.sparsity is not None:
        # Uniform sparsity on every block, the sensitive edges and 5% warm-up dense.
        return Policy(mlp=cfg.sparsity, attention=cfg.sparsity, dense_edges=True,
                      warmup_fraction=0.05, total_steps=cfg.steps)
    name = cfg.policy or ("tiny" if cfg.tiny else "smollm2")
    if name == "tiny":  # a 2-layer model has no "middle": sparsify all but warm-up
        return Policy(mlp=0.5, attention=0.25, warmup_steps=1)
    if name.endswith((".yaml", ".yml")):
        return Policy.from_yaml(name, total_steps=cfg.steps)
    if name not in presets.PRESETS:
        raise ValueError(f"--policy {name!r}: not a preset {sorted(presets.PRESETS)} "
                         "nor a .yaml file")
    fn = presets.PRESETS[name]
    return fn(total_steps=cfg.steps) if "total_steps" in inspect.signature(fn).parameters else fn()


def run_stats(compiled, backend: str) -> dict | None:
    """The sparselora run's FLOPs statistics; None for other backends."""
    if backend != "sparselora":
        return None
    return slc.run_of(compiled).stats.as_dict()


# ---- setup ----------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None


def set_threads(n: int | None) -> int:
    # torch defaults to the host's physical cores, not the cores this process may use.
    if not n:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def load(cfg: FinetuneConfig):
    from .models import load_model, tiny_llama
    if cfg.tiny:
        return tiny_llama(seed=cfg.seed)
    return load_model(cfg.model)


def load_data(cfg: FinetuneConfig):
    if cfg.data:
        return tasks.split_examples(tasks.load_jsonl(cfg.data), cfg.eval_size, cfg.seed)
    make = tasks.get_task(cfg.task).make
    return make(cfg.train_size, "train", cfg.seed), make(cfg.eval_size, "eval", cfg.seed)


def answer_fn(cfg: FinetuneConfig):
    """What exact match compares: the first line (user data), or the task's answer."""
    return None if cfg.data else tasks.get_task(cfg.task).answer


def add_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model
    if cfg.lora_targets not in LORA_TARGETS:
        raise ValueError(f"lora targets {cfg.lora_targets!r}: expected one of {list(LORA_TARGETS)}")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS[cfg.lora_targets], task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # same adapter init for sparse and dense runs
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lcfg)


def batches(encoded, cfg: FinetuneConfig, pad_id: int):
    """Endless seeded shuffled batches: identical order for every run with the same seed.
    One fixed length for all (the longest example, rounded to 8): a new sequence length
    would cost a recompile."""
    if len(encoded) < cfg.batch_size:
        raise ValueError(f"{len(encoded)} training examples < batch size {cfg.batch_size}")
    length = -(-max(len(e["input_ids"]) for e in encoded) // 8) * 8
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = torch.randperm(len(encoded), generator=g).tolist()
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            yield tasks.collate([encoded[j] for j in order[i:i + cfg.batch_size]], pad_id,
                                length=length)


# ---- evaluation -----------------------------------------------------------------------

@torch.no_grad()
def eval_loss(model, encoded, pad_id, device, batch_size=16) -> float:
    """Token-weighted mean loss over the supervised tokens (eager: no recompile)."""
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        b = {k: v.to(device) for k, v in tasks.collate(encoded[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tgt = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), tgt.flatten(), ignore_index=tasks.IGNORE,
            reduction="sum")
        total += loss.item()
        count += int((tgt != tasks.IGNORE).sum())
    return total / max(count, 1)


def evaluate(model, tok, eval_set, cfg, device) -> dict:
    model.eval()
    model.config.use_cache = True
    enc = [tasks.encode_example(tok, e.prompt, e.response, cfg.max_len) for e in eval_set]
    max_new = max(len(tok(e.response, add_special_tokens=False)["input_ids"]) for e in eval_set) + 4
    gen_batch = 64 if torch.device(device).type == "cuda" else 16
    preds = tasks.generate_answers(model, tok, [e.prompt for e in eval_set], max_new,
                                   batch_size=gen_batch, device=device)
    model.config.use_cache = False
    hits = tasks.exact_hits(preds, [e.response for e in eval_set], answer_fn(cfg))
    return {"eval_loss": eval_loss(model, enc, tok.pad_token_id, device),
            "exact_match": hits / len(eval_set), "exact_match_hits": hits,
            "eval_n": len(eval_set),
            "samples": [{"prompt": e.prompt, "reference": e.response, "prediction": p}
                        for e, p in list(zip(eval_set, preds))[:8]]}


# ---- the run --------------------------------------------------------------------------

def run(cfg: FinetuneConfig, dense: bool = False, progress: bool = True, policy=None,
        before_train=None) -> dict:
    """Fine-tune once; returns everything the report needs plus the trained PEFT model.
    policy: a `Policy` object that replaces the one `cfg` names (sparselora backend only).
    before_train: fn(peft_model, tokenizer, train_set) -> Policy | None, called once the
    LoRA model and the data exist and before compiling (e.g. `calibrate`); a Policy it
    returns is the run's policy."""
    from tqdm.auto import tqdm

    spec = compile_args(cfg, dense)  # first: a bad --policy fails before the model loads
    if policy is not None and spec is not None and spec[0] == "sparselora":
        spec = (spec[0], {**spec[1], "policy": policy})
    device = pick_device(cfg.device)
    threads = set_threads(cfg.threads) if device.type == "cpu" else None
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok = load(cfg)
    model.config.use_cache = False  # the KV cache output causes graph breaks in training
    model = add_lora(model, cfg).to(device)
    load_s = time.perf_counter() - t0

    train_set, eval_set = load_data(cfg)
    if before_train is not None:
        chosen = before_train(model, tok, train_set)
        if chosen is not None and spec is not None and spec[0] == "sparselora":
            spec = (spec[0], {**spec[1], "policy": chosen})
    encoded = [tasks.encode_example(tok, e.prompt, e.response, cfg.max_len) for e in train_set]
    it = batches(encoded, cfg, tok.pad_token_id)

    backend = "eager" if spec is None else spec[0]
    step_fn = model if spec is None else torch.compile(model, backend=spec[0], options=spec[1] or None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 10)  # linear warm-up, then cosine decay to 10%
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps - 1))))))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    label = f"{'dense' if dense else 'train'} [{backend}]"
    losses, step_times, tokens = [], [], 0
    model.train()
    bar = tqdm(range(cfg.steps), desc=label, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    t_train = time.perf_counter()
    for step in bar:
        b = {k: v.to(device) for k, v in next(it).items()}
        ts = time.perf_counter()
        with autocast:
            loss = step_fn(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_times.append(time.perf_counter() - ts)
        n_tok = int(b["attention_mask"].sum())
        tokens += n_tok
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{n_tok / step_times[-1]:.0f}")
    train_s = time.perf_counter() - t_train
    bar.close()

    te = time.perf_counter()
    metrics = evaluate(model, tok, eval_set, cfg, device)
    eval_s = time.perf_counter() - te
    steady = step_times[1:] or step_times  # step 0 includes the compile
    stats = run_stats(step_fn, backend)
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "dense": dense, "backend": backend, "device": str(device), "threads": threads,
        "losses": losses, "step_times": step_times,
        "train_loss": sum(tail) / len(tail),
        **{k: metrics[k] for k in ("eval_loss", "exact_match", "exact_match_hits", "eval_n")},
        "samples": metrics["samples"],
        "flops": stats,
        "flops_saved": (stats or {}).get("saved_fraction", 0.0 if dense or backend != "sparselora" else None),
        "timing": {"load_s": load_s, "first_step_s": step_times[0] if step_times else None,
                   "train_s": train_s, "eval_s": eval_s,
                   "tokens_per_s": tokens / max(train_s, 1e-9),
                   "steady_step_s": sum(steady) / max(len(steady), 1)},
        "model": model, "tokenizer": tok,
    }


def config_dict(cfg: FinetuneConfig) -> dict:
    return asdict(cfg)
