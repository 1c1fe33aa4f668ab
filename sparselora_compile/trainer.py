"""Training with the Hugging Face `Trainer` and TRL's `SFTTrainer`.

The Trainer trains the PEFT model itself, not a wrapper around it: `slc.compile` (regional,
the default) compiles the decoder layers in place and installs its glue (labels to the
run, dense eval, step count) as forward hooks on the model, so the Trainer sees the class
it knows. Its checkpoints are then PEFT's adapter files, resuming loads them through
PEFT, `remove_unused_columns` reads the real forward signature, and gradient
checkpointing and the eval loop (dense under `no_grad`) need nothing more.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)   # or trl.SFTTrainer
    sparse = slc.trainer.prepare(trainer, policy, **options)           # before train()
    trainer.train()
    sparse.stats                                                       # saved FLOPs

A Trainer given the wrapper (`Trainer(model=slc.compile(peft_model, policy))`) sees a
`PeftModel` too (wrapper.py, "standing in"); it needs `callbacks=[SparseLoRACallback(...)]`
for the steps, and the run warns once when a Trainer runs a warm-up without it.

Steps. The policy's warm-up and `total_steps` are in optimizer steps (`state.global_step`):
`SparseLoRACallback` sets the run's step from `global_step` before every micro-batch, so
with gradient accumulation all micro-batches of one optimizer step share its step (the
run alone counts forwards), and a resumed run continues from the checkpoint's step, its
warm-up over or not. `stats.steps` still counts training forwards. The callback also saves
the run's statistics and the warm-up's input moments (`estimator="activation_aware"`)
with each checkpoint (`sparselora_run.pt`) and reloads them when training resumes from
`output_dir/checkpoint-<global_step>` (the Trainer does not tell callbacks where it
resumed from; from elsewhere, only the step resumes, and the activation-aware estimator
keeps SVD factors unless `moments=` was given to compile).

Not supported, said loudly: `TrainingArguments(torch_compile=True)` (accelerate accepts
only its own backend names, and the Trainer would compile the model a second time), and
`regional=False` (its glue lives in the wrapper, and prepare hands the Trainer the model).
Where the Trainer takes `labels` out of the batch before the model (label smoothing, a
`compute_loss_func`), output tokens cannot be told apart and are computed sparse; prepare
warns.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings

import torch
from transformers import TrainerCallback

from .policy import Policy
from .wrapper import SparseLoRAModel, compile

log = logging.getLogger("sparselora_compile")
RUN_FILE = "sparselora_run.pt"


def wrapper_of(model) -> SparseLoRAModel | None:
    """The `slc.compile` wrapper of `model` (the wrapper itself, or a model compiled in
    place), or None."""
    if isinstance(model, SparseLoRAModel):
        return model
    wrapper = getattr(model, "__dict__", {}).get("_sparselora")
    return wrapper if isinstance(wrapper, SparseLoRAModel) else None


class SparseLoRACallback(TrainerCallback):
    """Keeps the run's step equal to the Trainer's optimizer step (`state.global_step`),
    and saves / restores the run's statistics and warm-up moments with checkpoints."""

    def __init__(self, model):
        sparse = wrapper_of(model)
        if sparse is None:
            raise ValueError("sparselora: SparseLoRACallback needs a model compiled with "
                             "slc.compile(model, policy) (or its wrapper)")
        self.sparse = sparse
        sparse.steps_from_trainer = True

    def _sync(self, state) -> None:
        self.sparse.set_step(state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self._restore(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                          state.global_step)
        self._sync(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync(state)

    def on_substep_end(self, args, state, control, **kwargs):
        self._sync(state)  # the next micro-batch belongs to the same optimizer step

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(run_state(self.sparse, state.global_step), os.path.join(folder, RUN_FILE))

    def _restore(self, folder: str, step: int) -> None:
        path = os.path.join(folder, RUN_FILE)
        run = self.sparse.run
        if os.path.isfile(path):
            load_run_state(self.sparse, torch.load(path, weights_only=True))
            log.info("sparselora: resumed the run's statistics and moments from %s", path)
        elif run.collect_moments and step >= run.warmup_steps and not run.moments:
            warnings.warn(f"sparselora: resuming at step {step}, past the warm-up, without {path}: "
                          "the activation-aware estimator has no warm-up moments and keeps SVD "
                          "factors; pass moments=slc.collect_moments(...) to compile", stacklevel=2)


def run_state(sparse: SparseLoRAModel, step: int) -> dict:
    """What a checkpoint keeps of the run: its step, statistics and warm-up moments."""
    run = sparse.run
    moments = {name: {"dim": m.dim, "count": m.count, "sum": m._sum}
               for name, m in run.moments.items() if m._sum is not None}
    return {"step": int(step), "stats": dataclasses.asdict(run.stats), "moments": moments}


def load_run_state(sparse: SparseLoRAModel, saved: dict) -> None:
    from sparselora_compile.runtime.second_moment import SecondMoment
    run = sparse.run
    for key, value in saved.get("stats", {}).items():
        setattr(run.stats, key, int(value))
    for name, m in saved.get("moments", {}).items():
        moment = SecondMoment(m["dim"])
        moment._sum, moment.count = m["sum"], int(m["count"])
        run.moments[name] = moment
    sparse.set_step(saved["step"])


def prepare(trainer, policy: Policy | None = None, **options) -> SparseLoRAModel:
    """Make `trainer` (a `transformers.Trainer`, `trl.SFTTrainer`, ...) train its model with
    SparseLoRA: compile `trainer.model` in place with `slc.compile(model, policy, **options)`
    (or take the one already compiled, or the wrapper, whose model the Trainer then holds)
    and add `SparseLoRACallback`. Call it after creating the Trainer and before `train()`.
    Returns the wrapper (`.run`, `.stats`, `.step`)."""
    args = trainer.args
    if getattr(args, "torch_compile", False):
        raise ValueError("sparselora: TrainingArguments(torch_compile=True) would compile the model "
                         "a second time with accelerate's backend; leave it False, "
                         "slc.trainer.prepare compiles the model")
    if options.get("regional", True) is False:
        raise ValueError("sparselora: the Trainer path compiles regionally (the model is compiled in "
                         "place and the Trainer saves it as what it is); drop regional=False")
    options.pop("regional", None)
    model = trainer.model
    sparse = wrapper_of(model)
    if sparse is None:
        sparse = compile(model, policy, **options)
    elif policy is not None or options:
        raise ValueError("sparselora: trainer.model is already compiled with slc.compile; pass the "
                         "policy and options there, or prepare an uncompiled model")
    if not sparse.regional:
        raise ValueError("sparselora: this model was compiled with regional=False; the Trainer path "
                         "needs slc.compile(model, policy) with regional=True (the default)")
    if model is sparse:  # the Trainer gets the model itself: it saves what it knows (PEFT adapters)
        trainer.model = sparse.model
        if trainer.model_wrapped is model:
            trainer.model_wrapped = sparse.model
    if not any(isinstance(cb, SparseLoRACallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(SparseLoRACallback(sparse))
    if (getattr(trainer, "label_smoother", None) is not None
            or getattr(trainer, "compute_loss_func", None) is not None):
        warnings.warn("sparselora: this Trainer takes `labels` out of the batch before the model "
                      "(label smoothing or compute_loss_func), so output tokens cannot be told "
                      "apart and are computed sparse as well", stacklevel=2)
    return sparse
