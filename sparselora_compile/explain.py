"""`explain(model, *args, policy=..., **kwargs)`: what the backend would do, as a table."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparselora_compile.passes import ANALYSIS, PassContext, run_passes
from sparselora_compile.passes.graphs import example_value

from .backend import BackendOptions
from .policy import Policy


@dataclass
class Explanation:
    blocks: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    graphs: int = 0

    @property
    def flops_saved(self) -> float:
        dense = sum(b["dense_flops"] for b in self.blocks)
        sparse = sum(b["sparse_flops"] for b in self.blocks)
        return 0.0 if dense == 0 else 1 - sparse / dense

    def __str__(self) -> str:
        head = f"{'block':<44} {'layer':>5} {'kind':<9} {'sparsity':>8} {'k':>6} {'of':>6} {'dense GFLOP':>11} {'sparse GFLOP':>12}"
        lines = [head, "-" * len(head)]
        for b in self.blocks:
            lines.append(f"{b['block'][-44:]:<44} {str(b['layer']):>5} {b['kind']:<9} {b['sparsity']:>8.3f} "
                         f"{b['k']:>6} {b['channels']:>6} {b['dense_flops'] / 1e9:>11.4f} {b['sparse_flops'] / 1e9:>12.4f}")
        lines.append(f"{self.graphs} graph(s); base FLOPs of the blocks saved on context tokens: "
                     f"{100 * self.flops_saved:.1f}%")
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  {s['where']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def explain(model: torch.nn.Module, *args, policy: Policy | None = None, verbose: bool = True,
            options: dict | None = None, **kwargs) -> Explanation:
    """Trace `model(*args, **kwargs)` with Dynamo, find and plan the blocks under `policy`
    and the backend `options` (no rewrite, the model runs eagerly), print and return the
    table. FLOPs are per call, counting every token as a context token. Blocks the
    backend keeps dense against the policy (its `min_*` options) are listed with why."""
    opts = BackendOptions.parse({**(options or {}), "policy": policy})
    result = Explanation()

    def capture(gm, example_inputs):
        ctx = PassContext(opts.policy, rewrite=False, limits=opts.limits)
        report = run_passes(gm, ctx, ANALYSIS)
        result.graphs += 1
        tokens = _tokens(report)
        planned = {id(p.block): p for p in report.planned}
        for blk in report.found:
            pb = planned.get(id(blk))
            dense = blk.dense_flops_per_token() * tokens.get(id(blk), 1)
            row = dict(block=blk.name, layer=blk.layer, kind=blk.kind, channels=blk.channels,
                       sparsity=pb.sparsity if pb else 0.0, k=pb.k if pb else blk.channels,
                       dense_flops=dense, sparse_flops=dense)
            if pb:
                d, s = pb.base_flops_per_token()
                row["sparse_flops"] = dense * s // d
            result.blocks.append(row)
        result.skipped += [dict(where=s.where, reason=s.reason) for s in report.skipped]
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=capture)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    result.blocks.sort(key=lambda b: (b["layer"] if b["layer"] is not None else -1, b["kind"]))
    if verbose:
        print(result)
    return result


def _tokens(report) -> dict:
    """Rows (tokens) through each block in the traced call."""
    out = {}
    for b in report.found:
        v = example_value(next(iter(b.sites.values())).base)
        out[id(b)] = math.prod(v.shape[:-1]) if v is not None else 1
    return out
