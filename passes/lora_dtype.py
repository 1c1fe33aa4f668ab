"""LoRA products in the model's dtype (backend option `lora_dtype="model"`).

PEFT keeps adapters in fp32 on a bf16/fp16 model and casts the layer input up before
lora_A, so each LoRA linear runs two fp32 SIMT GEMMs forward and four backward (about
24 ms of a 257 ms LLaMA-3-8B step on an H200). This pass runs
`lora_B(lora_A(x))` in the base product's dtype instead (fp32 accumulate inside the
GEMM), the way autocast would: the adapter weights are cast down where they are read,
so they, their gradients and the optimizer stay fp32, and the product is cast back to
fp32 before PEFT's scaling and add, so every node after it keeps its dtype.

The pattern, per adapter of a LoRA layer (module paths from find_sites):
    a = linear(<x cast to fp32, maybe dropout>, A)   # ...lora_A.<adapter>, fp32
    b = linear(a, B)                                 # ...lora_B.<adapter>, a's only user
becomes
    a = linear(x'.to(D), A.to(D)); b = linear(a, B.to(D)).to(float32)
where D is the base product's dtype. Adapters not of this shape are left alone.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .find_sites import LORA_PATH, find_sites
from .graphs import LINEAR, example_value, is_call, is_cast, module_path, scopes

LOW_PRECISION = (torch.bfloat16, torch.float16)


def lora_products_in_model_dtype(gm: fx.GraphModule, rewrite: bool = True) -> int:
    """Rewrite `gm` (and its checkpointed bodies) in place; returns how many adapters.
    `rewrite=False` only counts them."""
    done = 0
    for scope in scopes(gm):
        base_dtype = {}
        for site in find_sites(scope):
            v = example_value(site.base)
            if site.adapters and v is not None:
                base_dtype[site.path] = v.dtype
        graph = scope.gm.graph
        for node in list(graph.nodes):
            pair = _adapter_pair(node, base_dtype)
            if pair is not None:
                if rewrite:
                    _cast_down(graph, *pair)
                done += 1
        if done and rewrite:
            graph.lint()
            scope.gm.recompile()
    return done


def _adapter_pair(node: fx.Node, base_dtype: dict):
    """(lora_A product, lora_B product, model dtype) when `node` is an fp32 lora_A product
    of a layer whose base runs in bf16/fp16, read only by its lora_B product."""
    if not is_call(node, LINEAR):
        return None
    m = LORA_PATH.match(module_path(node) or "")
    if m is None or m["ab"] != "A" or base_dtype.get(m["layer"]) not in LOW_PRECISION:
        return None
    v = example_value(node)
    if v is None or v.dtype != torch.float32 or len(node.users) != 1:
        return None  # under autocast the product is already in the model's dtype
    b = next(iter(node.users))
    mb = LORA_PATH.match(module_path(b) or "") if is_call(b, LINEAR) else None
    if mb is None or (mb["ab"], mb["layer"], mb["adapter"]) != ("B", m["layer"], m["adapter"]):
        return None
    if b.args[0] is not node:
        return None
    return node, b, base_dtype[m["layer"]]


def _cast_down(graph: fx.Graph, a: fx.Node, b: fx.Node, dtype: torch.dtype) -> None:
    for lin in (a, b):
        with graph.inserting_before(lin):
            args = list(lin.args)
            start = 1 if lin is b else 0  # b's input is a, already in `dtype`
            for i in range(start, len(args)):
                if isinstance(args[i], fx.Node):  # x, weight, bias
                    args[i] = _to(graph, args[i], dtype)
            for key in ("weight", "bias"):
                if isinstance(lin.kwargs.get(key), fx.Node):
                    lin.update_kwarg(key, _to(graph, lin.kwargs[key], dtype))
            old = lin.args
            lin.args = tuple(args)
            for n in old:  # PEFT's up-cast of x, when skipped
                if isinstance(n, fx.Node) and is_cast(n) and not n.users:
                    graph.erase_node(n)
    with graph.inserting_after(b):
        up = _cast(graph, b, torch.float32)
    b.replace_all_uses_with(up, delete_user_cb=lambda user: user is not up)


def _to(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """`node` in `dtype`; PEFT's up-cast of x is skipped rather than undone (no copy of x)."""
    if is_cast(node) and getattr(example_value(node.args[0]), "dtype", None) == dtype:
        return node.args[0]
    return _cast(graph, node, dtype)


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """`node.to(dtype)`, with the example value that later passes read shapes and dtypes from."""
    cast = graph.call_method("to", (node, dtype))
    v = example_value(node)
    if v is not None:  # a fake tensor, as Dynamo's own example values (requires_grad kept)
        cast.meta["example_value"] = v.to(dtype)
    return cast
