import torch

import sparselora_compile as slc

from llama import ALL, batch, tiny_llama


def test_explain_lists_blocks_and_reasons(capsys):
    model = tiny_llama(ALL, layers=3)
    ids, labels = batch()
    e = slc.explain(model, input_ids=ids, labels=labels,
                    policy=slc.Policy(mlp=0.5, attention=0.5, dense_layers=[0]))
    assert len(e.blocks) == 6
    mlp1 = next(b for b in e.blocks if b["layer"] == 1 and b["kind"] == "mlp")
    assert mlp1["k"] == 32 and mlp1["sparse_flops"] * 2 == mlp1["dense_flops"]
    reasons = {s["where"].rsplit(".", 2)[-2] + "." + s["where"].rsplit(".", 1)[-1]: s["reason"] for s in e.skipped}
    assert reasons["0.mlp"] == "policy: dense"
    assert any("lm_head" in s["where"] for s in e.skipped)
    assert "layers.1.mlp" in capsys.readouterr().out
    # explain does not leave the model compiled or changed
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_too_little_sparsity_stays_dense_with_a_reason():
    model = tiny_llama(ALL, layers=2)
    ids, labels = batch()
    e = slc.explain(model, input_ids=ids, labels=labels, policy=slc.Policy(mlp=0.02, attention=0.5))
    assert {b["kind"]: b["sparsity"] for b in e.blocks} == {"attention": 0.5, "mlp": 0.0}
    assert any("below min_sparsity=0.05" in s["reason"] and s["where"].endswith("mlp") for s in e.skipped)
