"""`sparselora_compile.compile(model, policy)`: torch.compile with the sparselora backend,
plus the eager glue the graph cannot do itself: it hands `labels` and `attention_mask`
to the backend (HF
gradient checkpointing splits the graph so the layers never see them) and runs dense in
eval() mode."""
from __future__ import annotations

import torch

from .policy import Policy


class SparseLoRAModel(torch.nn.Module):
    """Calls the compiled model; `.model` is the original (for save_pretrained etc.)."""

    def __init__(self, model: torch.nn.Module, policy: Policy, **options):
        super().__init__()
        self.model = model
        self.policy = policy
        self._compiled = torch.compile(model, backend="sparselora",
                                       options={"policy": policy, **options})

    def forward(self, *args, **kwargs):
        state = self.policy.runtime_state()
        state.labels = kwargs.get("labels")
        state.attention_mask = kwargs.get("attention_mask")
        state.force_dense = self.policy.dense_eval and not self.model.training
        try:
            return self._compiled(*args, **kwargs)
        finally:
            state.labels = state.attention_mask = None


def compile(model: torch.nn.Module, policy: Policy | None = None, **options) -> SparseLoRAModel:
    from . import presets
    return SparseLoRAModel(model, policy or presets.default(), **options)
