"""The flash varlen kernel against its definition, shared by the packing and sliding-window
tests (CUDA only)."""
import torch

from sparselora_compile.runtime.varlen_attention import (flash_usable, packed_causal_attention,
                                                         reference_packed_attention)


def assert_flash_matches_reference(q, k, v, cu, window=None):
    """Outputs and q/k/v gradients against the fp64 reference at the dtype's tolerance; the
    compiled call (as in a layer graph, where Inductor calls the flash ops itself) gives the
    same forward bit for bit, and gradients at that tolerance: flash's backward sums dq with
    atomic adds, whose order varies between runs."""
    assert flash_usable(q)
    out = packed_causal_attention(q, k, v, cu, window=window)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_packed_attention(*ref_in, cu, window=window)
    ref_grads = torch.autograd.grad(ref, ref_in, gout.double())
    # bf16: 8 bits of mantissa; the kernels round q, k, v and p to the input dtype
    tol = dict(rtol=2e-2, atol=2e-2) if q.dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **tol)
    compiled = torch.compile(packed_causal_attention, dynamic=True, fullgraph=True)
    out_c = compiled(q, k, v, cu, None, window)
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(out_c, (q, k, v), gout), grads):
        torch.testing.assert_close(a, b, **tol)
