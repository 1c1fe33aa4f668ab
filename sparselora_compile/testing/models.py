"""Small LoRA models for property tests: a gated MLP block and a grouped-query attention
block (HF Llama layout: repeat_kv maps query head h to kv head h // n_rep), each inside
`layers.<i>` so the backend reads a layer index, wrapped with PEFT LoRA."""
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


class GQAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=bias)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        rep = self.n_heads // self.n_kv
        k = k[:, :, None].expand(b, self.n_kv, rep, t, self.hd).reshape(b, self.n_heads, t, self.hd)
        v = v[:, :, None].expand(b, self.n_kv, rep, t, self.hd).reshape(b, self.n_heads, t, self.hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


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


def with_lora(model: nn.Module, targets, r: int = 4, dropout: float = 0.0, seed: int = 0):
    """PEFT LoRA on `targets`, with lora_B made non-zero so LoRA terms matter."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                  target_modules=list(targets)))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return peft_model
