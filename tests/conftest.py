import gc
import logging
import os

# pytest-xdist's workers share the cores: an op split over OpenMP threads waits at its
# barrier for a thread the other worker's process holds descheduled (the tiny models' ops
# are just past ATen's grain size). One worker's share of the cores each; set before
# torch loads, and inherited by the processes the tests start (test_distributed.py).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import torch  # noqa: E402

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
# For the same reason, no full collection at the first training step after each of the
# suite's hundreds of compiles (test_collect_after_compile.py turns it on for its test).
from sparselora_compile import collect_after_compile  # noqa: E402

collect_after_compile.ENABLED = False


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
