"""`copy.deepcopy` of a compiled model.

A model compiled in place holds its compile: glue hooks bound to its wrapper (and through
it to its run), compiled layers and a compiled loss. Copied as they are, the copy's
forwards would count steps and hand labels to the original's run. So a deep copy of the
model is the model uncompiled (its own weights, eager layers, no glue; `slc.compile` it
again to train it sparse; its attention is HF's "sdpa" again), and a deep copy of the wrapper is a new wrapper compiling that
copy with the same policy and options, with a run of its own (step 0, empty statistics).
"""
from __future__ import annotations

import copy
import weakref
from collections import OrderedDict

import torch

from .packing import uninstall


def install(model: torch.nn.Module, wrapper) -> None:
    """Make `copy.deepcopy(model)` copy it uncompiled: `deepcopy` looks `__deepcopy__` up
    on the instance, and the model's class is not ours."""
    model.__dict__["__deepcopy__"] = _UncompiledCopy(wrapper)


def remove(model: torch.nn.Module) -> None:
    model.__dict__.pop("__deepcopy__", None)


class _UncompiledCopy:
    """The model's `__deepcopy__`. Holds the wrapper weakly: the model must not keep it alive."""

    def __init__(self, wrapper):
        self._ref = weakref.ref(wrapper)

    def __call__(self, memo: dict) -> torch.nn.Module:
        wrapper = self._ref()
        model = wrapper.model
        # What the copy takes instead of the compile's objects (deepcopy consults the memo
        # first): no wrapper, the plain loss function.
        memo[id(wrapper)] = None
        memo.update(wrapper._copy_instead)
        state = model.__getstate__()  # a shallow dict; torch leaves out the compiled layer call
        for key in ("_sparselora", "__deepcopy__"):
            state.pop(key, None)
        glue = {id(h) for h in wrapper._glue}
        for name in ("_forward_pre_hooks", "_forward_hooks"):
            state[name] = OrderedDict((k, v) for k, v in state[name].items() if id(v) not in glue)
        new = type(model).__new__(type(model))
        memo[id(model)] = new
        new.__setstate__(copy.deepcopy(state, memo))
        uninstall(new)  # HF's SDPA attention, as before slc.compile switched it
        return new

    def __deepcopy__(self, memo):
        return None  # a stale entry in a copied __dict__ must not act again
