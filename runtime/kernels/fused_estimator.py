"""Fused SparseLoRA estimator: per-channel squared L2 norms over tokens of a rank-r product.

The unfused estimator materialises x@A@B as [M, F] (F = 14336 for LLaMA-3-8B's MLP), then
silu, mul and a norm: five passes over a tensor as large as the layer's activations. Here the
rank-r projection xa = x@A is one small torch matmul ([M, r]); then one kernel, tiled over F,
keeps its B tile in registers, loops over tokens and reduces (silu(g) * u)^2 in fp32 without
writing any [M, F] tensor. Tokens are split across programs into an [S, F] fp32 partial sum
(S small) that torch adds up: deterministic, unlike atomics.

Squared norms rank channels exactly as norms do, so top-k over these scores is the paper's.

With the residual variances σ²_gate, σ²_up [F] (`estimator.residual_variance`), the gated
kernel sums the expected square instead, (silu(g)^2 + silu'(g)^2 σ²_gate) (u^2 + σ²_up)
(`selection.corrected_gated_sq`): the two [F] vectors are loaded once per channel tile
next to the B tiles, and nothing of size [M, F] is written either.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ._common import autotune_bench, cdiv, interpreting, m_bucket, next_pow2
from .launch import Launcher


_empty = torch.empty  # module attribute so tests can poison the partial sums with NaN


def _configs():
    if interpreting() or os.environ.get("SPARSELORA_KERNELS_TUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_F": 32}, num_warps=4, num_stages=1)]
    c = triton.Config
    return [c({"BLOCK_M": bm, "BLOCK_F": bf}, num_warps=w, num_stages=3)
            for bm, bf, w in [(64, 128, 4), (128, 128, 8), (64, 256, 8), (32, 128, 4),
                              # the best on the H200 at M = 4096, F = 14336, r = 8 without and with
                              # the residual term (bench/kernels.py --estimator-configs)
                              (64, 64, 4), (32, 256, 4)]]


@triton.jit
def _sigmoid(z, FAST: tl.constexpr):
    if FAST:
        # (1 + tanh(z / 2)) / 2 by PTX's tanh.approx (relative error ~2^-11): one special-
        # function instruction where tl.sigmoid takes an exp and a division. In the graphed
        # fixed-batch step on the H200 the kernel's time fell from 1.67 to 1.26 ms
        # (bench/README.md, "The 32-layer training step against Inductor").
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z * 0.5],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return 0.5 + 0.5 * t
    return tl.sigmoid(z)


# Keyed on M's power-of-two bucket, not on ROWS_PER_PROG: that follows M in 128-row steps
# (for the MLP on an H200, a new key every 512 tokens), so real batches re-tuned it nearly
# every step. Any config is valid for any ROWS_PER_PROG (a multiple of 128, so of BLOCK_M).
@triton.autotune(configs=_configs(), key=["F", "R", "M_BUCKET", "GATED", "RESIDUAL"], do_bench=autotune_bench)
@triton.jit(do_not_specialize=["M", "ROWS_PER_PROG", "M_BUCKET"])
def _channel_scores_kernel(
    ag_ptr, bg_ptr, au_ptr, bu_ptr, rg_ptr, ru_ptr, w_ptr, part_ptr,
    M, F, R, ROWS_PER_PROG,
    M_BUCKET,  # autotune key only
    stride_am, stride_ar, stride_bn_r, stride_bn_f, stride_um, stride_ur, stride_bu_r, stride_bu_f,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, WEIGHTED: tl.constexpr, FAST_SIGMOID: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_r = tl.arange(0, BLOCK_R)
    f_ok = offs_f < F
    r_ok = offs_r < R
    # B tiles stay in registers for the whole token loop; padded r rows/cols load as zero.
    b_mask = r_ok[:, None] & f_ok[None, :]
    bg = tl.load(bg_ptr + offs_r[:, None] * stride_bn_r + offs_f[None, :] * stride_bn_f, mask=b_mask, other=0.0)
    if GATED:
        bu = tl.load(bu_ptr + offs_r[:, None] * stride_bu_r + offs_f[None, :] * stride_bu_f, mask=b_mask, other=0.0)
        if RESIDUAL:  # contiguous fp32 [F] residual variances, one load per channel tile
            rg = tl.load(rg_ptr + offs_f, mask=f_ok, other=0.0)[None, :]
            ru = tl.load(ru_ptr + offs_f, mask=f_ok, other=0.0)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)  # reduce over tokens once, after the loop
    m_start = pid_s * ROWS_PER_PROG
    m_stop = tl.minimum(m_start + ROWS_PER_PROG, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_stop
        live = True
        if WEIGHTED:
            # Weight-0 rows (dense rows, padding, fillers: in runs, often whole tiles) are not
            # read. A tile of them is skipped; in a mixed tile they load as zero, so they add
            # exactly 0 even where x holds inf/NaN (not 0 * NaN = NaN). Any other weight, NaN
            # included, keeps its row, and that row's term does not depend on the skipping.
            w = tl.load(w_ptr + offs_m, mask=m_ok, other=0.0)
            m_ok = m_ok & (w != 0)
            live = tl.max(m_ok.to(tl.int32), axis=0) != 0  # a scalar: scf.if around the tile's work
        if live:
            a_mask = m_ok[:, None] & r_ok[None, :]
            # Rows past the end (and weight-0 rows) load as zero, so g = u = 0: without residuals
            # they add nothing, with residuals they would add silu'(0)^2 σ²_g σ²_u and are masked out.
            # x A may be bf16: cast to B's dtype (fp32) as the plain path's `.float()` does.
            xg = tl.load(ag_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_r[None, :] * stride_ar,
                         mask=a_mask, other=0.0).to(bg_ptr.dtype.element_ty)
            g = tl.dot(xg, bg)
            if GATED:
                xu = tl.load(au_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                             mask=a_mask, other=0.0).to(bu_ptr.dtype.element_ty)
                u = tl.dot(xu, bu)
                sig = _sigmoid(g, FAST_SIGMOID)
                if RESIDUAL:
                    silu = g * sig
                    ds = sig * (1.0 + g * (1.0 - sig))  # silu'(g)
                    p = (silu * silu + ds * ds * rg) * (u * u + ru)
                    p = tl.where(m_ok[:, None], p, 0.0)
                else:
                    p = g * sig * u
                    p = p * p
            else:
                p = g * g
            if WEIGHTED:
                p = p * w[:, None]
            acc += p
    tl.store(part_ptr + pid_s * F + offs_f, tl.sum(acc, axis=0), mask=f_ok)


_launch_scores = Launcher(_channel_scores_kernel)


@functools.lru_cache(None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _rows_per_prog(m, f, device):
    # Enough token splits to fill the GPU about four times over; chunks a multiple of any BLOCK_M.
    if interpreting() or device.type != "cuda":
        splits = 2
    else:
        splits = max(1, (4 * _sm_count(device.index or 0)) // cdiv(f, 128))
    return max(128, cdiv(cdiv(m, splits), 128) * 128)


def _fast_sigmoid(device) -> bool:
    """PTX's tanh.approx: NVIDIA GPUs only (not the CPU interpreter, not ROCm)."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def _fp32(t):
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _scores(xg, bg, xu, bu, rg=None, ru=None, row_weight=None):
    m, r = xg.shape
    f = bg.shape[1]
    assert bg.shape[0] == r and (xu is None or bu.dtype == bg.dtype)
    assert row_weight is None or row_weight.shape == (m,) and row_weight.dtype == torch.float32
    if m == 0 or f == 0:
        return torch.zeros(f, device=xg.device, dtype=torch.float32)
    rpp = _rows_per_prog(m, f, xg.device)
    splits = cdiv(m, rpp)
    part = _empty((splits, f), device=xg.device, dtype=torch.float32)
    gated = xu is not None
    if not gated:
        xu, bu = xg, bg
    residual = gated and (rg is not None or ru is not None)
    if residual:
        zero = None if rg is not None and ru is not None else torch.zeros(f, device=xg.device)
        rg, ru = ((zero if t is None else _fp32(t)) for t in (rg, ru))
        assert rg.shape == ru.shape == (f,)
    else:
        rg = ru = part  # unused (RESIDUAL=False); any pointer will do
    grid = lambda meta: (cdiv(f, meta["BLOCK_F"]), splits)
    _launch_scores(
        grid, xg, bg, xu, bu, rg, ru, part if row_weight is None else row_weight, part,
        m, f, r, rpp, m_bucket(m),
        xg.stride(0), xg.stride(1), bg.stride(0), bg.stride(1),
        xu.stride(0), xu.stride(1), bu.stride(0), bu.stride(1),
        GATED=gated, RESIDUAL=residual, WEIGHTED=row_weight is not None, FAST_SIGMOID=_fast_sigmoid(xg.device),
        BLOCK_R=max(16, next_pow2(r)),  # tl.dot needs K >= 16
    )
    return part.sum(0) if splits > 1 else part[0]


def mlp_channel_scores(x, Ag, Bg, Au, Bu, Rg=None, Ru=None, row_weight=None):
    """Gated-MLP channel scores [F] fp32: sum over rows of (silu(x@Ag@Bg) * (x@Au@Bu))^2,
    or with residual variances Rg, Ru [F] of (silu(g)^2 + silu'(g)^2 Rg) (u^2 + Ru), each
    row's term times its `row_weight` [M] fp32 when given.

    x [M, H]; A* [H, r]; B* [r, F]. One [M, 2r] matmul, then one fused kernel.
    """
    xa = x @ torch.cat([Ag, Au], dim=1)  # read x once for both projections
    return mlp_channel_scores_projected(xa, Bg, Bu, Rg, Ru, row_weight)


def mlp_channel_scores_projected(xa, Bg, Bu, Rg=None, Ru=None, row_weight=None):
    """`mlp_channel_scores` from xa = x @ [Ag | Au] [M, 2r] computed by the caller (in x's
    dtype: the kernel casts it to B's)."""
    r = Bg.shape[0]
    return _scores(xa[:, :r], Bg, xa[:, r:], Bu, Rg, Ru, row_weight)


def channel_sq_norms(xa, B, row_weight=None):
    """Squared column norms over rows of xa @ B, [N] fp32, without materialising it. xa [M, r]; B [r, N];
    each row's square times its `row_weight` [M] fp32 when given."""
    return _scores(xa, B, None, None, row_weight=row_weight)


# ---- plain-PyTorch references (they do materialise [M, F]) ----
# x@A is rounded to the input dtype, as in the fused path (and any torch estimator); the rest is fp32.
# Rows of weight 0 are dropped before any math, as the kernel does not read them: inf/NaN there add 0.

def _weighted_rows(x, row_weight):
    if row_weight is None:
        return x, None
    keep = row_weight != 0
    return x[keep], row_weight[keep]


def mlp_channel_scores_reference(x, Ag, Bg, Au, Bu, Rg=None, Ru=None, row_weight=None):
    x, row_weight = _weighted_rows(x, row_weight)
    g = (x @ Ag).float() @ Bg.float()
    u = (x @ Au).float() @ Bu.float()
    if Rg is None and Ru is None:
        terms = (torch.nn.functional.silu(g) * u).pow(2)
    else:
        from ..selection import corrected_gated_sq
        terms = corrected_gated_sq(g, u, Rg, Ru)
    return (terms if row_weight is None else terms * row_weight[:, None]).sum(0)


def channel_sq_norms_reference(xa, B, row_weight=None):
    xa, row_weight = _weighted_rows(xa, row_weight)
    sq = (xa.float() @ B.float()).pow(2)
    return (sq if row_weight is None else sq * row_weight[:, None]).sum(0)
