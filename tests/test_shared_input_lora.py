"""The lora_A products that read one input become one GEMM (passes/shared_input_lora.py).

Reference: the same graph unfused. Forward values and every gradient must agree."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sparselora_compile as slc
from sparselora_compile.passes.graphs import LINEAR, is_call, module_path
from sparselora_compile.passes.lora_dtype import lora_products_in_model_dtype
from sparselora_compile.passes.shared_input_lora import fuse_shared_input_lora_a

from llama import ALL, QKVO, batch, tiny_llama


def _lora_a_products(gm):
    return sum(is_call(n, LINEAR) and ".lora_A." in (module_path(n) or "") for n in gm.graph.nodes)


def _fused_vs_plain(model, ids, labels, cast_down=False):
    """Runs the model's Dynamo graph as is and fused; returns (count, outputs, grads) of each."""
    runs = []

    def backend(gm, example_inputs):
        gm = copy.deepcopy(gm)
        if cast_down:
            lora_products_in_model_dtype(gm)
        plain = copy.deepcopy(gm)
        n = fuse_shared_input_lora_a(gm)
        runs.append((n, _lora_a_products(plain), _lora_a_products(gm)))
        plain_fn = plain.forward
        fused_fn = gm.forward
        return lambda *a: (_grads(plain_fn, a), _grads(fused_fn, a))[1]

    def _grads(fn, args):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        out = fn(*args)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        g = torch.autograd.grad(loss.float().sum(), leaves, allow_unused=True)
        results.append((loss.detach(), g))
        return out

    results = []
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(input_ids=ids, labels=labels)
    torch._dynamo.reset()
    (n, before, after), = runs
    (plain_loss, plain_g), (fused_loss, fused_g) = results
    return n, before, after, (plain_loss, plain_g), (fused_loss, fused_g)


def _assert_same(plain, fused, **tol):
    torch.testing.assert_close(fused[0], plain[0], **tol)
    for a, b in zip(plain[1], fused[1]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("targets, fused_per_layer", [(QKVO, 3), (ALL, 5)], ids=["qkvo", "all"])
def test_qkv_and_gate_up_share_one_product(targets, fused_per_layer):
    """q, k, v read the same hidden states (and gate, up the same MLP input); o and down read
    their own. The merged graph gives the same loss and gradients as the plain one."""
    n, before, after, plain, fused = _fused_vs_plain(tiny_llama(targets, layers=2), *batch())
    assert n == 2 * fused_per_layer
    assert after == before - n  # the merged GEMM is no single adapter's product
    _assert_same(plain, fused, rtol=1e-5, atol=1e-6)


def test_dropout_keeps_products_apart():
    """With dropout each adapter reads its own masked input: nothing to merge."""
    n, before, after, _, _ = _fused_vs_plain(tiny_llama(QKVO, dropout=0.1, layers=1), *batch())
    assert n == 0 and before == after == 4


@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(r=st.sampled_from([1, 3, 8]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seq=st.integers(3, 9))
def test_merged_product_matches_property(r, dtype, seq):
    """Ranks, sequence lengths and model dtypes; on a bf16 model with fp32 adapters, after
    the lora_dtype pass (the weights are cast where they are read) as well."""
    peft = tiny_llama(QKVO, layers=1, r=r)
    peft.to(dtype)
    for n_, p in peft.named_parameters():
        if "lora_" in n_:
            p.data = p.data.float()
    n, _, _, plain, fused = _fused_vs_plain(peft, *batch(t=seq, n_out=2),
                                            cast_down=dtype == torch.bfloat16)
    assert n == 3
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    _assert_same(plain, fused, **tol)


def test_backend_merges_and_matches_eager(caplog):
    """Through the backend (regional, aot_eager, blocks rewritten but in their dense warm-up):
    the products are merged, and loss and grads are eager PEFT's."""
    model = tiny_llama(QKVO, layers=2)
    ref = copy.deepcopy(model)
    ids, labels = batch(t=12, n_out=4)
    torch._dynamo.reset()
    fn = slc.compile(model, slc.Policy(mlp=0.5, attention=0.5, warmup_steps=10**9), inner="aot_eager")
    with caplog.at_level("INFO", logger="sparselora_compile"):
        loss = fn(input_ids=ids, labels=labels).loss
    assert any("3 lora_A products in shared GEMMs" in r.getMessage() for r in caplog.records)
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref.named_parameters())
    for n_, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[n_].grad, rtol=1e-4, atol=1e-6, msg=n_)
    fn.uncompile()
    torch._dynamo.reset()
