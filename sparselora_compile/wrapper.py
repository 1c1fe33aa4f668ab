"""`sparselora_compile.compile(model, policy)`: torch.compile with the sparselora backend,
plus the eager glue the graph cannot do itself: it hands `labels` and `attention_mask`
to the backend (the layers never see them), counts training steps, and runs dense in
eval() mode.

By default it compiles *regionally* (regional.py): each decoder layer is compiled on its
own and layers with the same plan share one compiled graph, so the first step costs a
few layer compiles; the HF loss function is compiled on its own, and the embeddings,
final norm and head run eagerly. With
`regional=False` the whole model is one `torch.compile(model, backend="sparselora")`.
`cuda_graphs=True` (regional, CUDA) replays the compiled layers' forward and backward as
CUDA graphs in training steps past the warm-up (cuda_graphs.py).
"""
from __future__ import annotations

import torch

from .policy import Policy


class SparseLoRAModel(torch.nn.Module):
    """Calls the compiled model; `.model` is the original (for save_pretrained etc.).
    Regional compilation installs the compiled layers on `.model` itself (as
    `nn.Module.compile` does); `uncompile()` removes them."""

    def __init__(self, model: torch.nn.Module, policy: Policy, regional: bool = True,
                 cuda_graphs: bool = False, **options):
        super().__init__()
        if cuda_graphs and not regional:
            raise ValueError("sparselora: cuda_graphs=True graphs the regionally compiled "
                             "decoder layers; it needs regional=True")
        self.model = model
        self.policy = policy
        self.regional = regional
        self._layers, self._undo_loss = [], lambda: None
        self.graphs = None
        if regional:
            from .regional import compile_layers, compile_loss
            self._layers = compile_layers(model, policy, policy.runtime_state(), options)
            self._undo_loss = compile_loss(model, options.get("inner", "inductor"))
            self._compiled = model
            if cuda_graphs:
                from .cuda_graphs import LayerGraphs
                from .regional import decoder_layers
                self.graphs = LayerGraphs(policy.runtime_state())
                for prefix, layer in decoder_layers(model):
                    self.graphs.install(prefix, layer)
        else:
            self._compiled = torch.compile(model, backend="sparselora",
                                           options={"policy": policy, **options})

    def forward(self, *args, **kwargs):
        state = self.policy.runtime_state()
        state.labels = kwargs.get("labels")
        state.attention_mask = kwargs.get("attention_mask")
        state.force_dense = self.policy.dense_eval and not self.model.training
        state.forward_id += 1
        graphs = self.graphs if torch.is_grad_enabled() else None
        if self.regional and torch.is_grad_enabled():
            state.begin_forward()  # whole-model graphs count their own steps
            self._token_rows_ahead(state, kwargs)
        if graphs is not None:
            graphs.begin(self._graph_key(state))
        try:
            return self._compiled(*args, **kwargs)
        finally:
            state.labels = state.attention_mask = None
            if graphs is not None:
                graphs.end()

    def _graph_key(self, state):
        """What a CUDA graph set of the layers is valid for (None: no graphs this forward):
        a training forward past the warm-up whose token split was made ahead; its
        shape and the split's sizes."""
        from sparselora_compile.runtime import row_split
        if (not self.model.training or state.force_dense or not state.sparse_now()
                or state.record is not None or state.shared_rows is None
                or state.shared_rows[0][0] != state.forward_id):
            return None
        rows = state.shared_rows[1]
        split = row_split.split_of(rows)
        sizes = tuple(None if t is None else t.numel() for t in (split.dense, split.ctx, split.scored))
        return (tuple(rows.shape), rows.device, sizes)

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
        self.graphs = None  # its dispatch went with the compiled layers; frees the graphs' memory
        return self.model


def compile(model: torch.nn.Module, policy: Policy | None = None, *, regional: bool = True,
            cuda_graphs: bool = False, **options) -> SparseLoRAModel:
    """`regional`: compile one decoder layer per distinct plan and reuse it; `cuda_graphs`:
    replay those layers as CUDA graphs in training (see above)."""
    from . import presets
    return SparseLoRAModel(model, policy or presets.default(), regional=regional,
                           cuda_graphs=cuda_graphs, **options)
