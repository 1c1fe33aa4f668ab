"""What the wrapper does to a training batch's padding before the model sees it.

- `pad_batch` right-pads the sequence length up to a multiple (CUDA graph buckets,
  `pad_to_multiple_of`).
- `packing.unpad` (`padding_free`, on by default) runs a right-padded training batch as
  one packed row of its real tokens; the batches it leaves padded come here.
- `unmask_right_padding` drops an attention mask that pads only at the right end of each
  row, in a batch whose labels leave the padding unsupervised (`causal_right_padding`, on
  by default). HF turns a padding mask into a [B, 1, T, T] mask for SDPA, which then
  cannot take its fused causal kernels (flash, cuDNN) and runs the memory-efficient
  kernel over every (query, key) pair, the future ones included: on an H200 with padded
  SFT batches (8 x ~500 tokens) that kernel took 12.8 ms of a 47 ms sparse step of 8
  LLaMA-3-8B layers. Under causal attention no real token sees a later position, so with
  the mask gone the outputs at real positions, the loss (which reads no padded position)
  and every gradient are unchanged; only the outputs at padded positions differ (they
  now also attend to the pads before them). HF makes the same call itself when the mask
  has no padding at all (`masking_utils._ignore_causal_mask_sdpa`).
"""
from __future__ import annotations

import torch

IGNORE = -100  # the label of a position the loss skips (HF's ignore_index)
PADDABLE = ("input_ids", "labels", "attention_mask", "position_ids")


def pad_batch(kwargs: dict, step: int, pad_id: int) -> tuple[dict, int, torch.Tensor | None]:
    """Right-pad a batch's sequence length up to a multiple of `step` (for CUDA graph
    buckets, `row_split.bucket_step`, so that graphs captured for one length serve the
    nearby ones; for `pad_to_multiple_of`, an aligned length): `input_ids` with `pad_id`,
    `labels` with -100, `attention_mask` with 0, `position_ids` restarting at 0 (a new
    sequence, as packed batches mark them). Appended positions come after every real one,
    so under causal attention no real token sees them and the loss ignores them.
    Returns (kwargs, positions added, the mask of real positions for the estimator).
    Batches with other [B, T] inputs (`inputs_embeds`, ...) are left as they are."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    shaped = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    if ids is None or ids.dim() != 2 or any(k not in PADDABLE for k in shaped):
        return kwargs, 0, mask
    n = (-ids.shape[1]) % step
    if n == 0:
        return kwargs, 0, mask
    pad = lambda t, value: torch.nn.functional.pad(t, (0, n), value=value)  # noqa: E731
    out = dict(kwargs, input_ids=pad(ids, pad_id))
    if kwargs.get("labels") is not None:
        out["labels"] = pad(kwargs["labels"], IGNORE)
    real = torch.ones_like(ids, dtype=torch.long) if mask is None else mask
    score_mask = pad(real, 0)
    if mask is not None:
        out["attention_mask"] = score_mask
    if kwargs.get("position_ids") is not None:
        tail = torch.arange(n, device=ids.device, dtype=kwargs["position_ids"].dtype)
        out["position_ids"] = torch.cat([kwargs["position_ids"], tail.expand(ids.shape[0], n)], 1)
    return out, n, score_mask


def pad_id(model) -> int:
    cfg = getattr(model, "config", None)
    pid = getattr(cfg, "pad_token_id", None)
    return pid if isinstance(pid, int) else 0


def causal_attention(model: torch.nn.Module) -> bool:
    """Whether every attention module of `model` is causal (HF attention modules carry
    `is_causal`; GPT-2's cross-attention has it False). False when none says so."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def right_padded(mask: torch.Tensor, labels: torch.Tensor | None = None) -> bool:
    """Whether a [B, T] attention mask (1 or True on real tokens) has no real token after
    a padded one in any row, and, with `labels`, none of its padded positions supervised
    (-100 there: the loss never reads a padded position's output). Reads the device once:
    one sync on CUDA, where HF's own mask check would otherwise make it."""
    return not bool(not_right_padded(mask.bool(), labels))


def not_right_padded(real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`right_padded`'s test on the device (a bool tensor, no sync): a real token after a
    padded one, or with `labels`, a supervised padded position. `real`: the bool mask."""
    bad = (real[:, 1:] & ~real[:, :-1]).any()
    if labels is not None:
        bad = bad | (labels.masked_fill(real, IGNORE) != IGNORE).any()
    return bad


def unmask_right_padding(kwargs: dict) -> tuple[dict, bool]:
    """`kwargs` without `attention_mask` when it is a right-padded [B, T] mask, the batch
    has `labels` of its shape that leave the padding unsupervised, and no cache is passed
    (a cache's earlier keys may be padding that later queries must not see); (kwargs,
    whether the mask was dropped). Without labels the caller's own loss might read the
    padded positions, so the mask stays."""
    mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] < 2
            or not isinstance(labels, torch.Tensor) or labels.shape != mask.shape
            or kwargs.get("past_key_values") is not None or not right_padded(mask, labels)):
        return kwargs, False
    return {k: v for k, v in kwargs.items() if k != "attention_mask"}, True
