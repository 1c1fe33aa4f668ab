"""The `sparselora` torch.compile backend.

Dynamo hands us a torch-level FX graph; `passes` rewrites the recognised LoRA blocks into
the runtime's custom ops, and the result goes to Inductor (or `aot_eager` / `eager` for
fast debugging). Unknown graphs compile exactly as under the inner backend.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, fields

import torch

from . import presets
from .policy import Policy

log = logging.getLogger("sparselora_compile")
INNER = ("inductor", "aot_eager", "eager")
LORA_DTYPES = ("adapter", "model")


@dataclass
class BackendOptions:
    policy: Policy | None = None
    inner: str = "inductor"
    record: bool = False        # keep each block's last selection (for equivalence tests)
    cache_dir: str | None = None  # estimator factor cache; None: the default directory
    verbose: bool = True
    region: object = None       # regional.Region: set by `compile(model, regional=True)`
    # "adapter": LoRA products in the adapters' dtype, as PEFT runs them (fp32 adapters on a
    # bf16 model: fp32 GEMMs). "model": in the base layer's dtype, adapters kept fp32
    # (passes/lora_dtype.py); a numerics change, like autocast, so it is opt-in.
    lora_dtype: str = "adapter"
    # Inductor config for the graphs this backend compiles (with regional=True: the layers',
    # not the loss's), e.g. {"size_asserts": False}: without cuda_graphs the rewritten step
    # is bound by the host, and these settings change how much host work a compiled graph
    # does (cpp_wrapper brings the settings it needs along: CPP_WRAPPER_SETTINGS below).
    inductor_config: dict | None = None

    @classmethod
    def parse(cls, options) -> "BackendOptions":
        options = dict(options or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"sparselora: unknown option(s) {unknown}; valid options: {sorted(names)}")
        opts = cls(**options)
        if isinstance(opts.policy, dict):
            opts.policy = Policy.from_dict(opts.policy)
        elif isinstance(opts.policy, str):
            opts.policy = _named_policy(opts.policy)
        elif opts.policy is not None and not isinstance(opts.policy, Policy):
            raise TypeError(f"sparselora: options['policy'] must be a Policy, dict, preset name or "
                            f"YAML path, got {type(opts.policy).__name__}")
        if opts.inner not in INNER:
            raise ValueError(f"sparselora: options['inner']={opts.inner!r}; expected one of {INNER}")
        if opts.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"sparselora: options['lora_dtype']={opts.lora_dtype!r}; expected one of "
                             f"{LORA_DTYPES}")
        _check_inductor_config(opts)
        return opts


def _check_inductor_config(opts) -> None:
    cfg = opts.inductor_config
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise TypeError(f"sparselora: options['inductor_config'] must be a dict of Inductor config "
                        f"names to values, got {type(cfg).__name__}")
    if cfg and opts.inner != "inductor":
        raise ValueError(f"sparselora: options['inductor_config'] needs inner='inductor', not {opts.inner!r}")
    import torch._inductor.config as inductor_config
    unknown = sorted(k for k in cfg if k not in inductor_config._config)
    if unknown:
        raise ValueError(f"sparselora: options['inductor_config'] names no Inductor setting: {unknown} "
                         "(see torch._inductor.config)")


def _named_policy(name: str) -> Policy:
    if name in presets.PRESETS:
        return presets.PRESETS[name]()
    if name.endswith((".yaml", ".yml")):
        return Policy.from_yaml(name)
    raise ValueError(f"sparselora: policy {name!r} is neither a preset {sorted(presets.PRESETS)} nor a YAML file")


_DEFAULT_POLICY: Policy | None = None


def _default_policy() -> Policy:
    global _DEFAULT_POLICY
    if _DEFAULT_POLICY is None:
        _DEFAULT_POLICY = presets.default()
    return _DEFAULT_POLICY


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    new = copy.deepcopy(gm)
    # fx does not copy Dynamo's per-placeholder source; AOT autograd asks for it.
    for scope_old, scope_new in zip(_all_gms(gm), _all_gms(new)):
        for a, b in zip(scope_old.graph.find_nodes(op="placeholder"),
                        scope_new.graph.find_nodes(op="placeholder")):
            if hasattr(a, "_dynamo_source"):
                b._dynamo_source = a._dynamo_source
    return new


def _all_gms(gm):
    yield gm
    for _, sub in sorted(gm.named_children()):
        if isinstance(sub, torch.fx.GraphModule):
            yield from _all_gms(sub)


def _inner_compile(name, gm, example_inputs, inductor_config=None):
    if name == "eager":
        return gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    # AOT autograd's cache keys on the forward graph; our ops' backward (traced from their
    # Python autograd registration) is not part of the key, so after an upgrade that changes
    # a backward op, a warm cache would replay the old one. Inductor's own FX graph cache
    # still applies to both graphs.
    import torch._functorch.config as functorch_config
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=_with_cpp_wrapper_settings(inductor_config))


# What Inductor itself patches in while it compiles with cpp_wrapper (compile_fx's
# get_cpp_wrapper_config). torch 2.11 applies that only around the forward: the backward,
# compiled later, got cpp_wrapper without store_cubin and failed with "CudaKernelParamCache
# not populated" (bench/README.md, sessions 5-6; torch 2.13 patches the backward too).
# Compile-time autotuning, not torch 2.11's default of running each new graph once on
# inputs made from its fake tensors, which our data-dependent ops cannot take.
CPP_WRAPPER_SETTINGS = {"triton.store_cubin": True, "triton.autotune_at_compile_time": True,
                        "triton.autotune_cublasLt": False}


def _with_cpp_wrapper_settings(inductor_config):
    """`inductor_config` plus CPP_WRAPPER_SETTINGS when it turns cpp_wrapper on (the
    caller's own values win): they then reach the backward's compile too."""
    if not inductor_config or not inductor_config.get("cpp_wrapper"):
        return inductor_config
    return {**CPP_WRAPPER_SETTINGS, **inductor_config}


def sparselora_backend(gm: torch.fx.GraphModule, example_inputs, options=None):
    from sparselora_compile.passes import run_passes
    from sparselora_compile.passes.lora_dtype import lora_products_in_model_dtype
    from sparselora_compile.passes.shared_input_lora import fuse_shared_input_lora_a
    from .factors import FactorInputs, factor_provider

    opts = BackendOptions.parse(options)
    policy = opts.policy or _default_policy()
    policy.validate()
    state = policy.runtime_state()
    state.collect_moments = policy.estimator == "activation_aware" and not policy.moments
    if state.collect_moments and policy.warmup() == 0:
        log.warning("sparselora: estimator='activation_aware' without moments needs a dense "
                    "warm-up to collect them; using plain SVD factors")
        state.collect_moments = False
    if opts.record and state.record is None:
        state.record = {}
    rewrite = torch.is_grad_enabled() or not policy.dense_eval
    lora_in_model_dtype = opts.lora_dtype == "model"
    original = gm
    if rewrite or lora_in_model_dtype:  # Dynamo keeps using its own graph: rewrite a copy
        gm = copy_graph_module(gm)
    factor_fn = factor_provider(policy, opts.cache_dir)
    layer = _running_layer(opts.region, state)
    # before the rewrite: it finds each LoRA layer's base product (and so its dtype)
    lora_cast = lora_products_in_model_dtype(gm) if lora_in_model_dtype else 0
    if not lora_in_model_dtype:
        _hint_lora_dtype(gm)
    report = run_passes(gm, example_inputs, policy, state.state_id, factor_fn,
                        rewrite=rewrite, layer=layer)
    if layer is not None:
        _check_region(opts.region, report, layer[0])
    # last: the passes above read the per-adapter products
    merged = fuse_shared_input_lora_a(gm) if gm is not original else 0
    if opts.verbose:
        log.info("sparselora: %s%d blocks found, %d rewritten%s, estimated base FLOPs saved %.1f%%%s",
                 _region_label(opts.region), len(report.found),
                 len(report.planned) if rewrite else 0, "" if rewrite else " (no grad: dense)",
                 100 * report.flops_saved_estimate() if rewrite else 0.0,
                 (f", {lora_cast} LoRA adapter products in the model's dtype" if lora_in_model_dtype else "")
                 + (f", {merged} lora_A products in shared GEMMs" if merged else ""))
    if not (rewrite and report.planned):
        return _inner_compile(opts.inner, gm if lora_cast or merged else original, example_inputs,
                              opts.inductor_config)

    compiled = _inner_compile(opts.inner, gm, [*example_inputs, *report.extra_inputs],
                              opts.inductor_config)
    if layer is not None:
        return _regional_runner(compiled, report, layer[0], factor_fn, policy, state, opts)
    min_layer = report.min_layer
    if min_layer is not None and (state.first_layer is None or min_layer < state.first_layer):
        state.first_layer = min_layer
    factors = FactorInputs(report.extra_inputs, report.factor_slots)

    def run(*args):
        # One training step per forward: the graph holding the first sparse layer counts.
        if torch.is_grad_enabled() and min_layer == state.first_layer:
            state.begin_forward()
        factors.refresh_if_due(policy, state, opts.cache_dir)
        return compiled(*args, *factors.inputs)

    run._sparselora_report = report
    return run


_HINTED = False


def _hint_lora_dtype(gm) -> None:
    """Once per process: fp32 adapters on a bf16/fp16 model make every LoRA product an fp32
    GEMM; say that `lora_dtype="model"` exists (38 ms of a 256 ms step on an H200)."""
    global _HINTED
    from sparselora_compile.passes.lora_dtype import lora_products_in_model_dtype
    if not _HINTED and lora_products_in_model_dtype(gm, rewrite=False):
        _HINTED = True
        log.info("sparselora: the LoRA adapters are fp32 on a lower-precision model, so their "
                 "products run in fp32; options lora_dtype='model' computes them in the model's "
                 "dtype (adapters and optimizer stay fp32)")


# ---- regional compilation (see regional.py): one graph, many layers ----------------------

def _running_layer(region, state):
    if region is None:
        return None
    prefix = state.layer_prefix
    if prefix not in region.layers:
        raise RuntimeError(f"sparselora: a regional graph was compiled for layer {prefix!r}, "
                           f"which is not one of its group {sorted(region.layers)}")
    return prefix, region.layers[prefix], region.num_layers


def _check_region(region, report, root) -> None:
    from .regional import report_signature
    found = report_signature(report, root)
    if found != region.signature:
        raise RuntimeError(
            f"sparselora: regional compilation read the plan {region.signature} from the "
            f"modules of {root}, but its graph gives {found}; compile this model with "
            "regional=False")


def _region_label(region) -> str:
    if region is None:
        return ""
    idx = sorted(region.layers.values())
    return f"layers {idx[0]}..{idx[-1]} ({len(idx)} sharing one graph): "


def _regional_runner(compiled, report, root, factor_fn, policy, state, opts):
    from .regional import LayerInputs
    layers = LayerInputs(report, root, factor_fn)

    def run(*args):
        factors = layers.get(state.layer_prefix, args)
        factors.refresh_if_due(policy, state, opts.cache_dir)
        return compiled(*args, *factors.inputs)

    run._sparselora_report = report
    return run
