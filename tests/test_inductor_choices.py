"""inductor_choices: our Inductor heuristics reach the forward and the (lazily compiled)
backward graphs of our compiles, and no other compile in the process."""
import contextlib

import pytest
import torch
import torch._inductor.compile_fx as compile_fx_module
from torch._inductor.virtualized import V

from sparselora_compile import inductor_choices
from sparselora_compile.backend import _inner_compile


def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rms_loss(x, w):
    return _rms(x, w).float().sum()


_COMPILE_FX_INNER = compile_fx_module.compile_fx_inner


def _compile_and_step(x, w, seen, monkeypatch):
    real = _COMPILE_FX_INNER

    def spy(gm, example_inputs, **kwargs):
        seen.append((kwargs.get("is_inference"), type(V.choices).__name__))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx_inner", spy)
    torch._dynamo.reset()
    fn = torch.compile(_rms_loss, backend=lambda gm, ex: _inner_compile("inductor", gm, ex))
    fn(x, w).backward()
    torch._dynamo.reset()


def test_row_choices_reach_forward_and_backward_and_the_cache_key(monkeypatch):
    """Under the raised bound both graphs compile with our choices, the process keeps its
    own, and Inductor's FX graph cache serves a graph again under the same bound only."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache
    got = []
    with fresh_cache():
        for bound in (4096, 4096, inductor_choices.INDUCTOR_ROW_PERSISTENT_MAX):
            monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", bound)
            counters.clear()
            seen = []
            _compile_and_step(torch.randn(4, 32, requires_grad=True),
                              torch.randn(32, requires_grad=True), seen, monkeypatch)
            got.append((seen, counters["inductor"]["fxgraph_cache_hit"],
                        counters["inductor"]["fxgraph_cache_miss"]))
    ours = [(False, "RowPersistentChoices"), (None, "RowPersistentChoices")]
    assert got == [(ours, 0, 2), (ours, 2, 0),
                   ([(False, "InductorChoices"), (None, "InductorChoices")], 0, 2)]
    assert type(V.choices).__name__ == "InductorChoices"  # the process's own, untouched


def test_config_patches(monkeypatch):
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", inductor_choices.INDUCTOR_ROW_PERSISTENT_MAX)
    assert inductor_choices.config_patches(None) is None
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", 4096)
    assert inductor_choices.config_patches({"size_asserts": False})["post_grad_custom_post_pass"].uuid() == (
        "sparselora_row_persistent", 4096)
    theirs = object()  # a caller's own post-grad pass: kept, and the cache off instead
    assert inductor_choices.config_patches({"post_grad_custom_post_pass": theirs}) == {
        "post_grad_custom_post_pass": theirs, "fx_graph_cache": False}


def test_a_torch_without_the_hook_compiles_with_inductors_own(monkeypatch, caplog):
    from torch._inductor.choices import InductorChoices
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", 4096)
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features: False))
    inductor_choices._hook_matches.cache_clear()
    try:
        assert inductor_choices.config_patches({"size_asserts": False}) == {"size_asserts": False}
        assert isinstance(inductor_choices.choices_scope(), type(contextlib.nullcontext()))
        assert "Inductor's own reduction heuristics" in caplog.text
    finally:
        monkeypatch.undo()
        inductor_choices._hook_matches.cache_clear()
    assert inductor_choices._active()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton codegen)")
@pytest.mark.parametrize("bound, persistent", [(1024, False), (4096, True)])
def test_a_4096_wide_norm_is_persistent_under_the_raised_bound(monkeypatch, bound, persistent):
    """The generated forward kernel of a 4,096-wide RMSNorm: looped at Inductor's bound,
    one pass over the row at ours; both match eager."""
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", bound)
    torch._dynamo.reset()
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(_rms, backend=lambda gm, ex: _inner_compile("inductor", gm, ex))
    out, codes = run_and_get_code(fn, x, w)
    torch._dynamo.reset()
    assert ("@triton_heuristics.persistent_reduction" in "\n".join(codes)) == persistent
    torch.testing.assert_close(out, _rms(x.float(), w.float()).bfloat16(), rtol=2e-2, atol=2e-2)
