"""`sparselora_compile.compile(model, policy)`: torch.compile with the sparselora backend,
plus the eager glue the graph cannot do itself: it hands `labels` and `attention_mask`
to the backend (the layers never see them), counts training steps, and runs dense in
eval() mode.

By default it compiles *regionally* (regional.py): each decoder layer is compiled on its
own and layers with the same plan share one compiled graph, so the first step costs a
few layer compiles; the HF loss function is compiled on its own, and the embeddings,
final norm and head run eagerly. With
`regional=False` the whole model is one `torch.compile(model, backend="sparselora")`.
"""
from __future__ import annotations

import torch

from .policy import Policy


class SparseLoRAModel(torch.nn.Module):
    """Calls the compiled model; `.model` is the original (for save_pretrained etc.).
    Regional compilation installs the compiled layers on `.model` itself (as
    `nn.Module.compile` does); `uncompile()` removes them."""

    def __init__(self, model: torch.nn.Module, policy: Policy, regional: bool = True, **options):
        super().__init__()
        self.model = model
        self.policy = policy
        self.regional = regional
        self._layers, self._undo_loss = [], lambda: None
        if regional:
            from .regional import compile_layers, compile_loss
            self._layers = compile_layers(model, policy, policy.runtime_state(), options)
            self._undo_loss = compile_loss(model, options.get("inner", "inductor"))
            self._compiled = model
        else:
            self._compiled = torch.compile(model, backend="sparselora",
                                           options={"policy": policy, **options})

    def forward(self, *args, **kwargs):
        state = self.policy.runtime_state()
        state.labels = kwargs.get("labels")
        state.attention_mask = kwargs.get("attention_mask")
        state.force_dense = self.policy.dense_eval and not self.model.training
        state.forward_id += 1
        if self.regional and torch.is_grad_enabled():
            state.begin_forward()  # whole-model graphs count their own steps
            self._token_rows_ahead(state, kwargs)
        try:
            return self._compiled(*args, **kwargs)
        finally:
            state.labels = state.attention_mask = None

    @staticmethod
    def _token_rows_ahead(state, kwargs) -> None:
        """The token split syncs with the GPU; made here, before the model's work is queued,
        the host does not stall behind the first layers' kernels at the first sparse layer."""
        from sparselora_compile.runtime.ops import shared_token_rows
        ids, labels = kwargs.get("input_ids"), state.labels
        if labels is not None and ids is not None and labels.shape == ids.shape:
            shared_token_rows(state, labels, state.attention_mask, labels.shape, labels.device)

    def uncompile(self) -> torch.nn.Module:
        from .regional import uncompile_layers
        uncompile_layers(self._layers)
        self._undo_loss()
        self._layers, self._undo_loss = [], lambda: None
        return self.model


def compile(model: torch.nn.Module, policy: Policy | None = None, *, regional: bool = True,
            **options) -> SparseLoRAModel:
    """`regional`: compile one decoder layer per distinct plan and reuse it (see above)."""
    from . import presets
    return SparseLoRAModel(model, policy or presets.default(), regional=regional, **options)
