"""One compiled graph serving many decoder layers (regional compilation's graph side).

Layers are grouped by their *plan signature*: each block's kind, shape and kept-channel
count k. It is read from the modules before compiling (`layer_signature`) and checked
against what the graph passes found (`report_signature`). What differs between the
layers of a group is supplied at run time: the block names (the select ops prefix the
running layer's path, `Run.layer_prefix`), the estimator factors (`LayerInputs`, from each
layer's own weights) and the token split (made once per forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sparselora_compile.passes.blocks import module_blocks
from sparselora_compile.passes.plan import Limits, decide

from .factors import FactorInputs, factor_inputs


@dataclass(frozen=True)
class Region:
    """What one group's backend needs: its layers (module path -> index), the model's
    layer count, and the plan signature every layer of the group shares."""
    layers: dict
    num_layers: int
    signature: tuple

    def __hash__(self):
        return hash(self.signature)


def _entry(rel, info, k):
    return (rel, info.kind, info.in_features, info.channels, k)


def layer_signature(layer, prefix, index, num_layers, policy, limits: Limits) -> tuple:
    sig = []
    cuda = next(layer.parameters()).is_cuda
    for mb in module_blocks(layer, prefix, index, num_layers):
        _, k, _ = decide(mb.info, policy, () if mb.frozen else ("base weights",), cuda=cuda,
                         limits=limits)
        if k is not None:
            policy.check_rank([mb.info])  # at compile time, as plan_blocks does in the graph
        sig.append(_entry(mb.rel, mb.info, k))
    return tuple(sorted(sig, key=repr))


def report_signature(report, root: str) -> tuple:
    """The same signature, from what the graph passes found and planned."""
    planned = {id(p.block): p for p in report.planned}
    sig = []
    for b in report.found:
        p = planned.get(id(b))
        sig.append(_entry(b.name[len(root) + 1:], p.info if p else b.info(None), p.k if p else None))
    return tuple(sorted(sig, key=repr))


def without_skipped(signature: tuple, report, root: str) -> tuple:
    """`signature` less the blocks the graph passes found in the modules' places but left
    dense with a reason (a layout they do not rewrite, e.g. GPT-BigCode's per-head q/k/v):
    the layers of a group run the same code, so each layer leaves them dense alike."""
    skipped = {s.where[len(root) + 1:] for s in report.skipped if s.where.startswith(root + ".")}
    found = {b.name[len(root) + 1:] for b in report.found}
    return tuple(e for e in signature if e[0] in found or e[0] not in skipped)


@dataclass
class LayerInputs:
    """The factor inputs of each layer that runs one compiled graph, made on the layer's
    first call from its own weights (the graph inputs `FactorRequest.weight_input`)."""
    requests: list
    root: str               # the layer the graph was compiled on
    root_inputs: FactorInputs
    factor_fn: object
    table: dict = field(default_factory=dict)

    def __post_init__(self):
        self.table[self.root] = self.root_inputs

    def get(self, prefix: str, args) -> FactorInputs:
        entry = self.table.get(prefix)
        if entry is None:
            entry = self.table[prefix] = self._build(prefix, args)
        return entry

    def _build(self, prefix, args) -> FactorInputs:
        for req in self.requests:
            if req.weight_input is None:
                raise RuntimeError(
                    f"sparselora: regional compilation needs the weight of {req.path} as a graph "
                    "input (torch._dynamo.config.inline_inbuilt_nn_modules=True)")
        n = len(self.root)
        return factor_inputs(self.requests, [args[r.weight_input] for r in self.requests],
                             self.factor_fn, rename=lambda p: prefix + p[n:])
