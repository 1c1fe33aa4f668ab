"""Load the reference SparseLoRA YAML format into a Policy.

Keys used: `start_step` (a fraction of training if < 1, else a step count), `mode`
(`svd_<rank>`; `dense` means no sparsity), `skip_output_tokens`, and `sparsity:`, a map
such as `layers.29.mlp: 0.99`. Other keys of the reference (naming, wandb) are ignored.
"""
from __future__ import annotations

import os
import re

import yaml

_IGNORED = {"ffn_sparsity", "qkvo_sparsity", "model_id", "end_step"}
_KNOWN = {"start_step", "mode", "skip_output_tokens", "sparsity", "skip_sink_tokens"} | _IGNORED


def policy_from_yaml(source: str, total_steps=None, cls=None):
    from .policy import Policy
    cls = cls or Policy
    text = open(source).read() if os.path.exists(str(source)) else source
    cfg = yaml.safe_load(text) or {}
    if not isinstance(cfg, dict):
        raise ValueError("SparseLoRA YAML must be a mapping")
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown key(s) in SparseLoRA YAML: {unknown}; known: {sorted(_KNOWN)}")
    kwargs = {}
    mode = str(cfg.get("mode", "svd_8"))
    m = re.fullmatch(r"svd_(\d+)", mode)
    if mode == "dense":
        cfg["sparsity"] = {}
    elif m:
        kwargs["rank"] = int(m.group(1))
    else:
        raise ValueError(f"YAML mode {mode!r} is not supported; use 'svd_<rank>' or 'dense'")
    start = float(cfg.get("start_step", 0))
    if 0 < start < 1:
        kwargs.update(warmup_fraction=start, total_steps=total_steps)
    else:
        kwargs["warmup_steps"] = int(start)
    kwargs["dense_output_tokens"] = bool(cfg.get("skip_output_tokens", True))
    kwargs["sparsity"] = {str(k): float(v) for k, v in (cfg.get("sparsity") or {}).items()
                          if float(v) > 0}
    return cls(**kwargs)
