"""Ask the policy what each block gets; decide k, or why a block stays dense.

The policy is duck-typed (`sparsity_for(info)`, `kept_channels(info, s)`,
`check_layers(found)`, `check_rank(infos)`): the passes read configuration, never the front door's objects.
"""
from __future__ import annotations

from dataclasses import dataclass

from .blocks import Block, BlockInfo, Skipped, base_flops_per_token
from .graphs import example_value


@dataclass(frozen=True)
class Limits:
    """Where the backend keeps a block dense although the policy asks for sparsity; both
    are backend options, and explain() reports each block they keep dense.

    min_sparsity: the estimator of a block costs about 5% of the dense block (H200,
        LLaMA-3-8B MLP: select_mlp 0.19 ms per layer against ~4 ms for the block's forward
        and backward), so below this a block cannot gain.
    min_attention_sparsity_cuda: on CUDA an attention block's row split (row gathers,
        scatters, narrow q/k/v/o GEMMs, the selection) cost 1.47 ms per layer against
        0.93 ms dense at sparsity 0.75 (H200, LLaMA-3-8B shapes); below this sparsity an
        attention block stays dense on CUDA. 0 sparsifies every attention block asked for.
    """

    min_sparsity: float = 0.05
    min_attention_sparsity_cuda: float = 0.8


@dataclass
class PlannedBlock:
    block: Block
    info: BlockInfo
    sparsity: float
    k: int

    def base_flops_per_token(self) -> tuple[int, int]:
        """(dense, sparse) FLOPs per context token of the block's base products."""
        return base_flops_per_token(self.info, self.k)


def decide(info: BlockInfo, policy, thawed=(), cuda: bool = False, limits: Limits = Limits()
           ) -> tuple[float, int | None, str]:
    """(sparsity, k, why): k is None when the block stays dense, with the reason."""
    if thawed:
        return 0.0, None, f"base weight requires grad: {', '.join(thawed)}"
    s = policy.sparsity_for(info)
    if s <= 0:
        return s, None, "policy: dense"
    if s < limits.min_sparsity:
        return s, None, (f"sparsity {s:g} is below min_sparsity={limits.min_sparsity:g}: the "
                         "estimator would cost more than the block saves")
    if cuda and info.kind == "attention" and s < limits.min_attention_sparsity_cuda:
        return s, None, (f"attention sparsity {s:g} is below min_attention_sparsity_cuda="
                         f"{limits.min_attention_sparsity_cuda:g}: on CUDA its row split costs "
                         "more than it saves (set the option to 0 to force it)")
    k = policy.kept_channels(info, s)
    if k >= info.channels:
        return s, None, f"sparsity {s} keeps every channel after rounding"
    return s, k, ""


def plan_blocks(blocks: list[Block], policy, num_layers: int | None = None,
                limits: Limits = Limits()) -> tuple[list[PlannedBlock], list[Skipped]]:
    layers = [b.layer for b in blocks if b.layer is not None]
    if num_layers is None:
        policy.check_layers(layers)
        num_layers = max(layers) + 1 if layers else None
    planned, skipped = [], []
    for block in blocks:
        info = block.info(num_layers)
        thawed = [s.path for s in block.sites.values() if not s.frozen()]
        w = example_value(next(iter(block.sites.values())).weight)
        s, k, why = decide(info, policy, thawed, cuda=w is not None and w.is_cuda, limits=limits)
        if k is None:
            skipped.append(Skipped(block.name, why))
        else:
            planned.append(PlannedBlock(block, info, s, k))
    policy.check_rank([p.info for p in planned])
    return planned, skipped
