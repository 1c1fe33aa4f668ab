"""How the runtime registers its `torch.ops.sparselora` ops.

The ops are registered with the plain torch.library calls (define, impl, register_fake,
register_autograd), not `torch.library.custom_op`: its per-call Python layers (an autograd
wrapper that redispatches, also for ops without a backward; a Dynamo-disable context; an
output-aliasing check) cost tens of microseconds of host time, and the graph calls these
ops per layer per step. The kernels run eagerly or inside compiled graphs, which Dynamo and
AOT autograd already run with Dynamo off, and no output aliases an input. Ops without a
backward (selections, token split, input gradients) take PyTorch's autograd fallback:
backprop through an input gradient (double backward, unsupported) warns where custom_op
raised.
"""
from __future__ import annotations

import torch

_lib = torch.library.Library("sparselora", "FRAGMENT")
# cudagraph_unsafe: the ops read the run's Python state (token split, step, counters), which
# a replayed CUDA graph would not; Inductor's own CUDA graphs (mode="reduce-overhead") then
# partition the graph around them. Without those graphs Inductor does not partition.
_TAGS = (torch.Tag.pt2_compliant_tag,) + tuple(
    t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def define(fn, kernel):
    """`sparselora::<fn's name>` with the schema of fn's annotations (inferred as custom_op
    does, with its pt2_compliant tag) and `kernel` for every device; returns its OpOverload."""
    name = fn.__name__
    _lib.define(name + torch.library.infer_schema(fn, mutates_args=()), tags=_TAGS)
    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    return getattr(torch.ops.sparselora, name).default


def op(fn):
    """An op with a backward (register_autograd): its autograd layer runs fn below autograd."""
    return define(fn, fn)


def op_no_grad(fn):
    """An op without a backward: PyTorch's autograd fallback calls the kernel with autograd
    on, so the kernel turns it off, as custom_op's autograd layer did (nothing in it may
    record a graph: out= products, moments, recorded selections)."""
    def kernel(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        with torch.no_grad():
            return fn(*args)
    return define(fn, kernel)


def fake(overload):
    """Decorator: the fake (meta) kernel of `overload`."""
    return torch.library.register_fake(overload, lib=_lib)


def data_dependent_size():
    """An unbacked size for a fake output. `new_dynamic_size` refuses unless Dynamo was told
    to capture dynamic-output ops (fullgraph or a global config flag), which does not
    concern an op our pass inserts after Dynamo; create the symbol on the ShapeEnv the way
    torch's own device-mesh op does."""
    from torch.fx.experimental.symbolic_shapes import _constrain_range_for_size
    ctx = torch.library.get_ctx()
    env = ctx._shape_env
    if env is None:
        return ctx.new_dynamic_size()  # raises with torch's own message
    n = env.create_unbacked_symint()
    _constrain_range_for_size(n, min=0)
    return n


def autocast_kernel(overload, device_type):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    exclude = torch._C.DispatchKeySet(key)

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        # `.to` only where the dtype changes (else it returns the tensor, after a dispatch)
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
                else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return overload(*cast)
    return kernel


def register_autocast(overload) -> None:
    """`overload` follows the active autocast dtype on CPU and CUDA, as F.linear does (without
    this rule it would silently run in fp32 under autocast)."""
    name = overload._schema.name.split("::")[1]
    for dev in ("cpu", "cuda"):
        _lib.impl(name, autocast_kernel(overload, dev), "Autocast" + torch._C._dispatch_key_for_device(dev),
                  with_keyset=True)


def register_autograd(overload, backward, setup_context) -> None:
    torch.library.register_autograd(overload, backward, setup_context=setup_context, lib=_lib)
