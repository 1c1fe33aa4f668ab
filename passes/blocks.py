"""What a block is: the one place that says it, for the graph passes, regional
compilation, calibration and explain.

A block is an MLP (gate, up, down; gate_up, down; or fc, proj: `group_mlps` has the
layouts) or a grouped-query attention (q, k, v, o; or one [q | k | v] product and o)
whose frozen base products the method sparsifies together. It is found two ways: in a
Dynamo graph (`group_blocks` builds `Block`s from linear sites) and in the modules
(`module_blocks`, before anything is compiled). Both describe it to a policy as a
`BlockInfo`, name it by the reference's key (`layers.N.mlp`, `layers.N.self_attn`) and
count its FLOPs with `base_flops_per_token`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

KINDS = ("mlp", "attention")
MLP_ROLES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
FUSED_MLP_ROLES = {"gate_up": "gate_up_proj", "down": "down_proj"}   # Phi-3
# Non-gated MLPs by their linears' names: GPT-NeoX (Linear), GPT-2 (Conv1D)
PLAIN_MLP_ROLES = ({"fc": "dense_h_to_4h", "proj": "dense_4h_to_h"}, {"fc": "c_fc", "proj": "c_proj"})
ATTENTION_ROLES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
# One [q | k | v] product: Phi-3, GPT-2, GPT-BigCode (GPT-NeoX's interleaves them per head:
# not listed; where the graph finds another layout behind these names it leaves the block
# dense, and regional compilation drops it from the plan, regions.without_skipped)
FUSED_ATTENTION_ROLES = ({"qkv": "qkv_proj", "o": "o_proj"}, {"qkv": "c_attn", "o": "c_proj"})
# "layers.29.mlp", "layers.29.self_attn": the reference's keys (any prefix is allowed).
BLOCK_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(mlp|self_attn|attention)$")


@dataclass(frozen=True)
class BlockInfo:
    """What a policy sees of one block."""

    name: str            # module path, e.g. "model.layers.3.mlp"
    layer: int | None    # decoder layer index read from the module names
    kind: str            # "mlp" or "attention"
    in_features: int     # hidden size feeding the block
    channels: int        # selectable channels: d_ff (mlp) or n_kv_heads * head_dim (attention)
    num_layers: int | None = None  # decoder layers of the model (or of the graph)
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    gated: bool = True   # mlp: three products per channel (gate, up, down), else two (fc, proj)

    @property
    def key(self) -> str | None:
        return None if self.layer is None else block_key(self.layer, self.kind)


def block_key(layer: int, kind: str) -> str:
    return f"layers.{layer}.{'mlp' if kind == 'mlp' else 'self_attn'}"


def parse_block_key(key: str) -> tuple[int, str]:
    """(layer, kind) of a key; ValueError for anything else."""
    m = BLOCK_KEY.match(key)
    if not m:
        raise ValueError(f"{key!r} is not a block key of the form 'layers.N.mlp' or 'layers.N.self_attn'")
    return int(m.group(1)), ("mlp" if m.group(2) == "mlp" else "attention")


def base_flops_per_token(info: BlockInfo, k: int | None = None) -> tuple[int, int]:
    """(dense, sparse) FLOPs per context token of the block's base products with k kept
    channels (None: dense). MLP: gate, up and down (or fc and proj) at width k. Attention:
    q and o at k * n_rep (the grouped-query map), k and v at k."""
    c = info.channels
    k = c if k is None else k
    if info.kind == "mlp":
        per_channel = 2 * (3 if info.gated else 2) * info.in_features
    else:
        per_channel = 2 * info.in_features * (2 * (info.n_heads // info.n_kv_heads) + 2)
    return per_channel * c, per_channel * k


# ---- from the graph --------------------------------------------------------------------

@dataclass(eq=False)
class Block:
    """A block found in a Dynamo graph: its linear sites (`find_sites.Site`) by role."""

    kind: str
    name: str
    layer: int | None
    sites: dict              # by role; the one reading the block's input first
    h: object = None         # mlp: the node down reads, act(gate) * up or act(fc)
    sdpa: object = None
    heads: tuple[int, int, int] | None = None  # attention: n_heads, n_kv_heads, head_dim
    activation: str = "silu"  # mlp: runtime.selection.ACTIVATIONS name of the gate's (fc's)
    # mlp: "gated", "gated_fused" or "plain" (group_mlps); attention: "attention", or
    # "attention_fused" with one "qkv" site whose rows (start, stop) of q, k, v are `qkv_rows`
    layout: str = "gated"
    qkv_rows: tuple | None = None

    @property
    def scope(self):
        return next(iter(self.sites.values())).scope

    @property
    def channels(self) -> int:
        if self.kind != "mlp":
            return self.heads[1] * self.heads[2]
        first = next(iter(self.sites.values()))
        return first.out_features // 2 if self.layout == "gated_fused" else first.out_features

    def dense_flops_per_token(self) -> int:
        """Every site's base product, dense (LoRA terms not counted)."""
        return sum(2 * s.in_features * s.out_features for s in self.sites.values())

    def info(self, num_layers: int | None) -> BlockInfo:
        first = next(iter(self.sites.values()))
        heads = self.heads or (None, None, None)
        return BlockInfo(name=self.name, layer=self.layer, kind=self.kind,
                         in_features=first.in_features, channels=self.channels,
                         num_layers=num_layers, n_heads=heads[0], n_kv_heads=heads[1],
                         head_dim=heads[2], gated=self.layout != "plain")


@dataclass
class Skipped:
    where: str
    reason: str


@dataclass
class Grouping:
    blocks: list[Block] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def common_prefix(paths) -> str:
    """The module path the blocks' linears share ("model.layers.0.mlp")."""
    out = []
    for cols in zip(*(p.split(".") for p in paths)):
        if len(set(cols)) != 1:
            break
        out.append(cols[0])
    return ".".join(out)


def layer_index(path: str) -> int | None:
    """The last number between dots of a module path ("model.layers.3.mlp" -> 3)."""
    nums = re.findall(r"\.(\d+)(?=\.)", "." + path + ".")
    return int(nums[-1]) if nums else None


# ---- from the modules --------------------------------------------------------------------

@dataclass
class ModuleBlock:
    """A block found in the modules: `rel` is its path inside its decoder layer."""

    rel: str
    info: BlockInfo
    module: torch.nn.Module
    frozen: bool   # every base weight of the block is frozen
    roles: dict = field(default_factory=dict)   # role -> child name, input side first
    layout: str = "gated"                       # as Block.layout

    def linear(self, role: str) -> torch.nn.Module:
        return getattr(self.module, self.roles[role])

    def estimator_weights(self) -> list[torch.Tensor]:
        """The [out, in] weights the estimator scores from: gate and up (the halves of
        gate_up), fc, or q, k and v."""
        if self.layout == "gated_fused":
            return list(out_in_weight(base_layer(self.linear("gate_up"))).chunk(2, 0))
        if self.layout == "attention_fused":
            i = self.info
            n_q, n_kv = i.n_heads * i.head_dim, i.n_kv_heads * i.head_dim
            return list(out_in_weight(base_layer(self.linear("qkv"))).split([n_q, n_kv, n_kv], 0))
        roles = {"gated": ("gate", "up"), "plain": ("fc",)}.get(self.layout, ("q", "k", "v"))
        return [out_in_weight(base_layer(self.linear(r))) for r in roles]


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The longest ModuleList of same-class modules holding linears (the decoder stack)."""
    best: list = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or not len(mod):
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) == 1 and any(isinstance(x, torch.nn.Linear) or type(x).__name__ == "Conv1D"
                                   for x in mod[0].modules()):
            if len(mod) > len(best):
                best = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(mod)]
    return best


def base_layer(linear: torch.nn.Module) -> torch.nn.Module:
    return getattr(linear, "base_layer", linear)  # PEFT's LoRA wrapper keeps it there


def out_in_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight as [out, in]: transformers' Conv1D stores it [in, out]."""
    return linear.weight.t() if type(linear).__name__ == "Conv1D" else linear.weight


def _has(mod, roles) -> bool:
    return all(isinstance(getattr(mod, r, None), torch.nn.Module) for r in roles.values())


def _frozen(mod, roles) -> bool:
    return all(not p.requires_grad for r in roles.values()
               for p in base_layer(getattr(mod, r)).parameters())


def _head_dim(attn: torch.nn.Module) -> int | None:
    cfg = getattr(attn, "config", None)
    hd = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if not hd and cfg is not None and getattr(cfg, "num_attention_heads", None):
        hd = cfg.hidden_size // cfg.num_attention_heads
    return hd


def module_blocks(layer: torch.nn.Module, prefix: str, index: int, num_layers: int) -> list[ModuleBlock]:
    """The MLPs and attentions of one decoder layer, read from module names and weight
    shapes (the graph passes confirm them when they compile the layer)."""
    out = []
    for rel, mod in layer.named_modules():
        name = f"{prefix}.{rel}" if rel else prefix
        mlp = _mlp_layout(mod)
        if mlp is not None:
            layout, roles = mlp
            w = out_in_weight(base_layer(getattr(mod, next(iter(roles.values())))))
            channels = w.shape[0] // 2 if layout == "gated_fused" else w.shape[0]
            info = BlockInfo(name=name, layer=index, kind="mlp", in_features=w.shape[1],
                             channels=channels, num_layers=num_layers, gated=layout != "plain")
            out.append(ModuleBlock(rel, info, mod, _frozen(mod, roles), roles, layout))
        else:
            attention = _attention_block(rel, name, mod, index, num_layers)
            if attention is not None:
                out.append(attention)
    return out


def _attention_block(rel, name, mod, index, num_layers) -> ModuleBlock | None:
    """q, k, v, o; or a [q | k | v] product and o. Not eager attention: no
    scaled_dot_product_attention in its graph, so the graph passes do not rewrite it."""
    if getattr(getattr(mod, "config", None), "_attn_implementation", None) == "eager":
        return None
    fused = next((r for r in FUSED_ATTENTION_ROLES if _has(mod, r)), None)
    roles = ATTENTION_ROLES if _has(mod, ATTENTION_ROLES) else fused
    head_dim = _head_dim(mod) if roles else None
    if not head_dim:
        return None
    o = out_in_weight(base_layer(getattr(mod, roles["o"])))
    if fused is None:
        q, k = (base_layer(getattr(mod, roles[r])).weight for r in ("q", "k"))
        hidden, n_q, n_kv = q.shape[1], q.shape[0], k.shape[0]
    else:
        qkv = out_in_weight(base_layer(getattr(mod, roles["qkv"])))
        hidden, n_q = qkv.shape[1], o.shape[1]
        n_kv = (qkv.shape[0] - n_q) // 2
    info = BlockInfo(name=name, layer=index, kind="attention", in_features=hidden, channels=n_kv,
                     num_layers=num_layers, n_heads=n_q // head_dim, n_kv_heads=n_kv // head_dim,
                     head_dim=head_dim)
    layout = "attention" if fused is None else "attention_fused"
    return ModuleBlock(rel, info, mod, _frozen(mod, roles), roles, layout)


def _mlp_layout(mod) -> tuple[str, dict] | None:
    for layout, roles in (("gated", MLP_ROLES), ("gated_fused", FUSED_MLP_ROLES),
                          *(("plain", r) for r in PLAIN_MLP_ROLES)):
        if _has(mod, roles):
            return layout, roles
    return None


def model_blocks(model: torch.nn.Module) -> list[ModuleBlock]:
    """Every block of every decoder layer of `model`, in layer order."""
    layers = decoder_layers(model)
    return [b for i, (prefix, layer) in enumerate(layers)
            for b in module_blocks(layer, prefix, i, len(layers))]
