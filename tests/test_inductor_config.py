"""`inductor_config`: Inductor settings for the graphs the backend compiles."""
import pytest
import torch

import sparselora_compile as slc
from sparselora_compile import inductor_choices

from llama import batch, tiny_llama


def test_bad_inductor_config_is_rejected():
    with pytest.raises(ValueError, match=r"names no Inductor setting: \['cpp_wraper'\]"):
        slc.compile(tiny_llama(), slc.Policy(mlp=0.5), inductor_config={"cpp_wraper": True})
    with pytest.raises(TypeError, match="must be a dict"):
        slc.compile(tiny_llama(), slc.Policy(mlp=0.5), inductor_config=["size_asserts"])
    with pytest.raises(ValueError, match="needs inner='inductor'"):
        slc.compile(tiny_llama(), slc.Policy(mlp=0.5), inner="aot_eager",
                    inductor_config={"size_asserts": False})


def test_inductor_config_reaches_the_layer_graphs_not_the_loss(monkeypatch):
    """Every graph our backend compiles gets the patches; the regional loss graph (compiled
    by plain Inductor) keeps the defaults. Inductor itself is replaced by aot_eager here
    (CPU codegen takes a minute): what is checked is what it is called with."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor import compile_fx as compile_fx_module
    calls = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        calls.append((config_patches, any("sparselora" in o for o in ops)))
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    patches = {"size_asserts": False}
    model = slc.compile(tiny_llama(layers=2), slc.Policy(mlp=0.5), inductor_config=patches)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    model.uncompile()
    torch._dynamo.reset()
    ours = [c for c, rewritten in calls if rewritten]
    # with what inductor_choices adds for its heuristics
    assert ours and all(c == inductor_choices.config_patches(patches) for c in ours)
    assert any(c is None or c == {} for c, rewritten in calls if not rewritten)


def test_cpp_wrapper_brings_the_settings_inductor_patches_for_it():
    """torch 2.11 patched store_cubin (and compile-time autotuning) only around the
    forward's compile; passing them with cpp_wrapper makes them reach the backward's."""
    from sparselora_compile.backend import CPP_WRAPPER_SETTINGS, _with_cpp_wrapper_settings
    assert _with_cpp_wrapper_settings({"size_asserts": False}) == {"size_asserts": False}
    assert _with_cpp_wrapper_settings(None) is None
    got = _with_cpp_wrapper_settings({"cpp_wrapper": True, "triton.autotune_at_compile_time": False})
    assert got == {**CPP_WRAPPER_SETTINGS, "cpp_wrapper": True, "triton.autotune_at_compile_time": False}
    import torch._inductor.config as inductor_config
    assert all(k in inductor_config._config for k in CPP_WRAPPER_SETTINGS)
