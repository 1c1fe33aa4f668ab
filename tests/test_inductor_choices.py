"""inductor_choices: our Inductor heuristics reach the forward and the (lazily compiled)
backward graphs of our compiles, and no other compile in the process."""
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


def _compile_and_step(x, w, seen, monkeypatch):
    real = compile_fx_module.compile_fx_inner

    def spy(gm, example_inputs, **kwargs):
        seen.append((kwargs.get("is_inference"), type(V.choices).__name__))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx_inner", spy)
    torch._dynamo.reset()
    fn = torch.compile(_rms_loss, backend=lambda gm, ex: _inner_compile("inductor", gm, ex))
    fn(x, w).backward()
    torch._dynamo.reset()


def test_row_choices_reach_forward_and_backward_only(monkeypatch):
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", 4096)
    seen = []
    _compile_and_step(torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True),
                      seen, monkeypatch)
    assert seen == [(False, "RowPersistentChoices"), (None, "RowPersistentChoices")]
    assert type(V.choices).__name__ == "InductorChoices"  # the process's own, untouched


def test_fx_graph_cache_keys_on_the_heuristics(monkeypatch):
    """A graph compiled under one bound is served again under it, never under another."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache
    got = []
    with fresh_cache():
        for bound in (4096, 4096, 1024, 1024, 8192):
            monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", bound)
            counters.clear()
            _compile_and_step(torch.randn(4, 32, requires_grad=True),
                              torch.randn(32, requires_grad=True), [], monkeypatch)
            got.append((counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]))
    assert got == [(0, 2), (2, 0), (0, 2), (2, 0), (0, 2)]


def test_a_post_grad_pass_of_the_callers_turns_the_cache_off(monkeypatch):
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", 4096)
    theirs = object()
    assert inductor_choices.config_patches({"post_grad_custom_post_pass": theirs}) == {
        "post_grad_custom_post_pass": theirs, "fx_graph_cache": False}
    assert inductor_choices.config_patches({"size_asserts": False})["post_grad_custom_post_pass"].uuid() == (
        "sparselora_row_persistent", 4096)


def test_inductors_own_bound_changes_nothing(monkeypatch):
    monkeypatch.setattr(inductor_choices, "ROW_PERSISTENT_MAX", inductor_choices.INDUCTOR_ROW_PERSISTENT_MAX)
    seen = []
    _compile_and_step(torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True),
                      seen, monkeypatch)
    assert [name for _, name in seen] == ["InductorChoices", "InductorChoices"]
    assert inductor_choices.config_patches(None) is None


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
