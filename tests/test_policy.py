"""Policy rules, presets, the reference YAML format, and errors on bad input."""
import pytest
import torch

import sparselora_compile as slc
from sparselora_compile.policy import BlockInfo

from llama import ALL, batch, tiny_llama


def _block(layer, kind="mlp", n=30):
    return BlockInfo(name=f"model.layers.{layer}.{kind}", layer=layer, kind=kind, in_features=64,
                     channels=128, num_layers=n)


def test_math10k_preset_matches_published_layers():
    p = slc.presets.math10k(total_steps=1000)
    assert p.sparsity_for(_block(3)) == 0.99 and p.sparsity_for(_block(30)) == 0.99
    assert p.sparsity_for(_block(2)) == 0.0 and p.sparsity_for(_block(31)) == 0.0
    assert p.sparsity_for(_block(14, "attention")) == 0.75
    assert p.sparsity_for(_block(20, "attention")) == 0.0
    assert p.warmup() == 50


def test_csr_preset():
    p = slc.presets.csr()
    assert p.sparsity_for(_block(17)) == 0.97 and p.sparsity_for(_block(16)) == 0.0
    assert p.sparsity_for(_block(20, "attention")) == 0.2


def test_yaml_loader_reads_reference_format():
    text = """
start_step: 0.05
mode: "svd_16"
skip_output_tokens: True
ffn_sparsity: "ffn=0.99x28"
sparsity:
  layers.0.mlp: 0
  layers.29.mlp: 0.99
  layers.29.self_attn: 0.75
"""
    p = slc.Policy.from_yaml(text, total_steps=200)
    assert p.rank == 16 and p.dense_output_tokens and p.warmup() == 10
    assert p.sparsity_for(_block(29)) == 0.99
    assert p.sparsity_for(_block(29, "attention")) == 0.75
    assert p.sparsity_for(_block(0)) == 0.0


def test_yaml_unknown_key_and_mode():
    with pytest.raises(ValueError, match="unknown key"):
        slc.Policy.from_yaml("start_step: 3\nbogus: 1\n")
    with pytest.raises(ValueError, match="mode"):
        slc.Policy.from_yaml("mode: oracle_l2norm\n")


def test_k_rounds_up_to_multiple():
    p = slc.Policy(mlp=0.9, k_multiple=8)
    assert p.kept_channels(_block(5), 0.9) == 16   # int(12.8) = 12 -> 16
    assert slc.Policy(k_multiple=1).kept_channels(_block(5), 0.9) == 12


def test_dense_edges_and_dense_layers():
    p = slc.Policy(mlp=0.5, dense_edges=True, dense_layers=[10])
    assert [p.sparsity_for(_block(i)) for i in (0, 2, 3, 10, 28, 29)] == [0, 0, 0.5, 0, 0.5, 0]


def test_custom_decide_function_and_subclass():
    p = slc.Policy(decide=lambda b: 0.8 if b.kind == "mlp" and b.layer % 2 else None, mlp=0.1)
    assert p.sparsity_for(_block(3)) == 0.8 and p.sparsity_for(_block(4)) == 0.1

    class Deeper(slc.Policy):
        def sparsity_for(self, block):
            return min(0.9, 0.03 * block.layer)

    assert Deeper().sparsity_for(_block(20)) == pytest.approx(0.6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mlp=1.0), r"outside \[0, 1\)"),
    (dict(attention=-0.1), r"outside \[0, 1\)"),
    (dict(sparsity={"layers.3.mlp": 1.5}), r"outside \[0, 1\)"),
    (dict(sparsity={"layer3.mlp": 0.5}), "not of the form"),
    (dict(warmup_fraction=0.1), "needs total_steps"),
    (dict(estimator="oracle"), "estimator"),
    (dict(rank=0), "rank"),
])
def test_bad_policy_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slc.Policy(**kwargs)


def test_unknown_policy_field_in_dict():
    with pytest.raises(ValueError, match="unknown Policy option"):
        slc.Policy.from_dict({"mlp_sparsity": 0.5})


def _compile_and_run(options):
    model = tiny_llama(ALL, layers=1)  # one layer is enough for these errors (no layer 7 either way)
    ids, labels = batch()
    torch.compile(model, backend="sparselora", options=options)(input_ids=ids, labels=labels)


def test_unknown_backend_option_is_an_error():
    with pytest.raises(Exception, match="unknown option"):
        _compile_and_run({"polcy": slc.Policy()})


def test_policy_naming_missing_layer_is_an_error():
    with pytest.raises(Exception, match=r"layer\(s\) \[7\]"):
        _compile_and_run({"policy": slc.Policy(sparsity={"layers.7.mlp": 0.5}), "inner": "eager"})


def test_decide_returning_bad_sparsity_is_an_error():
    with pytest.raises(Exception, match="outside"):
        _compile_and_run({"policy": slc.Policy(decide=lambda b: 2.0), "inner": "eager"})


def test_attention_below_the_cuda_threshold_stays_dense_on_cuda_only():
    from sparselora_compile.passes.plan import Limits, decide
    MIN_ATTENTION_SPARSITY_CUDA = Limits().min_attention_sparsity_cuda
    info = slc.BlockInfo(name="model.layers.3.self_attn", layer=3, kind="attention", in_features=64,
                         channels=32, num_layers=8, n_heads=8, n_kv_heads=2, head_dim=16)
    low = slc.Policy(attention=MIN_ATTENTION_SPARSITY_CUDA / 2)
    assert decide(info, low, cuda=False)[1] == low.kept_channels(info, low.attention)
    s, k, why = decide(info, low, cuda=True)
    assert k is None and "attention sparsity" in why
    high = slc.Policy(attention=max(MIN_ATTENTION_SPARSITY_CUDA, 0.5) + 0.05)
    assert decide(info, high, cuda=True)[1] is not None
    mlp = slc.BlockInfo(name="model.layers.3.mlp", layer=3, kind="mlp", in_features=64,
                        channels=128, num_layers=8)
    assert decide(mlp, slc.Policy(mlp=0.5), cuda=True)[1] == 64
    # the option: 0 sparsifies every attention block the policy asks for
    assert decide(info, low, cuda=True, limits=Limits(min_attention_sparsity_cuda=0.0))[1] is not None


def test_policy_is_immutable():
    import dataclasses
    p = slc.Policy(mlp=0.5, sparsity={"layers.1.mlp": 0.9})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mlp = 0.9
    with pytest.raises(TypeError, match="immutable"):
        p.sparsity["layers.2.mlp"] = 0.5
    assert not hasattr(p, "stats") and not hasattr(p, "set_step")
    assert dataclasses.replace(p, mlp=0.25).sparsity == p.sparsity


@pytest.mark.parametrize("options,match", [
    ({"min_sparsity": 1.5}, "outside"), ({"min_attention_sparsity_cuda": -0.1}, "outside"),
    ({"mlp_all_rows_max_k": -1}, "int >= 0"), ({"lora_dtype": "fp8"}, "lora_dtype"),
    ({"run": object()}, "must be a Run")])
def test_bad_option_values_are_errors(options, match):
    from sparselora_compile.backend import BackendOptions
    with pytest.raises((ValueError, TypeError), match=match):
        BackendOptions.parse(options)


def test_rank_above_a_sparse_blocks_weights_is_an_error():
    """tiny_llama: hidden 32, d_ff 64, 2 kv heads of 8 (16 channels): the attention blocks
    allow rank 16 at most, the MLP 32. A block left dense needs no estimator."""
    with pytest.raises(ValueError, match=r"rank=17 exceeds min\(in, out\)=16 .*self_attn.*rank <= 16"):
        slc.compile(tiny_llama(ALL), slc.Policy(mlp=0.5, attention=0.5, rank=17), inner="aot_eager")
    slc.compile(tiny_llama(ALL), slc.Policy(mlp=0.5, attention=0.0, rank=17), inner="aot_eager")
    with pytest.raises(ValueError, match=r"rank=33 exceeds min\(in, out\)=32 .*mlp"):
        slc.compile(tiny_llama(ALL), slc.Policy(mlp=0.5, attention=0.0, rank=33), inner="aot_eager")


def test_rank_is_checked_under_torch_compile():
    model = torch.compile(tiny_llama(ALL), backend="sparselora",
                          options={"policy": {"mlp": 0.5, "attention": 0.5, "rank": 17}, "inner": "aot_eager"})
    ids, labels = batch()
    with pytest.raises(Exception, match=r"rank=17 exceeds min\(in, out\)=16"):
        model(input_ids=ids, labels=labels)


def test_policy_from_missing_yaml_names_the_path():
    with pytest.raises(FileNotFoundError, match=r"'missing\.yaml' not found"):
        slc.Policy.from_yaml("missing.yaml")
