"""Replace each planned block's base products with the runtime's custom ops.

MLP:       idx = select_mlp(x); gate/up base -> out_sparse_linear(x, W, b, idx);
           h = mask_channels(act(gate) * up, idx) when down's LoRA also reads h;
           down base -> in_sparse_linear(h, W, b, idx).
           Without LoRA on any of the three: the block -> sparse_mlp(x, Wg, Wu, Wd, idx)
Attention: idx_q/k/v/o = select_attention(x); q/k/v base -> out_sparse_linear;
           o base -> in_sparse_linear
LoRA branches are not touched. Estimator factors (A, B per projection, and for gate/up
the residual variance, which the MLP score uses) enter as new graph inputs: the rewrite
adds the placeholders and describes each in a `FactorRequest`; the backend computes the
tensors from the real weights and passes them in. The ops name their run by an int
handle (`runtime.run`), the only runtime fact a pass knows.
"""
from __future__ import annotations

import operator
import re
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

from .graphs import GraphScope, add_input, example_value, input_index, placeholders, thread
from .plan import PlannedBlock

ops = torch.ops.sparselora


class FactorRequest(NamedTuple):
    """The estimator inputs one site needs: placeholders for (A, B), or (A, B, residual)
    for MLP gate/up, made from the site's frozen weight. `weight_input` is the weight's
    position among the top graph's inputs (None: a get_attr, see `weight` and `scope`),
    so a graph that serves several layers can make them from each layer's weight."""
    block: str
    path: str
    weight: fx.Node
    scope: GraphScope
    weight_input: Optional[int]
    placeholders: tuple   # in the top graph
    scoped: tuple         # the same inputs as the site's own graph sees them

    @property
    def residual(self) -> bool:
        return len(self.placeholders) == 3


def find_input(top: fx.GraphModule, name: str) -> fx.Node | None:
    """The model's `labels` / `attention_mask` argument, if the graph receives it."""
    for ph in placeholders(top.graph):
        v = example_value(ph)
        if re.search(name, ph.name) and v is not None and v.dim() == 2 and not v.is_floating_point():
            return ph
    return None


class Rewriter:
    def __init__(self, top: fx.GraphModule, run_handle: int, name_root: str | None = None):
        self.top, self.sid = top, run_handle
        self.name_root = name_root          # regional: op names are relative to this layer
        self.factor_requests: list[FactorRequest] = []
        self.labels = find_input(top, "labels")
        self.attention_mask = find_input(top, "attention_mask")
        self._cache: dict = {}

    def _factors(self, site, scope: GraphScope, block_name: str, residual: bool = False):
        """Graph inputs (A, B), or (A, B, residual) with `residual`."""
        tag = re.sub(r"\W", "_", site.path)[-60:]
        added = [add_input(scope, f"sparselora_{t}_{tag}", self._cache)
                 for t in ("A", "B", "R")[: 3 if residual else 2]]
        self.factor_requests.append(FactorRequest(block_name, site.path, site.weight, scope,
                                                  input_index(site.weight, scope),
                                                  tuple(top for top, _ in added),
                                                  tuple(node for _, node in added)))
        return tuple(node for _, node in added)

    def _prologue(self, scope: GraphScope, x: fx.Node):
        graph = scope.gm.graph
        xd = graph.call_method("detach", (x,))
        key = ("rows", id(scope.gm))  # one token split per graph: every block shares [B, T]
        if key not in self._cache:
            labels, mask = (thread(scope, n, f"sparselora_{n.name}", self._cache) if n is not None else None
                            for n in (self.labels, self.attention_mask))
            self._cache[key] = graph.call_function(ops.token_rows.default, (labels, mask, xd, self.sid))
        return xd, self._cache[key]

    def _op_name(self, name: str) -> str:
        """The block name the select ops see; regional graphs serve several layers, so the
        runtime state prefixes the running layer's path (`RuntimeState.block_name`)."""
        if self.name_root and name.startswith(self.name_root + "."):
            return name[len(self.name_root) + 1:]
        return name

    def _swap_base(self, site, op, idx, rows):
        graph = site.scope.gm.graph
        with graph.inserting_before(site.base):
            new = graph.call_function(op, (site.base.args[0], site.weight, site.bias, idx, rows, self.sid))
        new.meta.update(site.base.meta)
        site.base.replace_all_uses_with(new)
        graph.erase_node(site.base)
        site.base = new

    def rewrite(self, pb: PlannedBlock) -> None:
        blk, scope = pb.block, pb.block.scope
        graph = scope.gm.graph
        s = blk.sites
        first = min((site.base for site in s.values()), key=_order(graph))
        x = (s["gate"] if blk.kind == "mlp" else s["q"]).x
        if blk.kind == "mlp":
            (ag, bg, rg), (au, bu, ru) = (self._factors(s[role], scope, blk.name, residual=True)
                                          for role in ("gate", "up"))
            factors = [ag, bg, au, bu, rg, ru]
        else:
            factors = [f for role in ("q", "k", "v") for f in self._factors(s[role], scope, blk.name)]
        with graph.inserting_before(first):
            xd, rows = self._prologue(scope, x)
            if blk.kind == "mlp":
                idx = graph.call_function(ops.select_mlp.default,
                                          (xd, *factors, rows, pb.k, self.sid, self._op_name(blk.name),
                                           blk.activation))
                self._rewrite_mlp(pb, idx, rows)
                return
            n_heads, n_kv, head_dim = blk.heads
            sel = graph.call_function(ops.select_attention.default,
                                      (xd, *factors, rows, pb.k, pb.k, n_heads, n_kv, head_dim,
                                       self.sid, self._op_name(blk.name)))
            iq, ik, iv, io = (graph.call_function(operator.getitem, (sel, i)) for i in range(4))
        for role, idx in (("q", iq), ("k", ik), ("v", iv)):
            self._swap_base(s[role], ops.out_sparse_linear.default, idx, rows)
        self._swap_base(s["o"], ops.in_sparse_linear.default, io, rows)

    def _rewrite_mlp(self, pb, idx, rows):
        s, mul = pb.block.sites, pb.block.mul
        graph = pb.block.scope.gm.graph
        if (not any(site.adapters for site in s.values()) and list(mul.users) == [s["down"].base]
                and pb.block.activation == "silu"):  # sparse_mlp computes silu only
            self._fuse_frozen_mlp(pb, idx, rows)
            return
        self._swap_base(s["gate"], ops.out_sparse_linear.default, idx, rows)
        self._swap_base(s["up"], ops.out_sparse_linear.default, idx, rows)
        if len(mul.users) > 1:  # down's LoRA reads h too: it must see h with 1_S applied
            with graph.inserting_after(mul):
                masked = graph.call_function(ops.mask_channels.default, (mul, idx, rows))
            for user in list(mul.users):
                if user is not masked:
                    user.replace_input_with(mul, masked)
        self._swap_base(s["down"], ops.in_sparse_linear.default, idx, rows)


    def _fuse_frozen_mlp(self, pb, idx, rows):
        """No LoRA anywhere in the block: one op computes it at width k, end to end."""
        s = pb.block.sites
        graph = pb.block.scope.gm.graph
        down = s["down"].base
        with graph.inserting_before(down):
            new = graph.call_function(ops.sparse_mlp.default, (
                s["gate"].x, s["gate"].weight, s["up"].weight, s["down"].weight,
                s["gate"].bias, s["up"].bias, s["down"].bias, idx, rows, self.sid))
            new = graph.call_function(operator.getitem, (new, 0))  # [1]: (g, u) for backward
        new.meta.update(down.meta)
        down.replace_all_uses_with(new)
        dead, erased = [down, pb.block.mul], set()
        while dead:  # the gate/up products, the activation and the casts between them
            n = dead.pop(0)
            if n not in erased and n.op in ("call_function", "call_method") and not n.users:
                inputs = list(n.all_input_nodes)
                graph.erase_node(n)
                erased.add(n)
                dead += inputs
        s["down"].base = new


def _order(graph: fx.Graph):
    pos = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: pos[n]
