import logging
import os

import torch

# Triton reads TRITON_INTERPRET once, at import, and importing torch._dynamo (any test
# here) imports triton: without a GPU the kernel tests need the interpreter from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

logging.getLogger("sparselora_compile").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
