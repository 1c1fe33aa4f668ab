"""Causal attention over packed sequences: tokens [N, heads, head_dim] holding several
sequences back to back, `cu_seqlens` [S + 1] (int32) their boundaries; each token attends
to the tokens of its own sequence at or before it.

`packed_causal_attention` runs PyTorch's flash varlen kernel (`torch.nn.attention.varlen`)
on CUDA in fp16/bf16: it visits only the (query, key) tiles inside a sequence's causal
triangle, where SDPA given the block-diagonal [N, N] mask runs the memory-efficient
kernel over every pair. Elsewhere (CPU, fp32, a torch without the module) it runs
`reference_packed_attention`, the definition written as plain SDPA with that mask.
"""
from __future__ import annotations

import inspect

import torch

try:
    from torch.nn.attention.varlen import varlen_attn
    _PARAMS = inspect.signature(varlen_attn).parameters
except ImportError:  # torch without it: the reference runs
    varlen_attn, _PARAMS = None, {}

# torch 2.10 and 2.11 take `is_causal`; later versions a (left, right) `window_size`, where
# (-1, 0) is causal, and `enable_gqa`.
_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _PARAMS else {"is_causal": True}
_GQA = "enable_gqa" in _PARAMS


def flash_usable(q: torch.Tensor) -> bool:
    """Whether the flash varlen kernel takes these queries (its dtype and head-size limits)."""
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """The sequence index of each of the `n` packed tokens."""
    tokens = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def reference_packed_attention(q, k, v, cu_seqlens, scale: float | None = None) -> torch.Tensor:
    """The definition, slowly: SDPA over all N tokens with the block-diagonal causal mask.
    q [N, Hq, D], k and v [N, Hkv, D] (query head h reads kv head h // (Hq // Hkv), as HF's
    `repeat_kv`); returns [N, Hq, D]."""
    n, groups = q.shape[0], q.shape[1] // k.shape[1]
    seg = segment_ids(cu_seqlens, n)
    pos = torch.arange(n, device=q.device)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def packed_causal_attention(q, k, v, cu_seqlens, scale: float | None = None) -> torch.Tensor:
    """q [N, Hq, D], k and v [N, Hkv, D], `cu_seqlens` [S + 1] int32 from 0 to N; [N, Hq, D]."""
    if not flash_usable(q):
        return reference_packed_attention(q, k, v, cu_seqlens, scale)
    groups = q.shape[1] // k.shape[1]
    extra = dict(_CAUSAL)
    if groups > 1:
        if _GQA:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    if scale is not None and "scale" in _PARAMS:
        extra["scale"] = scale
    elif scale is not None and scale != q.shape[-1] ** -0.5:
        return reference_packed_attention(q, k, v, cu_seqlens, scale)
    # The longest sequence is at most N: an upper bound the kernel sizes its grid by (tiles
    # past a sequence's end exit at once), which spares a device sync and keeps the
    # compiled graph free of a data-dependent int.
    n = q.shape[0]
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, n, n, **extra)
