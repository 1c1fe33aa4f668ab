"""`cudagraphs=True`: Inductor's CUDA graphs around everything but the runtime's ops."""
import pytest
import torch

import sparselora_compile as slc
from sparselora_compile.runtime.ops import OP_NAMES

from llama import ALL, batch, tiny_llama


def test_every_runtime_op_is_a_partition_point():
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparselora::")}
    assert registered == set(OP_NAMES)


def test_cudagraphs_needs_inductor():
    with pytest.raises(ValueError, match="cudagraphs"):
        slc.compile(tiny_llama(), slc.Policy(mlp=0.5), inner="aot_eager", cudagraphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("regional", [True, False])
def test_cudagraphs_match_plain_inductor(regional):
    """Three sparse training steps: the same losses and LoRA grads as without CUDA graphs."""
    def run(cudagraphs):
        torch._dynamo.reset()
        model = tiny_llama(ALL).cuda().to(torch.bfloat16)
        fn = slc.compile(model, slc.Policy(mlp=0.5, attention=0.5), regional=regional,
                         cudagraphs=cudagraphs)
        ids, labels = (t.cuda() for t in batch(t=12, n_out=4))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            loss = fn(input_ids=ids, labels=labels).loss
            loss.backward()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, grads

    (l0, g0), (l1, g1) = run(False), run(True)
    assert l1 == pytest.approx(l0, rel=1e-3)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=2e-2, atol=2e-2 * g0[n].abs().max().item(), msg=n)
