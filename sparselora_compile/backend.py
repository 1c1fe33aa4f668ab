"""The `sparselora` torch.compile backend.

Dynamo hands us a torch-level FX graph; the passes (`passes.PASSES`) rewrite the
recognised LoRA blocks into the runtime's custom ops, this module makes the estimator
factors the rewritten graph takes as inputs, and the result goes to Inductor (or
`aot_eager` / `eager` for fast debugging). Unknown graphs compile exactly as under the
inner backend.

Every graph of one compiled model shares one `Run` (the step, statistics, token split):
`slc.compile` makes it and passes it in `options["run"]`; under
`torch.compile(model, backend="sparselora", options={...})` the first graph makes it and
keeps it in that options dict, where `slc.run_of(compiled)` finds it.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, fields

import torch

from sparselora_compile.passes import PassContext, run_passes
from sparselora_compile.passes.graphs import resolve_real
from sparselora_compile.passes.plan import Limits
from sparselora_compile.runtime.run import Run
from sparselora_compile.runtime.sparse_mlp import ALL_ROWS_MAX_K

from . import presets
from .factors import FactorInputs, factor_inputs, factor_provider
from .policy import Policy
from .regions import LayerInputs, report_signature, without_skipped

log = logging.getLogger("sparselora_compile")
INNER = ("inductor", "aot_eager", "eager")
LORA_DTYPES = ("adapter", "model")


@dataclass
class BackendOptions:
    """The backend's options (`torch.compile(..., options={...})` or `slc.compile(**options)`).

    policy: a Policy, a dict of its fields, a preset name or a YAML path (None: presets.default()).
    inner: the compiler of the rewritten graph.
    record: keep each block's last selection (for equivalence tests).
    cache_dir: the estimator factor cache (None: ~/.cache/sparselora_compile/factors).
    lora_dtype: "adapter" runs LoRA products in the adapters' dtype, as PEFT does (fp32
        adapters on a bf16 model: fp32 GEMMs); "model" in the base layer's dtype, adapters
        kept fp32 (passes/lora_dtype.py): a numerics change, like autocast, so opt-in.
    inductor_config: Inductor settings for the graphs this backend compiles (regionally:
        the layers'), e.g. {"size_asserts": False}.
    moments: input second moments for estimator="activation_aware" (`collect_moments`);
        without them the dense warm-up collects them.
    min_sparsity, min_attention_sparsity_cuda: where a block stays dense although the
        policy asks for sparsity (`passes.plan.Limits` says why); explain() reports them.
    mlp_all_rows_max_k: below this many kept channels the sparse MLP runs its context part
        on every row (runtime/sparse_mlp.py says why); a layout choice, same values.
    run: the Run every graph of this model shares (see the module doc).
    """

    policy: Policy | None = None
    inner: str = "inductor"
    record: bool = False
    cache_dir: str | None = None
    verbose: bool = True
    lora_dtype: str = "adapter"
    inductor_config: dict | None = None
    moments: dict | None = None
    min_sparsity: float = Limits.min_sparsity
    min_attention_sparsity_cuda: float = Limits.min_attention_sparsity_cuda
    mlp_all_rows_max_k: int = ALL_ROWS_MAX_K
    run: Run | None = None
    region: object = None   # regional.Region: set by `compile(model, regional=True)`

    @classmethod
    def parse(cls, options) -> "BackendOptions":
        options = dict(options or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"sparselora: unknown option(s) {unknown}; valid options: {sorted(names)}")
        opts = cls(**options)
        opts.policy = as_policy(opts.policy)
        if opts.inner not in INNER:
            raise ValueError(f"sparselora: options['inner']={opts.inner!r}; expected one of {INNER}")
        if opts.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"sparselora: options['lora_dtype']={opts.lora_dtype!r}; expected one of "
                             f"{LORA_DTYPES}")
        for name in ("min_sparsity", "min_attention_sparsity_cuda"):
            v = getattr(opts, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"sparselora: options[{name!r}]={v!r} is outside [0, 1]")
        if not isinstance(opts.mlp_all_rows_max_k, int) or opts.mlp_all_rows_max_k < 0:
            raise ValueError(f"sparselora: options['mlp_all_rows_max_k']={opts.mlp_all_rows_max_k!r} "
                             "must be an int >= 0")
        if opts.run is not None and not isinstance(opts.run, Run):
            raise TypeError(f"sparselora: options['run'] must be a Run, got {type(opts.run).__name__}")
        _check_inductor_config(opts)
        return opts

    @property
    def limits(self) -> Limits:
        return Limits(self.min_sparsity, self.min_attention_sparsity_cuda)


def as_policy(policy) -> Policy:
    """A Policy from what the options may hold (None: the default preset, a fresh one)."""
    if policy is None:
        return presets.default()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    if isinstance(policy, str):
        if policy in presets.PRESETS:
            return presets.PRESETS[policy]()
        if policy.endswith((".yaml", ".yml")):
            return Policy.from_yaml(policy)
        raise ValueError(f"sparselora: policy {policy!r} is neither a preset {sorted(presets.PRESETS)} "
                         "nor a YAML file")
    raise TypeError(f"sparselora: options['policy'] must be a Policy, dict, preset name or "
                    f"YAML path, got {type(policy).__name__}")


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


def new_run(opts: BackendOptions) -> Run:
    """The run of one compiled model, set up from its options and policy."""
    policy = opts.policy
    run = Run(warmup_steps=policy.warmup(), dense_output_tokens=policy.dense_output_tokens,
              mlp_all_rows_max_k=opts.mlp_all_rows_max_k)
    run.collect_moments = policy.estimator == "activation_aware" and not opts.moments
    run.zero_residuals = policy.estimator == "svd"
    if run.collect_moments and policy.warmup() == 0:
        log.warning("sparselora: estimator='activation_aware' without moments needs a dense "
                    "warm-up to collect them; using plain SVD factors")
        run.collect_moments = False
    if opts.record:
        run.record = {}
    return run


def _run_of_options(options, opts: BackendOptions) -> Run:
    if opts.run is not None:
        return opts.run
    run = new_run(opts)
    if isinstance(options, dict):
        options["run"] = run  # every later graph of this compiled model finds it here
    else:
        log.warning("sparselora: compiled without options, so each graph keeps its own step "
                    "count and statistics; pass options={'policy': ...} or use slc.compile")
    return run


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
    from . import inductor_choices
    patches = inductor_choices.config_patches(_with_cpp_wrapper_settings(inductor_config))
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inductor_choices.compile_inner,
                          config_patches=patches)


# What Inductor itself patches in while it compiles with cpp_wrapper (compile_fx's
# get_cpp_wrapper_config). torch 2.11 applies that only around the forward: the backward,
# compiled later, gets cpp_wrapper without store_cubin and fails with "CudaKernelParamCache
# not populated" (torch 2.13 patches the backward too). Compile-time autotuning, not
# torch 2.11's default of running each new graph once on inputs made from its fake
# tensors, which our data-dependent ops cannot take.
CPP_WRAPPER_SETTINGS = {"triton.store_cubin": True, "triton.autotune_at_compile_time": True,
                        "triton.autotune_cublasLt": False}


def _with_cpp_wrapper_settings(inductor_config):
    """`inductor_config` plus CPP_WRAPPER_SETTINGS when it turns cpp_wrapper on (the
    caller's own values win): they then reach the backward's compile too."""
    if not inductor_config or not inductor_config.get("cpp_wrapper"):
        return inductor_config
    return {**CPP_WRAPPER_SETTINGS, **inductor_config}


def sparselora_backend(gm: torch.fx.GraphModule, example_inputs, options=None):
    opts = BackendOptions.parse(options)
    policy = opts.policy
    if opts.region is None and _could_be_sparse(policy) and _ddp_optimizer_piece():
        raise RuntimeError(DDP_SPLIT_MESSAGE)
    run = _run_of_options(options, opts)
    layer = _running_layer(opts.region, run)
    rewrite = torch.is_grad_enabled() or not policy.dense_eval
    original, gm = gm, copy_graph_module(gm)  # Dynamo keeps using its own graph
    ctx = PassContext(policy, run_handle=run.handle, rewrite=rewrite, lora_dtype=opts.lora_dtype,
                      limits=opts.limits, layer=layer)
    report = run_passes(gm, ctx)
    if layer is not None:
        _check_region(opts.region, report, layer[0])
    if opts.verbose:
        _log_report(opts, report, rewrite, run)
    if not report.factor_requests:
        return _inner_compile(opts.inner, gm if report.changed else original, example_inputs,
                              opts.inductor_config)

    weights = [_real_weight(req, example_inputs) for req in report.factor_requests]
    factor_fn = factor_provider(policy, opts.moments, opts.cache_dir)
    factors = factor_inputs(report.factor_requests, weights, factor_fn)
    _set_example_values(report.factor_requests, factors.inputs)
    compiled = _inner_compile(opts.inner, gm, [*example_inputs, *factors.inputs], opts.inductor_config)
    if layer is not None:
        return _regional_runner(compiled, report, layer[0], factors, factor_fn, run, opts)
    # One training step per forward: the graph holding the first sparse layer counts it
    # (without layer indices: the graph of the first block compiled; a recompile of a
    # graph for new shapes holds the same blocks, so it counts in its place).
    counter = report.min_layer if report.min_layer is not None else report.rewritten[0].block.name
    if run.first_layer is None or (isinstance(counter, int) and (
            not isinstance(run.first_layer, int) or counter < run.first_layer)):
        run.first_layer = counter

    def call(*args):
        # not a checkpointed layer recomputed inside a backward
        if (torch.is_grad_enabled() and run.first_layer == counter
                and torch._C._current_graph_task_id() == -1):
            run.begin_forward()
        factors.refresh_if_due(run, opts.cache_dir)
        return compiled(*args, *factors.inputs)

    call._sparselora_report, call._sparselora_factors = report, factors
    return call


DDP_SPLIT_MESSAGE = (
    "sparselora: Dynamo's DDP optimizer split this model's graph into DDP-bucket-sized pieces "
    "(torch._dynamo.config.optimize_ddp, on by default under DistributedDataParallel); a piece "
    "holds parts of blocks and not the labels, so the sparse rewrite cannot apply. Either use "
    "slc.compile(model, policy) (regional: each decoder layer is one graph, compiled with the DDP "
    "optimizer off, and DDP still overlaps each layer's all-reduce with the backward of the "
    "layers below), or set torch._dynamo.config.optimize_ddp = False before the first step "
    "(the whole model is then one bucket: gradients are all-reduced after the whole backward, "
    "without overlap)")


def _could_be_sparse(policy: Policy) -> bool:
    return bool(policy.mlp or policy.attention or policy.decide is not None
                or any(policy.sparsity.values()))


def ddp_optimizer_active() -> bool:
    """Whether Dynamo would hand a graph compiled now to its DDP optimizer: inside the
    forward of a DistributedDataParallel module, with `optimize_ddp` in its default mode.

    The DDP optimizer splits a graph into pieces that each hold about one DDP bucket of
    trainable parameters (the first piece 1 MiB, then `bucket_cap_mb`), so that each
    bucket's all-reduce can start while the rest of the backward runs. A decoder layer
    split that way reaches the backend in pieces in which no whole block is left.
    Regional compilation (regional.py) therefore compiles the layers with
    `optimize_ddp=False`: each layer graph is one bucket. The cost is the overlap *inside* one layer's backward; each layer is its own graph, so
    DDP's reducer still starts a layer's all-reduce as soon as that layer's backward has
    made its gradients, overlapping it with the backward of the layers below. With LoRA a
    layer's trainable parameters are a few MiB (LLaMA-3-8B, r=16 on all seven linears:
    5 MiB in fp32), less than one default bucket (25 MiB), though more than the 1 MiB
    the DDP optimizer gives each graph's first piece: that is where a layer was cut.
    """
    from torch._dynamo.utils import get_optimize_ddp_mode
    from torch.nn.parallel import DistributedDataParallel
    return (DistributedDataParallel._get_active_ddp_module() is not None
            and get_optimize_ddp_mode() == "ddp_optimizer")


def _ddp_optimizer_piece() -> bool:
    """Whether Dynamo's DDP optimizer is compiling one piece of a split graph (it calls the
    backend from `SubmodCompiler.compile_submod`; a graph it did not split, one bucket,
    reaches the backend whole, from `DDPOptimizer.compile_fn`)."""
    if not ddp_optimizer_active():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_submod" and code.co_filename.endswith(
                os.path.join("backends", "distributed.py")):
            return True
        frame = frame.f_back
    return False


def _real_weight(req, example_inputs) -> torch.Tensor:
    w = resolve_real(req.weight, req.scope, example_inputs)
    if w is None:
        raise RuntimeError(f"sparselora: cannot find the weight tensor of {req.path}")
    return w


def _set_example_values(requests, tensors) -> None:
    it = iter(tensors)
    for req in requests:
        for top, scoped in zip(req.placeholders, req.scoped):
            t = next(it)
            top.meta["example_value"] = t
            scoped.meta["example_value"] = t


def _log_report(opts, report, rewrite, run) -> None:
    extra = ""
    if report.lora_in_model_dtype:
        extra += f", {report.lora_in_model_dtype} LoRA adapter products in the model's dtype"
    if report.shared_lora_a:
        extra += f", {report.shared_lora_a} lora_A products in shared GEMMs"
    log.info("sparselora: %s%d blocks found, %d rewritten%s, estimated base FLOPs saved %.1f%%%s",
             _region_label(opts.region), len(report.found),
             len(report.rewritten), "" if rewrite else " (no grad: dense)",
             100 * report.flops_saved_estimate() if rewrite else 0.0, extra)
    if report.fp32_adapters and "lora_dtype" not in run.said:
        # fp32 adapters on a bf16 model make every LoRA product an fp32 GEMM
        run.said.add("lora_dtype")
        log.info("sparselora: the LoRA adapters are fp32 on a lower-precision model, so their "
                 "products run in fp32; options lora_dtype='model' computes them in the model's "
                 "dtype (adapters and optimizer stay fp32)")


# ---- regional compilation (see regional.py): one graph, many layers ----------------------

def _running_layer(region, run):
    if region is None:
        return None
    prefix = run.layer_prefix
    if prefix not in region.layers:
        raise RuntimeError(f"sparselora: a regional graph was compiled for layer {prefix!r}, "
                           f"which is not one of its group {sorted(region.layers)}")
    return prefix, region.layers[prefix], region.num_layers


def _check_region(region, report, root) -> None:
    found = report_signature(report, root)
    if found != without_skipped(region.signature, report, root):
        raise RuntimeError(
            f"sparselora: regional compilation read the plan {region.signature} from the "
            f"modules of {root}, but its graph gives {found}; compile this model with "
            "regional=False")


def _region_label(region) -> str:
    if region is None:
        return ""
    idx = sorted(region.layers.values())
    return f"layers {idx[0]}..{idx[-1]} ({len(idx)} sharing one graph): "


def _regional_runner(compiled, report, root, root_factors: FactorInputs, factor_fn, run, opts):
    layers = LayerInputs(report.factor_requests, root, root_factors, factor_fn)

    def call(*args):
        factors = layers.get(run.layer_prefix, args)
        factors.refresh_if_due(run, opts.cache_dir)
        return compiled(*args, *factors.inputs)

    call._sparselora_report = report
    return call
