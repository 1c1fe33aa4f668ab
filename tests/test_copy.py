"""copy.deepcopy of a compiled model (sparselora_compile/copying.py): a copy of the model is
the model uncompiled and leaves the original's run alone; a copy of the wrapper compiles the
copied model with a run of its own."""
import copy

import torch

import sparselora_compile as slc

from llama import ALL, batch, tiny_llama

POLICY = slc.Policy(mlp=0.5, attention=0.5)


def _compiled():
    model = tiny_llama(ALL)
    return model, slc.compile(model, POLICY, inner="aot_eager")


def test_a_copy_of_the_model_is_uncompiled_and_leaves_the_run_alone():
    model, sparse = _compiled()
    user_hook = model.register_forward_pre_hook(lambda m, a: None)
    ids, labels = batch()
    eager = tiny_llama(ALL)  # the same weights, never compiled
    c = copy.deepcopy(model)
    assert "_sparselora" not in c.__dict__ and "__deepcopy__" not in c.__dict__
    assert list(c._forward_pre_hooks) == [user_hook.id] and not c._forward_hooks
    assert all(m._compiled_call_impl is None for m in c.modules())
    assert c.get_base_model().config._attn_implementation == "sdpa"  # packing.py switched the original
    assert model.get_base_model().config._attn_implementation == "sparselora_sdpa"
    loss = c(input_ids=ids, labels=labels).loss
    loss.backward()
    assert sparse.stats.steps == 0 and sparse.run.labels is None
    torch.testing.assert_close(loss, eager(input_ids=ids, labels=labels).loss, rtol=0, atol=0)
    assert c.get_base_model().loss_function is eager.get_base_model().loss_function  # not compiled
    # its own weights
    with torch.no_grad():
        next(p for n, p in c.named_parameters() if "lora_B" in n).add_(1.0)
    assert not torch.equal(next(p for n, p in c.named_parameters() if "lora_B" in n),
                           next(p for n, p in model.named_parameters() if "lora_B" in n))
    slc.compile(c, POLICY, inner="aot_eager")  # compiles again, as any model
    copy.deepcopy(c)


def test_a_copy_of_the_wrapper_has_its_own_run():
    model, sparse = _compiled()
    ids, labels = batch()
    twin = copy.deepcopy(sparse)
    assert type(twin) is type(sparse) and twin.run is not sparse.run and twin.model is not model
    assert twin.model.__dict__["_sparselora"] is twin and twin.policy == sparse.policy
    assert twin.model.get_base_model().config._attn_implementation == "sparselora_sdpa"
    twin.uncompile()
    assert twin.model.get_base_model().config._attn_implementation == "sdpa"
    twin = copy.deepcopy(sparse)
    a = twin(input_ids=ids, labels=labels).loss
    assert (twin.stats.steps, sparse.stats.steps) == (1, 0)
    assert twin.stats.saved_fraction > 0  # its layers are compiled, sparse
    b = sparse(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(a, b)  # same weights, same step: same channels kept
    assert (twin.stats.steps, sparse.stats.steps) == (1, 1)


def test_after_uncompile_a_copy_is_plain():
    model, sparse = _compiled()
    sparse.uncompile()
    assert "__deepcopy__" not in model.__dict__
    c = copy.deepcopy(model)
    assert not c._forward_pre_hooks and not c._forward_hooks
