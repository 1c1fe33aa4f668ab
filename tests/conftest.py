import logging

import pytest
import torch

logging.getLogger("sparselora_compile").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
