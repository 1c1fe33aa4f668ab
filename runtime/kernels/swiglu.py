"""The SwiGLU product and its gradient as one elementwise pass each.

In plain PyTorch `silu(g) * u` is two kernels and its backward about nine, each a full
read and write of a [rows x d_ff] tensor; on the dense rows of the sparse MLP (all rows
during the dense warm-up) those passes cost more than a tenth of the MLP's GEMM time
(bench/results/train_step_32l_swiglu_unfused.json: aten::mul alone 18.6 ms of a 290 ms step).
Math in fp32, stored in the inputs' dtype, like Inductor's fused version.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv
from .launch import Launcher

_empty = torch.empty_like  # module attribute so tests can poison fresh outputs with NaN
BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dh * u * s * (1.0 + g * (1.0 - s))  # silu'(g) = s (1 + g (1 - s))
    du = dh * g * s
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=ok)


_launch_fwd, _launch_bwd = Launcher(_swiglu_fwd_kernel), Launcher(_swiglu_bwd_kernel)


def _check(*ts):
    shape, dtype = ts[0].shape, ts[0].dtype
    for t in ts:
        if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError("swiglu kernels take contiguous tensors of one shape and dtype")


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u."""
    _check(g, u)
    h = _empty(g)
    n = g.numel()
    if n:
        _launch_fwd((cdiv(n, BLOCK),), g, u, h, n, BLOCK=BLOCK)
    return h


def swiglu_grad(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dg, dL/du) of h = silu(g) * u given dL/dh."""
    _check(dh, g, u)
    dg, du = _empty(g), _empty(u)
    n = g.numel()
    if n:
        _launch_bwd((cdiv(n, BLOCK),), dh, g, u, dg, du, n, BLOCK=BLOCK)
    return dg, du


# ---- plain-PyTorch references ----
# They compute in fp32 at least, as the kernels do (fp64 stays fp64).

def _wide(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def swiglu_reference(g, u):
    return (torch.nn.functional.silu(_wide(g)) * _wide(u)).to(g.dtype)


def swiglu_grad_reference(dh, g, u):
    dh, gf, uf = _wide(dh), _wide(g), _wide(u)
    s = torch.sigmoid(gf)
    return (dh * uf * s * (1 + gf * (1 - s))).to(g.dtype), (dh * gf * s).to(u.dtype)
