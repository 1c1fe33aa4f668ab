"""Channel selection: estimator scores, one top-k per block, and the GQA channel maps.

Plain PyTorch; the CUDA path swaps the score computation for the fused Triton estimator
and the top-k for one Triton program.
Scores use context rows only (output rows are dense and never read the selection).
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .gathered import use_triton
from .row_split import RowSplit, scored_rows


def scored_projection(x: torch.Tensor, a_factors, split: RowSplit,
                      joined: "JoinedFactors | None" = None) -> torch.Tensor:
    """x @ [A_1 A_2 ...] over the context rows the estimator scores, fp32 [scored, sum r].

    The product runs on every row in x's dtype and only its narrow result is gathered
    and cast: gathering and casting x itself ([tokens x hidden], fp32) cost more than the
    product on the GPU. In bf16 this rounds x A once to bf16, as any bf16 estimator would.
    `joined`: the run's cache of the side-by-side factors (None: joined on each call).
    """
    x2 = x.reshape(-1, x.shape[-1])
    return scored_rows(x2 @ side_by_side(a_factors, x2.dtype, joined), split)


def side_by_side(a_factors, dtype: torch.dtype, joined: "JoinedFactors | None" = None) -> torch.Tensor:
    """[A_1 A_2 ...] in `dtype`, from the run's cache when given."""
    return joined.get(a_factors, dtype) if joined is not None else torch.cat(list(a_factors), 1).to(dtype)


class JoinedFactors:
    """The A factors of a block side by side in one dtype, the operand of one projection
    GEMM, cached per factor set (the cat and cast were two launches per block per step).

    Factors change only when refreshed in place, which bumps their version, so the key
    holds each factor's address and version. An entry holds its factors, so their storage
    cannot be reused by other tensors while it exists.
    """

    KEEP = 256

    def __init__(self):
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, factors, dtype: torch.dtype) -> torch.Tensor:
        if torch.is_grad_enabled() and any(a.requires_grad for a in factors):
            return torch.cat(list(factors), 1).to(dtype)  # a cached result would hold a stale graph
        key = (dtype, *((a.data_ptr(), a._version, tuple(a.shape)) for a in factors))
        hit = self._entries.get(key)
        if hit is None:
            hit = self._entries[key] = (tuple(factors), torch.cat(list(factors), 1).to(dtype))
            while len(self._entries) > self.KEEP:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return hit[1]

    def tensors(self) -> list:
        """Every cached operand (CUDA graphs read them by address and must hold them)."""
        return [v[1] for v in self._entries.values()]


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (sorted indices keep the gathers
    coalesced and make the selection a set). On CUDA one Triton program (kernels/top_k.py,
    ties keep the lowest indices) replaces top-k's kernels and the sort; elsewhere
    torch.topk (ties in any order)."""
    if scores.is_cuda and use_triton(scores):
        from .kernels.top_k import MAX_N, top_k_indices
        if scores.numel() <= MAX_N:
            return top_k_indices(scores, k)
    return torch.topk(scores, k, sorted=False).indices.msort()


def dsilu(z: torch.Tensor) -> torch.Tensor:
    """silu'(z) = sig(z) (1 + z (1 - sig(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2PI = 0.3989422804014327


def _silu_and_grad(z):
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def _gelu_and_grad(z):
    """gelu(z) = z Phi(z); gelu'(z) = Phi(z) + z phi(z)."""
    cdf = 0.5 * (1 + torch.erf(z * 0.7071067811865476))
    return z * cdf, cdf + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _gelu_tanh_and_grad(z):
    """gelu_tanh(z) = z (1 + tanh(c (z + 0.044715 z^3))) / 2, c = sqrt(2 / pi)."""
    t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3))
    grad = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
    return 0.5 * z * (1 + t), grad


def _relu_and_grad(z):
    return z.clamp_min(0), (z > 0).to(z.dtype)


# MLP activations (of the gate, or of fc in a non-gated MLP): name -> z -> (act(z), act'(z)).
# The names are the ones passes.group_mlps records on a block (Gemma's gelu_pytorch_tanh
# and GPT-2's gelu_new are "gelu_tanh").
ACTIVATIONS = {"silu": _silu_and_grad, "gelu": _gelu_and_grad, "gelu_tanh": _gelu_tanh_and_grad,
               "relu": _relu_and_grad}
# act(0)^2 + act'(0)^2 of each: what a zeroed row adds per unit σ²_gate σ²_up (gated) or
# per unit σ² (non-gated); relu'(0) is taken as 0, as autograd does
ZERO_ROW_TERM = {"silu": 0.25, "gelu": 0.25, "gelu_tanh": 0.25, "relu": 0.0}


def activation_and_grad(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"sparselora: gate activation {name!r} is not one of {sorted(ACTIVATIONS)}") from None


def corrected_gated_sq(g, u, res_gate, res_up, act: str = "silu") -> torch.Tensor:
    """Expected (act(gate) * up)^2 per element given the rank-r ĝ = g, û = u and the
    residual variances σ² [F] (`estimator.residual_variance`, None for zeros), to first
    order in the gate's residual: (act(ĝ)^2 + act'(ĝ)^2 σ²_gate) * (û^2 + σ²_up). With zero
    residuals: (act(ĝ) û)^2. `act`: silu, gelu or gelu_tanh."""
    a, da = activation_and_grad(act)(g)
    gate = a.square()
    if res_gate is not None:
        gate = gate + da.square() * res_gate.float()  # act'(ĝ)^2 σ²
    return gate * (u.square() if res_up is None else u.square() + res_up.float())


def mlp_scores(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, split: RowSplit,
               joined: JoinedFactors | None = None, act: str = "silu") -> torch.Tensor:
    """Per channel, sum over context tokens of the expected (act(gate) * up)^2 under the
    low-rank estimate (`corrected_gated_sq`). `res_gate`/`res_up` [F] or None (= zeros: the
    paper's squared L2 norm of act(x A_g B_g) * (x A_u B_u)). `act`: the block's gate
    activation (silu, gelu, gelu_tanh)."""
    r = a_gate.shape[1]
    p = scored_projection(x, (a_gate, a_up), split, joined)
    g, u = p[:, :r] @ b_gate, p[:, r:] @ b_up
    if res_gate is None and res_up is None:
        return (activation_and_grad(act)(g)[0] * u).square().sum(0)
    return without_zeroed_rows(corrected_gated_sq(g, u, res_gate, res_up, act).sum(0), split,
                               res_gate, res_up, act)


def plain_mlp_scores(x, a, b, res, split: RowSplit, joined: JoinedFactors | None = None,
                     act: str = "gelu") -> torch.Tensor:
    """Non-gated MLP (fc -> act -> proj): per channel, sum over context tokens of the
    expected act(fc)^2 under the low-rank estimate f̂ = x A B, to first order in the
    residual: act(f̂)^2 + act'(f̂)^2 σ² (`res` [F], None for zeros: the squared L2 norm of
    act(x A B), the gated score without its up factor)."""
    f = scored_projection(x, (a,), split, joined) @ b
    value, grad = activation_and_grad(act)(f)
    if res is None:
        return value.square().sum(0)
    scores = (value.square() + grad.square() * res.float()).sum(0)
    if split.n_unscored is None:
        return scores
    # rows `scored_rows` zeroed each added act(0)^2 + act'(0)^2 σ²
    return scores - split.n_unscored * ZERO_ROW_TERM[act] * res.float()


def without_zeroed_rows(scores, split: RowSplit, res_gate, res_up, act: str = "silu") -> torch.Tensor:
    """Take out what the rows the estimator skips added: `scored_rows` zeroes them, and a
    zero row's corrected term is (act(0)^2 + act'(0)^2 σ²_gate)(0 + σ²_up) = σ²_gate σ²_up / 4
    per channel for silu and both gelus (act(0) = 0, act'(0) = 1/2; zero without both
    residuals)."""
    if split.n_unscored is None or res_gate is None or res_up is None:
        return scores
    return scores - split.n_unscored * ZERO_ROW_TERM[act] * res_gate.float() * res_up.float()


def expand_kv_channels(kv_idx: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """Query-side channels for kept kv channels under the repeat_kv layout: query head h
    reads kv head h // n_rep, so kv channel (g, d) maps to (h, d) for every h in group g."""
    table = _query_channels(n_heads, n_kv_heads, head_dim, kv_idx.device)
    return table.index_select(0, kv_idx).view(-1).msort()


@functools.lru_cache(maxsize=64)
def _query_channels(n_heads: int, n_kv_heads: int, head_dim: int, device) -> torch.Tensor:
    """[kv channels, n_rep]: the query channels of each kv channel. Made once per layout: the
    gather and sort above are three ops per call, computing the map was a dozen."""
    n_rep = n_heads // n_kv_heads
    c = torch.arange(n_kv_heads * head_dim, device=device)
    g, d = c // head_dim, c % head_dim
    heads = g[:, None] * n_rep + torch.arange(n_rep, device=device)[None, :]
    return heads * head_dim + d[:, None]


def gram_column_sq_norms(x, factors, split: RowSplit, joined: JoinedFactors | None = None):
    """||x_c A B||^2 per output column over the scored rows x_c, for each (A, B), without the
    [tokens x out] product: with P = x_c A and G = P^T P (r x r), column j's norm is
    b_j^T G b_j. One GEMM over the tokens for all factor pairs (their A's side by side)."""
    p = scored_projection(x, [a for a, _ in factors], split, joined)
    gram = p.T @ p
    out, start = [], 0
    for a, b in factors:
        r = a.shape[1]
        g = gram[start:start + r, start:start + r]
        out.append(((g @ b) * b).sum(0).clamp_min(0))
        start += r
    return out


def attention_selection(x, factors, split: RowSplit, k_qk: int, k_v: int, n_heads: int,
                        n_kv_heads: int, head_dim: int, joined: JoinedFactors | None = None):
    """Returns (idx_q, idx_k, idx_v, idx_o).

    QK score of kv channel (g, d): ||K_hat(g,d)|| * sum over h in group g of ||Q_hat(h,d)||.
    V score: ||V_hat(g,d)||. o keeps the input channels whose kv head kept V channel (g, d).
    """
    n_rep = n_heads // n_kv_heads
    qn, kn, vn = gram_column_sq_norms(x, factors, split, joined)
    q = qn.sqrt().view(n_kv_heads, n_rep, head_dim).sum(1)
    k = kn.sqrt().view(n_kv_heads, head_dim)
    idx_k = top_channels((q * k).reshape(-1), k_qk)
    idx_v = top_channels(vn, k_v)
    idx_q = expand_kv_channels(idx_k, n_heads, n_kv_heads, head_dim)
    idx_o = expand_kv_channels(idx_v, n_heads, n_kv_heads, head_dim)
    return idx_q, idx_k, idx_v, idx_o


def placeholder_attention_selection(device, k_qk: int, k_v: int, n_heads: int, n_kv_heads: int,
                                    head_dim: int):
    """Index sets of the right sizes for a step whose rows are all dense (nothing reads them).
    Fresh copies of cached sets: an op's outputs must not share storage between calls."""
    return tuple(t.clone() for t in _placeholder_sets(device, k_qk, k_v, n_heads, n_kv_heads, head_dim))


@functools.lru_cache(maxsize=64)
def _placeholder_sets(device, k_qk, k_v, n_heads, n_kv_heads, head_dim):
    idx_k, idx_v = (torch.arange(n, device=device) for n in (k_qk, k_v))
    return (expand_kv_channels(idx_k, n_heads, n_kv_heads, head_dim), idx_k, idx_v,
            expand_kv_channels(idx_v, n_heads, n_kv_heads, head_dim))
