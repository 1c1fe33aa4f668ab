"""Read the reference SparseLoRA YAML format into Policy keyword arguments.

Keys used: `start_step` (a fraction of training if < 1, else a step count), `mode`
(`svd_<rank>`; `dense` means no sparsity), `skip_output_tokens` (a YAML bool), and
`sparsity:`, a map such as `layers.29.mlp: 0.99`. Other keys of the reference (naming,
wandb) are ignored. A leaf module: `Policy.from_yaml` calls `policy_kwargs_from_yaml`.
"""
from __future__ import annotations

import os
import re

import yaml

_IGNORED = {"ffn_sparsity", "qkvo_sparsity", "model_id", "end_step"}
_KNOWN = {"start_step", "mode", "skip_output_tokens", "sparsity", "skip_sink_tokens"} | _IGNORED


def _looks_like_path(source: str) -> bool:
    if source.endswith((".yaml", ".yml")):
        return True
    seps = {os.sep, os.altsep} - {None}
    return any(s in source for s in seps) and "\n" not in source and ":" not in source


def _read(source) -> tuple[str, str]:
    """(text, name): `source` is a path (an existing file, a PathLike, or a string that
    looks like a path) or YAML text."""
    if isinstance(source, os.PathLike) or os.path.isfile(str(source)) or (
            isinstance(source, str) and _looks_like_path(source)):
        path = os.fspath(source)
        try:
            with open(path) as f:
                return f.read(), path
        except FileNotFoundError:
            raise FileNotFoundError(f"SparseLoRA YAML file {path!r} not found") from None
    if not isinstance(source, str):
        raise TypeError(f"SparseLoRA YAML: expected a path or YAML text, got "
                        f"{type(source).__name__}")
    return source, "<yaml text>"


def _number(key: str, value) -> float:
    # Numbers written without a dot, such as 1e-2, load as strings in YAML 1.1.
    if not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"SparseLoRA YAML: {key} must be a number, got {value!r}")


def policy_kwargs_from_yaml(source, total_steps: int | None = None) -> dict:
    """Policy keyword arguments from a SparseLoRA YAML file path or YAML text."""
    text, name = _read(source)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"SparseLoRA YAML {name}{where}: not valid YAML: {what}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"SparseLoRA YAML {name} must be a mapping of keys, got "
                         f"{type(cfg).__name__}")
    unknown = sorted(set(cfg) - _KNOWN, key=str)
    if unknown:
        raise ValueError(f"unknown key(s) in SparseLoRA YAML {name}: {unknown}; "
                         f"known: {sorted(_KNOWN)}")
    kwargs = {}
    mode = str(cfg.get("mode", "svd_8"))
    m = re.fullmatch(r"svd_(\d+)", mode)
    if mode == "dense":
        cfg["sparsity"] = {}
    elif m:
        rank = int(m.group(1))
        if rank < 1:
            raise ValueError(f"SparseLoRA YAML {name}: mode {mode!r} needs a rank >= 1")
        kwargs["rank"] = rank
    else:
        raise ValueError(f"SparseLoRA YAML {name}: mode {mode!r} is not supported; use "
                         "'svd_<rank>' or 'dense'")
    start = _number("start_step", cfg.get("start_step", 0))
    if 0 < start < 1:
        kwargs.update(warmup_fraction=start, total_steps=total_steps)
    else:
        kwargs["warmup_steps"] = int(start)
    skip = cfg.get("skip_output_tokens", True)
    if not isinstance(skip, bool):
        raise ValueError(f"SparseLoRA YAML {name}: skip_output_tokens must be true or false "
                         f"(unquoted), got {skip!r}")
    kwargs["dense_output_tokens"] = skip
    sparsity = cfg.get("sparsity") or {}
    if not isinstance(sparsity, dict):
        raise ValueError(f"SparseLoRA YAML {name}: sparsity must be a mapping such as "
                         f"'layers.29.mlp: 0.99', got {sparsity!r}")
    values = {str(k): _number(f"sparsity[{str(k)!r}]", v) for k, v in sparsity.items()}
    kwargs["sparsity"] = {k: v for k, v in values.items() if v > 0}
    return kwargs

