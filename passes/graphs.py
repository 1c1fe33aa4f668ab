"""Walking Dynamo graphs: module paths from node metadata, checkpointed subgraphs, and
tracing a subgraph's placeholders back to the outer graph."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR = {torch._C._nn.linear, F.linear}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
MUL = {operator.mul, torch.mul, torch.Tensor.mul}
CHECKPOINT_HOPS = ("tag_activation_checkpoint", "checkpoint", "wrap_with_autocast")
# Ops that move or re-view data without changing values (for tracing the attention path).
SHAPE_METHODS = {"view", "reshape", "transpose", "contiguous", "permute", "flatten",
                 "to", "float", "half", "bfloat16", "unflatten", "expand", "__getitem__"}


def module_path(node: fx.Node) -> str | None:
    """Normalised path of the innermost module that produced `node`, e.g.
    "base_model.model.model.layers.0.mlp.down_proj.base_layer"."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    raw = list(stack.values())[-1][0]
    s = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", raw)
    s = re.sub(r"\['([^']+)'\]", r".\1", s)
    s = re.sub(r"^L\.self\.?", "", s)
    s = re.sub(r"\._modules\.", ".", s)
    return s


def module_type(node: fx.Node) -> str | None:
    """Class name of the innermost module that produced `node` ("Conv1D", "GELUActivation")."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    t = list(stack.values())[-1][1]
    return getattr(t, "__name__", None) or str(t).rsplit(".", 1)[-1].strip("'>")


def example_value(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in (
        "to", "float", "half", "bfloat16", "type", "contiguous")


def strip_casts(node):
    while is_cast(node):
        node = node.args[0]
    return node


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


@dataclass
class GraphScope:
    """One graph to search: the top graph, or a checkpointed body with the call that
    runs it (`call`), so values can be threaded in from outside."""

    gm: fx.GraphModule
    call: fx.Node | None = None
    parent: "GraphScope | None" = None


def scopes(gm: fx.GraphModule, parent: GraphScope | None = None, call=None):
    """The graph and every checkpointed region (`wrap_body_N`) below it."""
    scope = GraphScope(gm, call, parent)
    yield scope
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(h in str(node.target) for h in CHECKPOINT_HOPS):
            body_ref = node.args[0] if node.args else None
            if isinstance(body_ref, fx.Node) and body_ref.op == "get_attr":
                body = getattr(gm, body_ref.target, None)
                if isinstance(body, fx.GraphModule):
                    yield from scopes(body, scope, node)


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def input_index(node: fx.Node, scope: GraphScope) -> int | None:
    """Position among the top graph's inputs of the placeholder behind `node` (a lifted
    parameter), following checkpointed bodies outwards; None for anything else."""
    if node.op != "placeholder":
        return None
    i = placeholders(scope.gm.graph).index(node)
    if scope.call is None:
        return i
    outer = scope.call.args[1 + i] if 1 + i < len(scope.call.args) else None
    return input_index(outer, scope.parent) if isinstance(outer, fx.Node) else None


def resolve_real(node: fx.Node, scope: GraphScope, example_inputs) -> torch.Tensor | None:
    """The real tensor behind a placeholder (a lifted parameter) or a get_attr."""
    if node.op == "get_attr":
        return getattr(scope.gm, node.target, None)
    i = input_index(node, scope)
    t = example_inputs[i] if i is not None and i < len(example_inputs) else None
    return t if isinstance(t, torch.Tensor) else None


def _new_placeholder(graph: fx.Graph, name: str) -> fx.Node:
    phs = placeholders(graph)
    where = graph.inserting_after(phs[-1]) if phs else graph.inserting_before(next(iter(graph.nodes)))
    with where:
        return graph.placeholder(name)


def thread(scope: GraphScope, top_node: fx.Node, name: str, cache: dict) -> fx.Node:
    """Make the top graph's `top_node` visible inside `scope`, adding a body input to
    each enclosing checkpoint call on the way down."""
    if scope.call is None:
        return top_node
    key = (id(scope.gm), top_node)
    if key not in cache:
        outer = thread(scope.parent, top_node, name, cache)
        ph = _new_placeholder(scope.gm.graph, name)
        ph.meta.update({k: v for k, v in top_node.meta.items() if k in ("example_value", "val")})
        scope.call.args = (*scope.call.args, outer)
        cache[key] = ph
    return cache[key]


def add_input(scope: GraphScope, name: str, cache: dict) -> tuple[fx.Node, fx.Node]:
    """A new input of the top graph, visible in `scope`: (the top placeholder, the node
    that carries it inside `scope`). Its value is supplied by whoever compiles the graph,
    which also sets the placeholder's example value."""
    top = scope
    while top.parent is not None:
        top = top.parent
    ph = _new_placeholder(top.gm.graph, name)
    ph._dynamo_source = None  # not from user code (AOT autograd asks every input for one)
    return ph, thread(scope, ph, name, cache)
