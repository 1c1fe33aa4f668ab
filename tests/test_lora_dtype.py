"""`lora_dtype="model"`: LoRA products in the base layer's dtype, adapters kept fp32.

Its reference semantics: the same model with its adapters cast to the model's dtype
(what PEFT runs with `autocast_adapter_dtype=False`), gradients cast back to fp32.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import sparselora_compile as slc
from sparselora_compile.passes.lora_dtype import lora_products_in_model_dtype

from llama import ALL, QKVO, batch, tiny_llama


def _model(targets, dtype, dropout=0.0, layers=2):
    """A `dtype` model with PEFT's default fp32 adapters."""
    m = tiny_llama(targets, dropout=dropout, layers=layers).to(dtype)
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    return m


def _low_adapters(m, dtype):
    m = copy.deepcopy(m)
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
    return m


def _loss_grads(model, policy, regional, embeds=False, **options):
    """`embeds`: feed `inputs_embeds` that require grad instead of `input_ids`. Regionally
    compiled, layer 0 then shares the other layers' graph (its input needs grad like
    theirs), so a run costs one layer compile instead of two; the graph of a layer whose
    input needs no grad is what `input_ids` exercises."""
    torch._dynamo.reset()
    fn = slc.compile(model, slc.Policy(**policy), regional=regional, inner="aot_eager", **options)
    ids, labels = batch(t=12, n_out=4)
    if embeds:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = fn(inputs_embeds=emb, labels=labels).loss
    else:
        loss = fn(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                   if p.grad is not None}


class _LinearDtypes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch._C._nn.linear, torch.nn.functional.linear):
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_pass_leaves_no_fp32_product(dropout):
    """Every adapter of every LoRA layer is rewritten; afterwards no linear reads fp32."""
    model = _model(ALL, torch.bfloat16, dropout=dropout)
    found = []

    def backend(gm, example_inputs):
        before, after = _LinearDtypes(), _LinearDtypes()
        with before:
            gm(*example_inputs)
        found.append(lora_products_in_model_dtype(gm))
        with after:
            gm(*example_inputs)
        found.append((before.seen, after.seen))
        return gm.forward

    ids, labels = batch()
    torch.compile(model, backend=backend)(input_ids=ids, labels=labels)
    n, (before, after) = found
    assert n == 2 * len(ALL)
    assert before.count(torch.float32) == 2 * n  # lora_A and lora_B of each adapter
    assert len(after) == len(before) and set(after) == {torch.bfloat16}


# The whole-model graph's cost grows with its layers, so one layer there (every adapter
# of a whole graph being rewritten is test_pass_leaves_no_fp32_product's, on two layers);
# regionally two, so that layer 0 (input without grad) and layer 1 get graphs of their own.
@pytest.mark.parametrize("policy, regional, layers", [(dict(mlp=0.0, attention=0.0), False, 1),
                                                      (dict(mlp=0.5, attention=0.5), True, 2)],
                         ids=["dense-whole-model", "sparse-regional"])
def test_matches_adapters_cast_to_model_dtype(regional, policy, layers):
    """Loss and fp32 LoRA grads equal those of the model with bf16 adapters, while the
    adapters (and so the optimizer) stay fp32."""
    model = _model(ALL, torch.bfloat16, layers=layers)
    ref = _low_adapters(model, torch.bfloat16)
    loss, grads = _loss_grads(model, policy, regional, lora_dtype="model")
    ref_loss, ref_grads = _loss_grads(ref, policy, regional)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * layers * len(ALL)
    for n in grads:
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=2e-2 * scale, msg=n)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       targets=st.sampled_from([QKVO, ALL, ["v_proj", "down_proj"]]),
       sparsity=st.sampled_from([0.0, 0.5, 0.75]))
def test_property_matches_low_precision_adapters(dtype, targets, sparsity):
    # Embeddings as input (see _loss_grads): both layers run one compiled graph, which
    # halves the cost of an example; test_matches_adapters_cast_to_model_dtype covers
    # input_ids. fp16 costs about what bf16 does on CPU (the compiles dominate).
    model = _model(targets, dtype)
    low = _low_adapters(model, dtype)  # before compiling: a compiled model is not copied
    policy = dict(mlp=sparsity, attention=sparsity)
    loss, grads = _loss_grads(model, policy, True, embeds=True, lora_dtype="model")
    ref_loss, ref_grads = _loss_grads(low, policy, True, embeds=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for n in ref_grads:
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=2e-2 * scale, msg=n)


def test_fp32_model_is_untouched():
    """Nothing to cast down: the same graph, the same numbers as the default."""
    model = _model(QKVO, torch.float32)
    policy = dict(mlp=0.5, attention=0.5)  # embeds: one layer compile per run (_loss_grads)
    loss, grads = _loss_grads(copy.deepcopy(model), policy, True, embeds=True, lora_dtype="model")
    ref_loss, ref_grads = _loss_grads(model, policy, True, embeds=True)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=0, msg=n)


def test_bad_lora_dtype_is_rejected():
    with pytest.raises(ValueError, match="lora_dtype"):
        slc.compile(tiny_llama(), slc.Policy(mlp=0.5), lora_dtype="bf16")


def test_fp32_lora_products_get_a_hint_once(caplog):
    """Left at the default, a bf16 model with fp32 adapters says once (over its several
    layer graphs) that the option exists."""
    with caplog.at_level("INFO", logger="sparselora_compile"):
        _loss_grads(_model(QKVO, torch.bfloat16), dict(mlp=0.5, attention=0.5), True)
    assert sum("lora_dtype='model'" in r.getMessage() for r in caplog.records) == 1
