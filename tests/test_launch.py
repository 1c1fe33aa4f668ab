"""The direct Triton launcher (runtime/kernels/launch.py): its cache key on CPU; on the GPU,
every kernel launched directly gives bit for bit what Triton's own launch path gives, also
when a call changes the specialization (alignment, dtype, autotune key)."""
import pytest
import torch

pytest.importorskip("triton")

from sparselora_compile.runtime.kernels import launch as fast  # noqa: E402

CUDA = torch.cuda.is_available()


def test_key_holds_what_triton_specializes_on():
    x = torch.zeros(64)
    assert fast._arg_key(x) != fast._arg_key(x[1:])  # 4 bytes in: not 16-byte aligned
    assert fast._arg_key(x) != fast._arg_key(x.half())
    assert len({fast._arg_key(v) for v in (1, 16, 17, 2**31)}) == 4
    assert fast._arg_key(True) != fast._arg_key(1)
    assert fast._arg_key(32) == fast._arg_key(48)  # one class: one compiled kernel serves both
    assert fast._arg_key("tf32") != fast._arg_key("ieee")


def test_empty_launch_hooks_do_not_count_as_hooks():
    """Triton 3.6+ keeps its launch hooks as a HookChain, empty unless someone adds a hook
    (session 6: reading any non-None hook as set kept every launch on Triton's path)."""
    import triton
    rt = triton.knobs.runtime
    assert not fast._hooks_or_debug()
    hook = lambda *a: None  # noqa: E731
    if hasattr(rt.launch_enter_hook, "add"):
        rt.launch_enter_hook.add(hook)
        try:
            assert fast._hooks_or_debug()
        finally:
            rt.launch_enter_hook.remove(hook)
    assert not fast._hooks_or_debug()


@pytest.mark.skipif(CUDA, reason="the interpreter runs on CPU-only machines")
def test_interpreted_kernels_take_the_normal_path():
    from sparselora_compile.runtime.kernels import gathered_gemm, swiglu
    assert fast._kernel_info(swiglu._swiglu_fwd_kernel) is fast._NORMAL
    assert fast._kernel_info(gathered_gemm._gathered_gemm_kernel) is fast._NORMAL


def _compiled_twin(kernel):
    """The real gathered-GEMM kernel wrapped as on a GPU (Autotuner > Heuristics >
    JITFunction), whatever the interpreter made of it, so its arguments can be assembled
    on CPU."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction
    raw = kernel.fn.fn
    raw = getattr(raw, "fn", raw)
    jit = JITFunction(raw, do_not_specialize=["M", "M_BUCKET"])
    heur = Heuristics(jit, jit.arg_names, kernel.fn.values)
    return Autotuner(heur, jit.arg_names, kernel.configs, kernel.keys, None, None)


class _Compiled:
    """Stands for Triton's compiled kernel: records what its launcher is called with."""
    function, packed_metadata = "function-handle", "packed-metadata"

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


def test_direct_launch_passes_the_arguments_tritons_launch_does(monkeypatch):
    """The launcher gets the grid, the stream, the handles, no hooks, then every argument in
    the kernel's signature order: the call's runtime arguments, then the constexprs (the
    call's, the autotuner's choice, the heuristics')."""
    import triton
    from sparselora_compile.runtime.kernels import gathered_gemm as gg
    kernel = _compiled_twin(gg._gathered_gemm_kernel)
    config = kernel.configs[0]
    compiled = _Compiled()

    def triton_launch(grid):
        def call(*args, **kw):
            kernel.best_config = config  # what the autotuner records
            return compiled
        return call
    monkeypatch.setattr(type(kernel), "__getitem__", lambda self, grid: triton_launch(grid))
    monkeypatch.setattr(fast, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: 1234, raising=False)
    fast.clear()
    a, w, c, idx = torch.zeros(64, 96), torch.zeros(80, 96), torch.zeros(64, 32), torch.arange(32)
    args = (a, w, c, idx, idx, idx, 64, 32, 96, 96, 1, 1, 96, 32, 1, 64)
    constexprs = dict(GATHER_R=False, GATHER_N=True, HAS_ROWS=False, PRECISION="ieee")
    grid = lambda meta: (triton.cdiv(64, meta["BLOCK_M"]) * triton.cdiv(32, meta["BLOCK_N"]),)  # noqa: E731
    assert fast.launch(kernel, grid, *args, **constexprs) is compiled  # first: Triton's path
    assert fast.launch(kernel, grid, *args, **constexprs) is None  # then: the launcher
    (call,) = compiled.calls
    b = config.kwargs
    assert call[:9] == (grid(b)[0], 1, 1, 1234, "function-handle", "packed-metadata", None, None, None)
    assert call[9:9 + len(args)] == args
    even_k = 96 % b["BLOCK_K"] == 0
    assert list(call[9 + len(args):]) == [False, True, False, "ieee", b["BLOCK_M"], b["BLOCK_N"],
                                          b["BLOCK_K"], b["GROUP_M"], even_k]
    # another alignment class: Triton's path again, then a second entry
    fast.launch(kernel, grid, a[:, 1:], *args[1:], **constexprs)
    assert len(compiled.calls) == 1 and len(fast._ENTRIES) == 2
    fast.clear()


def _calls():
    """Each kernel through its public wrapper; the second gathered GEMM reads a view 2 bytes
    into its buffer (another alignment class), the last one another M bucket."""
    from sparselora_compile.runtime.kernels import fused_estimator as fe
    from sparselora_compile.runtime.kernels import gathered_gemm as gg
    from sparselora_compile.runtime.kernels import swiglu as sw
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    x, w, buf = r(300, 512), r(1024, 512) / 20, r(300, 513)
    idx = torch.randperm(1024, generator=g)[:600].sort().values.cuda()
    rows = torch.arange(0, 300, 3, device="cuda")
    gate, up, dh = r(200, 700), r(200, 700), r(200, 700)
    xa, bg, bu = r(400, 16), r(8, 900), r(8, 900)
    return [
        lambda: gg.out_sparse_matmul(x, w, idx),
        lambda: gg.out_sparse_matmul(buf[:, 1:], w, idx),
        lambda: gg.out_sparse_matmul(x, w, idx, rows=rows),
        lambda: gg.out_sparse_grad_input(r(300, 600), w, idx),
        lambda: gg.out_sparse_matmul(x[:40], w, idx),
        lambda: sw.swiglu(gate, up),
        lambda: sw.swiglu_grad(dh, gate, up),
        lambda: fe.mlp_channel_scores_projected(xa, bg, bu),
    ]


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the interpreter has no compiled kernels")
def test_direct_launches_match_tritons_launch_path(monkeypatch):
    from sparselora_compile.runtime.kernels import fused_estimator as fe
    from sparselora_compile.runtime.kernels import gathered_gemm as gg
    from sparselora_compile.runtime.kernels import swiglu as sw
    nan = lambda *s, **kw: torch.full(s[0] if len(s) == 1 else s, float("nan"), **kw)  # noqa: E731
    monkeypatch.setattr(gg, "_empty", nan)
    monkeypatch.setattr(fe, "_empty", nan)
    monkeypatch.setattr(sw, "_empty", lambda t: torch.full_like(t, float("nan")))
    calls = _calls()
    monkeypatch.setattr(fast, "ENABLED", False)
    want = [c() for c in calls]
    monkeypatch.setattr(fast, "ENABLED", True)
    fast.clear()
    for _ in range(3):  # the first call of a key runs Triton's path, the next ones launch directly
        for c, ref in zip(calls, want):
            got = c()
            for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
                assert torch.equal(a, b)
    direct = {key[0] for key, entry in fast._ENTRIES.items() if entry is not fast._NORMAL}
    assert direct == {gg._gathered_gemm_kernel, sw._swiglu_fwd_kernel, sw._swiglu_bwd_kernel,
                      fe._channel_scores_kernel}
