"""Regional compilation: one compiled decoder layer serves every layer with the same plan."""
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch._dynamo.utils import counters

import sparselora_compile as slc
from sparselora_compile.passes.blocks import decoder_layers
from sparselora_compile.passes.plan import Limits
from sparselora_compile.regions import layer_signature
from sparselora_compile.testing import assert_rewrite_equivalent

from llama import ALL, QKVO, batch, tiny_llama

# Three distinct layer plans over six layers: layer 1 keeps fewer MLP channels, layer 2's
# attention is dense, the rest share one plan.
PER_LAYER = slc.Policy(mlp=0.5, attention=0.5,
                       sparsity={"layers.1.mlp": 0.75, "layers.2.self_attn": 0.0})


def _train(regional, targets=ALL, layers=3, policy=PER_LAYER, steps=2, embeds=False):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_llama(targets, layers=layers)
    policy = slc.Policy(**{f: getattr(policy, f) for f in ("mlp", "attention", "sparsity", "estimator",
                                                             "warmup_steps")})
    wrapped = slc.compile(model, policy, regional=regional, inner="aot_eager", record=True)
    ids, labels = batch(t=12, n_out=4)
    # embeds: inputs_embeds that require grad, so that layer 0 needs no graph of its own
    inputs = ({"inputs_embeds": model.get_input_embeddings()(ids).detach().requires_grad_(True)}
              if embeds else {"input_ids": ids})
    losses = []
    for _ in range(steps):
        loss = wrapped(**inputs, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    record = wrapped.run.record
    return losses, grads, wrapped.stats.as_dict(), record, counters["stats"]["unique_graphs"]


def _same_selections(a, b):
    assert sorted(a) == sorted(b)
    for name, sel in b.items():
        for key, t in sel.items():
            torch.testing.assert_close(a[name][key], t, rtol=0, atol=0, msg=f"{name} {key}")


@pytest.mark.dynamic_shapes
def test_regional_matches_whole_model_compile():
    """Same selections, loss, LoRA gradients and FLOP counts as one whole-model graph."""
    whole, regional = _train(False), _train(True)
    assert len(whole[3]) == 5  # layer 2's attention is dense
    _same_selections(regional[3], whole[3])
    for a, b in zip(regional[0], whole[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert regional[1].keys() == whole[1].keys()
    for n in whole[1]:
        torch.testing.assert_close(regional[1][n], whole[1][n], rtol=1e-4, atol=1e-6, msg=n)
    assert regional[2] == whole[2] and regional[2]["saved_fraction"] > 0


def test_regional_compiles_once_per_distinct_plan():
    """Eight layers, three plans: three compiles, plus one for layer 0 (its input needs no
    grad, a guard Dynamo checks), however many layers share a plan; and the loss."""
    *_, record, graphs = _train(True, QKVO, layers=8)
    assert graphs == 4 + 1 and len(record) == 15


@pytest.mark.parametrize("targets,checkpointing", [(ALL, False), (QKVO, True)],
                         ids=["lora_all", "lora_qkvo_fused_mlp-ckpt"])
def test_regional_matches_reference_semantics(targets, checkpointing):
    """Against the slow reference; under checkpointing the layer is recomputed in the
    backward, outside the eager glue that names the running layer."""
    model = tiny_llama(targets, layers=3, checkpointing=checkpointing)
    ids, labels = batch()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    cmp = assert_rewrite_equivalent(model, {"inputs_embeds": emb, "labels": labels}, PER_LAYER,
                                    regional=True, expect_blocks=5)
    assert cmp.blocks_checked == 5


def test_regional_activation_aware_refreshes_every_layer():
    """The warm-up's moments reach each layer's own factors, not those of the layer the
    shared graph was compiled on: selections equal the whole-model compile's."""
    policy = slc.Policy(mlp=0.5, attention=0.5, estimator="activation_aware", warmup_steps=1)
    # Embeddings as input: both layers share the graph compiled on layer 0 (without them
    # layer 0 gets a graph of its own, its input needing no grad), so layer 1 reads
    # factors other than those of the layer the graph was compiled on; two layers suffice.
    whole = _train(False, layers=2, policy=policy, steps=3, embeds=True)
    regional = _train(True, layers=2, policy=policy, steps=3, embeds=True)
    assert len(whole[3]) == 4  # both blocks of both layers
    _same_selections(regional[3], whole[3])


def test_layer_signature_groups_layers_by_plan():
    model = tiny_llama(ALL, layers=6)
    layers = decoder_layers(model)
    assert [p for p, _ in layers] == [f"base_model.model.model.layers.{i}" for i in range(6)]
    sigs = [layer_signature(m, p, i, 6, PER_LAYER, Limits()) for i, (p, m) in enumerate(layers)]
    assert len(set(sigs)) == 3 and sigs[0] == sigs[3] == sigs[5] != sigs[1] != sigs[2]
    kinds = {e[1]: e[4] for e in sigs[2]}
    assert kinds == {"mlp": 32, "attention": None}  # d_ff 64 at 0.5; attention dense


def test_regional_errors_and_uncompile():
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        slc.compile(tiny_llama(ALL, layers=2).unload(), PER_LAYER)  # the base model alone
    lone = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="no stack of identical decoder layers"):
        slc.compile(lone, PER_LAYER)
    model = tiny_llama(ALL, layers=2)
    with pytest.raises(ValueError, match="unknown option"):
        slc.compile(model, slc.Policy(mlp=0.5), polcy="x")
    with pytest.raises(ValueError, match=r"names layer\(s\) \[5\]"):
        slc.compile(model, slc.Policy(sparsity={"layers.5.mlp": 0.5}))
    plain_loss = model.get_base_model().loss_function
    wrapped = slc.compile(model, slc.Policy(mlp=0.5), inner="aot_eager")
    assert all(m._compiled_call_impl is not None for _, m in decoder_layers(model))
    assert model.get_base_model().loss_function is not plain_loss  # compiled on its own
    assert wrapped.uncompile() is model
    assert all(m._compiled_call_impl is None for _, m in decoder_layers(model))
    assert model.get_base_model().loss_function is plain_loss


def test_regional_eval_is_dense_and_the_split_is_made_once_per_forward(monkeypatch):
    """After a training step, model.eval() under no_grad gives the eager model's logits;
    in training every layer's graph reuses the forward's one token split (one nonzero
    pass, not one per layer)."""
    from sparselora_compile.runtime import row_split
    model = tiny_llama(ALL, layers=4)
    ids, labels = batch()
    wrapped = slc.compile(model, slc.Policy(mlp=0.5, attention=0.5), inner="aot_eager")
    calls = []
    compute = row_split.compute_split
    monkeypatch.setattr(row_split, "compute_split", lambda *a, **k: calls.append(1) or compute(*a, **k))
    for step in range(2):
        wrapped(input_ids=ids, labels=labels).loss.backward()
        assert len(calls) == step + 1
    model.eval()
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
        want = wrapped.uncompile()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
