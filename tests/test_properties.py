"""Hypothesis over whole-block rewrites: generated LoRA MLP blocks (gated, fused gate_up,
non-gated with Linear or Conv1D) and GQA attention blocks (separate q/k/v, or one
[q | k | v] Linear or Conv1D) and policies, each checked against the reference
semantics, forward and gradients."""
from hypothesis import HealthCheck, given, settings

from sparselora_compile.testing import assert_rewrite_equivalent
from sparselora_compile.testing import strategies as sst

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


def _expected_blocks(case, policy):
    from sparselora_compile.policy import BlockInfo
    blk = case.model.base_model.model.layers[0]
    mod = getattr(blk, "mlp", None) or blk.self_attn
    kind = "mlp" if hasattr(blk, "mlp") else "attention"
    channels = mod.gate_proj.out_features if kind == "mlp" else (
        getattr(mod.k_proj, "base_layer", mod.k_proj).out_features)
    info = BlockInfo("layers.0." + kind, 0, kind, 0, channels)
    return int(policy.kept_channels(info, policy.sparsity_for(info)) < channels)


@SETTINGS
@given(sst.lora_mlp_cases(), sst.policies())
def test_mlp_block_rewrite_equivalent(case, policy):
    assert_rewrite_equivalent(case.model, case.inputs, policy,
                              expect_blocks=_expected_blocks(case, policy))


@SETTINGS
@given(sst.lora_attention_cases(), sst.policies())
def test_attention_block_rewrite_equivalent(case, policy):
    assert_rewrite_equivalent(case.model, case.inputs, policy,
                              expect_blocks=_expected_blocks(case, policy))


def _expected_from_modules(case, policy):
    """1 if the policy sparsifies the case's one block (read from the modules), else 0."""
    from sparselora_compile.passes.blocks import model_blocks
    (mb,) = model_blocks(case.model)
    return int(policy.kept_channels(mb.info, policy.sparsity_for(mb.info)) < mb.info.channels)


@SETTINGS
@given(sst.lora_fused_mlp_cases(), sst.policies())
def test_fused_gate_up_mlp_rewrite_equivalent(case, policy):
    assert_rewrite_equivalent(case.model, case.inputs, policy,
                              expect_blocks=_expected_from_modules(case, policy))


@SETTINGS
@given(sst.lora_plain_mlp_cases(), sst.policies())
def test_plain_mlp_rewrite_equivalent(case, policy):
    assert_rewrite_equivalent(case.model, case.inputs, policy,
                              expect_blocks=_expected_from_modules(case, policy))


@SETTINGS
@given(sst.lora_fused_attention_cases(), sst.policies())
def test_fused_qkv_attention_rewrite_equivalent(case, policy):
    assert_rewrite_equivalent(case.model, case.inputs, policy,
                              expect_blocks=_expected_from_modules(case, policy))
