"""Published settings of the SparseLoRA reference (LLaMA-3-8B) and our defaults."""
from __future__ import annotations

from .policy import Policy


def _layers(spec, kind, s):
    key = "mlp" if kind == "mlp" else "self_attn"
    return {f"layers.{i}.{key}": s for i in spec}


def math10k(total_steps: int | None = None, **overrides) -> Policy:
    """LLaMA-3-8B Math10K: MLP 0.99 on layers 3-30, attention 0.75 on 14-19, 21-23,
    25-29, dense for the first 5% of steps, output tokens dense."""
    attn = [*range(14, 20), *range(21, 24), *range(25, 30)]
    sparsity = {**_layers(range(3, 31), "mlp", 0.99), **_layers(attn, "attention", 0.75)}
    return _preset(sparsity, total_steps, overrides)


def csr(total_steps: int | None = None, **overrides) -> Policy:
    """LLaMA-3-8B commonsense reasoning: MLP 0.97 on layers 17-30, attention 0.2 there."""
    sparsity = {**_layers(range(17, 31), "mlp", 0.97), **_layers(range(17, 31), "attention", 0.2)}
    return _preset(sparsity, total_steps, overrides)


def _preset(sparsity, total_steps, overrides):
    warm = dict(warmup_fraction=0.05, total_steps=total_steps) if total_steps else {}
    return Policy(sparsity=sparsity, **{**warm, **overrides})


def default() -> Policy:
    """Used when torch.compile gets no policy: MLP 0.75 and attention 0.25 outside the
    first 10% of layers and the last one (the layers the paper found sensitive)."""
    return Policy(mlp=0.75, attention=0.25, dense_edges=True)


def smollm2_default(total_steps: int | None = None, estimator: str = "activation_aware") -> Policy:
    """The main job's policy for SmolLM2-135M (30 layers, d_ff 1536): MLP and attention
    0.5 on layers 3-27 (42% of the context tokens' base FLOPs), 5% dense warm-up, and the
    activation-aware estimator fed by that warm-up. Measured (bench/README.md, "Accuracy",
    30 steps): eval loss +2.1% vs dense LoRA with it, +68% with the paper's plain SVD."""
    sparsity = {**_layers(range(3, 28), "mlp", 0.5), **_layers(range(3, 28), "attention", 0.5)}
    return _preset(sparsity, total_steps, {"estimator": estimator})


PRESETS = {"math10k": math10k, "csr": csr, "default": default, "smollm2": smollm2_default}
