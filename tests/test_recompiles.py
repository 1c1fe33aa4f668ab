"""Compile counts over batches of varying length (issue 15): a new sequence length must not
recompile, and slc.compile must not compile more graphs than plain per-layer
torch.compile does over the same batches. Counts, not timings."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import sparselora_compile as slc
from sparselora_compile.dynamic_dims import _dims
from sparselora_compile.passes.blocks import decoder_layers

from llama import QKVO, tiny_llama

pytestmark = pytest.mark.dynamic_shapes  # slc.compile's default, which the other tests leave off

_spec = importlib.util.spec_from_file_location(
    "bench_batches", Path(__file__).resolve().parent.parent / "bench" / "batches.py")
B = sys.modules.setdefault("bench_batches", importlib.util.module_from_spec(_spec))
if not hasattr(B, "make_batches"):
    _spec.loader.exec_module(B)

# layer 0 dense, layers 1-2 sparse: two layer plans, as the Math10K preset has
POLICY = slc.Policy(mlp=0.5, attention=0.5, dense_layers=[0], warmup_steps=0)


def _user_batches():
    """Padded SFT batches (8 rows, T 56-80), then packed rows (one row, 34-63 tokens,
    position_ids restarting per sequence): each a new length nearly every step."""
    return {"padded": list(B.make_batches("padded", 64, 5, seq=64, seed=0)),
            "packed": list(B.make_batches("packed", 64, 5, batch=2, seq=32, seed=0))}


def _frames(compile_fn, modes=("padded", "packed")):
    """Dynamo frames compiled after each step, per mode, on one compiled model."""
    torch._dynamo.reset()
    counters.clear()
    fn = compile_fn(tiny_llama(QKVO, layers=3))
    out, user_batches = {}, _user_batches()
    for mode in modes:
        batches = user_batches[mode]
        lengths = {b["input_ids"].shape[-1] for b in batches}
        assert len(lengths) >= 4, (mode, lengths)  # the sequence does vary
        out[mode] = []
        for b in batches:
            fn(**b).loss.backward()
            out[mode].append(counters["frames"]["ok"])
    return out


def _per_layer_baseline(model):
    for _, layer in decoder_layers(model):
        layer.compile(backend="aot_eager")
    return model


def test_new_lengths_compile_nothing_and_no_more_than_per_layer_torch_compile():
    ours = _frames(lambda m: slc.compile(m, POLICY, inner="aot_eager"))
    # after each mode's first step (its batch size), new lengths compile nothing
    for mode, frames in ours.items():
        assert frames[1:] == frames[1:2] * (len(frames) - 1) and frames[0] == frames[1], (mode, frames)
    plain = _frames(_per_layer_baseline)
    assert ours["packed"][-1] <= plain["packed"][-1], (ours, plain)


def test_whole_model_wrapper_new_lengths_compile_nothing():
    frames = _frames(lambda m: slc.compile(m, POLICY, regional=False, inner="aot_eager"))
    for mode, f in frames.items():
        assert f[1:] == f[1:2] * (len(f) - 1) and f[0] == f[1], (mode, f)


def test_dynamic_false_leaves_shapes_to_dynamo():
    """dynamic=False: static graphs first, then Dynamo's automatic-dynamic recompile at the
    second length (so more frames than the default over the same batches)."""
    static = _frames(lambda m: slc.compile(m, POLICY, inner="aot_eager", dynamic=False), modes=("padded",))
    frames = static["padded"]
    assert frames[1] > frames[0], frames  # the second length recompiled


@pytest.mark.parametrize("shape, dtype, dims", [
    ((8, 64, 64), torch.float32, [0, 1]),      # hidden states, H == T: H stays static
    ((8, 1, 64, 64), torch.bool, [0, 2, 3]),   # 4D mask
    ((8, 64, 16), torch.float32, [0, 1]),      # rotary cos / sin
    ((8, 64), torch.long, [0, 1]),             # position ids, labels
    ((1, 64, 256), torch.float32, [1]),        # a packed row's logits: batch 1 stays static
])
def test_marked_dims(shape, dtype, dims):
    assert _dims(torch.zeros(shape, dtype=dtype), batch=shape[0], seq=64) == dims


@pytest.mark.parametrize("packed", [False, True])
def test_pad_to_multiple_of_keeps_loss_grads_and_logits(packed):
    """Opt-in alignment padding: the layers see lengths that are multiples of 8, the
    loss, LoRA gradients and (cut back) logits are those of the unpadded batch."""
    from llama import batch
    ids, labels = batch(t=11, n_out=4)
    kwargs = {"input_ids": ids, "labels": labels}
    if packed:  # two sequences per row
        kwargs["position_ids"] = torch.cat([torch.arange(5), torch.arange(6)]).expand(2, 11)
    out = {}
    for pad in (0, 8):
        torch._dynamo.reset()
        model = tiny_llama(QKVO, layers=3)
        seen = []
        model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
        wrapped = slc.compile(model, POLICY, inner="aot_eager", pad_to_multiple_of=pad)
        res = wrapped(**kwargs)
        res.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        out[pad] = res.loss.detach(), res.logits.detach(), grads, seen
    assert out[8][3] == [16] and out[0][3] == [11]
    torch.testing.assert_close(out[8][0], out[0][0])
    torch.testing.assert_close(out[8][1], out[0][1], rtol=1e-5, atol=1e-6)
    assert out[8][2].keys() == out[0][2].keys()
    for n, g in out[0][2].items():
        torch.testing.assert_close(out[8][2][n], g, rtol=1e-4, atol=1e-6, msg=n)
