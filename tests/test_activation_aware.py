"""The activation-aware estimator wired into the backend: user moments at compile time,
or moments streamed during the dense warm-up and swapped in without recompiling."""
import torch

import sparselora_compile as slc
from sparselora_compile.runtime import scores
from sparselora_compile.runtime.estimator import activation_aware_factors, estimator_factors, residual_variance
from sparselora_compile.testing import assert_rewrite_equivalent

from llama import ALL, batch, tiny_llama
from test_backend import _Counting


def test_collect_moments_streams_frozen_linear_inputs():
    model = tiny_llama(ALL)
    ids, labels = batch()
    moments = slc.collect_moments(model, [{"input_ids": ids}, {"input_ids": ids[:1]}])
    key = next(k for k in moments if k.endswith("layers.0.mlp.gate_proj"))
    assert moments[key].count == 2 * 10 + 10


def test_user_moments_give_activation_aware_factors(monkeypatch):
    model = tiny_llama(ALL, layers=1)
    ids, labels = batch()
    moments = slc.collect_moments(model, [{"input_ids": ids}])
    policy = slc.Policy(mlp=0.5, attention=0.5, estimator="activation_aware", rank=4)
    seen = []
    real = scores.mlp_scores
    monkeypatch.setattr(scores, "mlp_scores", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    cmp = assert_rewrite_equivalent(model, {"input_ids": ids, "labels": labels}, policy, expect_blocks=2,
                                    moments=moments)
    assert cmp.blocks_checked == 2
    # the MLP selection scored with the activation-aware residual variances of gate and up
    (args,) = seen
    mlp = model.base_model.model.model.layers[0].mlp
    for w, name, got in ((mlp.gate_proj.base_layer.weight, "gate_proj", args[5]),
                         (mlp.up_proj.base_layer.weight, "up_proj", args[6])):
        moment = next(m for k, m in moments.items() if k.endswith("layers.0.mlp." + name))
        want = estimator_factors(w, 4, "activation_aware", moment).residual
        assert want.sum() > 0
        torch.testing.assert_close(got, want)


def test_plain_svd_scores_without_its_zero_residual_term(monkeypatch):
    """Plain SVD's residual variances are zeros: the MLP score gets None for them (the
    fused kernel then skips the term), and selects what the zero-residual score does."""
    model = tiny_llama(ALL, layers=1)
    ids, labels = batch()
    seen = []
    real = scores.mlp_scores
    monkeypatch.setattr(scores, "mlp_scores", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    cmp = assert_rewrite_equivalent(model, {"input_ids": ids, "labels": labels},
                                    slc.Policy(mlp=0.5, attention=0.5, rank=4), expect_blocks=2)
    assert cmp.blocks_checked == 2
    (args,) = seen
    assert args[5] is None and args[6] is None


def test_warmup_moments_refresh_factors_in_place_without_recompiling():
    model = tiny_llama(ALL, layers=1)
    ids, labels = batch()
    policy = slc.Policy(mlp=0.5, attention=0.5, estimator="activation_aware", warmup_steps=2, rank=4)
    counter = _Counting(policy=policy, inner="aot_eager")
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        compiled(input_ids=ids, labels=labels).loss.backward()
    assert counter.graphs == 1
    state = counter.run
    mlp_name = next(n for n in state.moments if n.endswith("mlp"))
    assert state.moments[mlp_name].count == 2 * ids.numel()  # the two warm-up steps only
    gate = model.base_model.model.model.layers[0].mlp.gate_proj.base_layer.weight
    expect_a, expect_b = activation_aware_factors(gate, 4, state.moments[mlp_name])
    expect_r = residual_variance(gate, expect_a, expect_b, state.moments[mlp_name])
    assert expect_r.sum() > 0
    # the factor tensors the graph reads now hold the activation-aware factors and residuals
    slots = counter.last._sparselora_factors.slots
    gate_slot = next(s for s in slots if s.path.endswith("mlp.gate_proj"))
    torch.testing.assert_close(gate_slot.a, expect_a)
    torch.testing.assert_close(gate_slot.residual, expect_r)
    assert all(s.residual is not None for s in slots if s.path.endswith(("gate_proj", "up_proj")))
    assert all(s.residual is None for s in slots if s.path.endswith(("q_proj", "k_proj", "v_proj")))
