"""Causal attention over packed sequences: tokens [N, heads, head_dim] holding several
sequences back to back, `cu_seqlens` [S + 1] (int32) their boundaries; each token attends
to the tokens of its own sequence at or before it, and with a sliding `window` only to the
last `window` of them, itself included (HF's rule: a key less than `window` positions
back).

`packed_causal_attention` runs PyTorch's flash attention kernel in its variable-length
form on CUDA in fp16/bf16: it visits only the (query, key) tiles inside a sequence's
causal triangle, where SDPA given the block-diagonal [N, N] mask runs the
memory-efficient kernel over every pair. It calls the ATen ops `_flash_attention_forward`
/ `_flash_attention_backward` (what `torch.nn.attention.varlen` wraps) from an autograd
Function, which Dynamo traces into the graph: Inductor then calls them directly, not
through a Python custom op on every layer's forward and backward (the host time of a
sparse step counts, bench/README.md). Elsewhere (CPU, fp32) it runs
`reference_packed_attention`, the definition written as plain SDPA with that mask.
"""
from __future__ import annotations

import torch


def flash_usable(q: torch.Tensor) -> bool:
    """Whether the flash kernel takes these queries (its dtype and head-size limits). It also
    needs an Ampere or newer GPU (sm80+), which is not checked: the H200 is what ran it."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """The sequence index of each of the `n` packed tokens."""
    tokens = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def block_causal_mask(cu_seqlens: torch.Tensor, b: int, t: int, window: int | None = None) -> torch.Tensor:
    """[b, t, t] bool for b rows of t packed tokens (`cu_seqlens` over the b * t tokens):
    each token sees the tokens of its own sequence at or before it (the last `window`)."""
    seg = segment_ids(cu_seqlens, b * t).view(b, t)
    pos = torch.arange(t, device=cu_seqlens.device)
    back = pos[:, None] - pos[None, :]  # within a sequence: how far back the key is
    mask = (seg[:, :, None] == seg[:, None, :]) & (back >= 0)
    return mask if window is None else mask & (back < window)


def reference_packed_attention(q, k, v, cu_seqlens, scale: float | None = None,
                               window: int | None = None) -> torch.Tensor:
    """The definition, slowly: SDPA over all N tokens with the block-diagonal causal mask.
    q [N, Hq, D], k and v [N, Hkv, D] (query head h reads kv head h // (Hq // Hkv), as HF's
    `repeat_kv`); returns [N, Hq, D]."""
    n, groups = q.shape[0], q.shape[1] // k.shape[1]
    mask = block_causal_mask(cu_seqlens, 1, n, window)[0]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class _FlashVarlenCausal(torch.autograd.Function):
    """Flash attention, causal within each sequence of `cu_seqlens`, no dropout; `left`: the
    keys a query sees before itself (None: all), flash's `window_size_left`."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int, scale: float, left: int | None):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=None if left is None else 0)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_len, ctx.scale, ctx.left = max_len, scale, left
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len,
            0.0, True, seed, offset, scale=ctx.scale, window_size_left=ctx.left,
            window_size_right=None if ctx.left is None else 0)
        return dq, dk, dv, None, None, None, None


def packed_causal_attention(q, k, v, cu_seqlens, scale: float | None = None,
                            window: int | None = None) -> torch.Tensor:
    """q [N, Hq, D], k and v [N, Hkv, D], `cu_seqlens` [S + 1] int32 from 0 to N; [N, Hq, D].
    `window`: a sliding window, in tokens (None: whole sequences)."""
    if window is not None and window <= 0:
        raise ValueError(f"sparselora: a sliding window of {window} tokens attends to nothing")
    if not flash_usable(q):
        return reference_packed_attention(q, k, v, cu_seqlens, scale, window)
    # Grouped-query k and v go in with their own head count: the kernel maps query head h to
    # kv head h // (Hq // Hkv) itself (HF's repeat_kv layout), so no [N, Hq, D] copies are
    # made in the forward, saved for the backward, or summed back per group after it.
    q, k, v = (t.contiguous() for t in (q, k, v))
    # The longest sequence is at most N: an upper bound the kernel sizes its grid by (tiles
    # past a sequence's end exit at once), which spares a device sync and keeps the
    # compiled graph free of a data-dependent int.
    n = q.shape[0]
    return _FlashVarlenCausal.apply(q, k, v, cu_seqlens, n, q.shape[-1] ** -0.5 if scale is None else scale,
                                    None if window is None else window - 1)
