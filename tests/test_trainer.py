"""HF Trainer and TRL's SFTTrainer train the PEFT model that slc.compile compiled in place
(sparselora_compile/trainer.py): steps in optimizer steps, dense eval, PEFT checkpoints,
resume, and the wrapper standing in for the model."""
import inspect
import os

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

import sparselora_compile as slc
from sparselora_compile.trainer import RUN_FILE, SparseLoRACallback, prepare

from llama import tiny_llama

POLICY = dict(mlp=0.5, attention=0.5)


def _rows(n, t=12, n_out=4, seed=0):
    """Tokenized rows with a string column the model does not take: the Trainer must drop
    it (remove_unused_columns, the default), the default collator cannot batch it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (t,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * t, "labels": [-100] * (t - n_out) + ids[-n_out:],
                     "source": "synthetic"})
    return rows


def _recorder(model, sparse):
    """What the run looked like at each forward (a hook after the glue's)."""
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((torch.is_grad_enabled(), sparse.run.step, sparse.run.sparse_now(),
                                      kw.get("labels") is not None)), with_kwargs=True)
    return seen


def _trainer(out, **extra):
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                             gradient_checkpointing=True, logging_steps=1, report_to=[], use_cpu=True,
                             seed=0, data_seed=0, disable_tqdm=True, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(16), eval_dataset=_rows(2, seed=1))
    sparse = prepare(trainer, slc.Policy(**POLICY, warmup_steps=2), inner="aot_eager")
    return model, trainer, sparse, _recorder(model, sparse)


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_accumulation_checkpointing_eval_save_and_resume(tmp_path):
    """Gradient accumulation 2: both micro-batches of an optimizer step share its step, the
    warm-up (2) is in optimizer steps; eval forwards run dense; checkpoints are PEFT adapter
    files plus the run's state; resuming from checkpoint-2 continues at step 2, past the
    warm-up, and ends where the uninterrupted run ended."""
    model, trainer, sparse, seen = _trainer(tmp_path)
    assert trainer.model is model  # the Trainer holds the PEFT model, not a wrapper
    trainer.train()
    train = [s for s in seen if s[0]]
    assert [s[1] for s in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s[2] for s in train] == [False] * 4 + [True] * 4
    assert all(s[3] for s in train)  # labels reached the glue
    evals = [s for s in seen if not s[0]]
    assert evals and not any(s[2] for s in evals)
    # Output tokens dense under the Trainer's checkpointing: 5 of 12 rows (4 supervised + the
    # one predicting the first) in each of the 4 sparse forwards, the 4 warm-up forwards dense.
    assert sparse.stats.steps == 8
    assert sparse.stats.saved_fraction == pytest.approx(0.5 * 7 / 12 * 4 / 8, abs=1e-6)
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", RUN_FILE} <= files
    assert "model.safetensors" not in files
    final, stats = _adapters(model), sparse.stats.as_dict()

    model2, trainer2, sparse2, seen2 = _trainer(tmp_path)
    trainer2.train(resume_from_checkpoint=str(ckpt))
    train2 = [s for s in seen2 if s[0]]
    assert [s[1] for s in train2] == [2, 2, 3, 3] and all(s[2] for s in train2)
    assert sparse2.stats.as_dict() == stats  # restored from checkpoint-2, then two more steps
    resumed = _adapters(model2)
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_forwards_are_dense(tmp_path):
    """The eval loop (model.eval(), no_grad) runs dense even past the warm-up."""
    model = tiny_llama()
    sparse = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    seen = _recorder(model, sparse)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert seen == [(False, 0, False, True)] and sparse.run.force_dense
    model.train()


def test_save_pretrained_state_dict_and_signature(tmp_path):
    """The wrapper stands in for the model: plain PEFT keys, adapters that plain PEFT loads
    and that give the same logits, the model's forward signature and attributes."""
    model = tiny_llama()
    keys = list(model.state_dict())
    sparse = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    assert list(sparse.state_dict()) == keys
    params = inspect.signature(sparse.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "position_ids"} <= set(params)
    assert sparse.config is model.config
    assert sparse.get_input_embeddings() is model.get_input_embeddings()

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    sparse(input_ids=ids, labels=ids).loss.backward()  # a sparse training step runs
    sparse.eval()
    with torch.no_grad():
        logits = sparse(input_ids=ids).logits
    sparse.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = tiny_llama().unload()  # same seed: the same base weights, no adapters
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)

    state = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in sparse.state_dict().items()}
    sparse.load_state_dict(state)
    assert all((p == 0).all() for n, p in model.named_parameters() if "lora_B" in n)


def test_trainer_given_the_wrapper(tmp_path):
    """`Trainer(model=slc.compile(...))`: the wrapper's signature keeps the dataset's
    columns, and prepare hands the Trainer the PEFT model (it saves what it knows)."""
    model = tiny_llama()
    sparse = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=sparse, args=args, train_dataset=_rows(4))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert prepare(trainer) is sparse
    assert trainer.model is model and trainer.model_wrapped is model
    assert sum(isinstance(cb, SparseLoRACallback) for cb in trainer.callback_handler.callbacks) == 1
    prepare(trainer)  # once is enough
    assert sum(isinstance(cb, SparseLoRACallback) for cb in trainer.callback_handler.callbacks) == 1
    with pytest.raises(ValueError, match="already compiled"):
        prepare(trainer, slc.Policy(mlp=0.9))


def test_prepare_refuses_what_would_silently_go_wrong(tmp_path):
    def trainer(**kw):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
        return Trainer(model=tiny_llama(), args=args, train_dataset=_rows(4))
    with pytest.raises(ValueError, match="torch_compile"):
        prepare(trainer(torch_compile=True), slc.Policy(**POLICY))
    with pytest.raises(ValueError, match="regional"):
        prepare(trainer(), slc.Policy(**POLICY), regional=False)
    with pytest.warns(UserWarning, match="labels"):
        prepare(trainer(label_smoothing_factor=0.1), slc.Policy(**POLICY), inner="aot_eager")
    model = tiny_llama()
    slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    with pytest.raises(ValueError, match="already compiled"):
        slc.compile(model, slc.Policy(**POLICY))


# ---- TRL ---------------------------------------------------------------------------------------

def _word_tokenizer():
    """A word-level tokenizer over the tiny model's 64 ids ("t2" .. "t63"), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.mark.parametrize("mode", ["padding_free", "packing"])
def test_trl_sft_trainer(tmp_path, mode):
    """SFTTrainer on prompt-completion pairs (completion-only loss) in its padding-free and
    packed (BFD) layouts: one row, position_ids restarting per sequence, no attention
    mask; labels reach the run, steps follow global_step, the prompt tokens run sparse, and
    the packed sequences run varlen attention."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(2, 64, (n,), generator=g))
    data = Dataset.from_list([{"prompt": words(6), "completion": words(3)} for _ in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True, padding_free=mode == "padding_free",
                     packing=mode == "packing", max_length=None if mode == "padding_free" else 64)
    model = tiny_llama()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_word_tokenizer())
    sparse = prepare(trainer, slc.Policy(**POLICY, warmup_steps=1), inner="aot_eager")
    shapes = []
    model.register_forward_pre_hook(lambda m, a, kw: shapes.append(
        (sparse.run.step, kw["input_ids"].shape[0], kw.get("attention_mask"), int((kw["labels"] != -100).sum()),
         int((kw["position_ids"] == 0).sum()))), with_kwargs=True)
    trainer.train()
    assert [s[0] for s in shapes] == [0, 1]
    for step, rows, mask, supervised, sequences in shapes:
        # no mask of TRL's; the model gets the varlen stand-in (packing.without_hf_mask)
        assert rows == 1 and mask.shape == (1, 1, 1, 1) and sequences >= 4
        assert 0 < supervised < 10 * sequences  # completion tokens only
    assert "no labels" not in sparse.run.said
    assert sparse.stats.steps == 2 and sparse.stats.saved_fraction > 0
    assert sparse.stats.varlen_forwards == 2  # the sequences attend within themselves (packing.py)


def test_trl_sft_trainer_with_supervised_head(tmp_path):
    """SFTTrainer's own fused LM head already projects the supervised positions only: with
    supervised_head=True its forwards go through untouched (no logits_to_keep reaches the
    backbone), and the losses, token accuracy and adapters equal those without it."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    runs = []
    for head in (False, True):
        g = torch.Generator().manual_seed(0)
        words = lambda n: " ".join(f"t{int(i)}" for i in torch.randint(2, 64, (n,), generator=g))  # noqa: E731
        data = Dataset.from_list([{"prompt": words(6), "completion": words(3)} for _ in range(8)])
        args = SFTConfig(output_dir=str(tmp_path / str(head)), per_device_train_batch_size=4, max_steps=2,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                         padding_free=True, max_length=None, seed=0, data_seed=0)
        model = tiny_llama()
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_word_tokenizer())
        prepare(trainer, slc.Policy(**POLICY, warmup_steps=1), inner="aot_eager", supervised_head=head)
        backbone = model.get_base_model().model
        kept = []
        backbone.register_forward_pre_hook(lambda m, a, kw: kept.append(kw.get("logits_to_keep")), with_kwargs=True)
        trainer.train()
        logged = [(h["loss"], h["mean_token_accuracy"]) for h in trainer.state.log_history if "loss" in h]
        runs.append((logged, _adapters(model), kept))
    (ref_logged, ref_adapters, _), (logged, adapters, kept) = runs
    assert len(logged) == 2 and kept == [None, None]
    for got, want in zip(logged, ref_logged):
        assert got == pytest.approx(want, rel=1e-6)
    for name in ref_adapters:
        torch.testing.assert_close(adapters[name], ref_adapters[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_model_itself_runs_the_glue_until_uncompiled():
    """After slc.compile the model itself (what a Trainer holds) hands labels over and
    counts steps exactly as the wrapper does; uncompile() removes the glue with the layers."""
    from llama import ALL, batch
    ids, labels = batch(n_out=3)
    model = tiny_llama(ALL)
    sparse = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    model(input_ids=ids, labels=labels).loss.backward()
    sparse(input_ids=ids, labels=labels).loss.backward()
    # 4 of 10 rows are output tokens (3 supervised + the one predicting the first)
    assert sparse.stats.steps == 2 and sparse.stats.saved_fraction == pytest.approx(0.5 * 6 / 10, abs=1e-6)
    assert slc.run_of(model) is sparse.run
    assert sparse.uncompile() is model and "_sparselora" not in model.__dict__
    model(input_ids=ids, labels=labels).loss.backward()
    assert sparse.stats.steps == 2


def test_supervised_head_trains_as_the_full_head(tmp_path):
    """prepare(..., supervised_head=True): the Trainer's losses (train and eval) and the
    adapters it trains are those of the full head."""
    runs = []
    for head in (False, True):
        model = tiny_llama()
        args = TrainingArguments(output_dir=str(tmp_path / str(head)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, logging_steps=1,
                                 eval_strategy="steps", eval_steps=3, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=_rows(12), eval_dataset=_rows(2, seed=1))
        prepare(trainer, slc.Policy(**POLICY, warmup_steps=1), inner="aot_eager", supervised_head=head)
        trainer.train()
        logged = [(h.get("loss"), h.get("eval_loss")) for h in trainer.state.log_history]
        runs.append((logged, _adapters(model)))
    (logged, adapters), (ref_logged, ref_adapters) = runs[1], runs[0]
    assert len(logged) == len(ref_logged)
    assert any(t is not None for t, _ in logged) and any(e is not None for _, e in logged)
    for got, want in zip(logged, ref_logged):
        for x, y in zip(got, want):  # a log line holds a train loss, an eval loss or neither
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-5)
    for name in ref_adapters:
        torch.testing.assert_close(adapters[name], ref_adapters[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_trainer_bf16_with_cuda_graphs_trains_as_without_on_cuda(tmp_path):
    """`bf16=True` runs the forward under autocast with its weight cache on: the layers are
    still captured (the capture runs with the cache off) and replayed, and the adapters
    end as an ungraphed run's, within bf16 noise."""
    def run(graphs):
        torch.manual_seed(0)
        model = tiny_llama().cuda()
        args = TrainingArguments(output_dir=str(tmp_path / f"graphs_{graphs}"), per_device_train_batch_size=2,
                                 max_steps=6, bf16=True, save_strategy="no", logging_steps=1, report_to=[],
                                 seed=0, data_seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=_rows(12))
        sparse = prepare(trainer, slc.Policy(**POLICY, warmup_steps=1), inner="inductor", cuda_graphs=graphs)
        trainer.train()
        return _adapters(model), sparse.graphs

    plain, _ = run(False)
    graphed, graphs = run(True)
    assert graphs.disabled is None, graphs.failure
    assert graphs.captures == 1 and graphs.graphed_forwards >= 3
    for name, p in plain.items():
        torch.testing.assert_close(graphed[name], p, rtol=2e-2, atol=2e-2, msg=name)
