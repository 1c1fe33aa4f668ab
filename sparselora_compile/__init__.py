"""sparselora-compile: SparseLoRA contextual sparsity as a torch.compile backend.

How `labels` and `policy` reach a Triton kernel:
1. `torch.compile(model, backend="sparselora", options={"policy": p})` -> Dynamo calls
   `backend.sparselora_backend(gm, inputs, options)`: options parsed, the model's `Run` made.
2. `passes.PASSES`: find sites -> group blocks (passes/blocks.py) -> plan with
   `p.sparsity_for(block)` -> base products become `torch.ops.sparselora.*` ops carrying
   `run.handle`; the graph's `labels` input feeds `token_rows`.
3. The backend fills the estimator-factor inputs (factors.py); Inductor compiles the rest.
4. Per step: `token_rows(labels)` splits rows (runtime/token_rows.py), `select_mlp` picks
   channels (select_channels.py), `out_sparse_linear` finds the run by handle and calls
   runtime/sparse_linear.py -> gathered.py -> kernels/gathered_gemm.py (Triton on CUDA).
"""
from __future__ import annotations

import logging as _logging

from sparselora_compile.runtime import ops as _ops  # noqa: F401  registers torch.ops.sparselora
from sparselora_compile.runtime.run import Run, RunStats

from . import presets
from .backend import sparselora_backend
from .explain import explain
from .factors import collect_moments
from .policy import BlockInfo, Policy
from .wrapper import SparseLoRAModel, compile, run_of

__all__ = ["Policy", "BlockInfo", "presets", "sparselora_backend", "explain", "calibrate",
           "compile", "SparseLoRAModel", "run_of", "Run", "RunStats", "collect_moments", "trainer"]
__version__ = "0.1.0"

# A library logs, the application decides where it goes (the CLI configures it).
_logging.getLogger("sparselora_compile").addHandler(_logging.NullHandler())


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


def __getattr__(name):
    if name == "calibrate":  # imported on use: it pulls in the estimator study code
        from .calibrate import calibrate as fn
        globals()["calibrate"] = fn
        return fn
    if name == "trainer":  # imported on use: it imports transformers' Trainer
        import importlib
        return importlib.import_module(".trainer", __name__)
    raise AttributeError(name)
