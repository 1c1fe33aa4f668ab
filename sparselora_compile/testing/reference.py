"""The slow reference of a rewritten model: the eager model with forward hooks that apply
the SparseLoRA semantics (DESIGN.md) using the selections the compiled run recorded.

MLP:        down's input h becomes h ⊙ 1_S on context rows (its LoRA reads the same h); h is
            act(gate) * up, or act(fc) in a non-gated MLP (down: proj, dense_4h_to_h, c_proj).
Attention:  q/k/v base outputs keep channels idx_q/idx_k/idx_v on context rows (LoRA
            terms dense); o's base product reads only input channels idx_o.
The channel sets are replayed, not re-scored: whatever estimator score chose them (for the
MLP, `selection.mlp_scores` with its residual term) the reference applies the same sets.
"""
from __future__ import annotations

import contextlib

import torch

from sparselora_compile.passes.blocks import base_layer, out_in_weight
from sparselora_compile.runtime.sparse_linear import mask_reference, out_sparse_reference


def _find(model: torch.nn.Module, block_name: str) -> torch.nn.Module:
    """The block's module; the recorded name may carry more or fewer prefixes than the
    model's own names (Dynamo traced from an inner module, or from a wrapper)."""
    names = [n for n, _ in model.named_modules() if n and (
        n == block_name or n.endswith("." + block_name) or block_name.endswith("." + n))]
    if not names:
        raise KeyError(f"no module {block_name!r} in the model")
    return model.get_submodule(max(names, key=len))


def _children(block: torch.nn.Module, roles) -> dict:
    linears = {n: m for n, m in block.named_children()}
    out = {}
    for role, names in roles.items():
        hit = [linears[n] for n in names if n in linears]
        if not hit:
            raise KeyError(f"block {type(block).__name__} has none of {names}")
        out[role] = hit[0]
    return out


MLP_ROLES = {"down": ("down_proj", "fc2", "w2", "dense_4h_to_h", "c_proj")}
ATTN_ROLES = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "out_proj")}
FUSED_ATTN_ROLES = {"qkv": ("qkv_proj", "c_attn"), "o": ("o_proj", "c_proj")}


def _fused_qkv_rows(qkv: torch.nn.Module, o: torch.nn.Module, sel: dict) -> torch.Tensor:
    """The kept rows of a [q | k | v] product: idx_q, then idx_k and idx_v shifted."""
    n_q = out_in_weight(o).shape[1]
    n_kv = (out_in_weight(qkv).shape[0] - n_q) // 2
    return torch.cat([sel["idx_q"], sel["idx_k"] + n_q, sel["idx_v"] + n_q + n_kv])


@contextlib.contextmanager
def reference_semantics(model: torch.nn.Module, record: dict):
    """Within this context, `model` computes the rewrite's semantics eagerly."""
    handles = []
    try:
        for name, sel in record.items():
            block = _find(model, name)
            rows = sel["dense_rows"]
            if "idx" in sel:
                down = _children(block, MLP_ROLES)["down"]
                idx = sel["idx"]
                handles.append(down.register_forward_pre_hook(
                    lambda m, args, idx=idx, rows=rows: (mask_reference(args[0], idx, rows), *args[1:])))
                continue
            fused = not any(hasattr(block, n) for n in ATTN_ROLES["q"])
            mods = {r: base_layer(m) for r, m in _children(block, FUSED_ATTN_ROLES if fused else ATTN_ROLES).items()}
            kept = ({"qkv": _fused_qkv_rows(mods["qkv"], mods["o"], sel)} if fused
                    else {r: sel[f"idx_{r}"] for r in ("q", "k", "v")})
            for role, idx in kept.items():
                handles.append(mods[role].register_forward_hook(
                    lambda m, args, out, idx=idx, rows=rows:
                    out_sparse_reference(args[0], out_in_weight(m), m.bias, idx, rows)))
            handles.append(mods["o"].register_forward_pre_hook(
                lambda m, args, idx=sel["idx_o"], rows=rows: (mask_reference(args[0], idx, rows), *args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
