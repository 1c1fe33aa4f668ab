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

from sparselora_compile.passes.blocks import base_layer
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
            mods = _children(block, ATTN_ROLES)
            for role in ("q", "k", "v"):
                lin, idx = base_layer(mods[role]), sel[f"idx_{role}"]
                handles.append(lin.register_forward_hook(
                    lambda m, args, out, idx=idx, rows=rows: out_sparse_reference(args[0], m.weight, m.bias, idx, rows)))
            handles.append(base_layer(mods["o"]).register_forward_pre_hook(
                lambda m, args, idx=sel["idx_o"], rows=rows: (mask_reference(args[0], idx, rows), *args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
