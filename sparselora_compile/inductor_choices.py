"""Inductor heuristics for the graphs this backend compiles.

Inductor makes a row reduction persistent (one pass with the whole row in registers)
only up to 1,024 elements; above that it loops over the row in blocks. The decoder's
RMSNorms reduce over the hidden size (4,096 at 8B), forward and backward, so they run
looped. ROW_PERSISTENT_MAX raises that bound for the graphs we hand to Inductor, forward
and backward (which compiles lazily, through the same inner compile), and leaves every
other Inductor compile in the process alone. At 8B that took 1.0 ms off a ~122 ms step
on average over three A/B runs, between 0 and 2.2 (bench/README.md, "Persistent norms").
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging

log = logging.getLogger("sparselora_compile")

INDUCTOR_ROW_PERSISTENT_MAX = 1024  # Inductor's own bound
ROW_PERSISTENT_MAX = 4096
# the hook we override, as torch 2.11-2.13 define it
_HOOK_PARAMETERS = ("features", "cooperative_reduction")


def _active() -> bool:
    """Whether our heuristics differ from Inductor's and this torch has the hook they use
    (another torch compiles with Inductor's own, and says so once)."""
    if ROW_PERSISTENT_MAX <= INDUCTOR_ROW_PERSISTENT_MAX:
        return False
    return _hook_matches()


@functools.cache
def _hook_matches() -> bool:
    from torch._inductor.choices import InductorChoices
    hook = getattr(InductorChoices, "should_use_persistent_reduction", None)
    try:
        matches = tuple(inspect.signature(hook).parameters) == _HOOK_PARAMETERS
    except (TypeError, ValueError):
        matches = False
    if not matches:
        log.warning("sparselora: this torch's InductorChoices.should_use_persistent_reduction "
                    "is not the one inductor_choices.py overrides; our graphs compile with "
                    "Inductor's own reduction heuristics")
    return matches


@functools.cache
def _row_choices(max_numel: int):
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class RowPersistentChoices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER):
                return V.graph.sizevars.statically_known_leq(features.reduction_numel, max_numel)
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return RowPersistentChoices()


def choices_scope():
    """A context in which Inductor compiles with this module's heuristics (nothing when
    they are Inductor's own)."""
    if not _active():
        return contextlib.nullcontext()
    from torch._inductor.virtualized import V
    return V.set_choices_handler(_row_choices(ROW_PERSISTENT_MAX))


@functools.cache  # one object: equal patches for equal settings
def _cache_key_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class HeuristicsCacheKey(CustomGraphPass):
        """A post-grad pass that changes nothing: its uuid puts our heuristics into
        Inductor's FX graph cache key, which does not see a choices handler."""
        def __call__(self, graph):
            pass

        def uuid(self):
            return ("sparselora_row_persistent", ROW_PERSISTENT_MAX)

    return HeuristicsCacheKey()


def config_patches(patches):
    """Inductor's config patches for a compile under choices_scope: a graph compiled with
    other heuristics must not come from Inductor's FX graph cache. Where the caller has a
    post-grad pass of its own, the cache is off for our graphs instead."""
    from torch._inductor import config
    if not _active():
        return patches
    if (patches or {}).get("post_grad_custom_post_pass", config.post_grad_custom_post_pass) is not None:
        return {**(patches or {}), "fx_graph_cache": False}
    return {**(patches or {}), "post_grad_custom_post_pass": _cache_key_pass()}


def compile_inner(gm, example_inputs, **kwargs):
    """compile_fx's inner compile (forward and backward graphs) within choices_scope."""
    from torch._inductor.compile_fx import compile_fx_inner
    with choices_scope():
        return compile_fx_inner(gm, example_inputs, **kwargs)
