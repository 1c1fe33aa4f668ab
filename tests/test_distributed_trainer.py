"""The HF Trainer on two processes with the documented integration (README, "Training with
the HF Trainer / TRL" and "Several GPUs"): each rank builds the PEFT model and the Trainer,
`prepare(trainer, policy)` compiles the model in place, and the Trainer (accelerate) wraps
it in DDP. Launched the way users launch it, `torchrun --nproc-per-node 2` of a script
(this file, run as `__main__` under torchrun), on CPU with gloo (accelerate's MULTI_CPU).

Each rank saves what it saw to `<out>/<rank>.pt`; the tests here read those and the
checkpoint that rank 0 wrote.
"""
import gc
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

WORLD = 2
STEPS = 3          # optimizer steps
ACCUMULATION = 2   # micro-batches per optimizer step and rank
WARMUP = 1         # optimizer steps
POLICY = dict(mlp=0.5, attention=0.5)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(out):
    """One rank (under torchrun): the Trainer with prepare, as the README shows it."""
    from accelerate.utils import DistributedType
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import Trainer, TrainingArguments

    import sparselora_compile as slc
    from sparselora_compile import collect_after_compile
    from sparselora_compile.trainer import prepare
    collect_after_compile.ENABLED = False  # as conftest.py, which a rank does not load

    from llama import ALL, tiny_llama
    from test_trainer import _rows

    rank = int(os.environ["RANK"])
    model = tiny_llama(ALL)  # seed 0 on every rank (DDP broadcasts rank 0's weights anyway)
    args = TrainingArguments(output_dir=os.path.join(out, "run"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS, learning_rate=1e-2,
                             save_strategy="steps", save_steps=STEPS, logging_steps=1, report_to=[],
                             use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(2 * WORLD * ACCUMULATION * STEPS))
    sparse = prepare(trainer, slc.Policy(**POLICY, warmup_steps=WARMUP), inner="aot_eager")
    seen = []  # at each forward, after the glue: grad, run's step, global_step, sparse, batch
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((torch.is_grad_enabled(), sparse.run.step, trainer.state.global_step,
                                      sparse.run.sparse_now(), kw["input_ids"].clone())), with_kwargs=True)
    trainer.train()
    wrapped = trainer.model_wrapped
    torch.save({"distributed_type": str(trainer.accelerator.distributed_type),
                "multi_cpu": trainer.accelerator.distributed_type == DistributedType.MULTI_CPU,
                "backend": dist.get_backend(), "world": dist.get_world_size(),
                "ddp": isinstance(wrapped, DDP), "ddp_holds_model": getattr(wrapped, "module", None) is model,
                "global_step": trainer.state.global_step, "seen": seen,
                "stats": sparse.stats.as_dict(), "lora": _lora(model)},
               os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from test_distributed import CHILD_ENV, _free_port
    out = str(tmp_path_factory.mktemp("dist_trainer"))
    env = {**os.environ, **CHILD_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), os.path.abspath(__file__),
           "--worker", out]
    proc = subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out, [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_the_trainer_ran_ddp_on_cpu(results):
    """accelerate saw torchrun's two processes on CPU and wrapped the compiled model in DDP."""
    for res in results[1]:
        assert res["multi_cpu"], res["distributed_type"]
        assert res["backend"] == "gloo" and res["world"] == WORLD
        assert res["ddp"] and res["ddp_holds_model"]


def test_steps_are_optimizer_steps_on_every_rank(results):
    """At every training forward the run's step is the Trainer's global_step: both
    micro-batches of an optimizer step share it, the warm-up (1 step) is dense."""
    for res in results[1]:
        train = [s for s in res["seen"] if s[0]]
        assert [s[1] for s in train] == [s[2] for s in train]
        assert [s[1] for s in train] == [i for i in range(STEPS) for _ in range(ACCUMULATION)]
        assert [s[3] for s in train] == [s[1] >= WARMUP for s in train]
        assert res["global_step"] == STEPS
        assert res["stats"]["steps"] == STEPS * ACCUMULATION


def test_sparse_forwards_saved_base_flops(results):
    for res in results[1]:
        assert res["stats"]["saved_fraction"] > 0


def test_ranks_end_with_the_same_trained_lora_weights(results):
    """Each rank trained on its own rows, and DDP's all-reduce kept the weights equal."""
    from llama import ALL, tiny_llama
    ranks = results[1]
    batches = [torch.cat([s[4] for s in res["seen"] if s[0]]) for res in ranks]
    assert not torch.equal(batches[0], batches[1]), "both ranks trained on the same rows"
    initial = _lora(tiny_llama(ALL))
    assert ranks[0]["lora"].keys() == ranks[1]["lora"].keys() == initial.keys()
    for name, w in ranks[0]["lora"].items():
        torch.testing.assert_close(ranks[1]["lora"][name], w, rtol=0, atol=0, msg=f"{name}: ranks differ")
    assert all(not torch.equal(w, initial[n]) for n, w in ranks[0]["lora"].items() if "lora_B" in n)


def test_rank0_checkpoint_loads_with_plain_peft(results):
    """checkpoint-<STEPS> holds PEFT adapter files (plus the run's state) that plain
    `PeftModel.from_pretrained` loads: the trained LoRA weights."""
    from peft import PeftModel

    from sparselora_compile.trainer import RUN_FILE

    from llama import ALL, tiny_llama
    out, ranks = results
    ckpt = os.path.join(out, "run", f"checkpoint-{STEPS}")
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", RUN_FILE} <= files
    assert "model.safetensors" not in files
    assert torch.load(os.path.join(ckpt, RUN_FILE), weights_only=True)["step"] == STEPS
    plain = PeftModel.from_pretrained(tiny_llama(ALL).unload(), ckpt)
    loaded = dict(plain.named_parameters())
    for name, w in ranks[0]["lora"].items():
        torch.testing.assert_close(loaded[name], w, rtol=0, atol=0, msg=name)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a rank, started by torchrun (the fixture above)
        gc.set_threshold(700, 10, 1000)  # conftest.py's (why: there), which a rank does not load
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-q"]))
