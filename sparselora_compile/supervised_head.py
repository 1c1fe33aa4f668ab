"""The LM head on supervised positions only: `slc.compile(model, supervised_head=True)`.

A training loss reads the logits of the positions whose next token has a label
(`labels != -100`, shifted by one); the head's product over every other position (a
prompt, padding, filler) is thrown away, and on a LLaMA-3-8B-shaped model with a 128k
vocabulary it is among the largest products of the step (forward and input gradient).
So a training forward with labels passes HF's `logits_to_keep` the positions that some
row supervises, and the loss function gets the matching shifted labels (`shift_labels`):
the same loss and gradients, as HF's loss computes them. Such a forward returns
`logits=None` (what fused-loss kernels such as Liger's do); eval and no-grad forwards
return every position's logits.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .padding import IGNORE
from .regional import hf_base, replace_loss_function


def check(model: torch.nn.Module) -> None:
    """A clear error where the model cannot take it."""
    base = hf_base(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ValueError(f"sparselora: supervised_head=True needs a model whose forward takes "
                         f"logits_to_keep (transformers' causal LMs do); {type(base).__name__} does not")
    prop = getattr(type(base), "loss_function", None)
    if not isinstance(prop, property) or prop.fset is None:
        raise ValueError(f"sparselora: supervised_head=True hands the loss its labels through "
                         f"transformers' settable loss_function, which {type(base).__name__} lacks")


def supervised_positions(labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Positions (of the sequence dim) whose next token some row supervises, ascending."""
    keep = labels[..., 1:] != ignore_index  # the last position predicts nothing
    return (keep.any(0) if keep.dim() > 1 else keep).nonzero().squeeze(-1)


def shifted_labels_at(labels: torch.Tensor, positions: torch.Tensor,
                      ignore_index: int = IGNORE) -> torch.Tensor:
    """The label each kept position predicts: HF's shifted labels at `positions`."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shifted.index_select(-1, positions).contiguous()


class SupervisedHead:
    """The positions of the running forward, and the loss function wrapper that reads them."""

    def __init__(self, model: torch.nn.Module):
        check(model)
        self.positions: torch.Tensor | None = None
        base = hf_base(model)
        inner = base.loss_function

        def loss(*args, **kwargs):
            labels, pos = kwargs.get("labels"), self.positions
            if pos is not None and isinstance(labels, torch.Tensor) and kwargs.get("shift_labels") is None:
                ignore = kwargs.get("ignore_index", IGNORE)
                kwargs["shift_labels"] = shifted_labels_at(labels, pos, ignore)
                # the compiled loss reads the kept positions' labels, not these: one graph for every length
                torch._dynamo.maybe_mark_dynamic(labels, labels.dim() - 1)
            return inner(*args, **kwargs)
        self.undo = replace_loss_function(base, loss)
        self.loss, self.inner = loss, inner  # a deep copy of the model takes the plain loss (copying.py)

    def begin(self, kwargs: dict) -> dict:
        """A training forward: keep the head to the supervised positions, if it has labels
        and the caller chose no positions itself (nor asked for TRL's fused LM head, which
        `SFTTrainer` 1.16+ uses and which already projects the supervised positions only)."""
        labels, chosen = kwargs.get("labels"), kwargs.get("logits_to_keep")
        self.positions = None
        if kwargs.get("fused_lm_head"):  # TRL's fused head scores the supervised positions itself
            return kwargs
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and (chosen is None or
                                                                       isinstance(chosen, int) and chosen == 0):
            self.positions = supervised_positions(labels)
            kwargs = {**kwargs, "logits_to_keep": self.positions}
        return kwargs

    def end(self, output):
        """After the forward: its logits cover the kept positions only, so none are returned."""
        if self.positions is not None and isinstance(getattr(output, "logits", None), torch.Tensor):
            output["logits"] = None
        self.positions = None
        return output
