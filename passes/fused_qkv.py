"""Which rows of a fused q/k/v projection q, k and v read.

Phi-3 slices `qkv[..., :n_q]`, `qkv[..., n_q:n_q + n_kv]`, `qkv[..., n_q + n_kv:]`; GPT-2
splits `c_attn(x).split(n_embd, dim=2)`; GPT-BigCode (multi-query) splits
`c_attn(x).unsqueeze(1)` along its last dim. Either way each of q, k and v is a contiguous
range of the product's output channels, so the attention rewrite can treat them as three
products that share one GEMM. GPT-NeoX instead views its output as
[..., heads, 3 * head_dim] and chunks per head (q, k, v interleaved): not a range, and
left dense.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from .graphs import example_value, is_call, is_cast, strip_casts


def qkv_rows(flow: nx.DiGraph, args, site) -> tuple | None:
    """((q0, q1), (k0, k1), (v0, v1)) for the SDPA inputs `args` fed by `site`, or None
    when one of them is not one contiguous range of its output's last dim."""
    source = _with_casts(strip_casts(site.output))
    width = site.out_features
    spans = []
    for a in args:
        reach = nx.ancestors(flow, a) | {a}
        readers = {n for n in reach if n not in source and any(i in source for i in n.all_input_nodes)}
        span = _span(_past_views(readers.pop(), reach), reach, width) if len(readers) == 1 else None
        if span is None or span[0] >= span[1]:
            return None
        spans.append(span)
    ordered = sorted(spans)
    if any(a[1] > b[0] for a, b in zip(ordered, ordered[1:])):
        return None  # overlapping: not three separate products
    return tuple(spans)


def _with_casts(node: fx.Node) -> set:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        out.add(n)
        todo += [u for u in n.users if is_cast(u)]
    return out


def _past_views(node: fx.Node, reach: set) -> fx.Node:
    """From `node` through re-views that keep the last dim (BigCode's unsqueeze(1))."""
    while node.op == "call_method" and node.target in ("unsqueeze", "view", "reshape") and (
            _same_last_dim(node, node.args[0])):
        nxt = [u for u in node.users if u in reach]
        if len(nxt) != 1:
            break
        node = nxt[0]
    return node


def _same_last_dim(a, b) -> bool:
    va, vb = example_value(a), example_value(b)
    return va is not None and vb is not None and va.shape[-1] == vb.shape[-1]


def _last_dim(node: fx.Node, dim) -> bool:
    v = example_value(node)
    return v is not None and dim in (-1, v.dim() - 1)


def _span(reader: fx.Node, reach: set, width: int) -> tuple | None:
    """The [start, stop) of the last dim that `reader` (the one node reading the product)
    passes on towards the attention input."""
    if is_call(reader, {operator.getitem}):  # x[..., a:b]
        index = reader.args[1]
        if (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
                and isinstance(index[1], slice) and index[1].step in (None, 1)):
            start, stop, _ = index[1].indices(width)
            return start, stop
        return None
    split = reader.op == "call_method" and reader.target in ("split", "chunk") or is_call(
        reader, {torch.split, torch.chunk})
    if not split:
        return None
    name = reader.target if isinstance(reader.target, str) else reader.target.__name__
    _, *rest = reader.args
    size = rest[0] if rest else reader.kwargs.get("split_size_or_sections" if name == "split" else "chunks")
    dim = rest[1] if len(rest) > 1 else reader.kwargs.get("dim", 0)
    if not _last_dim(reader.args[0], dim):
        return None
    if name == "chunk":
        if not isinstance(size, int) or width % size:
            return None
        size = width // size
    if isinstance(size, int):
        sizes = [size] * (width // size) + ([width % size] if width % size else [])
    else:
        sizes = list(size)
    picks = [n for n in reach if is_call(n, {operator.getitem}) and n.args[0] is reader]
    if len(picks) != 1 or sum(sizes) != width or not 0 <= picks[0].args[1] < len(sizes):
        return None
    i = picks[0].args[1]
    return sum(sizes[:i]), sum(sizes[: i + 1])
