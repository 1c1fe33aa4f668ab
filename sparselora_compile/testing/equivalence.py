"""`assert_rewrite_equivalent`: a compiled model against the reference semantics,
forward and gradients."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .reference import reference_semantics


@dataclass
class Comparison:
    loss: float
    reference_loss: float
    max_grad_error: float
    blocks_checked: int


def _loss_of(out):
    if isinstance(out, torch.Tensor):
        return out.float().pow(2).mean() if out.dim() else out
    loss = getattr(out, "loss", None)
    if loss is None:
        loss = out.logits.float().pow(2).mean()
    return loss


def _grads(model, extra):
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()
         if p.requires_grad and p.grad is not None}
    g.update({f"input:{k}": v.grad.detach().clone() for k, v in extra.items() if v.grad is not None})
    return g


def _run(model, inputs, call, seed=0):
    torch.manual_seed(seed)  # same dropout draws in both runs (eager and aot_eager share the RNG)
    inputs = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    out = call(**inputs)
    loss = _loss_of(out)
    loss.backward()
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return loss.detach(), _grads(model, leaves)


def assert_rewrite_equivalent(model: torch.nn.Module, inputs: dict, policy, *,
                              inner: str = "aot_eager", atol: float = 1e-4, rtol: float = 1e-4,
                              autocast_dtype: torch.dtype | None = None,
                              expect_blocks: int | None = None, regional: bool = False,
                              **options) -> Comparison:
    """Compile a copy of `model` with the sparselora backend, run forward and backward on
    `inputs` (keyword arguments; the loss is `out.loss`, else a function of the output),
    and compare the loss and every gradient (trainable parameters and inputs that require
    grad) with the eager model under the reference semantics, using the channel
    selections the compiled run made. Resets Dynamo's caches first. Raises AssertionError with the largest mismatch.
    `regional`: compile through `sparselora_compile.compile(..., regional=True)` (one graph
    per group of identically planned decoder layers) instead of the whole model.
    `options`: further backend options (e.g. `moments`)."""
    from sparselora_compile.wrapper import compile as slc_compile

    # Many models of one class exhaust Dynamo's per-code recompile limit, after which it
    # silently runs eager; a property test compiles hundreds, so start from a clean cache.
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    reference_model = copy.deepcopy(model)
    compiled = slc_compile(compiled_model, policy, regional=regional, inner=inner, record=True,
                           **options)
    amp = (torch.autocast(next(model.parameters()).device.type, dtype=autocast_dtype)
           if autocast_dtype else _nullcontext())
    with amp:
        loss_c, grads_c = _run(compiled_model, inputs, compiled)
    record = compiled.run.record  # empty when the policy left every block dense
    if expect_blocks is not None and len(record) != expect_blocks:
        raise AssertionError(f"expected {expect_blocks} rewritten blocks, {len(record)} ran: {sorted(record)}")
    with reference_semantics(reference_model, record), amp:
        loss_r, grads_r = _run(reference_model, inputs, reference_model)
    torch.testing.assert_close(loss_c, loss_r, atol=atol, rtol=rtol, msg=lambda m: f"loss: {m}")
    if set(grads_c) != set(grads_r):
        raise AssertionError(f"gradients differ in which tensors have them: "
                             f"{sorted(set(grads_c) ^ set(grads_r))}")
    worst = 0.0
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
        worst = max(worst, (grads_c[name] - grads_r[name]).abs().max().item())
    return Comparison(loss_c.item(), loss_r.item(), worst, len(record))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
