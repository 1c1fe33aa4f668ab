"""`sparselora_compile.compile(model, policy)`: torch.compile with the sparselora backend,
plus the eager glue the graph cannot do itself: it hands `labels` and `attention_mask`
to the run (the layers never see them), counts training steps, and runs dense in eval()
mode.

By default it compiles *regionally* (regional.py): each decoder layer is compiled on its
own and layers with the same plan share one compiled graph, so the first step costs a
few layer compiles; the HF loss function is compiled on its own, and the embeddings,
final norm and head run eagerly. The compiled layers are installed on `model` itself (as
`nn.Module.compile` does), and so is the glue, as forward hooks: after `slc.compile(model)`,
`model(...)` and the returned wrapper compute the same thing, so the model itself can be
handed to code that needs the real class (HF `Trainer`, TRL, `save_pretrained`; see
trainer.py). `uncompile()` removes both.

With `regional=False` the whole model is one `torch.compile(model, backend="sparselora")`
and the glue lives in the wrapper's forward: call the wrapper. `cuda_graphs=True`
(regional, CUDA) replays the compiled layers' forward and backward as CUDA graphs in
training steps past the warm-up (cuda_graphs.py).

The wrapper stands in for the model it wraps: its forward has the model's signature (the
HF Trainer keeps only the dataset columns that the signature names), its `__class__` is
the model's (the Trainer saves and resumes by isinstance), its `named_modules` /
`named_parameters`, `state_dict` and `load_state_dict` use the model's own names, and
attributes it does not have itself (`config`, `save_pretrained`, `get_input_embeddings`,
`gradient_checkpointing_enable`, `generate`, ...) are the model's. `copy.deepcopy` of
either: copying.py.
"""
from __future__ import annotations

import copy
import inspect
import warnings
import weakref

import torch

from sparselora_compile.runtime.ops import shared_token_rows
from sparselora_compile.runtime.row_split import bucket_step, kept_fit
from sparselora_compile.runtime.run import Run, RunStats

from . import copying
from .collect_after_compile import CollectAfterCompile
from .backend import BackendOptions, new_run
from .chained_graphs import autocast_dtype
from . import dynamic_dims
from . import packing
from .padding import causal_attention, pad_batch, pad_id, unmask_right_padding
from .policy import Policy


class SparseLoRAModel(torch.nn.Module):
    """Calls the compiled model; `.model` is the original, `.run` its run (step, statistics).
    Regional compilation installs the compiled layers and the glue on `.model` itself;
    `uncompile()` removes them. See the module doc for what the wrapper forwards."""

    def __init__(self, model: torch.nn.Module, policy: Policy | None = None, regional: bool = True,
                 cuda_graphs: bool = False, graph_bucket: int = 0, graph_sets: int | None = None,
                 pad_to_multiple_of: int = 0, dynamic: bool | None = None, causal_right_padding: bool = True,
                 varlen_attention: bool = True, padding_free: bool = True,
                 supervised_head: bool = False, **options):
        super().__init__()
        if cuda_graphs and not regional:
            raise ValueError("sparselora: cuda_graphs=True graphs the regionally compiled "
                             "decoder layers; it needs regional=True")
        if cuda_graphs:
            from .cuda_graphs import refuse_sharded
            refuse_sharded(model)
        if not isinstance(graph_bucket, int) or graph_bucket < 0:
            raise ValueError(f"sparselora: graph_bucket={graph_bucket!r} must be an int >= 0")
        if graph_bucket and not cuda_graphs:
            raise ValueError(f"sparselora: graph_bucket={graph_bucket} shapes batches for CUDA graphs; "
                             "it needs cuda_graphs=True")
        if graph_sets is not None:
            if isinstance(graph_sets, bool) or not isinstance(graph_sets, int) or graph_sets < 1:
                raise ValueError(f"sparselora: graph_sets={graph_sets!r} must be an int >= 1")
            if not cuda_graphs:
                raise ValueError(f"sparselora: graph_sets={graph_sets} is how many CUDA graph sets "
                                 "are kept; it needs cuda_graphs=True")
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 0:
            raise ValueError(f"sparselora: pad_to_multiple_of={pad_to_multiple_of!r} must be an int >= 0")
        for name, flag in (("causal_right_padding", causal_right_padding), ("varlen_attention", varlen_attention),
                           ("padding_free", padding_free), ("supervised_head", supervised_head)):
            if not isinstance(flag, bool):
                raise ValueError(f"sparselora: {name}={flag!r} must be True or False")
        if supervised_head and not regional:
            raise ValueError("sparselora: supervised_head=True needs regional=True (the head and "
                             "the loss run outside the compiled layers there)")
        if "run" in options or "region" in options:
            raise ValueError("sparselora: 'run' and 'region' are set by compile itself")
        if getattr(model, "_sparselora", None) is not None:
            raise ValueError("sparselora: this model is already compiled with slc.compile; use that "
                             "wrapper (model._sparselora), or call its uncompile() first")
        opts = BackendOptions.parse({**options, "policy": policy})  # a bad option fails here
        _refuse_without_lora(model)
        _refuse_dora(model)
        opts.run = new_run(opts)
        options = {**options, "policy": opts.policy, "run": opts.run}
        self.model = model   # the only submodule: the compiled model below is not registered
        self.policy, self.run = opts.policy, opts.run
        self.regional = regional
        self._layers, self._undo_loss, self._hooks, self._glue = [], lambda: None, [], ()
        self._copy_instead = {}  # id(compiled object) -> what a deep copy takes (copying.py)
        self._args = dict(regional=regional, cuda_graphs=cuda_graphs, graph_bucket=graph_bucket,
                          graph_sets=graph_sets, pad_to_multiple_of=pad_to_multiple_of, dynamic=dynamic,
                          causal_right_padding=causal_right_padding, varlen_attention=varlen_attention,
                          padding_free=padding_free, supervised_head=supervised_head, **{k: v for k, v in options.items() if k not in ("policy", "run")})
        self.steps_from_trainer = False  # set by trainer.SparseLoRACallback
        self.graphs = None
        self._graphs_now = None  # the graph set of the running forward
        self.graph_bucket = graph_bucket
        self.pad_to_multiple_of = pad_to_multiple_of
        # padding.py: right-padded training batches run causal attention without their mask
        causal = causal_attention(model)
        self.unmask = causal_right_padding and causal
        # packing.py: packed rows run variable-length attention
        self._undo_varlen = packing.install(model) if varlen_attention and causal else None
        self._packed_now = False  # whether the running forward's rows run varlen attention
        # under CUDA graphs with graph_bucket, the packed row is filled up to its bucket
        self.padding_free = padding_free and self._undo_varlen is not None
        self._unpadded = None     # how the running forward's batch became a packed row (packing.Unpadded)
        self.dynamic = dynamic_dims.DEFAULT if dynamic is None else bool(dynamic)
        self._padded = 0         # positions the running forward's batch was padded by
        self._head = None        # supervised_head.SupervisedHead
        self._collect = CollectAfterCompile()
        if regional:
            from .regional import compile_layers, compile_loss
            self._layers = compile_layers(model, opts, options, self.dynamic)
            self._undo_loss, self._copy_instead = compile_loss(model, opts.inner, self.dynamic)
            if supervised_head:
                from .supervised_head import SupervisedHead
                self._head = SupervisedHead(model)
                self._copy_instead[id(self._head.loss)] = self._copy_instead.get(id(self._head.inner),
                                                                                self._head.inner)
            if cuda_graphs:
                from sparselora_compile.passes.blocks import decoder_layers

                from .cuda_graphs import LayerGraphs
                self.graphs = LayerGraphs(self.run, graph_sets)
                self.run.splits.bucket = self.graph_bucket
                for prefix, layer in decoder_layers(model):
                    self.graphs.install(prefix, layer)
            self._install_glue(model)
            compiled = model
        else:
            compiled = torch.compile(model, backend="sparselora", options=options)
        # Not a submodule: a second name for the model's parameters would put every tensor
        # in the state dict twice (with regional compilation it is the model itself).
        self.__dict__["_compiled"] = compiled
        self.register_state_dict_post_hook(_without_model_prefix)
        self.register_load_state_dict_pre_hook(_with_model_prefix)
        self.__dict__["forward"] = _forward_with_signature(self, model)

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
        if self.regional:
            return self.model(*args, **kwargs)  # the glue runs in the model's hooks
        kwargs = self._begin(self.model, kwargs)
        if self.dynamic:
            dynamic_dims.mark_model_inputs(kwargs)  # one compile for every length
        out = None
        try:
            out = self._compiled(*args, **kwargs)
        finally:
            out = self._end(out)
        return out

    def _begin(self, model: torch.nn.Module, kwargs) -> dict:
        """Before a forward; returns its keyword arguments (padded when graph buckets apply)."""
        run = self.run
        run.force_dense = self.policy.dense_eval and not model.training
        run.forward_id += 1
        training = self.regional and torch.is_grad_enabled()
        if training:
            run.begin_forward()  # whole-model graphs count their own steps
        if torch.is_grad_enabled() and model.training:
            self._collect.step()
        if torch.is_grad_enabled():
            self._warn_without_trainer_steps(kwargs)
        self._padded, score_mask = 0, kwargs.get("attention_mask")
        train_batch = torch.is_grad_enabled() and model.training
        bucket = self._graph_bucket_now(run, kwargs) if train_batch else 0
        if self.padding_free and train_batch and not self.pad_to_multiple_of:
            kwargs, self._unpadded = packing.unpad(kwargs, bucket, pad_id(model),
                                                   self._fill_to(kwargs) if bucket else None)
            if self._unpadded is not None:
                run.stats.padding_free_forwards += 1
                score_mask = self._unpadded.real
        if bucket and self._unpadded is None and self._undo_varlen is not None and not self.pad_to_multiple_of:
            kwargs, self._unpadded = packing.fill_packed(kwargs, bucket, pad_id(model))
            if self._unpadded is not None:
                score_mask = self._unpadded.real
        step = self._pad_step(kwargs, bucket) if train_batch and self._unpadded is None else 0
        if step:
            kwargs, self._padded, score_mask = pad_batch(kwargs, step, pad_id(model))
        if self.unmask and train_batch:
            kwargs, unmasked = unmask_right_padding(kwargs)
            run.stats.unmasked_forwards += unmasked
        if self._undo_varlen is not None:
            packed = self._unpadded is not None
            if not packed:
                kwargs, packed = packing.add_sequence_starts(kwargs)
            self._packed_now = packed
            if packed:
                kwargs = packing.without_hf_mask(kwargs)
                run.stats.varlen_forwards += 1
                if self.dynamic:  # one compile for every count of sequences
                    torch._dynamo.maybe_mark_dynamic(kwargs[packing.SEQ_STARTS], 0)
        run.labels, run.attention_mask = kwargs.get("labels"), score_mask
        if training:
            run.splits.fit = self._split_fit(kwargs)
            try:
                self._token_rows_ahead(run, kwargs)
            finally:
                run.splits.fit = (0, ())
        self._graphs_now = self.graphs if torch.is_grad_enabled() else None
        if self._graphs_now is not None:
            self._graphs_now.begin(self._graph_key(run, model, kwargs.get(packing.SEQ_STARTS)))
        if self._head is not None and train_batch:
            kwargs = self._head.begin(kwargs)
        return kwargs

    def _pad_step(self, kwargs, bucket: int) -> int:
        """What a training batch's length is rounded up to (0: left as it is):
        `pad_to_multiple_of`, and with graph buckets (regional, past the warm-up) the
        bucket's step for a row (the bucket counts the batch's tokens), rounded up to a
        multiple of the former."""
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return 0
        step = self.pad_to_multiple_of
        if bucket:  # this batch's graph bucket (_graph_bucket_now)
            bucket = bucket_step(ids.shape[1], max(1, bucket // ids.shape[0]))
            step = -(-bucket // step) * step if step else bucket
        return step

    def _graph_bucket_now(self, run: Run, kwargs) -> int:
        """`graph_bucket` when this training batch may replay graphs (past the warm-up, on
        CUDA), else 0."""
        if self.regional and self.graph_bucket and run.sparse_now() and _graphable(self.graphs, kwargs):
            return self.graph_bucket
        return 0

    def _end(self, output=None):
        """After a forward; returns its output (logits cut back to the unpadded length)."""
        self.run.labels = self.run.attention_mask = None
        if self._head is not None:
            output = self._head.end(output)
        graphs, self._graphs_now = self._graphs_now, None
        if graphs is not None:
            graphs.end()
        padded, self._padded = self._padded, 0
        unpadded, self._unpadded, self._packed_now = self._unpadded, None, False
        logits = getattr(output, "logits", None)
        if unpadded is not None and isinstance(logits, torch.Tensor) and logits.dim() == 3:
            output["logits"] = unpadded.repad(logits)
        if padded and isinstance(logits, torch.Tensor) and logits.dim() == 3:
            output["logits"] = logits[:, : logits.shape[1] - padded]
        return output

    def _warn_without_trainer_steps(self, kwargs) -> None:
        """The HF Trainer (and TRL's) passes `num_items_in_batch` to models that take loss
        keyword arguments. Without SparseLoRACallback the run cannot know the optimizer step,
        which matters only when there is a warm-up."""
        run = self.run
        if ("num_items_in_batch" in kwargs and not self.steps_from_trainer and run.warmup_steps > 0
                and "trainer steps" not in run.said):
            run.said.add("trainer steps")
            warnings.warn(
                "sparselora: a Trainer trains this model without SparseLoRACallback, so the run "
                f"counts forwards, not optimizer steps: the warm-up (warmup_steps={run.warmup_steps}) "
                "ends early under gradient accumulation and starts again when training resumes. Call "
                "sparselora_compile.trainer.prepare(trainer) before train(), or pass "
                "callbacks=[SparseLoRACallback(model)] (sparselora_compile.trainer) to the Trainer",
                stacklevel=3)

    def _install_glue(self, model: torch.nn.Module) -> None:
        """Forward hooks on the model: the glue runs however the model is called (the
        wrapper, a Trainer holding the model, DDP). They hold the wrapper weakly; while
        the model is compiled, it holds the wrapper (`model._sparselora`)."""
        ref = weakref.ref(self)

        def before(module, args, kwargs):
            if (wrapper := ref()) is not None:
                return args, wrapper._begin(module, kwargs)

        def after(module, args, kwargs, output):
            if (wrapper := ref()) is not None:
                return wrapper._end(output)

        self._hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
                       model.register_forward_hook(after, with_kwargs=True, always_call=True)]
        self._glue = (before, after)
        model.__dict__["_sparselora"] = self  # not a submodule of the model
        copying.install(model, self)

    def _fill_to(self, kwargs):
        """For `packing.unpad` under graph buckets (None while no set is kept): the length to
        fill a row of n real tokens and d dense rows to. Its bucket's own length, unless no
        kept set of that length fits its token split and one at most a bucket longer does:
        then the shortest such. That replay computes up to a bucket of extra filler rows
        (~20 ms at 1,024 rows on LLaMA-3-8B by bench/roofline.py's rates), where an ungraphed step
        took 1.6-2x a replay on the H200 and a capture of its own key ~0.4 s. A length that
        keeps taking a longer set never gets one of its own (README, "CUDA graphs")."""
        graphs, ids = self.graphs, kwargs.get("input_ids")
        if graphs is None or not graphs.sets or not isinstance(ids, torch.Tensor):
            return None
        kept = graphs.filled_row_capacities(ids.device, ids.shape[0] + packing.FILLER_SEQUENCES,
                                            autocast_dtype(ids.device))

        def choose(n: int, dense: int, own: int) -> int:
            for length in [own] + [k for k in kept if own < k <= own + self.graph_bucket]:
                if length in kept and kept_fit(dense, length - dense, length - n, kept[length]) is not None:
                    graphs.longer_fills += length > own
                    return length
            return own
        return choose

    def _split_fit(self, kwargs) -> tuple:
        """(filler rows, capacities) for the token split of a row filled for graph buckets:
        its trailing filler rows and the (dense, context) capacities of the kept graph
        sets of its shape, so that the split can take one of them (row_split.compute_split)."""
        u = self._unpadded
        if self.graphs is None or u is None or not u.filler or not self.graphs.sets:
            return 0, ()
        ids = kwargs["input_ids"]
        sequences = self._sequences(kwargs.get(packing.SEQ_STARTS))
        return u.filler, self.graphs.capacities_for(tuple(ids.shape), ids.device, sequences,
                                                    autocast_dtype(ids.device))

    def _sequences(self, starts) -> int | None:
        """The count of sequences of the running forward's packed rows (None: not packed)."""
        return starts.numel() - 1 if self._packed_now and isinstance(starts, torch.Tensor) else None

    def _graph_key(self, run: Run, model: torch.nn.Module, starts=None):
        """What a CUDA graph set of the layers is valid for (None: no graphs this forward):
        a training forward past the warm-up whose token split was made ahead; its shape, the
        split's sizes, for packed rows their count of sequences (`starts`), and the autocast
        dtype (None: no autocast)."""
        if (not model.training or run.force_dense or not run.sparse_now()
                or run.record is not None or run.shared_rows is None
                or run.shared_rows[0][0] != run.forward_id):
            return None
        rows = run.shared_rows[1]
        split = run.splits.of(rows)
        sequences = self._sequences(starts)
        return (tuple(rows.shape), rows.device, split.capacities, split.score_weight is not None,
                sequences, autocast_dtype(rows.device))

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
        if self._head is not None:
            self._head.undo()
            self._head = None
        self._undo_loss()
        for hook in self._hooks:
            hook.remove()
        if self.model.__dict__.get("_sparselora") is self:
            del self.model.__dict__["_sparselora"]
            copying.remove(self.model)
        self._layers, self._undo_loss, self._hooks = [], lambda: None, []
        self._copy_instead, self._glue = {}, ()
        if self._undo_varlen is not None:
            self._undo_varlen()
            self._undo_varlen = None
        self.graphs = None  # its dispatch went with the compiled layers; frees the graphs' memory
        return self.model

    # ---- standing in for the model -----------------------------------------------------------
    @property
    def __class__(self):
        """The model's class, as transparent proxies do (`wrapt.ObjectProxy`): the HF Trainer
        picks what to save and how to resume by `isinstance(model, (PeftModel, PreTrainedModel))`,
        so the wrapper is saved as adapters and resumed through `load_adapter`, like the model.
        `type(wrapper)` is still SparseLoRAModel."""
        model = self.__dict__.get("_modules", {}).get("model")
        return type(self) if model is None else model.__class__

    def _get_name(self) -> str:
        return type(self).__name__  # for repr: nn.Module names itself by __class__

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """The model's modules and names (`named_parameters`, `parameters`, `named_buffers`
        follow, as in nn.Module): optimizer groups, DDP and parameter names see the model's
        names, as in the state dict."""
        return self.model.named_modules(memo, prefix, remove_duplicate)

    def save_pretrained(self, *args, **kwargs):
        """The model's `save_pretrained` (a PEFT model saves its adapters only)."""
        return self.model.save_pretrained(*args, **kwargs)

    def __deepcopy__(self, memo):
        """A new wrapper compiling a copy of the model, with a run of its own (copying.py)."""
        model = copy.deepcopy(self.model, memo)
        return SparseLoRAModel(model, self.policy, **self._args)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.model)))


DORA_MESSAGE = (
    "sparselora: DoRA adapters (use_dora=True) are not supported: DoRA rescales every output "
    "channel of a layer by magnitude / ||W + scale * B A|| over the whole base weight, which a "
    "sparse base product does not preserve, and PEFT's DoRA forward breaks the compiled graph. "
    "Use LoraConfig(use_dora=False) (found on: {where})")


def _refuse_without_lora(model: torch.nn.Module) -> None:
    """The rewrite finds its blocks by PEFT's LoRA adapters (`<layer>.lora_A[<adapter>]`):
    without any, nothing would be sparse and the model would train dense, in silence."""
    if not any(name.rsplit(".", 1)[-1] == "lora_A" and len(mod) for name, mod in model.named_modules()):
        raise ValueError(
            f"sparselora: the model ({type(model).__name__}) has no LoRA adapters, so there is "
            "nothing to make sparse: SparseLoRA computes the frozen base products of a LoRA "
            "fine-tune sparsely, and finds them by PEFT's adapters. Add them first: "
            "peft.get_peft_model(model, LoraConfig(target_modules=[...]))")


def _refuse_dora(model: torch.nn.Module) -> None:
    """PEFT keeps a DoRA adapter's magnitude in `<layer>.lora_magnitude_vector[<adapter>]`."""
    found = [name for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] == "lora_magnitude_vector" and len(mod)]
    if found:
        more = f" and {len(found) - 2} more" if len(found) > 2 else ""
        raise ValueError(DORA_MESSAGE.format(where=", ".join(n.rsplit(".", 1)[0] for n in found[:2]) + more))


def _graphable(graphs, kwargs) -> bool:
    """Whether this batch can replay graphs at all (CUDA, unless a test stands in)."""
    ids = kwargs.get("input_ids")
    return graphs is not None and not graphs.disabled and (
        not graphs.needs_cuda or (isinstance(ids, torch.Tensor) and ids.is_cuda))


def _without_model_prefix(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: the wrapped model's keys, without the wrapper's `model.`."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _with_model_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: the inverse of `_without_model_prefix`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


def _forward_with_signature(wrapper: SparseLoRAModel, model: torch.nn.Module):
    """The wrapper's forward, showing the signature that the HF Trainer reads for this
    model: for a PEFT model, its base model's (the Trainer drops dataset columns that the
    signature does not name; `*args, **kwargs` would drop them all)."""
    ref = weakref.ref(wrapper)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(*args, **kwargs):
        return SparseLoRAModel.forward(ref(), *args, **kwargs)
    try:
        forward.__signature__ = inspect.signature(inner.forward)
    except (TypeError, ValueError):
        pass
    forward.__doc__ = SparseLoRAModel.forward.__doc__
    return forward


def compile(model: torch.nn.Module, policy: Policy | None = None, *, regional: bool = True,
            cuda_graphs: bool = False, graph_bucket: int = 0, graph_sets: int | None = None,
            pad_to_multiple_of: int = 0,
            dynamic: bool | None = None, causal_right_padding: bool = True, varlen_attention: bool = True,
            padding_free: bool = True, supervised_head: bool = False, **options) -> SparseLoRAModel:
    """`regional`: compile one decoder layer per distinct plan and reuse it, in place (the
    model itself then trains sparse, see above); `cuda_graphs`: replay those layers as CUDA
    graphs in training (see above; they turn themselves off, with a warning, where their
    replays are not faster than ungraphed steps); `graph_bucket` (with cuda_graphs, opt-in;
    tokens): fill packed rows (padding-free ones, and the caller's) up to multiples of it (pad other
    batches' lengths to multiples of their share of it per row) and round the token split's dense rows up to multiples of a
    quarter of it, so that graphs captured for one batch serve batches of nearby lengths
    (a padded batch no kept set of its own length fits may be filled up to one bucket
    further, to a kept set's length; 0, the default: exact shapes; README "CUDA graphs"
    has what bucketing measured);
    `graph_sets` (with cuda_graphs; default 3): how many graph sets (keys) are kept, each
    holding its own static activations and gradients: fewer keep less memory and replay
    fewer kinds of batches; `pad_to_multiple_of` (opt-in):
    right-pad every training batch's length to a multiple of it, as HF collators'
    option of that name does (8 keeps Inductor's CUDA attention-mask alignment guard
    from recompiling every layer graph at the first aligned length of packed rows);
    `dynamic` (default True): mark the batch and sequence dims dynamic before the first
    compile (one compile for all lengths; dynamic_dims.py), False leaves shapes to Dynamo
    (static, recompiled dynamic at a second shape): for batches of one shape, whose static
    graphs compile ~2x faster; `causal_right_padding` (default True): training batches whose
    attention mask pads only at the right end run causal attention without the mask (fused
    causal SDPA kernels; outputs at real positions, loss and gradients unchanged, see
    padding.py), on models whose attention modules are all causal; False keeps the mask;
    `varlen_attention` (default True): on HF models with SDPA attention, all causal, forwards
    whose rows are packed (position ids restarting within a row, no attention mask) run
    variable-length flash attention instead of SDPA over HF's block-diagonal mask (the same
    result; packing.py); False leaves HF's SDPA attention in place; `padding_free` (default
    True, with varlen_attention, unless pad_to_multiple_of is set): right-padded training
    batches whose labels leave the padding and each row's first token unsupervised run as
    one packed row of their real tokens (no work on padding; loss and gradients unchanged;
    the logits come back padded, zeros at the padding; packing.unpad);
    `supervised_head` (opt-in): training forwards with labels run the LM head only on the
    positions whose next token is supervised (the same loss and gradients; such forwards
    return logits=None; supervised_head.py).
    `options`: the backend's (`backend.BackendOptions`)."""
    return SparseLoRAModel(model, policy, regional=regional, cuda_graphs=cuda_graphs,
                           graph_bucket=graph_bucket, graph_sets=graph_sets,
                           pad_to_multiple_of=pad_to_multiple_of, dynamic=dynamic, causal_right_padding=causal_right_padding,
                           varlen_attention=varlen_attention, padding_free=padding_free,
                           supervised_head=supervised_head, **options)


def run_of(model) -> Run:
    """The run of a model compiled with this backend: an `slc.compile` wrapper or the model
    it compiled regionally, or `torch.compile(model, backend="sparselora", options={...})`
    once it has run a forward."""
    if isinstance(model, SparseLoRAModel):
        return model.run
    wrapper = getattr(model, "__dict__", {}).get("_sparselora")
    if isinstance(wrapper, SparseLoRAModel):
        return wrapper.run
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
