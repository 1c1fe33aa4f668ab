"""Channel selection: estimator scores, one top-k per block, and the GQA channel maps.

Plain PyTorch; the CUDA path swaps the score computation for the fused Triton estimator.
Scores use context rows only (output rows are dense and never read the selection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _context_rows(x: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
    from .row_split import scored_rows, split_of
    return scored_rows(x.reshape(-1, x.shape[-1]), split_of(dense_rows)).float()


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (sorted indices keep the gathers
    coalesced and make the selection a set, independent of top-k's tie order)."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


def mlp_scores(x, a_gate, b_gate, a_up, b_up, dense_rows) -> torch.Tensor:
    """Squared L2 norm over context tokens of silu(x A_g B_g) * (x A_u B_u), per channel."""
    xc = _context_rows(x, dense_rows)
    gated = F.silu(xc @ a_gate @ b_gate) * (xc @ a_up @ b_up)
    return gated.square().sum(0)


def column_sq_norms(x, a, b, dense_rows) -> torch.Tensor:
    xc = _context_rows(x, dense_rows)
    return (xc @ a @ b).square().sum(0)


def expand_kv_channels(kv_idx: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """Query-side channels for kept kv channels under the repeat_kv layout: query head h
    reads kv head h // n_rep, so kv channel (g, d) maps to (h, d) for every h in group g."""
    n_rep = n_heads // n_kv_heads
    g, d = kv_idx // head_dim, kv_idx % head_dim
    heads = g[:, None] * n_rep + torch.arange(n_rep, device=kv_idx.device)[None, :]
    return (heads * head_dim + d[:, None]).reshape(-1).sort().values


def attention_selection(x, factors, dense_rows, k_qk: int, k_v: int,
                        n_heads: int, n_kv_heads: int, head_dim: int, norms=column_sq_norms):
    """Returns (idx_q, idx_k, idx_v, idx_o).

    QK score of kv channel (g, d): ||K_hat(g,d)|| * sum over h in group g of ||Q_hat(h,d)||.
    V score: ||V_hat(g,d)||. o keeps the input channels whose kv head kept V channel (g, d).
    """
    (aq, bq), (ak, bk), (av, bv) = factors
    n_rep = n_heads // n_kv_heads
    q = norms(x, aq, bq, dense_rows).sqrt().view(n_kv_heads, n_rep, head_dim).sum(1)
    k = norms(x, ak, bk, dense_rows).sqrt().view(n_kv_heads, head_dim)
    v = norms(x, av, bv, dense_rows)
    idx_k = top_channels((q * k).reshape(-1), k_qk)
    idx_v = top_channels(v, k_v)
    idx_q = expand_kv_channels(idx_k, n_heads, n_kv_heads, head_dim)
    idx_o = expand_kv_channels(idx_v, n_heads, n_kv_heads, head_dim)
    return idx_q, idx_k, idx_v, idx_o
