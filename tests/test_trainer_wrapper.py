"""`Trainer(model=slc.compile(peft_model, policy))`, without `prepare`: the wrapper stands in
for the PEFT model (isinstance, parameter names, state dict), so the Trainer saves adapter
checkpoints, resumes through PEFT, and plain `PeftModel.from_pretrained` loads them; tied
embeddings included. Steps follow the Trainer with SparseLoRACallback, and without it the
run warns once."""
import os
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

import sparselora_compile as slc
from sparselora_compile.trainer import RUN_FILE, SparseLoRACallback
from sparselora_compile.wrapper import SparseLoRAModel

from llama import tiny_llama
from test_trainer import _adapters, _recorder, _rows

POLICY = dict(mlp=0.5, attention=0.5)


def _args(out, **extra):
    return TrainingArguments(**{**dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                       max_steps=4, save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                       data_seed=0, disable_tqdm=True), **extra})


def _wrapped(tied, warmup=2):
    model = tiny_llama(tied=tied)
    sparse = slc.compile(model, slc.Policy(**POLICY, warmup_steps=warmup), inner="aot_eager")
    return model, sparse, _recorder(model, sparse)


def test_the_wrapper_shows_the_model():
    model = tiny_llama(tied=True)
    names = [n for n, _ in model.named_parameters()]
    sparse = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    assert type(sparse) is SparseLoRAModel and isinstance(sparse, (PeftModel, SparseLoRAModel))
    assert [n for n, _ in sparse.named_parameters()] == names
    assert [n for n, _ in sparse.named_modules()] == [n for n, _ in model.named_modules()]
    assert list(sparse.state_dict()) == list(model.state_dict())
    assert sum(p.numel() for p in sparse.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert repr(sparse).startswith("SparseLoRAModel(")
    sparse.eval()
    assert not model.training
    sparse.train()
    assert model.training


@pytest.mark.parametrize("tied", [False, True])
def test_trainer_given_the_wrapper_saves_adapters_and_resumes(tmp_path, tied):
    """Gradient accumulation 2 with SparseLoRACallback: steps are optimizer steps; checkpoints
    are PEFT adapter files that plain PEFT loads (the same weights, the same logits);
    resuming from checkpoint-2 ends where the uninterrupted run ended."""
    model, sparse, seen = _wrapped(tied)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    trainer = Trainer(model=sparse, args=_args(tmp_path), train_dataset=_rows(16),
                      callbacks=[SparseLoRACallback(sparse)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sparselora")
        trainer.train()
    train = [s for s in seen if s[0]]
    assert [s[1] for s in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s[2] for s in train] == [False] * 4 + [True] * 4
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", RUN_FILE} <= files
    assert "model.safetensors" not in files
    final = _adapters(model)

    trainer.save_model(str(tmp_path / "final"))
    plain = PeftModel.from_pretrained(tiny_llama(tied=tied).unload(), str(tmp_path / "final")).eval()
    loaded = dict(plain.named_parameters())
    for name, value in final.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, sparse(input_ids=ids).logits)

    model2, sparse2, seen2 = _wrapped(tied)
    trainer2 = Trainer(model=sparse2, args=_args(tmp_path), train_dataset=_rows(16),
                       callbacks=[SparseLoRACallback(sparse2)])
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert [s[1] for s in seen2 if s[0]] == [2, 2, 3, 3]
    assert sparse2.stats.as_dict() == sparse.stats.as_dict()
    resumed = _adapters(model2)
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_the_callback_the_run_counts_forwards_and_warns_once(tmp_path):
    """The Trainer's loss keyword (num_items_in_batch) shows a Trainer at work; without the
    callback the run cannot know optimizer steps. It still saves adapters (tied embeddings)."""
    model, sparse, seen = _wrapped(tied=True)
    trainer = Trainer(model=sparse, args=_args(tmp_path), train_dataset=_rows(16))
    with pytest.warns(UserWarning, match="without SparseLoRACallback") as record:
        trainer.train()
    assert sum("SparseLoRACallback" in str(w.message) for w in record) == 1
    assert [s[1] for s in seen if s[0]] == list(range(8))
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "checkpoint-2")


def test_no_warning_without_a_warm_up(tmp_path, recwarn):
    model, sparse, seen = _wrapped(tied=False, warmup=0)
    Trainer(model=sparse, args=_args(tmp_path, max_steps=1, save_strategy="no"), train_dataset=_rows(4)).train()
    assert len([s for s in seen if s[0]]) == 2
    assert not [w for w in recwarn if "SparseLoRACallback" in str(w.message)]



def test_trl_sft_trainer_given_the_wrapper(tmp_path):
    """TRL's SFTTrainer takes the wrapper for a PeftModel (no second PEFT wrapping): padding-free
    rows, steps from the callback, adapter checkpoints (tied embeddings)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from test_trainer import _word_tokenizer
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(2, 64, (n,), generator=g))
    data = Dataset.from_list([{"prompt": words(6), "completion": words(3)} for _ in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_steps=1,
                     report_to=[], use_cpu=True, disable_tqdm=True, padding_free=True, max_length=None)
    model, sparse, seen = _wrapped(tied=True, warmup=1)
    trainer = SFTTrainer(model=sparse, args=args, train_dataset=data, processing_class=_word_tokenizer(),
                         callbacks=[SparseLoRACallback(sparse)])
    assert trainer.model is sparse
    trainer.train()
    assert [s[1:] for s in seen if s[0]] == [(0, False, True), (1, True, True)]
    assert sparse.stats.saved_fraction > 0
    assert {"adapter_model.safetensors", RUN_FILE} <= set(os.listdir(tmp_path / "checkpoint-1"))
