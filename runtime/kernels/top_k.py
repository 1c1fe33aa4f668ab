"""The k largest of a score vector as ascending indices, in one Triton program.

`torch.topk(s, k, sorted=False).indices.msort()` on a block's 14,336 MLP scores is a
radix select over several kernels plus a sort: ~90-140 us per block on an H200
(bench/results/topk.json), about a third of the estimator's share of the step. Here one
program holds the whole vector in registers, finds the k-th largest value by a bitwise
binary search over an order-preserving integer key (32 counts), and writes the kept
indices with one prefix sum: they come out ascending without a sort. On an H200 that
took 35 us at 14,336 scores with 16 warps (bench/results/topk.json).

Ties at the k-th value keep the lowest indices (`top_k_reference`: a stable sort);
-0.0 ties +0.0 and every NaN counts as larger than +inf and ties other NaNs, as in
`torch.sort`.
"""
import torch
import triton
import triton.language as tl

from .launch import Launcher

MAX_N = 1 << 16  # one program's registers; larger vectors take torch.topk (selection.top_channels)


@triton.jit(do_not_specialize=["N", "K"])
def _top_k_kernel(s_ptr, out_ptr, N, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(s_ptr + offs, mask=ok, other=0.0)
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)  # -0.0 -> +0.0
    bits = tl.where(x != x, 0x7FC00000, bits)  # any NaN -> the positive quiet NaN
    # flipping the low 31 bits of negatives makes int32 order the float order
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # the k-th largest key: the largest t with count(key >= t) >= K, a bit at a time
    t = tl.where(tl.sum((ok & (key >= 0)).to(tl.int32), axis=0) >= K, 0, -2147483648)
    for b in tl.static_range(30, -1, -1):
        cand = t + (1 << b)
        t = tl.where(tl.sum((ok & (key >= cand)).to(tl.int32), axis=0) >= K, cand, t)
    above = ok & (key > t)
    at = ok & (key == t)
    room = K - tl.sum(above.to(tl.int32), axis=0)  # how many copies of t are kept
    # one prefix sum counts both: keys above t in the low word, copies of t in the high
    c = tl.cumsum(above.to(tl.int64) + (at.to(tl.int64) << 32), axis=0)
    n_at = c >> 32
    keep = above | (at & (n_at <= room))
    pos = (c & 0xFFFFFFFF) + tl.minimum(n_at, room) - 1
    tl.store(out_ptr + pos, offs.to(tl.int64), mask=keep)


_launch = Launcher(_top_k_kernel)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int64 indices of the k largest of `scores` [N] (N <= MAX_N, 0 <= k <= N);
    fp32 scores are read as they are, other dtypes cast first."""
    n = scores.numel()
    if not 0 <= k <= n or n > MAX_N:
        raise ValueError(f"top_k_indices: k={k} of n={n} (n at most {MAX_N})")
    out = torch.empty(k, dtype=torch.int64, device=scores.device)
    if k == 0:
        return out
    s = scores.reshape(-1).to(torch.float32).contiguous()
    block = max(16, 1 << (n - 1).bit_length())
    _launch((1,), s, out, n, k, BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return out


def top_k_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The same set by a stable descending sort (ties: lowest index first), ascending."""
    s = torch.where(scores == 0, torch.zeros_like(scores), scores)
    return torch.sort(s, descending=True, stable=True).indices[:k].sort().values
