"""Regional compilation: compile one decoder layer and reuse it for every layer that the
policy treats alike, so the first step of a 32-layer model pays a few layer compiles, not
one 32-layer graph.

Dynamo keeps one cache entry per backend object on the layer's (shared) code, and with
`inline_inbuilt_nn_modules` the layer's parameters are graph inputs, so a compiled layer
runs any layer of the same structure. Layers are grouped by their *plan signature* (each
block's kind, shape and kept-channel count k, read from the modules before compiling);
each group gets its own backend object, so a per-layer policy costs one compile per
distinct signature. What differs between the layers of a group is supplied at run time:

- the block names (the select ops prefix the running layer's path, `RuntimeState.layer_prefix`,
  set by the eager glue around each layer call);
- the estimator factors, graph inputs looked up per layer from the layer's own weights
  (`LayerInputs`);
- the token split, made once per forward and shared by every layer's graph (`token_rows`).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from sparselora_compile.factors import FactorInputs
from sparselora_compile.passes.plan import block_info, decide
from sparselora_compile.passes.rewrite import FactorSlot
from sparselora_compile.policy import BlockInfo, Policy

log = logging.getLogger("sparselora_compile")
_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Region:
    """What one group's backend needs: its layers (module path -> index), the model's
    layer count, and the plan signature every layer of the group shares."""
    layers: dict
    num_layers: int
    signature: tuple

    def __hash__(self):
        return hash(self.signature)


# ---- finding the layers and their plan before compiling ---------------------------------

def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The longest ModuleList of same-class modules holding linears (the decoder stack)."""
    best: list = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or not len(mod):
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) == 1 and any(isinstance(x, torch.nn.Linear) for x in mod[0].modules()):
            if len(mod) > len(best):
                best = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(mod)]
    return best


def _base(linear: torch.nn.Module) -> torch.nn.Module:
    return getattr(linear, "base_layer", linear)  # PEFT's LoRA wrapper keeps it there


def _frozen(linear) -> bool:
    return all(not p.requires_grad for p in _base(linear).parameters())


def layer_blocks(layer: torch.nn.Module, prefix: str, index: int, num_layers: int):
    """(relative name, BlockInfo, frozen) of each gated MLP and attention in `layer`, read
    from the module names and weight shapes (the graph pass confirms them)."""
    out = []
    for rel, mod in layer.named_modules():
        if all(hasattr(mod, a) for a in _MLP):
            gate = _base(mod.gate_proj).weight
            info = BlockInfo(name=f"{prefix}.{rel}", layer=index, kind="mlp",
                             in_features=gate.shape[1], channels=gate.shape[0], num_layers=num_layers)
            out.append((rel, info, all(_frozen(getattr(mod, a)) for a in _MLP)))
        elif all(hasattr(mod, a) for a in _ATTENTION):
            q, k = _base(mod.q_proj).weight, _base(mod.k_proj).weight
            head_dim = getattr(mod, "head_dim", None)
            if not head_dim:
                continue
            info = BlockInfo(name=f"{prefix}.{rel}", layer=index, kind="attention",
                             in_features=q.shape[1], channels=k.shape[0], num_layers=num_layers,
                             n_heads=q.shape[0] // head_dim, n_kv_heads=k.shape[0] // head_dim,
                             head_dim=head_dim)
            out.append((rel, info, all(_frozen(getattr(mod, a)) for a in _ATTENTION)))
    return out


def _entry(rel, info: BlockInfo, k):
    return (rel, info.kind, info.in_features, info.channels, k)


def layer_signature(layer, prefix, index, num_layers, policy: Policy) -> tuple:
    sig = []
    cuda = next(layer.parameters()).is_cuda
    for rel, info, frozen in layer_blocks(layer, prefix, index, num_layers):
        _, k, _ = decide(info, policy, () if frozen else ("base weights",), cuda=cuda)
        sig.append(_entry(rel, info, k))
    return tuple(sorted(sig, key=repr))


def report_signature(report, root: str) -> tuple:
    """The same signature, from what the graph pass found and planned."""
    planned = {id(p.block): p for p in report.planned}
    sig = []
    for b in report.found:
        p = planned.get(id(b))
        sig.append(_entry(b.name[len(root) + 1:], p.info if p else block_info(b, None),
                          p.k if p else None))
    return tuple(sorted(sig, key=repr))


# ---- per-layer graph inputs ---------------------------------------------------------------

@dataclass
class LayerInputs:
    """The factor inputs of each layer that runs one compiled graph, made on the layer's
    first call from its own weights (the graph input `FactorRequest.weight_input`)."""
    report: object
    root: str               # the layer the graph was compiled on
    factor_fn: object
    table: dict = field(default_factory=dict)

    def __post_init__(self):
        self.table[self.root] = FactorInputs(list(self.report.extra_inputs), list(self.report.factor_slots))

    def get(self, prefix: str, args) -> FactorInputs:
        entry = self.table.get(prefix)
        if entry is None:
            entry = self.table[prefix] = self._build(prefix, args)
        return entry

    def _build(self, prefix, args) -> FactorInputs:
        n = len(self.root)
        inputs, slots = [], []
        for req in self.report.factor_requests:
            if req.weight_input is None:
                raise RuntimeError(
                    f"sparselora: regional compilation needs the weight of {req.path} as a graph "
                    "input (torch._dynamo.config.inline_inbuilt_nn_modules=True)")
            w = args[req.weight_input]
            path, block = prefix + req.path[n:], prefix + req.block[n:]
            a, b, r = self.factor_fn(w, path)
            inputs += [a, b, r] if req.residual else [a, b]
            slots.append(FactorSlot(block, path, w, a, b, r if req.residual else None))
        return FactorInputs(inputs, slots)


# ---- compiling --------------------------------------------------------------------------

def compile_layers(model: torch.nn.Module, policy: Policy, state, options: dict) -> list:
    """Compile every decoder layer of `model` in place, one backend per plan signature.
    Returns the layers (for `uncompile_layers`)."""
    from .backend import BackendOptions, sparselora_backend
    BackendOptions.parse({**options, "policy": policy})  # a bad option fails here, not mid-step
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("sparselora: regional=True, but the model has no stack of identical "
                         "decoder layers (an nn.ModuleList); use regional=False")
    n = len(layers)
    policy.check_layers(range(n))
    groups: dict[tuple, dict] = {}
    for i, (prefix, layer) in enumerate(layers):
        groups.setdefault(layer_signature(layer, prefix, i, n, policy), {})[prefix] = i
    backends = {sig: functools.partial(sparselora_backend,
                                       options={**options, "policy": policy,
                                                "region": Region(members, n, sig)})
                for sig, members in groups.items()}
    limit = 4 * len(groups) + 4  # per group: layer 0's input without grad, eval (no grad)
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    log.info("sparselora: regional compilation, %d layers in %d group(s) of identical plans",
             n, len(groups))
    by_prefix = dict(layers)
    for sig, members in groups.items():
        for prefix in members:
            layer = by_prefix[prefix]
            layer._compiled_call_impl = _layer_call(torch.compile(layer._call_impl, backend=backends[sig]),
                                                    prefix, state)
    return list(by_prefix.values())


def compile_loss(model: torch.nn.Module, inner: str):
    """Compile the eager tail's loss (HF's `loss_function`: fp32 upcast of the logits, then
    cross-entropy) with the inner compiler, so that, as in a whole-model Inductor graph,
    the fp32 logits are not materialised. Returns the undo."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prop = getattr(type(base), "loss_function", None)
    if inner == "eager" or not isinstance(prop, property) or prop.fset is None:
        return lambda: None
    before = base.__dict__.get("_loss_function")
    # Default Inductor settings, not `inductor_config`: the loss runs once per step, so host
    # settings gain nothing here.
    base.loss_function = torch.compile(base.loss_function, backend=inner)

    def undo():
        if before is None:
            base.__dict__.pop("_loss_function", None)
        else:
            base._loss_function = before
    return undo


def _layer_call(compiled, prefix: str, state):
    def call(*args, **kwargs):
        outer, state.layer_prefix = state.layer_prefix, prefix
        try:
            return compiled(*args, **kwargs)
        finally:
            state.layer_prefix = outer
    return call


def uncompile_layers(layers) -> None:
    for layer in layers:
        layer._compiled_call_impl = None
