"""Launching our Triton kernels with less host time per call.

`kernel[grid](...)` goes through Triton's Python layers on every call: the autotuner builds
dicts of all arguments for its key, the heuristics evaluate, and `JITFunction.run` binds and
specialises the arguments and looks the compiled kernel up. On the H200 host that is 20-90
µs per launch, and a sparse decoder layer launches about ten of our kernels per step while
the step waits on the host (bench/README.md). `Launcher` does that work once per distinct
specialisation and then calls the compiled kernel directly.

The cache key holds everything Triton specialises on, and more: each tensor's dtype and
16-byte alignment, each int's range class, divisibility by 16 and whether it is 1, the value
of every other argument, the constexprs, the values of the autotuner's key arguments and
the current device (a loaded kernel belongs to one). A
new key takes the ordinary path (which autotunes and compiles as usual) and records the
compiled kernel and the meta-parameters it was launched with. Under the interpreter (CPU)
every call takes the ordinary path.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("sparselora_compile")
ENABLED = True  # False: every call takes Triton's ordinary path (bench/op_host.py's A/B)


def _other(v):
    if isinstance(v, torch.Tensor):  # a subclass (nn.Parameter)
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v == 1, v % 16 == 0, -2**31 <= v < 2**31, v >= 2**63
    if isinstance(v, float):
        return float
    raise TypeError(type(v))


def _key(args) -> tuple:
    """What Triton may specialise the runtime arguments on (a superset of it). Plain tensors
    and ints, nearly every argument, are keyed inline (a call per argument would cost on
    every launch); `_other` keys the rest the same way."""
    return tuple((v.dtype, v.data_ptr() % 16 == 0) if type(v) is torch.Tensor
                 else (v == 1, v % 16 == 0, -2**31 <= v < 2**31, v >= 2**63) if type(v) is int
                 else _other(v) for v in args)


class Launcher:
    """`Launcher(kernel)(grid, *args, **constexprs)` launches like `kernel[grid](*args, **constexprs)`.

    `kernel`: a `triton.jit` function, optionally under `triton.heuristics` and `triton.autotune`.
    `grid`: a tuple, or a function of the meta-parameters (constexprs, the autotuner's and
    the heuristics' values; Triton passes it the runtime arguments too, which ours do not
    read). `args`: the kernel's leading runtime arguments, positionally; constexprs by name.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.tuner = kernel if hasattr(kernel, "configs") else None
        self.heuristics = []
        inner = kernel  # Autotuner -> Heuristics -> JITFunction (InterpretedFunction on CPU)
        while hasattr(inner, "fn") and (hasattr(inner, "values") or hasattr(inner, "configs")):
            if hasattr(inner, "values"):
                self.heuristics.append(inner.values)
            inner = inner.fn
        self.names = list(inner.arg_names)
        self.name = getattr(getattr(inner, "fn", None), "__name__", "a Triton kernel")
        self.interpreted = not hasattr(inner, "params")  # an InterpretedFunction (CPU)
        # the autotuner's key arguments given positionally (constexprs are in the key anyway)
        self.tune_keys = tuple(self.names.index(k) for k in self.tuner.keys) if self.tuner else ()
        self._compiled: dict = {}
        # the device Triton launches on is part of the key (a loaded kernel belongs to one);
        # whether CUDA is there is asked at the first launch, not at import
        self._device = self._first_device
        self.broken: str | None = None  # why the direct launch failed, once it has

    def __call__(self, grid, *args, **constexprs):
        if not ENABLED or self.interpreted or self.broken:
            return self.kernel[grid](*args, **constexprs)
        try:
            key = (_key(args), tuple(constexprs.items()),
                   tuple(args[i] for i in self.tune_keys if i < len(args)), self._device())
        except TypeError:  # an argument kind we do not key on: the ordinary path
            return self.kernel[grid](*args, **constexprs)
        hit = self._compiled.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **constexprs)
            if hasattr(compiled, "result"):  # an asynchronous compile's future
                compiled = compiled.result()
            meta = self._meta(args, constexprs)
            if all(n in meta for n in self.names[len(args):]):
                self._compiled[key] = (compiled, meta, tuple(meta[n] for n in self.names[len(args):]))
            return compiled
        compiled, meta, tail = hit
        size = grid(meta) if callable(grid) else grid
        try:
            compiled[(*size, 1, 1)[:3]](*args, *tail)
        except (TypeError, AttributeError) as e:  # a Triton whose compiled-kernel API differs
            self._give_up(e)
            return self.kernel[grid](*args, **constexprs)
        return compiled

    def _first_device(self) -> int:
        self._device = torch.cuda.current_device if torch.cuda.is_available() else (lambda: -1)
        return self._device()

    def _give_up(self, error) -> None:
        """Launch through Triton's own path from now on, and say so once."""
        self.broken = f"{type(error).__name__}: {error}"
        self._compiled.clear()
        log.warning("sparselora: launching %s directly failed (%s); it goes through Triton's "
                    "own launch path from now on", self.name, self.broken)

    def _meta(self, args, constexprs) -> dict:
        """The meta-parameters the ordinary path launched with: the constexprs given, the
        autotuner's choice for this key, then the heuristics."""
        meta = dict(constexprs)
        if self.tuner is not None:
            meta.update(self.tuner.best_config.kwargs)
        named = dict(zip(self.names, args))
        for values in self.heuristics:  # outermost first, as they run
            for name, fn in values.items():
                meta[name] = fn({**named, **meta})
        return meta
