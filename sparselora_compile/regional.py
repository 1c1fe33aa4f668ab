"""Regional compilation: compile one decoder layer and reuse it for every layer that the
policy treats alike, so the first step of a 32-layer model pays a few layer compiles, not
one 32-layer graph.

Dynamo keeps one cache entry per backend object on the layer's (shared) code, and with
`inline_inbuilt_nn_modules` the layer's parameters are graph inputs, so a compiled layer
runs any layer of the same structure. Layers are grouped by their plan signature
(regions.py); each group gets its own backend object, so a per-layer policy costs one
compile per distinct signature.
"""
from __future__ import annotations

import functools
import logging

import torch

from sparselora_compile.passes.blocks import decoder_layers

from .backend import BackendOptions, ddp_optimizer_active, sparselora_backend
from .dynamic_dims import mark_call_inputs
from .regions import Region, layer_signature

log = logging.getLogger("sparselora_compile")


def compile_layers(model: torch.nn.Module, opts: BackendOptions, options: dict,
                   dynamic: bool = True) -> list:
    """Compile every decoder layer of `model` in place, one backend per plan signature,
    all sharing `opts.run`. Returns the layers (for `uncompile_layers`)."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("sparselora: regional=True, but the model has no stack of identical "
                         "decoder layers (an nn.ModuleList); use regional=False")
    n, policy, run = len(layers), opts.policy, opts.run
    policy.check_layers(range(n))
    groups: dict[tuple, dict] = {}
    for i, (prefix, layer) in enumerate(layers):
        groups.setdefault(layer_signature(layer, prefix, i, n, policy, opts.limits), {})[prefix] = i
    backends = {sig: functools.partial(sparselora_backend,
                                       options={**options, "policy": policy, "run": run,
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
                                                    prefix, run, dynamic)
    return list(by_prefix.values())


def compile_loss(model: torch.nn.Module, inner: str, dynamic: bool = True):
    """Compile the eager tail's loss (HF's `loss_function`: fp32 upcast of the logits, then
    cross-entropy) with the inner compiler, so that, as in a whole-model Inductor graph,
    the fp32 logits are not materialised. Returns the undo and {id(compiled): plain}, what
    a deep copy of the model takes instead of the compiled loss (copying.py)."""
    base = hf_base(model)
    prop = getattr(type(base), "loss_function", None)
    if inner == "eager" or not isinstance(prop, property) or prop.fset is None:
        return (lambda: None), {}
    plain = base.loss_function
    # Default Inductor settings, not `inductor_config`: the loss runs once per step, so host
    # settings gain nothing here.
    compiled = torch.compile(plain, backend=inner)

    def loss(*args, **kwargs):
        if dynamic:
            mark_call_inputs(args, kwargs, "logits")  # one compile for every length (dynamic_dims.py)
        return compiled(*args, **kwargs)
    return replace_loss_function(base, loss), {id(loss): plain}


def hf_base(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def replace_loss_function(base: torch.nn.Module, fn):
    """Set transformers' `loss_function` of `base` to `fn`; returns the undo."""
    before = base.__dict__.get("_loss_function")
    base.loss_function = fn

    def undo():
        if before is None:
            base.__dict__.pop("_loss_function", None)
        else:
            base._loss_function = before
    return undo


def _layer_call(compiled, prefix: str, run, dynamic: bool = True):
    def call(*args, **kwargs):
        if dynamic:
            mark_call_inputs(args, kwargs, "hidden_states")  # one compile for every length (dynamic_dims.py)
        outer, run.layer_prefix = run.layer_prefix, prefix
        try:
            if ddp_optimizer_active():
                with torch._dynamo.config.patch(optimize_ddp=False):
                    return compiled(*args, **kwargs)
            return compiled(*args, **kwargs)
        finally:
            run.layer_prefix = outer
    return call


def uncompile_layers(layers) -> None:
    for layer in layers:
        layer._compiled_call_impl = None
