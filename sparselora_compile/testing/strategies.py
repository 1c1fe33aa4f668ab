"""Hypothesis strategies for property-testing rewrites and policies.

    from sparselora_compile.testing import strategies as sst
    @given(sst.lora_mlp_cases(), sst.policies())
    def test_mine(case, policy):
        assert_rewrite_equivalent(case.model, case.inputs, policy)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from sparselora_compile.policy import Policy

from .models import FusedGatedMLP, FusedQKVAttention, GatedMLP, GQAttention, PlainMLP, Stack, with_lora


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict
    description: str

    def __repr__(self):
        return f"Case({self.description})"


def _inputs(draw, hidden, dtype):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(2, 12))
    x = torch.randn(b, t, hidden, dtype=dtype).requires_grad_(True)
    labels = torch.full((b, t), -100, dtype=torch.long)
    n_out = draw(st.integers(0, t - 1))
    if n_out:
        labels[:, t - n_out:] = 1
    return {"x": x, "labels": labels}


@st.composite
def lora_mlp_cases(draw, dtypes=(torch.float32,)):
    hidden = draw(st.sampled_from([8, 16, 24]))
    d_ff = draw(st.integers(8, 48))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    targets = draw(st.sampled_from([("gate_proj", "up_proj", "down_proj"), ("down_proj",),
                                    ("gate_proj",), ("up_proj", "down_proj")]))
    r = draw(st.integers(1, 6))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = with_lora(Stack(GatedMLP(hidden, d_ff, bias), "mlp"), targets, r, dropout, seed).to(dtype)
    desc = f"mlp h={hidden} d_ff={d_ff} bias={bias} lora={targets} r={r} p={dropout} {dtype}"
    return Case(model, _inputs(draw, hidden, dtype), desc)


@st.composite
def lora_fused_mlp_cases(draw, dtypes=(torch.float32,)):
    """Phi-3's MLP layout: gate_up_proj (halves gate, up) and down_proj."""
    hidden = draw(st.sampled_from([8, 16, 24]))
    d_ff = draw(st.integers(8, 32))  # >= the policies' largest estimator rank
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    targets = draw(st.sampled_from([("gate_up_proj", "down_proj"), ("gate_up_proj",), ("down_proj",)]))
    r = draw(st.integers(1, 6))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = with_lora(Stack(FusedGatedMLP(hidden, d_ff, bias), "mlp"), targets, r, dropout, seed).to(dtype)
    desc = f"fused mlp h={hidden} d_ff={d_ff} bias={bias} lora={targets} r={r} p={dropout} {dtype}"
    return Case(model, _inputs(draw, hidden, dtype), desc)


@st.composite
def lora_plain_mlp_cases(draw, dtypes=(torch.float32,)):
    """Non-gated fc -> act -> proj with biases: Linear (GPT-NeoX) or Conv1D (GPT-2)."""
    hidden = draw(st.sampled_from([8, 16, 24]))
    d_ff = draw(st.integers(8, 48))  # >= the policies' largest estimator rank
    conv1d = draw(st.booleans())
    act = draw(st.sampled_from(["gelu", "gelu_tanh", "relu"]))
    dtype = draw(st.sampled_from(dtypes))
    fc, proj = ("c_fc", "c_proj") if conv1d else ("dense_h_to_4h", "dense_4h_to_h")
    targets = draw(st.sampled_from([(fc, proj), (fc,), (proj,)]))
    r = draw(st.integers(1, 6))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = with_lora(Stack(PlainMLP(hidden, d_ff, act, conv1d), "mlp"), targets, r, dropout, seed,
                      fan_in_fan_out=conv1d).to(dtype)
    desc = (f"plain mlp h={hidden} d_ff={d_ff} act={act} conv1d={conv1d} lora={targets} r={r} "
            f"p={dropout} {dtype}")
    return Case(model, _inputs(draw, hidden, dtype), desc)


@st.composite
def lora_attention_cases(draw, dtypes=(torch.float32,)):
    n_kv = draw(st.integers(1, 3))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    # n_kv * head_dim >= 8: the policies' estimator rank goes up to 8 (and defaults to 8)
    head_dim = draw(st.sampled_from([4, 8] if n_kv > 1 else [8]))
    hidden = draw(st.sampled_from([8, 16]))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    targets = draw(st.sampled_from([("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"),
                                    ("o_proj",)]))
    r = draw(st.integers(1, 4))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    block = GQAttention(hidden, n_kv * n_rep, n_kv, head_dim, bias)
    model = with_lora(Stack(block, "attention"), targets, r, dropout, seed).to(dtype)
    desc = (f"attention h={hidden} heads={n_kv * n_rep}/{n_kv} hd={head_dim} bias={bias} "
            f"lora={targets} r={r} p={dropout} {dtype}")
    return Case(model, _inputs(draw, hidden, dtype), desc)


@st.composite
def lora_fused_attention_cases(draw, dtypes=(torch.float32,)):
    """One [q | k | v] product: Linear sliced (Phi-3) or Conv1D split (GPT-2)."""
    n_kv = draw(st.integers(1, 3))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    # n_kv * head_dim >= 8: the policies' estimator rank goes up to 8 (and defaults to 8)
    head_dim = draw(st.sampled_from([4, 8] if n_kv > 1 else [8]))
    hidden = draw(st.sampled_from([8, 16]))
    conv1d = draw(st.booleans())
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    qkv, o = ("c_attn", "c_proj") if conv1d else ("qkv_proj", "o_proj")
    targets = draw(st.sampled_from([(qkv, o), (qkv,), (o,)]))
    r = draw(st.integers(1, 4))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    block = FusedQKVAttention(hidden, n_kv * n_rep, n_kv, head_dim, bias, conv1d)
    model = with_lora(Stack(block, "attention"), targets, r, dropout, seed,
                      fan_in_fan_out=conv1d).to(dtype)
    desc = (f"fused attention h={hidden} heads={n_kv * n_rep}/{n_kv} hd={head_dim} bias={bias} "
            f"conv1d={conv1d} lora={targets} r={r} p={dropout} {dtype}")
    return Case(model, _inputs(draw, hidden, dtype), desc)


@st.composite
def policies(draw, max_sparsity: float = 0.95):
    frac = st.floats(0.05, max_sparsity, allow_nan=False)
    return Policy(mlp=draw(frac), attention=draw(frac),
                  dense_output_tokens=draw(st.booleans()),
                  k_multiple=draw(st.sampled_from([1, 2, 8])),
                  rank=draw(st.integers(1, 8)))
