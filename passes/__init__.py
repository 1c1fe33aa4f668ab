"""FX graph passes, in the order `PASSES` runs them on each Dynamo graph.

Each pass is a function `(gm, ctx) -> gm` that rewrites `gm` in place (its checkpointed
bodies too) and records what it did in `ctx.report`. They read shapes, dtypes and module
names from the graph and the configuration in `ctx`; they never touch runtime objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .blocks import Block, Skipped
from .find_sites import find_sites
from .graphs import scopes
from .group_blocks import group_blocks
from .lora_dtype import lora_products_in_model_dtype
from .plan import Limits, PlannedBlock, plan_blocks
from .rewrite import FactorRequest, Rewriter
from .shared_input_lora import fuse_shared_input_lora_a


@dataclass
class PassContext:
    """What the passes read: the policy (config), whether to rewrite (a training graph),
    the run handle the ops will carry, and for a regional graph the layer it was traced
    on: (module path, index, number of layers)."""
    policy: object
    run_handle: int = 0
    rewrite: bool = True
    lora_dtype: str = "adapter"
    limits: Limits = Limits()
    layer: tuple | None = None
    report: "PassReport" = None

    def __post_init__(self):
        if self.report is None:
            self.report = PassReport()


@dataclass
class PassReport:
    found: list[Block] = field(default_factory=list)
    planned: list[PlannedBlock] = field(default_factory=list)   # rewritten when ctx.rewrite
    skipped: list[Skipped] = field(default_factory=list)
    factor_requests: list[FactorRequest] = field(default_factory=list)
    lora_in_model_dtype: int = 0    # adapters whose products now run in the model's dtype
    fp32_adapters: int = 0          # adapters that could (lora_dtype="model" would cast them)
    shared_lora_a: int = 0          # lora_A products merged into shared GEMMs

    @property
    def rewritten(self) -> list[PlannedBlock]:
        return self.planned if self.factor_requests else []

    @property
    def changed(self) -> bool:
        return bool(self.factor_requests or self.lora_in_model_dtype or self.shared_lora_a)

    @property
    def min_layer(self):
        layers = [p.block.layer for p in self.rewritten if p.block.layer is not None]
        return min(layers) if layers else None

    def flops_saved_estimate(self) -> float:
        """Fraction of the found blocks' base FLOPs removed, if every token were context."""
        dense = sparse = 0
        for pb in self.planned:
            d, s = pb.base_flops_per_token()
            dense, sparse = dense + d, sparse + s
        planned = {id(p.block) for p in self.planned}
        total = dense + sum(b.dense_flops_per_token() for b in self.found if id(b) not in planned)
        return 0.0 if total == 0 else (dense - sparse) / total


# ---- the passes ------------------------------------------------------------------------

def cast_lora_products(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """lora_dtype="model": LoRA products in the base product's dtype (lora_dtype.py). Runs
    first: it finds each adapter's base product, which the rewrite replaces."""
    if ctx.lora_dtype == "model":
        ctx.report.lora_in_model_dtype = lora_products_in_model_dtype(gm)
    else:
        ctx.report.fp32_adapters = lora_products_in_model_dtype(gm, rewrite=False)
    return gm


def find_blocks(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Linear sites grouped into MLP and attention blocks; in a regional graph, named by
    the layer it was traced on."""
    report = ctx.report
    for scope in list(scopes(gm)):
        grouping = group_blocks(find_sites(scope))
        report.found += grouping.blocks
        report.skipped += grouping.skipped
    if ctx.layer is not None:
        _place_in_layer(report, ctx.layer[0], ctx.layer[1])
    return gm


def plan(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    num_layers = ctx.layer[2] if ctx.layer is not None else None
    ctx.report.planned, skipped = plan_blocks(ctx.report.found, ctx.policy, num_layers, ctx.limits)
    ctx.report.skipped += skipped
    return gm


def rewrite_blocks(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Each planned block's base products -> the runtime's sparse ops."""
    report = ctx.report
    if not (ctx.rewrite and report.planned):
        return gm
    rw = Rewriter(gm, ctx.run_handle, name_root=ctx.layer[0] if ctx.layer else None)
    # graph order, so nodes shared by the blocks of one graph are defined before use
    pos = {n: i for sc in scopes(gm) for i, n in enumerate(sc.gm.graph.nodes)}
    for pb in sorted(report.planned, key=lambda p: min(pos[s.base] for s in p.block.sites.values())):
        rw.rewrite(pb)
    for scope in scopes(gm):
        scope.gm.graph.lint()
        scope.gm.recompile()
    report.factor_requests = rw.factor_requests
    return gm


def share_lora_a(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """lora_A products of adapters reading one input as one GEMM (shared_input_lora.py).
    Last: the passes above read the per-adapter products."""
    ctx.report.shared_lora_a = fuse_shared_input_lora_a(gm)
    return gm


PASSES = (cast_lora_products, find_blocks, plan, rewrite_blocks, share_lora_a)
ANALYSIS = (find_blocks, plan)  # what explain() runs: no rewrite


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes=PASSES) -> PassReport:
    for p in passes:
        gm = p(gm, ctx)
    return ctx.report


def _place_in_layer(report: PassReport, root: str, index: int) -> None:
    for block in report.found:
        block.name, block.layer = f"{root}.{block.name}", index
        for site in block.sites.values():
            site.path = f"{root}.{site.path}"
    for sk in report.skipped:
        sk.where = f"{root}.{sk.where}"
