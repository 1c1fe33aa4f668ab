"""Packed rows run variable-length attention (`varlen_attention`, on by default), and
right-padded training batches run as packed rows (`padding_free`, on by default).

A packed batch (HF `DataCollatorWithFlattening`, TRL's padding-free packing) holds several
sequences back to back in a row, with `position_ids` restarting at 0 for each and no
attention mask. For SDPA, HF builds from those position ids a [B, 1, T, T] block-diagonal
causal mask, and SDPA given a mask runs its memory-efficient kernel over every (query,
key) pair of the row: on a 4096-token row holding ~9 sequences that is some 9x the
attention work the sequences need.

`slc.compile` switches the model's attention implementation from "sdpa" to
`IMPLEMENTATION`, which is HF's SDPA attention (and HF's SDPA mask) except in forwards
that carry HF's varlen keyword `cu_seq_lens_q` (the sequence boundaries, as HF's flash
attention integration takes them): those run `runtime.varlen_attention` on the row's
tokens, which computes the same block-diagonal causal attention by PyTorch's flash varlen
kernel (with the layer's sliding window, where it keeps one: `layer_window`). The wrapper adds the boundaries to a forward whose position ids restart within a
row and that has no attention mask and no cache (`packed_sequences`); `uncompile()` puts
"sdpa" back. Outputs, loss and gradients are those of the masked SDPA (to the kernels'
rounding).

`unpad` turns a right-padded training batch into one packed row of its real tokens with
their boundaries, so that no work runs on padding; `Unpadded.repad` gives the logits back
in the batch's shape. For CUDA graph buckets (`graph_bucket`), `unpad` and `fill_packed`
(a caller's packed row) fill the row up to its bucket with short filler sequences, so
that rows of nearby lengths share one shape and one count of sequences.

A forward that runs varlen attention hands HF a prepared 4D mask (`without_hf_mask`), which
HF passes through as it is: HF would otherwise check the position ids for packed sequences
(a device sync) and build the [1, 1, N, N] block-diagonal mask that the varlen path never
reads (16 MiB at N = 4,096, and under CUDA graphs copied into every layer's static input
on each replay).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparselora_compile.runtime.row_split import bucket_step
from sparselora_compile.runtime.token_rows import dense_token_rows
from sparselora_compile.runtime.varlen_attention import block_causal_mask, packed_causal_attention

from .padding import IGNORE, not_right_padded

IMPLEMENTATION = "sparselora_sdpa"
_hf_sdpa = None  # HF's SDPA attention function, bound by register() (transformers loads lazily)
SEQ_STARTS = "cu_seq_lens_q"  # HF's FlashAttentionKwargs name, passed down to the attention
WINDOW_ATTR = "sparselora_window"  # an attention layer's sliding window, noted by install()


def packed_sequences(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The sequence boundaries (int32 [S + 1], from 0 to B * T) of the flattened [B, T]
    tokens, when some row holds more than one sequence: a new sequence starts at each row's
    first token and wherever a position id is not the previous one plus 1 (HF's rule,
    `masking_utils.find_packed_sequence_indices`). None for rows of one sequence each.
    Reads the device once (the count of sequences)."""
    b, t = position_ids.shape
    pos = position_ids.reshape(-1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[1:] = pos[1:] != pos[:-1] + 1
    start[::t] = True
    starts = start.nonzero().squeeze(1)
    if starts.numel() == b:
        return None
    end = torch.full((1,), b * t, dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


def add_sequence_starts(kwargs: dict) -> tuple[dict, bool]:
    """`kwargs` with `cu_seq_lens_q` when its rows are packed ([B, T] `position_ids`, no
    `attention_mask`, no cache); (kwargs, whether the forward runs varlen attention). A
    caller's own `cu_seq_lens_q` (TRL's padding-free collator passes HF's flash-attention
    keywords) is kept, and counts."""
    if isinstance(kwargs.get(SEQ_STARTS), torch.Tensor):
        return kwargs, kwargs.get("past_key_values") is None
    pos = kwargs.get("position_ids")
    if (not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] < 2
            or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None):
        return kwargs, False
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if isinstance(ids, torch.Tensor) and ids.shape[0] != pos.shape[0]:
        pos = pos.expand(ids.shape[0], -1)  # position ids given once for every row
    starts = packed_sequences(pos)
    if starts is None:
        return kwargs, False
    return {**kwargs, SEQ_STARTS: starts}, True


@dataclass(frozen=True)
class Unpadded:
    """Where a packed row's tokens came from: `index` [N] their flat positions in the
    [batch, length] padded batch (None for a caller's packed row, filled: its first
    `length` tokens are the row); `real` [1, C] the row's real tokens (1) and filler (0),
    None without filler (C = N)."""
    index: torch.Tensor | None
    batch: int
    length: int
    real: torch.Tensor | None = None

    @property
    def filler(self) -> int:
        """The row's trailing filler tokens."""
        if self.real is None:
            return 0
        return self.real.shape[1] - (self.index.numel() if self.index is not None else self.length)

    def repad(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, C, V] -> [batch, length, V], zeros at the padding (differentiable)."""
        if self.index is None:
            return logits[:, : self.length]
        flat = logits.new_zeros(self.batch * self.length, logits.shape[-1])
        rows = logits[0, : self.index.numel()]
        return flat.index_copy(0, self.index, rows).view(self.batch, self.length, -1)


FILLER_SEQUENCES = 4  # the filler's pieces: short sequences keep its attention work small
SEQUENCE_STEP = 8     # a filled packed row's count of sequences is rounded up to a multiple


UNPADDABLE = {"input_ids", "attention_mask", "labels", "num_items_in_batch", "return_dict",
              "use_cache", "logits_to_keep"}


def unpad(kwargs: dict, bucket: int = 0, filler_id: int = 0,
          fill_to: Callable[[int, int, int], int] | None = None) -> tuple[dict, Unpadded | None]:
    """A right-padded training batch as one packed row (`padding_free`): the real tokens
    back to back, `position_ids` restarting per row, `cu_seq_lens_q` the rows' boundaries,
    each row's first label -100. The loss reads the same (logit, label) pairs: a row's
    last token, which predicted a padded position (-100), now predicts the next row's
    first token, whose label must then be -100 too, which is why this applies only when
    every row's first label already is (HF's shifted loss never reads it, but the token
    split would count a supervised first token as an output token). Applies to [B, T]
    `input_ids`, `attention_mask` and `labels`, nothing else of shape (no `position_ids`,
    cache, embeddings, hidden-state outputs); else (kwargs, None), without the mask when it
    has no padding. Reads the device once.

    `bucket` > 0 (CUDA graph buckets): the row is filled up to a capacity, the multiple of
    `row_split.bucket_step` that leaves room for the filler after the N real tokens (see
    `_filler`), so that rows of nearby
    lengths have one shape and one count of sequences (a graph serves them all). The
    filler is FILLER_SEQUENCES sequences of `filler_id` tokens labelled -100, after every
    real token: no real token attends to it, the loss skips it, and `Unpadded.real` tells
    the estimator to leave it out of its scores. `fill_to(n, dense rows, length)` may
    choose a longer filled length than the bucket's (a kept graph set's: see
    wrapper._fill_to); the dense rows are counted in the same read of the device."""
    ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(mask, torch.Tensor)
            or mask.shape != ids.shape or not isinstance(labels, torch.Tensor) or labels.shape != ids.shape
            or any(k not in UNPADDABLE and v is not None and v is not False for k, v in kwargs.items())
            or kwargs.get("use_cache") or kwargs.get("logits_to_keep", 0) != 0):
        return kwargs, None
    b, t = ids.shape
    real = mask.bool()
    bad = not_right_padded(real, labels) | (labels[:, 0] != IGNORE).any()
    counts = [bad.long()[None], real.sum(1)]
    if fill_to is not None:  # the dense rows, for fill_to
        counts.append((dense_token_rows(labels) & real).sum()[None])
    facts = torch.cat(counts).tolist()  # the one sync
    if facts[0]:
        return kwargs, None
    lengths = facts[1:1 + b]
    if all(n == t for n in lengths):  # no padding: a mask of ones, as HF drops itself
        return {k: v for k, v in kwargs.items() if k != "attention_mask"}, None
    n = sum(lengths)
    filler = _filler(n, bucket)
    if filler and fill_to is not None:
        filler = _filler(n, bucket, length=fill_to(n, facts[-1], n + sum(filler)))
    seqs = lengths + filler
    host = torch.cat([torch.arange(i * t, i * t + k) for i, k in enumerate(lengths)]  # flat index
                     + [torch.arange(k) for k in seqs]                               # positions
                     + [torch.tensor([0] + seqs).cumsum(0)])
    host = _to_device(host, ids.device)
    fill = sum(filler)
    c = n + fill
    index, positions, starts = host[:n], host[n:n + c], host[n + c:].to(torch.int32)
    flat = lambda x, value: _filled(x.reshape(-1).index_select(0, index)[None], fill, value)  # noqa: E731
    out = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    out.update(input_ids=flat(ids, filler_id), labels=flat(labels, IGNORE), position_ids=positions[None],
               **{SEQ_STARTS: starts})
    return out, Unpadded(index, b, t, _real_tokens(n, fill, ids.device))


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy, from pinned memory to a GPU: a pageable one would wait for the GPU."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _filled(row: torch.Tensor, fill: int, value) -> torch.Tensor:
    """[1, n] -> [1, n + fill], the filler tokens `value`."""
    return torch.cat([row, row.new_full((1, fill), value)], 1) if fill else row


def _real_tokens(n: int, fill: int, device) -> torch.Tensor | None:
    """`Unpadded.real` of a row of n real tokens then `fill` filler ones (None without)."""
    return (torch.arange(n + fill, device=device) < n).long()[None] if fill else None


def _filler(n: int, bucket: int, pieces: int = FILLER_SEQUENCES, length: int = 0) -> list[int]:
    """The filler sequences' lengths that take `n` real tokens up to their bucket, or up to
    `length` when that is longer (none without a bucket): `pieces` of them, each at least
    one token, so that the count of sequences does not change with n."""
    if bucket <= 0:
        return []
    step = bucket_step(n + pieces, bucket)
    total = max(-(-(n + pieces) // step) * step, length) - n
    each, extra = divmod(total, pieces)
    return [each + (i < extra) for i in range(pieces)]


FILLABLE = {"input_ids", "labels", "position_ids", "num_items_in_batch", "return_dict",
            "use_cache", "logits_to_keep", "attention_mask"}


def fill_packed(kwargs: dict, bucket: int, filler_id: int = 0) -> tuple[dict, Unpadded | None]:
    """A caller's packed training row ([1, N] `input_ids`, `labels` and `position_ids`
    restarting per sequence, no attention mask, no cache, no boundaries of its own) with
    `cu_seq_lens_q` added and filled up to its CUDA graph bucket, as `unpad` fills (same
    filler, same `Unpadded.real`); its count of sequences is rounded up to a multiple of
    SEQUENCE_STEP by more filler sequences (plus FILLER_SEQUENCES), so that a graph serves
    rows of nearby lengths and counts. Else (kwargs, None). Reads the device once (the
    boundaries' count, as `add_sequence_starts`)."""
    ids, labels, pos = kwargs.get("input_ids"), kwargs.get("labels"), kwargs.get("position_ids")
    if (bucket <= 0 or any(not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != 1
                           or x.shape != ids.shape for x in (ids, labels, pos))
            or kwargs.get("attention_mask") is not None or kwargs.get("use_cache")
            or kwargs.get("logits_to_keep", 0) != 0
            or any(k not in FILLABLE and v is not None and v is not False for k, v in kwargs.items())):
        return kwargs, None
    out, packed = add_sequence_starts(kwargs)
    if not packed:
        return kwargs, None
    n, s = ids.shape[1], out[SEQ_STARTS].numel() - 1
    filler = _filler(n, bucket, -(-s // SEQUENCE_STEP) * SEQUENCE_STEP - s + FILLER_SEQUENCES)
    fill = sum(filler)
    host = _to_device(torch.cat([torch.arange(k) for k in filler] + [n + torch.tensor(filler).cumsum(0)]),
                      ids.device)
    positions, ends = host[:fill].to(pos.dtype), host[fill:].to(torch.int32)
    out.update(input_ids=_filled(ids, fill, filler_id), labels=_filled(labels, fill, IGNORE),
               position_ids=torch.cat([pos, positions[None]], 1),
               **{SEQ_STARTS: torch.cat([out[SEQ_STARTS], ends])})
    out.pop("attention_mask", None)
    return out, Unpadded(None, 1, n, _real_tokens(n, fill, ids.device))


_PREPARED: dict = {}  # device -> the stand-in mask of varlen forwards


def without_hf_mask(kwargs: dict) -> dict:
    """`kwargs` of a forward that runs varlen attention, with a stand-in 4D attention mask
    (one [1, 1, 1, 1] tensor per device, so that graph replays copy nothing): HF returns a
    prepared 4D mask as it is, skipping its packed-sequence check and mask. `attention`
    builds the real mask from the boundaries where a layer falls back to HF's SDPA."""
    device = kwargs[SEQ_STARTS].device
    mask = _PREPARED.get(device)
    if mask is None:
        mask = _PREPARED[device] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    return {**kwargs, "attention_mask": mask}


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
              is_causal=None, **kwargs):
    """HF attention function: q [B, Hq, T, D], k and v [B, Hkv, T, D]; returns
    ([B, T, Hq, D], None) as HF's SDPA function does."""
    starts = kwargs.get(SEQ_STARTS)
    if starts is None or dropout > 0.0 or is_causal is False or not getattr(module, "is_causal", True):
        if starts is not None and attention_mask is not None and attention_mask.shape[-1] < query.shape[2]:
            # the stand-in (without_hf_mask): HF's mask, made here
            attention_mask = block_causal_mask(starts, query.shape[0], query.shape[2],
                                               layer_window(module, kwargs))[:, None]
        return _hf_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)
    b, hq, t, d = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # noqa: E731
    out = packed_causal_attention(flat(query), flat(key), flat(value), starts.to(torch.int32), scaling,
                                  layer_window(module, kwargs))
    return out.view(b, t, hq, d), None


def layer_window(module, kwargs: dict) -> int | None:
    """The sliding window (tokens) of the attention layer HF is calling, None for one that
    attends whole sequences: what HF passes it as `sliding_window` (models that support
    flash attention pass their layer's, None on full layers), else what `install` noted on
    the layer (`config_window` by its type), else the config's for its `layer_idx`."""
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
        return window if isinstance(window, int) and window > 0 else None
    if hasattr(module, WINDOW_ATTR):
        return getattr(module, WINDOW_ATTR)
    return config_window(getattr(module, "config", None), getattr(module, "layer_idx", None))


def _note_windows(base: torch.nn.Module, note: bool = True) -> None:
    """Note (or remove) each attention layer's sliding window as `WINDOW_ATTR`, read once
    here: Dynamo specializes a compiled layer on the int attributes it reads (torch 2.11
    even on unused ones), so reading `layer_idx` in every call would compile each decoder
    layer apart, up to the recompile limit, where layers with one window share a graph."""
    for m in base.modules():
        if not note:
            m.__dict__.pop(WINDOW_ATTR, None)
        elif isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config"):
            setattr(m, WINDOW_ATTR, config_window(m.config, m.layer_idx))


def register() -> None:
    """Make `IMPLEMENTATION` known to HF (its mask: the one HF builds for SDPA)."""
    global _hf_sdpa
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    _hf_sdpa = sdpa_attention_forward
    AttentionInterface.register(IMPLEMENTATION, attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install(model: torch.nn.Module):
    """Switch an HF model whose attention is "sdpa" to `IMPLEMENTATION`; returns the undo,
    or None for a model it does not apply to (another attention implementation, a model
    without HF's attention interface). A model already switched (a deep copy of a compiled
    one) stays switched, with the same undo."""
    base = _base(model)
    config = getattr(base, "config", None)
    if (getattr(config, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION)
            or not hasattr(base, "set_attn_implementation")):
        return None
    register()
    if config._attn_implementation == "sdpa":
        base.set_attn_implementation(IMPLEMENTATION)
    if config._attn_implementation != IMPLEMENTATION:  # a model HF cannot switch
        return None
    _note_windows(base)
    return lambda: uninstall(model)


def uninstall(model: torch.nn.Module) -> None:
    """Put HF's "sdpa" back on a model switched to `IMPLEMENTATION` (else nothing)."""
    base = _base(model)
    if getattr(getattr(base, "config", None), "_attn_implementation", None) == IMPLEMENTATION:
        base.set_attn_implementation("sdpa")
        _note_windows(base, note=False)


def config_window(config, layer: int | None = None) -> int | None:
    """The sliding window (in tokens) an HF config gives its attention layers (layer number
    `layer`; None: any of them), None for whole sequences: `sliding_window`, unless
    `use_sliding_window` is False, on the layers whose `layer_types` entry is a sliding one
    (every layer without `layer_types`)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is None:
        return window
    kinds = types if layer is None or not 0 <= layer < len(types) else [types[layer]]
    return window if any("sliding" in str(t) for t in kinds) else None


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
