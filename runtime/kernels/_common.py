"""Shared bits of the Triton kernels: availability, interpreter detection, dtypes."""
import os

import torch


def interpreting() -> bool:
    # Triton reads TRITON_INTERPRET at import; callers must set it before importing triton.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when triton imports and can run here: on CUDA, or under the CPU interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own TF32 switch so the kernel matches F.linear's numerics.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grids: `triton.cdiv` is a constexpr function, and calling
    it from Python costs microseconds per call on the launch path."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def m_bucket(m: int) -> int:
    """The autotune key of a row count: its next power of two. Row counts follow the batch
    (padded length, token split) and change nearly every step on real data; a key holding
    the exact count re-tunes every kernel for each new one (configs x do_bench, ~100 ms per
    kernel on an H200), while the best config only changes with the count's scale."""
    return next_pow2(m)


def autotune_bench(kernel_call, quantiles):
    # Shorter than triton's default (25/100 ms): new (M, N, K) keys appear as k changes.
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)
