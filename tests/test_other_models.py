"""Models that are not Llama-shaped compile and stay correct."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparselora_compile as slc
from sparselora_compile.testing import assert_rewrite_equivalent
from sparselora_compile.testing.models import GatedMLP, Stack, with_lora


class NormedMLP(nn.Module):
    """A layer norm between the linears mixes the intermediate channels, so keeping some
    of fc1's outputs is not the same as keeping fc2's inputs: nothing the method knows."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(F.layer_norm(F.gelu(self.fc1(x)), (32,)))


def test_channel_mixing_mlp_is_left_alone():
    torch.manual_seed(0)
    model = with_lora(NormedMLP(), ["fc1"])
    x = torch.randn(2, 5, 16)
    policy = slc.Policy(mlp=0.5, attention=0.5)
    compiled = torch.compile(model, backend="sparselora", options={"policy": policy, "inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x))
    assert slc.run_of(compiled).stats.base_flops_dense == 0


def test_gated_mlp_with_biases_and_frozen_linears():
    torch.manual_seed(0)
    model = with_lora(Stack(GatedMLP(16, 40, bias=True), "mlp"), ["up_proj"])
    x = torch.randn(2, 6, 16, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[:, -2:] = 3
    cmp = assert_rewrite_equivalent(model, {"x": x, "labels": labels}, slc.Policy(mlp=0.6, k_multiple=1),
                                    expect_blocks=1)
    assert cmp.blocks_checked == 1


def test_trainable_base_weight_is_never_rewritten():
    torch.manual_seed(0)
    model = Stack(GatedMLP(16, 32), "mlp")  # plain model: every weight requires grad
    policy = slc.Policy(mlp=0.5)
    compiled = torch.compile(model, backend="sparselora", options={"policy": policy, "inner": "aot_eager"})
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(compiled(x), model(x))
    assert slc.run_of(compiled).stats.base_flops_dense == 0
