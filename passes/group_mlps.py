"""Group linear sites into MLP blocks. One kind ("mlp"), three layouts:

gated        down(act(gate(x)) * up(x))                         Llama, Qwen, Mistral, OLMo2, Gemma
gated_fused  g, u = gate_up(x).chunk(2, -1); down(u * act(g))     Phi-3
plain        proj(act(fc(x)))                                   GPT-NeoX, GPT-2 (Conv1D)

Intermediate channel j is row j of gate and up (rows j and j + d_ff of gate_up; row j of
fc) and column j of down (proj); the rewrite keeps the same channels in all of them.
A block's `h` is the node down reads: act(gate) * up, or act(fc).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .blocks import Block, Grouping, Skipped, common_prefix, layer_index
from .graphs import MUL, example_value, is_call, is_cast, module_type, strip_casts

SILU = {F.silu, torch._C._nn.silu}
GELU = {F.gelu, torch._C._nn.gelu}
RELU = {F.relu, torch.relu}
OTHER_ACTIVATIONS = {torch.tanh, torch.sigmoid}
# The activations the estimator scores (runtime.selection.ACTIVATIONS has the same names)
ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "relu")
# transformers activation modules that Dynamo traces as arithmetic (no F.gelu call to
# read), by class name; both compute gelu's tanh approximation.
ACTIVATION_MODULES = {"NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh"}
# Ops under which output channel j depends on input channel j only (an activation spelled
# out, a cast, dropout's per-element mask): what may lie between fc and proj.
ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
               operator.pow, torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.tanh,
               torch.sigmoid, torch.erf, torch.exp, torch.neg, torch.abs, F.dropout,
               *SILU, *GELU, *RELU}
ELEMENTWISE_METHODS = {"to", "float", "half", "bfloat16", "type", "contiguous", "mul", "add",
                       "sub", "div", "pow", "tanh", "sigmoid", "neg", "abs"}


def gate_activation(node: fx.Node) -> str | None:
    """The estimator's name of an activation call (None: not one it scores): silu, exact
    gelu, gelu's tanh approximation (Gemma's `gelu_pytorch_tanh`), relu."""
    if node.op != "call_function":
        return None
    if node.target in SILU:
        return "silu"
    if node.target in RELU:
        return "relu"
    if node.target in GELU:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return None


def group_mlps(sites, by_output, out: Grouping, used: set) -> None:
    """Gated blocks first (their act(gate) * up also looks elementwise), then plain ones."""
    for down in sites:
        _gated(down, by_output, out, used)
    for proj in sites:
        if id(proj) not in used:
            _plain(proj, by_output, out, used)


# ---- gated: act(gate) * up, from two linears or from the halves of one ------------------

def _gated(down, by_output, out: Grouping, used: set) -> None:
    mul = strip_casts(down.x)
    if not is_call(mul, MUL) or len(mul.args) != 2:
        return
    a, b = (strip_casts(x) for x in mul.args)
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return
    for act, up_out in ((a, b), (b, a)):
        activation = gate_activation(act)
        if activation in ("silu", "gelu", "gelu_tanh"):
            gate_out = strip_casts(act.args[0])
            break
        if act.op == "call_function" and (act.target in OTHER_ACTIVATIONS | RELU | GELU):
            out.skipped.append(Skipped(down.path, f"gated MLP with activation "
                                                  f"{getattr(act.target, '__name__', act.target)}: "
                                                  "the estimator supports silu, gelu, gelu_tanh gates"))
            return
    else:
        return
    gate_half, up_half = _chunk_half(gate_out, by_output), _chunk_half(up_out, by_output)
    if gate_half and up_half and gate_half[0] is up_half[0] and (gate_half[1], up_half[1]) == (0, 1):
        gate_up = gate_half[0]
        sites, layout = {"gate_up": gate_up, "down": down}, "gated_fused"
    else:
        gate, up = by_output.get(gate_out), by_output.get(up_out)
        if gate is None or up is None:
            return
        sites, layout = {"gate": gate, "up": up, "down": down}, "gated"
        if strip_casts(gate.x) is not strip_casts(up.x):
            out.skipped.append(Skipped(common_prefix(s.path for s in sites.values()),
                                       "gate and up read different inputs"))
            return
    _add(out, used, sites, layout, mul, activation, down)


def _chunk_half(node: fx.Node, by_output) -> tuple | None:
    """(site, i) when `node` is half i of `site(x).chunk(2, dim=-1)` (Phi-3's gate_up_proj)."""
    if not (is_call(node, {operator.getitem}) and node.args[1] in (0, 1)):
        return None
    c = node.args[0]
    if not isinstance(c, fx.Node):
        return None
    is_chunk = (c.op == "call_method" and c.target == "chunk") or is_call(c, {torch.chunk})
    if not is_chunk:
        return None
    src, *rest = c.args
    chunks = rest[0] if rest else c.kwargs.get("chunks")
    dim = rest[1] if len(rest) > 1 else c.kwargs.get("dim", 0)
    v = example_value(src)
    site = by_output.get(strip_casts(src))
    if site is None or chunks != 2 or v is None or dim not in (-1, v.dim() - 1) or v.shape[-1] % 2:
        return None
    return site, node.args[1]


# ---- plain: proj(act(fc(x))) ------------------------------------------------------------

def _plain(proj, by_output, out: Grouping, used: set) -> None:
    h = _channel_view_source(proj.x)
    found = _elementwise_from_site(h, by_output)
    if found is None:
        first = h.args[0] if h.op == "call_function" and h.args else None
        fc = by_output.get(strip_casts(first)) if isinstance(first, fx.Node) else None
        if fc is not None and id(fc) not in used and fc is not proj:  # one op we cannot vouch for
            out.skipped.append(Skipped(common_prefix([fc.path, proj.path]), (
                f"non-gated MLP with activation {getattr(h.target, '__name__', h.target)}: the "
                f"estimator supports {', '.join(ACTIVATION_NAMES)}")))
        return
    fc, between = found
    if fc is proj or id(fc) in used or fc.out_features != proj.in_features:
        return
    sites = {"fc": fc, "proj": proj}
    activation = _plain_activation(between)
    if activation is None:
        kinds = sorted({module_type(n) or str(n.target) for n in between if not is_cast(n)})
        out.skipped.append(Skipped(common_prefix(s.path for s in sites.values()),
                                   f"non-gated MLP with activation {', '.join(kinds) or 'none'}: "
                                   f"the estimator supports {', '.join(ACTIVATION_NAMES)}"))
        return
    _add(out, used, sites, "plain", h, activation, proj)


def _channel_view_source(node: fx.Node) -> fx.Node:
    """Through casts and re-views that keep the last (channel) dim: Conv1D's x.view(-1, in)."""
    while isinstance(node, fx.Node) and (is_cast(node) or (
            node.op == "call_method" and node.target in ("view", "reshape") and
            _same_last_dim(node, node.args[0]))):
        node = node.args[0]
    return node


def _same_last_dim(a, b) -> bool:
    va, vb = example_value(a), example_value(b)
    return va is not None and vb is not None and va.shape[-1] == vb.shape[-1]


def _elementwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ELEMENTWISE) or (
        node.op == "call_method" and node.target in ELEMENTWISE_METHODS)


def _elementwise_from_site(h: fx.Node, by_output, limit: int = 64):
    """(site, nodes) when `h` is an elementwise function of one site's output alone: every
    node between them elementwise, their other arguments constants, and nothing else
    reading them (so the channels fc leaves out reach nothing but columns down skips)."""
    between, todo, sources = [], [h], set()
    while todo:
        n = todo.pop()
        if n in by_output:
            sources.add(n)
            continue
        if n in between:
            continue
        if not _elementwise(n) or len(between) >= limit:
            return None
        between.append(n)
        todo += n.all_input_nodes
    if len(sources) != 1 or not between:
        return None
    inside = set(between)
    src = next(iter(sources))
    if any(u not in inside for n in (src, *between) if n is not h for u in n.users):
        return None
    return by_output[src], between


def _plain_activation(between) -> str | None:
    calls = [n for n in between if not is_cast(n) and n.target is not F.dropout]
    if len(calls) == 1 and gate_activation(calls[0]):
        return gate_activation(calls[0])
    kinds = {module_type(n) for n in calls}
    return ACTIVATION_MODULES.get(kinds.pop()) if len(kinds) == 1 else None


# ---- the block --------------------------------------------------------------------------

def _add(out: Grouping, used: set, sites: dict, layout: str, h: fx.Node, activation: str, down) -> None:
    name = common_prefix(s.path for s in sites.values())
    outside = [u for u in h.users if not down.owns(u)]
    if outside:
        out.skipped.append(Skipped(name, f"the MLP's intermediate is used outside {down.name}"))
        return
    blk = Block("mlp", name, layer_index(name), sites, h=h, activation=activation, layout=layout)
    out.blocks.append(blk)
    used.update(id(s) for s in sites.values())
