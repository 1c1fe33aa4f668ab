"""sparselora-compile: SparseLoRA contextual sparsity as a torch.compile backend.

    model = torch.compile(model, backend="sparselora", options={"policy": policy})
"""
from __future__ import annotations

import logging as _logging

from sparselora_compile.runtime import ops as _ops  # noqa: F401  registers torch.ops.sparselora

from . import presets
from .backend import sparselora_backend
from .explain import explain
from .factors import collect_moments
from .policy import BlockInfo, Policy
from .wrapper import compile

__all__ = ["Policy", "BlockInfo", "presets", "sparselora_backend", "explain", "set_labels",
           "calibrate", "compile", "collect_moments"]
__version__ = "0.1.0"

_log = _logging.getLogger("sparselora_compile")
if not _log.handlers:
    _h = _logging.StreamHandler()
    _h.setFormatter(_logging.Formatter("%(message)s"))
    _log.addHandler(_h)
    _log.setLevel(_logging.INFO)


def _register_backend() -> None:
    """Register "sparselora" with Dynamo unless the installed entry point will: torch
    loads entry points lazily and asserts on a duplicate name."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry
    if "sparselora" in registry._COMPILER_FNS:
        return
    if any(ep.name == "sparselora" for ep in entry_points(group="torch_dynamo_backends")):
        return
    registry.register_backend(sparselora_backend, name="sparselora")


_register_backend()


def set_labels(policy: Policy, labels, attention_mask=None) -> None:
    """Hand the batch's labels (and padding mask) to the backend when the compiled graph
    that holds the layers does not see them (e.g. HF gradient checkpointing splits the
    graph there). `sparselora_compile.compile` does this for you."""
    state = policy.runtime_state()
    state.labels, state.attention_mask = labels, attention_mask


def __getattr__(name):
    if name == "calibrate":  # imported on use: it pulls in the estimator study code
        from .calibrate import calibrate as fn
        globals()["calibrate"] = fn
        return fn
    raise AttributeError(name)
