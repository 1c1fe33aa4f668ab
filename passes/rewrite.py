"""Replace each planned block's base products with the runtime's custom ops.

MLP:       idx = select_mlp(x); gate/up base -> out_sparse_linear(x, W, b, idx);
           h = mask_channels(act(gate) * up, idx) when down's LoRA also reads h;
           down base -> in_sparse_linear(h, W, b, idx).
           Without LoRA on any of the three (silu gate): the block -> sparse_mlp(x, Wg, Wu, Wd, idx)
           Fused gate_up (Phi-3): its rows idx and idx + d_ff, scored from its two halves.
           Non-gated fc -> act -> proj: idx = select_plain_mlp(x); fc as gate, proj as down.
           Conv1D (GPT-2) products read their [in, out] weight through a transposed view.
Attention: idx_q/k/v/o = select_attention(x); q/k/v base -> out_sparse_linear;
           o base -> in_sparse_linear. A fused qkv product (Phi-3, GPT-2) keeps
           idx_q/k/v shifted to the start of q's, k's and v's row ranges.
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
    transposed: bool = False        # the weight is stored [in, out] (Conv1D)
    rows: Optional[tuple] = None    # (start, stop): factors of these rows only (a half of gate_up, q/k/v of qkv)

    @property
    def residual(self) -> bool:
        return len(self.placeholders) == 3

    def estimator_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The [out, in] weight the factors are made from, given the site's real weight."""
        w = weight.t() if self.transposed else weight
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]


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

    def _factors(self, site, scope: GraphScope, block_name: str, residual: bool = False,
                 rows: tuple | None = None):
        """Graph inputs (A, B), or (A, B, residual) with `residual`; of weight rows `rows`."""
        tag = re.sub(r"\W", "_", site.path)[-60:] + (f"_{rows[0]}" if rows else "")
        added = [add_input(scope, f"sparselora_{t}_{tag}", self._cache)
                 for t in ("A", "B", "R")[: 3 if residual else 2]]
        self.factor_requests.append(FactorRequest(block_name, site.path, site.weight, scope,
                                                  input_index(site.weight, scope),
                                                  tuple(top for top, _ in added),
                                                  tuple(node for _, node in added),
                                                  transposed=site.conv1d, rows=rows))
        return tuple(node for _, node in added)

    def _attention_factors(self, blk, scope: GraphScope) -> list:
        """[A_q, B_q, A_k, B_k, A_v, B_v]: of q/k/v, or of the fused product's row ranges."""
        s = blk.sites
        if blk.layout == "attention_fused":
            return [f for span in blk.qkv_rows for f in self._factors(s["qkv"], scope, blk.name, rows=span)]
        return [f for role in ("q", "k", "v") for f in self._factors(s[role], scope, blk.name)]

    def _mlp_factors(self, blk, scope: GraphScope) -> list:
        """[A_g, B_g, A_u, B_u, R_g, R_u] (select_mlp's order), or [A, B, R] of fc (plain)."""
        s = blk.sites
        if blk.layout == "plain":
            return list(self._factors(s["fc"], scope, blk.name, residual=True))
        if blk.layout == "gated_fused":
            n = blk.channels
            parts = [(s["gate_up"], (0, n)), (s["gate_up"], (n, 2 * n))]
        else:
            parts = [(s["gate"], None), (s["up"], None)]
        (ag, bg, rg), (au, bu, ru) = (self._factors(site, scope, blk.name, True, rows)
                                      for site, rows in parts)
        return [ag, bg, au, bu, rg, ru]

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
            w = site.weight
            if site.conv1d:  # the ops take [out, in]: a view, no copy (the Triton kernels take strides)
                w = graph.call_function(torch.t, (w,))
                w.meta["example_value"] = example_value(site.weight).t()
            new = graph.call_function(op, (site.x, w, site.bias, idx, rows, self.sid))
        new.meta.update(site.base.meta)
        site.base.replace_all_uses_with(new)
        graph.erase_node(site.base)
        site.base = new

    def rewrite(self, pb: PlannedBlock) -> None:
        blk, scope = pb.block, pb.block.scope
        graph = scope.gm.graph
        s = blk.sites
        first = min((site.base for site in s.values()), key=_order(graph))
        x = next(iter(s.values())).token_input  # the site reading the block's input comes first
        if blk.kind == "mlp":
            factors = self._mlp_factors(blk, scope)
        else:
            factors = self._attention_factors(blk, scope)
        with graph.inserting_before(first):
            xd, rows = self._prologue(scope, x)
            if blk.kind == "mlp":
                select = ops.select_plain_mlp if blk.layout == "plain" else ops.select_mlp
                idx = graph.call_function(select.default,
                                          (xd, *factors, rows, pb.k, self.sid, self._op_name(blk.name),
                                           blk.activation))
                self._rewrite_mlp(pb, idx, rows)
                return
            n_heads, n_kv, head_dim = blk.heads
            sel = graph.call_function(ops.select_attention.default,
                                      (xd, *factors, rows, pb.k, pb.k, n_heads, n_kv, head_dim,
                                       self.sid, self._op_name(blk.name)))
            iq, ik, iv, io = (graph.call_function(operator.getitem, (sel, i)) for i in range(4))
        if blk.layout == "attention_fused":  # q, k, v are row ranges of one product
            with graph.inserting_before(s["qkv"].base):
                parts = [graph.call_function(operator.add, (idx, span[0]))
                         for idx, span in zip((iq, ik, iv), blk.qkv_rows)]
                kept = graph.call_function(torch.cat, (parts,))
            self._swap_base(s["qkv"], ops.out_sparse_linear.default, kept, rows)
        else:
            for role, idx in (("q", iq), ("k", ik), ("v", iv)):
                self._swap_base(s[role], ops.out_sparse_linear.default, idx, rows)
        self._swap_base(s["o"], ops.in_sparse_linear.default, io, rows)

    def _rewrite_mlp(self, pb, idx, rows):
        blk = pb.block
        s, h = blk.sites, blk.h
        graph = blk.scope.gm.graph
        if (blk.layout == "gated" and not any(site.adapters for site in s.values())
                and list(h.users) == [s["down"].base] and blk.activation == "silu"):
            self._fuse_frozen_mlp(pb, idx, rows)
            return
        # The rest, fused gate_up and non-gated blocks included, take the per-product ops
        # (their gathers run as Triton kernels on CUDA from k >= 512): sparse_mlp takes
        # separate gate and up weights and computes silu(gate) * up only.
        if blk.layout == "gated_fused":  # intermediate channel j is rows j and j + d_ff
            with graph.inserting_before(s["gate_up"].base):
                upper = graph.call_function(operator.add, (idx, blk.channels))
                both = graph.call_function(torch.cat, ([idx, upper],))
            self._swap_base(s["gate_up"], ops.out_sparse_linear.default, both, rows)
        for role in ("gate", "up", "fc"):
            if role in s:
                self._swap_base(s[role], ops.out_sparse_linear.default, idx, rows)
        if len(h.users) > 1:  # down's LoRA reads h too: it must see h with 1_S applied
            with graph.inserting_after(h):
                masked = graph.call_function(ops.mask_channels.default, (h, idx, rows))
            for user in list(h.users):
                if user is not masked:
                    user.replace_input_with(h, masked)
        down = s["proj"] if blk.layout == "plain" else s["down"]
        self._swap_base(down, ops.in_sparse_linear.default, idx, rows)

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
        dead, erased = [down, pb.block.h], set()
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
