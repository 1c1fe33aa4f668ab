"""Find linear sites: a frozen base product, with or without PEFT LoRA around it.

PEFT's LoRA linear shows up in the Dynamo graph as
    result = linear(x, W_base, b)            # module path ...q_proj.base_layer
    a      = linear(dropout(x), A)           # ...q_proj.lora_A.<adapter>
    out    = result + linear(a, B) * scaling # ...q_proj (then maybe a cast back)
and a frozen linear without adapters as a bare `linear(x, W)`. transformers' Conv1D
(GPT-2) stores its weight [in, out] and computes `addmm(b, x.view(-1, in), W)`: a site too,
marked `conv1d`. The structure finds the base product; the module names confirm which is which.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx as fx

import torch

from .graphs import LINEAR, GraphScope, example_value, module_path, module_type

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
    conv1d: bool = False  # base is addmm(b, x, W) with W stored [in, out] (transformers' Conv1D)

    @property
    def x(self) -> fx.Node:
        return self.base.args[1] if self.conv1d else self.base.args[0]

    @property
    def token_input(self) -> fx.Node:
        """x with its token dims [..., in] (a Conv1D's product reads x.view(-1, in))."""
        x = self.x
        if self.conv1d and x.op == "call_method" and x.target in ("view", "reshape"):
            return x.args[0]
        return x

    @property
    def weight(self) -> fx.Node:
        if self.conv1d:
            return self.base.args[2]
        return self.base.args[1] if len(self.base.args) > 1 else self.base.kwargs["weight"]

    @property
    def bias(self):
        if self.conv1d:
            return self.base.args[0]
        if len(self.base.args) > 2:
            return self.base.args[2]
        return self.base.kwargs.get("bias")

    @property
    def out_features(self) -> int:
        return example_value(self.base).shape[-1]

    @property
    def in_features(self) -> int:
        return example_value(self.x).shape[-1]

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def owns(self, node: fx.Node) -> bool:
        """`node` belongs to this layer: its base product or a node of its modules."""
        p = module_path(node)
        return node is self.base or (p is not None and (p == self.path or p.startswith(self.path + ".")))

    def frozen(self) -> bool:
        w, b = example_value(self.weight), example_value(self.bias)
        return w is not None and not w.requires_grad and (b is None or not b.requires_grad)


def _conv1d_product(node: fx.Node) -> bool:
    """`torch.addmm(bias, x, W)` inside a transformers Conv1D (alpha = beta = 1)."""
    return (node.target is torch.addmm and len(node.args) == 3 and not node.kwargs
            and module_type(node) == "Conv1D")


def find_sites(scope: GraphScope) -> list[Site]:
    sites, by_path = [], {}
    nodes = list(scope.gm.graph.nodes)
    for node in nodes:
        if node.op != "call_function" or not (node.target in LINEAR or _conv1d_product(node)):
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
        site = Site(path=layer, base=node, scope=scope, output=node, conv1d=node.target is torch.addmm)
        sites.append(site)
        by_path[layer] = site
    # The layer's result is the last node attributed to the layer itself: after LoRA adds
    # and PEFT's cast back, or without adapters the base product (a Conv1D's view back to
    # [..., out] after its addmm).
    for node in nodes:
        p = module_path(node)
        if p in by_path and node.op != "placeholder":
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
