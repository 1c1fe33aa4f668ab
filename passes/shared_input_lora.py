"""One GEMM for the lora_A products that read the same input.

q_proj, k_proj and v_proj read the same hidden states, so their adapters' first products
`x A_q^T`, `x A_k^T`, `x A_v^T` are one product with the A's stacked:
    a_q, a_k, a_v = split(linear(x, cat([A_q, A_k, A_v])), [r_q, r_k, r_v], -1)
Forward, that is one GEMM and one weight cast instead of three each; backward, autograd
gives one GEMM for the input gradient and one for the stacked weight gradient, instead of
three each. The step is bound by the host on an H200, and these are ~9 kernel launches
per decoder layer. Each output column is the same dot product as before.

Grouped: lora_A products (module path `...lora_A.<adapter>`) without bias whose inputs
are one value: the same node, or casts of one node to one dtype (PEFT casts x up once per
adapter). With dropout each adapter draws its own mask, so those inputs differ.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .find_sites import LORA_PATH
from .graphs import LINEAR, example_value, is_call, is_cast, module_path, scopes


def fuse_shared_input_lora_a(gm: fx.GraphModule) -> int:
    """Rewrite `gm` (and its checkpointed bodies) in place; returns how many lora_A products
    were merged into shared GEMMs."""
    fused = 0
    for scope in scopes(gm):
        graph = scope.gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        groups: dict[tuple, list[fx.Node]] = {}
        for node in graph.nodes:
            key = _group_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        done = 0
        for members in groups.values():
            if len(members) > 1 and _fuse(graph, members, order):
                done += len(members)
        if done:
            graph.lint()
            scope.gm.recompile()
            fused += done
    return fused


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _group_key(node: fx.Node):
    if not is_call(node, LINEAR) or _arg(node, 2, "bias") is not None:
        return None
    m = LORA_PATH.match(module_path(node) or "")
    if m is None or m["ab"] != "A":
        return None
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    xv, wv = example_value(x), example_value(w)
    if xv is None or wv is None or wv.dim() != 2:
        return None
    source = x.args[0] if is_cast(x) and x.target != "contiguous" else x
    return source, xv.dtype, wv.dtype


def _fuse(graph: fx.Graph, members: list[fx.Node], order: dict) -> bool:
    members = sorted(members, key=order.__getitem__)
    first = members[0]
    weights = []
    for node in members:  # each weight, or what it is cast from, must exist before `first`
        w = _arg(node, 1, "weight")
        if order.get(w, len(order)) < order[first]:
            weights.append((w, None))
        elif is_cast(w) and w.target == "to" and order.get(w.args[0], len(order)) < order[first]:
            weights.append((w.args[0], example_value(w).dtype))
        else:
            return False
    x = _arg(first, 0, "input")
    with graph.inserting_before(first):
        stacked = [src if dtype is None else graph.call_method("to", (src, dtype))
                   for src, dtype in weights]
        out = graph.call_function(torch._C._nn.linear,
                                  (x, graph.call_function(torch.cat, (stacked, 0))))
        sizes = [example_value(_arg(n, 1, "weight")).shape[0] for n in members]
        parts = graph.call_function(torch.split, (out, sizes, -1))
    for i, node in enumerate(members):
        with graph.inserting_before(node):
            part = graph.call_function(operator.getitem, (parts, i))
        old = (_arg(node, 0, "input"), _arg(node, 1, "weight"))
        node.replace_all_uses_with(part)
        graph.erase_node(node)
        for n in old:  # the per-adapter casts of x and of the weights, now unused
            if isinstance(n, fx.Node) and is_cast(n) and not n.users:
                graph.erase_node(n)
    return True
