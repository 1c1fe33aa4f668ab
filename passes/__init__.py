"""FX graph passes: find linear sites, group them into blocks, plan with the policy,
rewrite. `run_passes` is the whole pipeline for one Dynamo graph."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .find_sites import Site, find_sites
from .graphs import scopes
from .group_blocks import Block, Skipped, group_blocks
from .plan import PlannedBlock, plan_blocks
from .rewrite import Rewriter


@dataclass
class PassReport:
    found: list[Block] = field(default_factory=list)
    planned: list[PlannedBlock] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    extra_inputs: list = field(default_factory=list)
    factor_slots: list = field(default_factory=list)
    factor_requests: list = field(default_factory=list)

    @property
    def min_layer(self):
        layers = [p.block.layer for p in self.planned if p.block.layer is not None]
        return min(layers) if layers else None

    def flops_saved_estimate(self) -> float:
        """Fraction of the found blocks' base FLOPs removed, if every token were context."""
        dense = sparse = 0
        for pb in self.planned:
            d, s = pb.base_flops_per_token()
            dense, sparse = dense + d, sparse + s
        total = dense + sum(_dense_flops(b) for b in self.found if all(p.block is not b for p in self.planned))
        return 0.0 if total == 0 else (dense - sparse) / total


def _dense_flops(block: Block) -> int:
    return sum(2 * s.in_features * s.out_features for s in block.sites.values())


def run_passes(gm: fx.GraphModule, example_inputs, policy, state_id: int, factor_fn,
               rewrite: bool = True, layer=None) -> PassReport:
    """`layer`: (module path, index, number of layers) when `gm` is one decoder layer's
    graph (regional compilation): its module paths are relative to that layer."""
    report = PassReport()
    for scope in list(scopes(gm)):
        grouping = group_blocks(find_sites(scope))
        report.found += grouping.blocks
        report.skipped += grouping.skipped
    root = None
    if layer is not None:
        root, index, num_layers = layer
        _place_in_layer(report, root, index)
        report.planned, skipped = plan_blocks(report.found, policy, num_layers)
    else:
        report.planned, skipped = plan_blocks(report.found, policy)
    report.skipped += skipped
    if rewrite and report.planned:
        rw = Rewriter(gm, example_inputs, state_id, factor_fn, name_root=root)
        # graph order, so nodes shared by the blocks of one graph are defined before use
        pos = {n: i for sc in scopes(gm) for i, n in enumerate(sc.gm.graph.nodes)}
        for pb in sorted(report.planned, key=lambda p: min(pos[s.base] for s in p.block.sites.values())):
            rw.rewrite(pb)
        for scope in scopes(gm):
            scope.gm.graph.lint()
            scope.gm.recompile()
        report.extra_inputs = rw.extra_inputs
        report.factor_slots = rw.factor_slots
        report.factor_requests = rw.factor_requests
    return report


def _place_in_layer(report: PassReport, root: str, index: int) -> None:
    for block in report.found:
        block.name, block.layer = f"{root}.{block.name}", index
        for site in block.sites.values():
            site.path = f"{root}.{site.path}"
    for sk in report.skipped:
        sk.where = f"{root}.{sk.where}"
