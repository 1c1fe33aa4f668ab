"""Find linear sites: a frozen base product, with or without PEFT LoRA around it.

PEFT's LoRA linear shows up in the Dynamo graph as
    result = linear(x, W_base, b)            # module path ...q_proj.base_layer
    a      = linear(dropout(x), A)           # ...q_proj.lora_A.<adapter>
    out    = result + linear(a, B) * scaling # ...q_proj (then maybe a cast back)
and a frozen linear without adapters as a bare `linear(x, W)`. The structure finds the
base product; the module names confirm which is which.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx as fx

from .graphs import LINEAR, GraphScope, example_value, module_path

LORA_PATH = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)$")
# PEFT's DoRA: `<layer>.lora_magnitude_vector.<adapter>` (a DoraLinearLayer). Under torch
# 2.13 + peft 0.21 its forward breaks the graph (`dequantize_module_weight` calls
# str.startswith), so the layer's frame is traced on its own and only the file of its
# code (peft/tuners/lora/dora.py in the nodes' stack traces) shows it is DoRA.
DORA_PATH = re.compile(r"^(?P<layer>.+)\.lora_magnitude_vector\.(?P<adapter>[^.]+)(?:\.|$)")
DORA_SOURCE = re.compile(r"peft[/\\]tuners[/\\]lora[/\\]dora\.py")
# Dynamo's name for the code that continues a frame after a graph break
RESUMED_FRAME = "torch_dynamo_resume_in_"


@dataclass(eq=False)
class Site:
    path: str             # the layer's module path (the LoRA wrapper, or the plain linear)
    base: fx.Node         # the frozen base product
    scope: GraphScope
    adapters: list[str] = field(default_factory=list)
    output: fx.Node | None = None   # the node carrying the layer's final result
    dora: list[str] = field(default_factory=list)  # adapters with DoRA's magnitude vector

    @property
    def x(self) -> fx.Node:
        return self.base.args[0]

    @property
    def weight(self) -> fx.Node:
        return self.base.args[1] if len(self.base.args) > 1 else self.base.kwargs["weight"]

    @property
    def bias(self):
        if len(self.base.args) > 2:
            return self.base.args[2]
        return self.base.kwargs.get("bias")

    @property
    def out_features(self) -> int:
        return example_value(self.base).shape[-1]

    @property
    def in_features(self) -> int:
        return example_value(self.base.args[0]).shape[-1]

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def frozen(self) -> bool:
        w, b = example_value(self.weight), example_value(self.bias)
        return w is not None and not w.requires_grad and (b is None or not b.requires_grad)


def find_sites(scope: GraphScope) -> list[Site]:
    sites, by_path = [], {}
    nodes = list(scope.gm.graph.nodes)
    for node in nodes:
        if node.op != "call_function" or node.target not in LINEAR:
            continue
        path = module_path(node)
        if path is None or example_value(node) is None:
            continue
        m = LORA_PATH.match(path)
        if m:
            if m["ab"] == "A" and m["layer"] in by_path:
                by_path[m["layer"]].adapters.append(m["adapter"])
            continue
        layer = path[: -len(".base_layer")] if path.endswith(".base_layer") else path
        site = Site(path=layer, base=node, scope=scope, output=node)
        sites.append(site)
        by_path[layer] = site
    # The layer's result is the last node attributed to the layer itself (after LoRA adds
    # and PEFT's cast back), or the base product when it has no adapter.
    for node in nodes:
        p = module_path(node)
        if p in by_path and by_path[p].adapters:
            by_path[p].output = node
        m = DORA_PATH.match(p or "")
        if m and m["layer"] in by_path and m["adapter"] not in by_path[m["layer"]].dora:
            by_path[m["layer"]].dora.append(m["adapter"])
    return sites


def dora_nodes(scope: GraphScope) -> list[fx.Node]:
    """Nodes of PEFT's DoRA code: by module path (a DoRA layer traced whole) or by the
    file of the code that made them (a DoRA forward that a graph break cut apart)."""
    out = []
    for node in scope.gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if DORA_PATH.match(module_path(node) or "") or DORA_SOURCE.search(
                str(node.meta.get("stack_trace") or "")):
            out.append(node)
    return out


def resumed_frame(node: fx.Node) -> bool:
    """True if `node` was traced in the code Dynamo runs after a graph break in a frame
    (the frame's module is then the root of the module paths: "mlp.gate_proj")."""
    return RESUMED_FRAME in str(node.meta.get("stack_trace", ""))
