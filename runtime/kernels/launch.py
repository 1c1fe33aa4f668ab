"""Launching our Triton kernels with less host time.

`kernel[grid](...)` runs Triton's per-call Python each time: the autotuner's key (dicts
over every argument), the heuristics, the JIT's binder and cache key (a `str` of its
options) and launch bookkeeping. On an H200 host (bench/results/launch_overhead.json) a
call cost 88 us through our autotuned GEMM and 28 us through the plain SwiGLU kernel,
against 9 us for the compiled kernel's own launcher; the sparse step makes hundreds of
these launches and is bound by the host on slower machines.

`launch(kernel, grid, *args, **constexprs)` makes the first call of each specialization
the normal way (compile, autotune), keeps the compiled kernel with its constexprs (the
autotuner's choice and the heuristics' values included), and afterwards calls the
kernel's launcher directly. Its cache key holds more than Triton specializes on, so a hit
always finds a kernel compiled for such arguments: each tensor's dtype and 16-byte
alignment, each integer's `== 1`, `% 16 == 0` and 32-bit range, the values of the
autotuner's key arguments, and every other argument's value. The normal path runs under
the interpreter, with Triton's launch hooks or debug mode on, and for kernels whose
shape this does not know (autotuner hooks, constexprs before runtime arguments).

Off by default until a GPU run has checked it (see ENABLED).
"""
from __future__ import annotations

import os

import torch
import triton
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

# Opt in with SPARSELORA_DIRECT_LAUNCH=1 (tests and the bench's A/B set this flag): the
# direct launch has not yet been checked on a GPU against Triton's path (session 6's GPU
# run found it never engaged on Triton 3.6, whose launch hooks are an empty HookChain, not
# None; fixed since, not yet re-run). Needs Triton's knobs (3.4 and later).
ENABLED = hasattr(triton, "knobs") and os.environ.get("SPARSELORA_DIRECT_LAUNCH", "0") == "1"
_ENTRIES: dict = {}
_KERNELS: dict = {}
_NORMAL = object()  # an entry that always takes the normal path


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        return a == 1, a % 16 == 0, -2**31 <= a < 2**31
    return a


def _kernel_info(kernel):
    """(JITFunction, autotuner, heuristics, positions of the autotuner's key arguments), or
    None for a kernel this cannot launch itself."""
    info = _KERNELS.get(kernel)
    if info is None:
        info = _KERNELS[kernel] = _unwrap(kernel) or _NORMAL
    return info


def _unwrap(kernel):
    autotuner = heuristics = None
    fn = kernel
    while not isinstance(fn, JITFunction):
        if isinstance(fn, Autotuner) and autotuner is None and heuristics is None:
            if (fn.reset_to_zero or fn.restore_value or getattr(fn, "user_defined_pre_hook", False)
                    or getattr(fn, "user_defined_post_hook", False)
                    or any(c.pre_hook is not None for c in fn.configs)):
                return None
            autotuner = fn
        elif isinstance(fn, Heuristics) and heuristics is None:
            heuristics = fn
        else:
            return None
        fn = fn.fn
    names = list(fn.arg_names)
    tune = tuple(names.index(k) for k in autotuner.keys) if autotuner is not None else ()
    return fn, autotuner, heuristics, tune


def _hook_set(hook) -> bool:
    # None (older Triton) or a HookChain (3.6: always there, `calls` empty unless someone adds one)
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_or_debug() -> bool:
    rt = triton.knobs.runtime
    return _hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook) or bool(rt.debug)


def launch(kernel, grid, *args, **constexprs):
    """`kernel[grid](*args, **constexprs)` with the runtime arguments positional and the
    constexprs by name, as every launch in this package is written."""
    info = _kernel_info(kernel) if ENABLED else _NORMAL
    if info is _NORMAL or _hooks_or_debug():
        return kernel[grid](*args, **constexprs)
    tune = info[3]
    device = torch.cuda.current_device()
    key = (kernel, device, *map(_arg_key, args), *constexprs.values(), *(args[i] for i in tune if i < len(args)))
    entry = _ENTRIES.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs)
        _ENTRIES[key] = _make_entry(info, compiled, args, constexprs)
        return compiled
    if entry is _NORMAL:
        return kernel[grid](*args, **constexprs)
    run, function, packed, tail, meta = entry
    g = grid(meta) if callable(grid) else grid
    stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's own launch reads
    run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, function, packed,
        None, None, None, *args, *tail)
    return None


def _make_entry(info, compiled, args, constexprs):
    jit, autotuner, heuristics, _ = info
    names = list(jit.arg_names)
    n = len(args)
    params = jit.params
    if any(p.is_constexpr for p in params[:n]) or not all(p.is_constexpr for p in params[n:]):
        return _NORMAL
    meta = dict(zip(names, args))
    meta.update(constexprs)
    if autotuner is not None:
        meta.update(autotuner.best_config.kwargs)
    if heuristics is not None:
        for name, rule in heuristics.values.items():
            meta[name] = rule(meta)
    if hasattr(compiled, "result"):  # compiled asynchronously
        compiled = compiled.result()
    try:
        tail = [meta[name] if name in meta else params[i].default
                for i, name in enumerate(names[n:], start=n)]
        return compiled.run, compiled.function, compiled.packed_metadata, tail, meta
    except (AttributeError, KeyError):  # another Triton's internals: stay on the normal path
        return _NORMAL


def clear() -> None:
    _ENTRIES.clear()
