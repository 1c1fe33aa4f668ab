import gc
import logging
import os

import torch

# Triton reads TRITON_INTERPRET once, at import, and importing torch._dynamo (any test
# here) imports triton: without a GPU the kernel tests need the interpreter from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

logging.getLogger("sparselora_compile").setLevel(logging.WARNING)

# The compiles make millions of short-lived objects, and each full collection rescans all
# that torch, transformers and the tests hold (about a million objects, ~1 s each on a
# 2-core machine, some 30 times a run). Full collections only after 1000 middle-generation
# ones (a couple a run; peak RSS stays ~1.2 GB); the young generations as before.
gc.set_threshold(700, 10, 1000)


@pytest.fixture(autouse=True)
def _static_shapes(request, monkeypatch):
    """Up-front dynamic shapes (slc.compile's default, dynamic_dims.py) make each CPU compile
    ~2.5x slower; tests compile static unless marked `dynamic_shapes` (test_recompiles.py,
    regional against whole-model). Processes the tests start keep the default."""
    if request.node.get_closest_marker("dynamic_shapes") is None:
        from sparselora_compile import dynamic_dims
        monkeypatch.setattr(dynamic_dims, "DEFAULT", False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
