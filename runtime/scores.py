"""MLP estimator scores with dispatch: the fused Triton estimator on CUDA (no [tokens x d_ff]
tensor), the plain PyTorch version of `selection` elsewhere, for gate activations other
than silu and for non-gated MLPs (the fused kernel computes silu(gate) * up only). (Attention scores need no
kernel: `selection` gets q/k/v column norms from an r x r Gram matrix.)"""
from __future__ import annotations

from . import selection
from .gathered import use_triton


def mlp_scores(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, split, joined=None, act="silu"):
    """`act`: the block's gate activation (`selection.ACTIVATIONS`)."""
    if act == "silu" and use_triton(x):
        # every row's projection in x's dtype, weighted in the kernel (split.row_weight): no
        # gather, cast or correction for the skipped rows on the host
        from .kernels.fused_estimator import mlp_channel_scores_projected
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ selection.side_by_side((a_gate, a_up), x2.dtype, joined)
        return mlp_channel_scores_projected(xa, b_gate, b_up, res_gate, res_up, split.row_weight)
    return selection.mlp_scores(x, a_gate, b_gate, a_up, b_up, res_gate, res_up, split, joined, act)


def plain_mlp_scores(x, a, b, res, split, joined=None, act="gelu"):
    """Non-gated MLPs: plain PyTorch on every device (a [tokens x d_ff] fp32 temporary;
    the fused Triton estimator scores gated blocks only)."""
    return selection.plain_mlp_scores(x, a, b, res, split, joined, act)
