"""Small LoRA models for property tests: MLP blocks (gated, Phi-3's fused gate_up, non-gated
with Linear or GPT-2's Conv1D) and grouped-query attention blocks, with separate q/k/v or
one [q | k | v] product (HF Llama layout: repeat_kv maps query head h to kv head
h // n_rep), each inside `layers.<i>` so the backend reads a layer index, wrapped with
PEFT LoRA."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, d_ff, bias=bias)
        self.up_proj = nn.Linear(hidden, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """Phi-3's layout: one gate_up_proj whose output halves are gate and up."""

    def __init__(self, hidden: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, hidden, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


def _activation(name: str) -> nn.Module:
    """transformers' activation modules by ACT2FN name, as the models hold them; gelu_tanh
    is GPT-2's gelu_new, which Dynamo traces as arithmetic."""
    from transformers.activations import ACT2FN
    return ACT2FN[{"gelu_tanh": "gelu_new"}.get(name, name)]


class PlainMLP(nn.Module):
    """fc -> act -> proj with biases: GPT-NeoX's names and Linear layers, or with `conv1d`
    GPT-2's names and transformers' Conv1D (weight stored [in, out])."""

    def __init__(self, hidden: int, d_ff: int, act: str = "gelu", conv1d: bool = False):
        super().__init__()
        self.names = ("c_fc", "c_proj") if conv1d else ("dense_h_to_4h", "dense_4h_to_h")
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            fc, proj = Conv1D(d_ff, hidden), Conv1D(hidden, d_ff)
        else:
            fc, proj = nn.Linear(hidden, d_ff), nn.Linear(d_ff, hidden)
        for name, lin in zip(self.names, (fc, proj)):
            fan_in = lin.weight.shape[0] if conv1d else lin.weight.shape[1]
            nn.init.normal_(lin.weight, std=fan_in ** -0.5)  # Conv1D's std 0.02 is near zero
            nn.init.normal_(lin.bias, std=0.1)
            setattr(self, name, lin)
        self.act = _activation(act)

    def forward(self, x):
        fc, proj = (getattr(self, n) for n in self.names)
        return proj(self.act(fc(x)))


def _grouped_query_attention(q, k, v, n_heads: int, n_kv: int, hd: int):
    """SDPA over [b, t, heads * hd] q and [b, t, n_kv * hd] k, v (repeat_kv layout)."""
    b, t, _ = q.shape
    q = q.view(b, t, n_heads, hd).transpose(1, 2)
    k, v = (z.view(b, t, n_kv, hd).transpose(1, 2) for z in (k, v))
    rep = n_heads // n_kv
    k = k[:, :, None].expand(b, n_kv, rep, t, hd).reshape(b, n_heads, t, hd)
    v = v[:, :, None].expand(b, n_kv, rep, t, hd).reshape(b, n_heads, t, hd)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(b, t, -1)


class GQAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=bias)

    def forward(self, x):
        o = _grouped_query_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                     self.n_heads, self.n_kv, self.hd)
        return self.o_proj(o)


class FusedQKVAttention(nn.Module):
    """One [q | k | v] product: Phi-3's qkv_proj and o_proj (Linear, sliced), or with
    `conv1d` GPT-2's c_attn and c_proj (transformers' Conv1D, split)."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False, conv1d: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.conv1d = n_heads, n_kv_heads, head_dim, conv1d
        self.widths = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.c_attn, self.c_proj = Conv1D(sum(self.widths), hidden), Conv1D(hidden, self.widths[0])
            for lin in (self.c_attn, self.c_proj):  # Conv1D's std 0.02 is near zero
                nn.init.normal_(lin.weight, std=lin.weight.shape[0] ** -0.5)
                nn.init.normal_(lin.bias, std=0.1)
        else:
            self.qkv_proj = nn.Linear(hidden, sum(self.widths), bias=bias)
            self.o_proj = nn.Linear(self.widths[0], hidden, bias=bias)

    def forward(self, x):
        if self.conv1d:
            q, k, v = self.c_attn(x).split(self.widths, dim=2)
        else:
            qkv = self.qkv_proj(x)
            n_q, n_kv = self.widths[:2]
            q, k, v = qkv[..., :n_q], qkv[..., n_q:n_q + n_kv], qkv[..., n_q + n_kv:]
        o = _grouped_query_attention(q, k, v, self.n_heads, self.n_kv, self.head_dim)
        return (self.c_proj if self.conv1d else self.o_proj)(o)


class Layer(nn.Module):
    def __init__(self, block: nn.Module, kind: str):
        super().__init__()
        setattr(self, "mlp" if kind == "mlp" else "self_attn", block)
        self.kind = kind

    def forward(self, x):
        return x + (self.mlp(x) if self.kind == "mlp" else self.self_attn(x))


class Stack(nn.Module):
    """`layers.0.<block>`: one block with a residual, so the loss sees every channel."""

    def __init__(self, block: nn.Module, kind: str):
        super().__init__()
        self.layers = nn.ModuleList([Layer(block, kind)])

    def forward(self, x, labels=None):
        for layer in self.layers:
            x = layer(x)
        return x


def with_lora(model: nn.Module, targets, r: int = 4, dropout: float = 0.0, seed: int = 0,
              fan_in_fan_out: bool = False):
    """PEFT LoRA on `targets`, with lora_B made non-zero so LoRA terms matter
    (`fan_in_fan_out`: the targets are Conv1D layers, weight [in, out])."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                  target_modules=list(targets),
                                                  fan_in_fan_out=fan_in_fan_out))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return peft_model
