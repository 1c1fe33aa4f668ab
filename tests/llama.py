"""Tiny transformers Llama models with PEFT LoRA, shared by the tests."""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(targets=QKVO, dropout=0.0, layers=2, checkpointing=False, seed=0, r=4, tied=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    peft = with_lora(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets))
    if checkpointing:
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft


def with_lora(model, lora_config):
    """A PEFT model in training mode, without a cache, its lora_B drawn N(0, 0.1) (PEFT's
    zeros would make every LoRA product vanish)."""
    model.config.use_cache = False
    peft = get_peft_model(model, lora_config)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft.train()
    return peft


def batch(b=2, t=10, n_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t - n_out] = -100
    return ids, labels


def assert_same_step(got, want, real=None, packed=False):
    """Two training steps, each (output, {name: grad}, run record), computed two ways: the
    same loss, gradients and sparse selections, and the same logits (at the `real` positions
    when given). `packed`: `got` ran the real positions as one packed row, so its per-token
    records hold those positions only."""
    (out, grads, sel), (ref, ref_grads, ref_sel) = got, want
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    logits, ref_logits = (out.logits, ref.logits) if real is None else (out.logits[real], ref.logits[real])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert sorted(sel) == sorted(ref_sel) and sel
    for name in sel:
        for key, x in sel[name].items():
            expected = ref_sel[name][key]
            if packed and key == "dense_rows":
                expected = expected.reshape(real.shape)[real].reshape(x.shape)
            torch.testing.assert_close(x, expected, rtol=0, atol=0, msg=f"{name} {key}")


def one_step(wrapped, batch):
    """A forward and backward of a compiled model on `batch`: (output, {name: grad})."""
    model = wrapped.model
    model.zero_grad(set_to_none=True)
    out = wrapped(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
