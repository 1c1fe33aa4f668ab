"""Ask the policy what each block gets; decide k, or why a block stays dense."""
from __future__ import annotations

from dataclasses import dataclass

from sparselora_compile.policy import BlockInfo, Policy

from .graphs import example_value
from .group_blocks import Block, Skipped

# Below this sparsity a block stays dense: its estimator alone costs about 5% of the dense
# block (H200, LLaMA-3-8B MLP: select_mlp 0.19 ms per layer against ~4 ms for the block's
# forward and backward, bench/results/train_step_32l_bf16.json), so it cannot gain.
MIN_SPARSITY = 0.05

# On CUDA an attention block below this sparsity stays dense: its q/k/v/o split into
# dense and context rows (row gathers, scatters, narrow GEMMs, the selection) costs more
# than the channels it drops. Measured on the H200 at LLaMA-3-8B shapes, 32 layers: the
# Math10K preset (attention 0.75 on 14 layers) took 298 ms per step with sparse attention
# and 205 ms with those blocks dense (Inductor dense: 258 ms), and the per-op device time
# of a sparse attention block was 1.47 ms against 0.93 ms on its dense path
# (bench/results/train_step_32l_presets.json, _regional_v2.json). Set to 0 to force it.
MIN_ATTENTION_SPARSITY_CUDA = 0.8


@dataclass
class PlannedBlock:
    block: Block
    info: BlockInfo
    sparsity: float
    k: int

    def base_flops_per_token(self) -> tuple[int, int]:
        """(dense, sparse) FLOPs per context token of the block's base products."""
        h, c, k = self.info.in_features, self.info.channels, self.k
        if self.block.kind == "mlp":
            return 2 * 3 * h * c, 2 * 3 * h * k
        n_heads, n_kv, _ = self.block.heads
        rep = n_heads // n_kv
        return 2 * h * c * (2 * rep + 2), 2 * h * k * (2 * rep + 2)


def block_info(block: Block, num_layers: int | None) -> BlockInfo:
    first = next(iter(block.sites.values()))
    heads = block.heads or (None, None, None)
    return BlockInfo(name=block.name, layer=block.layer, kind=block.kind,
                     in_features=first.in_features, channels=block.channels,
                     num_layers=num_layers, n_heads=heads[0], n_kv_heads=heads[1],
                     head_dim=heads[2])


def decide(info: BlockInfo, policy: Policy, thawed=(), cuda: bool = False
           ) -> tuple[float, int | None, str]:
    """(sparsity, k, why): k is None when the block stays dense, with the reason."""
    if thawed:
        return 0.0, None, f"base weight requires grad: {', '.join(thawed)}"
    s = policy.sparsity_for(info)
    if s <= 0:
        return s, None, "policy: dense"
    if s < MIN_SPARSITY:
        return s, None, (f"sparsity {s:g} is below {MIN_SPARSITY:g}: the estimator would cost "
                         "more than the block saves")
    if cuda and info.kind == "attention" and s < MIN_ATTENTION_SPARSITY_CUDA:
        return s, None, (f"attention sparsity {s:g} is below {MIN_ATTENTION_SPARSITY_CUDA:g}: on "
                         "CUDA its row split costs more than it saves (passes/plan.py)")
    k = policy.kept_channels(info, s)
    if k >= info.channels:
        return s, None, f"sparsity {s} keeps every channel after rounding"
    return s, k, ""


def plan_blocks(blocks: list[Block], policy: Policy, num_layers: int | None = None
                ) -> tuple[list[PlannedBlock], list[Skipped]]:
    layers = [b.layer for b in blocks if b.layer is not None]
    if num_layers is None:
        policy.check_layers(layers)
        num_layers = max(layers) + 1 if layers else None
    planned, skipped = [], []
    for block in blocks:
        info = block_info(block, num_layers)
        thawed = [s.path for s in block.sites.values() if not s.frozen()]
        w = example_value(next(iter(block.sites.values())).weight)
        s, k, why = decide(info, policy, thawed, cuda=w is not None and w.is_cuda)
        if k is None:
            skipped.append(Skipped(block.name, why))
        else:
            planned.append(PlannedBlock(block, info, s, k))
    return planned, skipped
