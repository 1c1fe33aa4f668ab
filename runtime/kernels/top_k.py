"""The k largest of a score vector as ascending indices, in one Triton program.

`torch.topk(s, k, sorted=False).indices.msort()` on a block's 14,336 MLP scores is a
radix select over several kernels plus a sort: ~90-140 us per block on an H200
(bench/results/topk.json), about a third of the estimator's share of the step. Here one
program holds the whole vector in registers as order-preserving int32 keys and finds the
k-th largest key by a radix select from the top bit down, DIGIT_BITS bits a round: a round
counts, for every value of the next digit at once, the keys at or above the threshold that
digit gives, and keeps the largest digit whose count reaches k. The counts come from a
histogram of the keys' digits under the prefix settled so far and a suffix sum over its
bins (`hist`: shared-memory atomics, a few instructions a key whatever the width), or from
one block-wide sum of a [2**DIGIT_BITS, BLOCK] comparison (work a key grows with the
width). Each round ends in cross-warp exchanges (barrier round trips) that the next round
waits on, so wider digits trade work for fewer rounds: ceil(32 / DIGIT_BITS) of them; the
bisection stops at the first threshold that exactly k keys reach. The kept indices are
then written with one prefix sum: they come out ascending without a sort.
bench/topk.py times the widths, both counts and the warp counts; `defaults` runs the
fastest on the H200: one-bit compared rounds (a bisection) above 2,048 scores (an MLP's
d_ff), 5-bit histogram rounds up to it (attention's kv channels).

Ties at the k-th value keep the lowest indices (`top_k_reference`: a stable sort);
-0.0 ties +0.0 and every NaN counts as larger than +inf and ties other NaNs, as in
`torch.sort`.
"""
import torch
import triton
import triton.language as tl

from .launch import Launcher

MAX_N = 1 << 16  # one program's registers; larger vectors take torch.topk (selection.top_channels)
SMALL_N = 2048  # up to here histogram rounds, above it the bisection (the H200's fastest)


def defaults(n: int) -> tuple[bool, int, int]:
    """(hist, digit_bits, num_warps) for n scores, the fastest of bench/topk.py's ways on the
    H200 (bench/results/topk.json): at 14,336 the bisection with 16 warps, 25-26 us (it
    stops early) against 35-92 for every histogram or wider comparison round; at 1,024
    5-bit histogram rounds with 8 warps, 4.9 us, the bisection 4.5-5.4."""
    if n > SMALL_N:
        block = 1 << (n - 1).bit_length()
        return False, 1, min(16, max(4, block // 1024))
    return True, 5, 8


@triton.jit
def _keys(s_ptr, offs, N):
    """Order-preserving int32 keys of the scores at `offs`; INT_MIN (no score's key) past N."""
    x = tl.load(s_ptr + offs, mask=offs < N, other=0.0)
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)  # -0.0 -> +0.0
    bits = tl.where(x != x, 0x7FC00000, bits)  # any NaN -> the positive quiet NaN
    # flipping the low 31 bits of negatives makes int32 order the float order
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(offs < N, key, -2147483648)


@triton.jit(do_not_specialize=["N", "K"])
def _top_k_kernel(s_ptr, out_ptr, N, K, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
                  HIST: tl.constexpr):
    # 2-D throughout ([1, BLOCK] keys, [CANDS, 1] candidates, [1, 1] threshold): all share
    # one layout, so a round's only cross-thread step is its count
    offs = tl.arange(0, BLOCK)[None, :]
    key = _keys(s_ptr, offs, N)
    # t: the k-th largest key, settled DIGIT_BITS bits a round from the top. Read as unsigned
    # (t ^ INT_MIN), its undecided bits are 0; xor-ing a digit into t sets them, the sign
    # bit included, so the top round needs no special case.
    t = tl.full([1, 1], -2147483648, tl.int32)
    if DIGIT_BITS == 1 and not HIST:
        # the bisection stops once exactly K keys reach t: those are the k largest, whatever
        # the lower bits. Untied scores rarely need the low bits: 31-32 -> 25-26 us at
        # 14,336 on the H200 (bench/results/topk.json)
        shift = 31
        exact = 0
        while (shift >= 0) & (exact == 0):
            cand = t ^ (1 << shift)
            cnt = tl.sum((key >= cand).to(tl.int32), axis=1, keep_dims=True)
            t = tl.where(cnt >= K, cand, t)
            exact = tl.sum(tl.sum((cnt == K).to(tl.int32), axis=1), axis=0)
            shift -= 1
    else:
        # candidate digits 1 .. 2**DIGIT_BITS - 1, padded to a power of two with 2**DIGIT_BITS
        CANDS: tl.constexpr = 1 if DIGIT_BITS == 1 else 1 << DIGIT_BITS
        j = tl.arange(0, CANDS)[:, None] + 1
        for r in tl.static_range((31 + DIGIT_BITS) // DIGIT_BITS - 1, -1, -1):
            shift = r * DIGIT_BITS
            nb = min(DIGIT_BITS, 32 - shift)  # the top round may be narrower
            # counts fall as the digit grows: keep the largest digit whose count reaches K
            if HIST:
                # each key's digit under t's prefix, clamped rather than masked (a masked
                # atomic costs a branch a key): keys below the prefix land in bin 0, keys above
                # it in the top bin, so the suffix sums are count(key >= t with that digit)
                LOW = -1 if shift + nb == 32 else (1 << (shift + nb)) - 1  # t's undecided bits
                kc = tl.minimum(tl.maximum(key, t), t ^ LOW)
                digit = tl.reshape(((kc ^ t) >> shift) & ((1 << nb) - 1), [BLOCK])
                cnt = tl.cumsum(tl.histogram(digit, 1 << DIGIT_BITS), axis=0, reverse=True)
                # bin 0 counts all
                t = t ^ ((tl.sum((cnt >= K).to(tl.int32), axis=0) - 1) << shift)
            else:
                cand = tl.where(j < (1 << nb), t ^ (j << shift), 2147483647)  # INT_MAX: no key
                cnt = tl.sum((key >= cand).to(tl.int32), axis=1, keep_dims=True)
                t = t ^ (tl.sum((cnt >= K).to(tl.int32), axis=0, keep_dims=True) << shift)
    above = key > t
    at = key == t
    room = K - tl.sum(above.to(tl.int32), axis=1, keep_dims=True)  # copies of t kept
    # one prefix sum counts both: keys above t in the low word, copies of t in the high
    c = tl.cumsum(above.to(tl.int64) + (at.to(tl.int64) << 32), axis=1)
    n_at = c >> 32
    keep = above | (at & (n_at <= room))
    pos = (c & 0xFFFFFFFF) + tl.minimum(n_at, room) - 1
    tl.store(out_ptr + pos, offs.to(tl.int64), mask=keep)


_launch = Launcher(_top_k_kernel)


def top_k_indices(scores: torch.Tensor, k: int, digit_bits: int | None = None,
                  hist: bool | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Ascending int64 indices of the k largest of `scores` [N] (N <= MAX_N, 0 <= k <= N);
    fp32 scores are read as they are, other dtypes cast first. `digit_bits` (1-8 with
    `hist`, 1-4 without), `hist` and `num_warps` override the defaults (bench/topk.py)."""
    n = scores.numel()
    if not 0 <= k <= n or n > MAX_N:
        raise ValueError(f"top_k_indices: k={k} of n={n} (n at most {MAX_N})")
    out = torch.empty(k, dtype=torch.int64, device=scores.device)
    if k == 0:
        return out
    s = scores.reshape(-1).to(torch.float32).contiguous()
    d_hist, d_bits, d_warps = defaults(n)
    hist = d_hist if hist is None else hist
    num_warps = num_warps or d_warps
    # no fewer keys than threads: a thread holding a copy of another's key would count it
    # again in the histogram
    block = max(1 << (n - 1).bit_length(), 32 * num_warps)
    _launch((1,), s, out, n, k, BLOCK=block, DIGIT_BITS=digit_bits or (d_bits if hist == d_hist else 1),
            HIST=hist, num_warps=num_warps)
    return out


def top_k_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The same set by a stable descending sort (ties: lowest index first), ascending."""
    s = torch.where(scores == 0, torch.zeros_like(scores), scores)
    return torch.sort(s, descending=True, stable=True).indices[:k].sort().values
