"""Group sites into blocks the method knows.

MLP:        down(act(gate(x)) * up(x)), its fused and non-gated layouts (group_mlps.py)
Attention:  o(sdpa(q(x), k(x), v(x)) ...)   -> Block(kind="attention", q, k, v, o)
            or q, k, v as row ranges of one product -> Block(kind="attention", qkv, o)

Matching is structural on the FX graph (networkx for reachability); anything that does
not fit is reported as skipped with the reason and left alone. So are blocks the method
cannot rewrite with its contract: DoRA adapters, and blocks of a graph that resumes after
a graph break inside a decoder layer (see `_unplaceable`).
"""
from __future__ import annotations

import warnings

import networkx as nx
import torch
import torch.fx as fx

from .blocks import Block, Grouping, Skipped, common_prefix, layer_index
from .find_sites import Site, dora_nodes, resumed_frame
from .fused_qkv import qkv_rows
from .graphs import SDPA, SHAPE_METHODS, example_value, is_call, module_path, strip_casts
from .group_mlps import group_mlps

DORA_REASON = ("DoRA adapter (use_dora=True){on}: DoRA rescales every output channel of "
               "the layer by magnitude / ||W + scale * B A|| computed from the whole base weight, "
               "which the sparse contract does not cover; the block stays dense")
DORA_WARNING = ("sparselora: the model has DoRA adapters (use_dora=True), which sparselora does "
                "not support: every block holding one stays dense (and PEFT's DoRA forward breaks "
                "the graph, so the layers around it are traced in pieces and stay dense too). "
                "Train with use_dora=False to get the speed-up; slc.explain lists the blocks.")
RESUMED_REASON = ("the graph resumes after a graph break inside a decoder layer{cause}, so the "
                  "block's layer, the batch's labels and the training step are unknown here; "
                  "the block stays dense (torch._dynamo.explain names the break)")


def _dataflow_cut_at(graph: fx.Graph, stops) -> nx.DiGraph:
    """Dataflow graph with the inputs of `stops` cut, so ancestry stops at them."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        if n not in stops:
            g.add_edges_from((a, n) for a in n.all_input_nodes)
    return g


def _sites_feeding(flow: nx.DiGraph, node: fx.Node, by_output: dict) -> set:
    """Sites whose result reaches `node` without crossing another linear site."""
    reach = nx.ancestors(flow, node) | {node}
    return {by_output[n] for n in reach if n in by_output}


def _shape_successor(node: fx.Node, target: fx.Node, depth: int = 12) -> bool:
    """True if `target` is reached from `node` through re-views and casts only."""
    n = target
    for _ in range(depth):
        if n is node:
            return True
        if n.op == "call_method" and n.target in SHAPE_METHODS or n.op == "call_function" and (
                n.target in (torch.reshape, torch.transpose, torch.permute, torch.flatten)):
            n = n.args[0]
            continue
        return False
    return False


def group_blocks(sites: list[Site]) -> Grouping:
    out = Grouping()
    if not sites:
        return out
    graph = sites[0].scope.gm.graph
    by_output = {strip_casts(s.output): s for s in sites}  # PEFT casts its result back
    used: set[int] = set()
    group_mlps(sites, by_output, out, used)
    _group_attention(graph, sites, by_output, out, used)
    dora_graph = check_dora(sites[0].scope, out)
    eager_attention = _eager_attention(graph, [s for s in sites if id(s) not in used])
    for where in eager_attention:
        out.skipped.append(Skipped(where, EAGER_ATTENTION_REASON))
    for s in sites:
        if id(s) not in used and not (dora_graph and s.path.startswith("L.")) and (
                s.path.rsplit(".", 1)[0] not in eager_attention):  # said above
            out.skipped.append(Skipped(s.path, "linear is not part of a recognised MLP or attention block"))
    kept = []
    for blk in out.blocks:
        why = _unsupported(blk, dora_graph)
        if why:
            out.skipped.append(Skipped(blk.name, why))
        else:
            kept.append(blk)
    out.blocks = kept
    return out


EAGER_ATTENTION_REASON = (
    "attention without scaled_dot_product_attention (eager attention: matmul, softmax, matmul, "
    "e.g. Gemma2, whose logit softcapping needs attn_implementation='eager'): only SDPA "
    "attention is recognised, so q/k/v/o stay dense")
ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj"}
FUSED_QKV_REASON = (
    "fused q/k/v projection ({qkv}) whose q, k and v are not contiguous ranges of its "
    "output (GPT-NeoX's query_key_value and multi_query=False GPT-BigCode's c_attn "
    "interleave them per head): only separate q/k/v "
    "linears or [q | k | v] ranges (Phi-3's qkv_proj, GPT-2's c_attn) are supported, so "
    "this attention block stays dense")


def _eager_attention(graph: fx.Graph, unused: list) -> list[str]:
    """Modules holding all of q/k/v/o projections that no SDPA call in the graph reads."""
    if any(is_call(n, SDPA) for n in graph.nodes):
        return []
    by_parent: dict = {}
    for s in unused:
        parent, _, name = s.path.rpartition(".")
        if name in ATTENTION_NAMES:
            by_parent.setdefault(parent, set()).add(name)
    return [p for p, names in by_parent.items() if names == ATTENTION_NAMES]


def check_dora(scope, out: Grouping) -> bool:
    """A graph holding (pieces of) PEFT's DoRA forward: say so once and in the report."""
    nodes = dora_nodes(scope)
    if not nodes:
        return False
    paths = sorted({p for p in (module_path(n) for n in nodes) if p and not p.startswith("L.")})
    where = paths[0] if paths else "DoRA forward (traced alone after a graph break)"
    out.skipped.append(Skipped(where, DORA_REASON.format(on="")))
    warnings.warn(DORA_WARNING, UserWarning, stacklevel=2)
    return True


def _unsupported(blk: Block, dora_graph: bool) -> str:
    """Why a recognised block cannot be rewritten ("" if it can)."""
    dora = [f"{s.path} ({', '.join(s.dora)})" for s in blk.sites.values() if s.dora]
    if dora:
        warnings.warn(DORA_WARNING, UserWarning, stacklevel=3)
        return DORA_REASON.format(on=" on " + ", ".join(dora))
    if blk.layer is None and any(resumed_frame(s.base) for s in blk.sites.values()):
        return RESUMED_REASON.format(cause=" (PEFT's DoRA forward breaks it)" if dora_graph else "")
    return ""


def _group_attention(graph, sites, by_output, out: Grouping, used: set) -> None:
    flow = _dataflow_cut_at(graph, set(by_output))
    for node in graph.nodes:
        if not is_call(node, SDPA):
            continue
        args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")][len(node.args[:3]):]
        feeds = [_sites_feeding(flow, a, by_output) for a in args]
        o_sites = [s for s in sites if _shape_successor(node, strip_casts(s.x))]
        where = f"attention at {node.name}"
        if any(len(f) != 1 for f in feeds) or len(o_sites) != 1:
            out.skipped.append(Skipped(where, "q/k/v/o projections could not be traced to one linear each"))
            continue
        q, k, v = (next(iter(f)) for f in feeds)
        o = o_sites[0]
        name = common_prefix([q.path, k.path, v.path, o.path])
        if q is k is v:
            _fused_attention(flow, node, args, q, o, name, out, used)
            continue
        if len({id(q), id(k), id(v)}) != 3 or not (strip_casts(q.x) is strip_casts(k.x) is strip_casts(v.x)):
            out.skipped.append(Skipped(name, "q, k and v do not read the same input (cross attention)"))
            continue
        qv = example_value(args[0])
        n_heads, head_dim = qv.shape[-3], qv.shape[-1]
        if k.out_features % head_dim or q.out_features != n_heads * head_dim:
            out.skipped.append(Skipped(name, "head layout of q/k does not match the attention call"))
            continue
        n_kv = k.out_features // head_dim
        if v.out_features != k.out_features or n_heads % n_kv or o.in_features != q.out_features:
            out.skipped.append(Skipped(name, "q/k/v/o shapes are not grouped-query attention"))
            continue
        blk = Block("attention", name, layer_index(name), {"q": q, "k": k, "v": v, "o": o},
                    sdpa=node, heads=(n_heads, n_kv, head_dim), layout="attention")
        out.blocks.append(blk)
        used.update(id(s) for s in blk.sites.values())


def _fused_attention(flow, node, args, qkv, o, name, out: Grouping, used: set) -> None:
    """q, k and v are row ranges of one product (`fused_qkv`)."""
    spans = qkv_rows(flow, args, qkv)
    if spans is None:
        out.skipped.append(Skipped(name, FUSED_QKV_REASON.format(qkv=qkv.name)))
        used.update((id(qkv), id(o)))  # said here, not again as unrecognised linears
        return
    qv = example_value(args[0])
    n_heads, head_dim = qv.shape[-3], qv.shape[-1]
    n_q, n_k, n_v = (b - a for a, b in spans)
    if n_q != n_heads * head_dim or n_k != n_v or n_k % head_dim or n_heads % (n_k // head_dim) \
            or o.in_features != n_q:
        out.skipped.append(Skipped(name, "fused q/k/v ranges are not grouped-query attention"))
        return
    blk = Block("attention", name, layer_index(name), {"qkv": qkv, "o": o}, sdpa=node,
                heads=(n_heads, n_k // head_dim, head_dim), layout="attention_fused", qkv_rows=spans)
    out.blocks.append(blk)
    used.update((id(qkv), id(o)))
