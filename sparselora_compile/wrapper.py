"""`sparselora_compile.compile(model, policy)`: torch.compile with the sparselora backend,
plus the eager glue the graph cannot do itself: it hands `labels` and `attention_mask`
to the run (the layers never see them), counts training steps, and runs dense in eval()
mode.

By default it compiles *regionally* (regional.py): each decoder layer is compiled on its
own and layers with the same plan share one compiled graph, so the first step costs a
few layer compiles; the HF loss function is compiled on its own, and the embeddings,
final norm and head run eagerly. With `regional=False` the whole model is one
`torch.compile(model, backend="sparselora")`. `cuda_graphs=True` (regional, CUDA) replays
the compiled layers' forward and backward as CUDA graphs in training steps past the
warm-up (cuda_graphs.py).
"""
from __future__ import annotations

import torch

from sparselora_compile.runtime.ops import shared_token_rows
from sparselora_compile.runtime.run import Run, RunStats

from .backend import BackendOptions, new_run
from .policy import Policy


class SparseLoRAModel(torch.nn.Module):
    """Calls the compiled model; `.model` is the original (for save_pretrained etc.), `.run`
    its run (step, statistics). Regional compilation installs the compiled layers on
    `.model` itself (as `nn.Module.compile` does); `uncompile()` removes them."""

    def __init__(self, model: torch.nn.Module, policy: Policy | None = None, regional: bool = True,
                 cuda_graphs: bool = False, **options):
        super().__init__()
        if cuda_graphs and not regional:
            raise ValueError("sparselora: cuda_graphs=True graphs the regionally compiled "
                             "decoder layers; it needs regional=True")
        if "run" in options or "region" in options:
            raise ValueError("sparselora: 'run' and 'region' are set by compile itself")
        opts = BackendOptions.parse({**options, "policy": policy})  # a bad option fails here
        opts.run = new_run(opts)
        options = {**options, "policy": opts.policy, "run": opts.run}
        self.model = model
        self.policy, self.run = opts.policy, opts.run
        self.regional = regional
        self._layers, self._undo_loss = [], lambda: None
        self.graphs = None
        if regional:
            from .regional import compile_layers, compile_loss
            self._layers = compile_layers(model, opts, options)
            self._undo_loss = compile_loss(model, opts.inner)
            self._compiled = model
            if cuda_graphs:
                from sparselora_compile.passes.blocks import decoder_layers

                from .cuda_graphs import LayerGraphs
                self.graphs = LayerGraphs(self.run)
                for prefix, layer in decoder_layers(model):
                    self.graphs.install(prefix, layer)
        else:
            self._compiled = torch.compile(model, backend="sparselora", options=options)

    # ---- the run ---------------------------------------------------------------------------
    @property
    def stats(self) -> RunStats:
        """Steps and base FLOPs of training forwards."""
        return self.run.stats

    @property
    def step(self) -> int:
        """Index of the current (last started) training step."""
        return self.run.step

    def set_step(self, step: int) -> None:
        """Set the index of the next training forward (e.g. when resuming)."""
        self.run.set_step(step)

    # ---- calling -----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        run = self.run
        run.labels = kwargs.get("labels")
        run.attention_mask = kwargs.get("attention_mask")
        run.force_dense = self.policy.dense_eval and not self.model.training
        run.forward_id += 1
        graphs = self.graphs if torch.is_grad_enabled() else None
        if self.regional and torch.is_grad_enabled():
            run.begin_forward()  # whole-model graphs count their own steps
            self._token_rows_ahead(run, kwargs)
        if graphs is not None:
            graphs.begin(self._graph_key(run))
        try:
            return self._compiled(*args, **kwargs)
        finally:
            run.labels = run.attention_mask = None
            if graphs is not None:
                graphs.end()

    def _graph_key(self, run: Run):
        """What a CUDA graph set of the layers is valid for (None: no graphs this forward):
        a training forward past the warm-up whose token split was made ahead; its
        shape and the split's sizes."""
        if (not self.model.training or run.force_dense or not run.sparse_now()
                or run.record is not None or run.shared_rows is None
                or run.shared_rows[0][0] != run.forward_id):
            return None
        rows = run.shared_rows[1]
        split = run.splits.of(rows)
        sizes = tuple(None if t is None else t.numel() for t in (split.dense, split.ctx, split.scored))
        return (tuple(rows.shape), rows.device, sizes)

    @staticmethod
    def _token_rows_ahead(run: Run, kwargs) -> None:
        """The token split syncs with the GPU; made here, before the model's work is queued,
        the host does not stall behind the first layers' kernels at the first sparse layer."""
        ids, labels = kwargs.get("input_ids"), run.labels
        if labels is not None and ids is not None and labels.shape == ids.shape:
            shared_token_rows(run, labels, run.attention_mask, labels.shape, labels.device)

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
    replay those layers as CUDA graphs in training (see above). `options`: the backend's
    (`backend.BackendOptions`)."""
    return SparseLoRAModel(model, policy, regional=regional, cuda_graphs=cuda_graphs, **options)


def run_of(model) -> Run:
    """The run of a model compiled with this backend: an `slc.compile` wrapper, or
    `torch.compile(model, backend="sparselora", options={...})` once it has run a forward."""
    if isinstance(model, SparseLoRAModel):
        return model.run
    fn = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    seen = set()
    while fn is not None and id(fn) not in seen:  # Dynamo's wrappers around the backend
        seen.add(id(fn))
        options = getattr(fn, "kwargs", {}).get("options") if hasattr(fn, "compiler_fn") else None
        if isinstance(options, dict):
            if isinstance(options.get("run"), Run):
                return options["run"]
            raise RuntimeError("sparselora: this model has not run a forward yet, so it has no run")
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    raise ValueError("sparselora: no run found: compile with slc.compile(model, policy), or with "
                     "torch.compile(model, backend='sparselora', options={'policy': ...})")
