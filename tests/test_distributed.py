"""Two processes (gloo, CPU) train the tiny PEFT Llama with the sparselora backend under
DDP (all three orders) and FSDP2 (`fully_shard` per decoder layer or on a list of layers,
then the root), also with `supervised_head=True` (the same loss and gradients).

Reference: one process, the same steps, each rank's micro-batch run in turn with its
loss halved (gradient accumulation over the global batch). The rows are right-padded:
the reference and the slc.compile runs train them padding-free, as one packed row of
their real tokens (packing.py), plain torch.compile keeps the padding and the mask. The token split and channel
selection are made per micro-batch, so this is what two ranks compute; a one-process run
of the whole global batch selects once over all rows and differs by that choice.

DDP runs with tiny buckets where the graph is regional, so that Dynamo's DDP optimizer
would cut each layer graph into pieces (as LLaMA-8B layers are cut on GPUs): regional
compilation must keep a layer whole, and a whole-model compile must say what to do.
"""
import gc
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

import sparselora_compile as slc
from sparselora_compile import collect_after_compile

from llama import ALL, batch, tiny_llama

WORLD = 2
STEPS = 3
POLICY = dict(mlp=0.5, attention=0.5)
SMALL_BUCKET = 2048  # bytes: a tiny layer's LoRA weights (~8 KiB) fill several
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
             "NVSHMEM_DISABLE_NVLS": "1"}
SCENARIOS = ("ddp_compile_ddp", "ddp_ddp_compile", "ddp_slc_wrapper", "ddp_slc_model", "fsdp_slc",
             "fsdp_units_slc", "ddp_slc_suphead", "fsdp_slc_suphead", "ddp_split_error", "fsdp_graphs_error")

SMALL = ("ddp_slc_wrapper", "ddp_slc_model", "ddp_slc_suphead", "ddp_split_error")  # DDP, tiny buckets
DEFAULT_FIRST_BUCKET = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 1 << 20)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _model():
    return tiny_llama(ALL, layers=2)


def _lora(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


LENGTHS = (12, 9, 11, 7)  # right-padded rows: slc.compile packs their real tokens (packing.py)


def _shards(rank):
    """This rank's rows of the global batch: right-padded, the last 4 real tokens supervised."""
    ids, _ = batch(b=2 * WORLD, t=12, n_out=4)
    mask = (torch.arange(12)[None] < torch.tensor(LENGTHS)[:, None]).long()
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(LENGTHS):
        labels[i, n - 4:n] = ids[i, n - 4:n]
    return {k: v.chunk(WORLD)[rank] for k, v in
            {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def _train(model, fn, rank):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    shard = _shards(rank)
    losses = []
    for _ in range(STEPS):
        loss = fn(**shard).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _scenario(name, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch._dynamo.reset()
    model, policy = _model(), slc.Policy(**POLICY)
    options = {"policy": policy, "inner": "aot_eager"}
    small = dict(bucket_cap_mb=SMALL_BUCKET / 2**20)
    # the DDP optimizer's first piece: tiny where the DDP buckets are, else the default
    dist._DEFAULT_FIRST_BUCKET_BYTES = SMALL_BUCKET if name in SMALL else DEFAULT_FIRST_BUCKET
    if name == "ddp_compile_ddp":
        fn = torch.compile(DDP(model), backend="sparselora", options=options)
    elif name == "ddp_ddp_compile":
        fn = DDP(torch.compile(model, backend="sparselora", options=options))
    elif name == "ddp_slc_wrapper":
        fn = DDP(slc.compile(model, policy, inner="aot_eager"), **small)
    elif name == "ddp_slc_model":  # the gradients live in DDP's buckets
        slc.compile(model, policy, inner="aot_eager")
        fn = DDP(model, gradient_as_bucket_view=True, **small)
    elif name == "ddp_slc_suphead":  # the LM head on the supervised positions only
        fn = DDP(slc.compile(model, policy, inner="aot_eager", supervised_head=True), **small)
    elif name in ("fsdp_slc", "fsdp_slc_suphead"):
        from torch.distributed.fsdp import fully_shard
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        fn = slc.compile(model, policy, inner="aot_eager", supervised_head=name.endswith("suphead"))
    elif name == "fsdp_units_slc":  # several layers per FSDP2 unit: one gather, one set of hooks
        from torch.distributed.fsdp import fully_shard
        fully_shard(list(model.base_model.model.model.layers))
        fully_shard(model)
        fn = slc.compile(model, policy, inner="aot_eager")
    elif name == "fsdp_graphs_error":
        from torch.distributed.fsdp import fully_shard
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        try:
            slc.compile(model, policy, inner="aot_eager", cuda_graphs=True)
        except ValueError as e:
            return {"error": str(e), "compiled": getattr(model, "_sparselora", None) is not None}
        return {"error": None}
    elif name == "ddp_split_error":
        fn = torch.compile(DDP(model, **small), backend="sparselora", options=options)
        try:
            _train(model, fn, rank)
        except Exception as e:  # Dynamo wraps the backend's error
            return {"error": str(e)}
        return {"error": None}
    losses = _train(model, fn, rank)
    stats = slc.run_of(fn.module if isinstance(fn, DDP) else fn).stats
    return {"losses": losses, "lora": _lora(model), "saved": stats.saved_fraction,
            "padding_free": stats.padding_free_forwards}


def _worker(rank, port, out):
    gc.set_threshold(700, 10, 1000)  # conftest.py's (why: there), which a spawned rank does not load
    collect_after_compile.ENABLED = False  # conftest.py's too
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.save({name: _scenario(name, rank) for name in SCENARIOS}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference():
    """One process: each step runs every rank's micro-batch, loss / WORLD each."""
    torch._dynamo.reset()
    model = _model()
    fn = slc.compile(model, slc.Policy(**POLICY), inner="aot_eager")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = [[] for _ in range(WORLD)]
    for _ in range(STEPS):
        for rank in range(WORLD):
            loss = fn(**_shards(rank)).loss
            (loss / WORLD).backward()
            losses[rank].append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses, _lora(model)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp
    out = str(tmp_path_factory.mktemp("dist"))
    from sparselora_compile import dynamic_dims
    mp_env = pytest.MonkeyPatch()
    for k, v in CHILD_ENV.items():
        mp_env.setenv(k, v)
    # the reference compiles static, as conftest.py has each test do (this module fixture
    # runs before that autouse fixture); the spawned ranks keep the default
    mp_env.setattr(dynamic_dims, "DEFAULT", False)
    try:
        ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False,
                                 start_method="spawn")
        ref = _reference()  # while the ranks start
        while not ctx.join():
            pass
    finally:
        mp_env.undo()
    return ref, [torch.load(os.path.join(out, f"{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", [s for s in SCENARIOS if not s.endswith("_error")])
def test_matches_one_process(results, name):
    """Sparse blocks ran; each rank's losses are the reference's for its micro-batch; the
    LoRA weights (FSDP2: gathered) are equal across ranks and to the reference's. The
    reference and the slc.compile runs train padding-free, plain torch.compile keeps the
    padding: the same loss and gradients either way."""
    (ref_losses, ref_lora), ranks = results
    for rank, res in enumerate(ranks):
        got = res[name]
        assert got["saved"] > 0, f"{name}: no base FLOPs saved"
        assert got["padding_free"] == (0 if "compile" in name else STEPS), f"{name}: padding-free"
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses[rank]),
                                   rtol=1e-5, atol=1e-5, msg=f"{name} rank {rank} losses")
        assert got["lora"].keys() == ref_lora.keys()
        for n, w in got["lora"].items():
            torch.testing.assert_close(w, ref_lora[n], rtol=1e-4, atol=1e-5, msg=f"{name} {n}")
            torch.testing.assert_close(w, ranks[0][name]["lora"][n], rtol=0, atol=0,
                                       msg=f"{name} {n}: ranks differ")
    # the optimizer moved the weights, so equality above is not the initial state's
    assert any(not torch.equal(w, tiny_w) for (n, w), tiny_w in
               zip(ref_lora.items(), _lora(_model()).values()))


def test_whole_model_split_by_ddp_optimizer_says_what_to_do(results):
    for res in results[1]:
        err = res["ddp_split_error"]["error"]
        assert err is not None and "DDP optimizer split" in err and "slc.compile" in err


def test_fsdp2_with_cuda_graphs_is_refused_before_compiling(results):
    for res in results[1]:
        got = res["fsdp_graphs_error"]
        assert got["error"] is not None and "FSDP2" in got["error"] and "cuda_graphs=False" in got["error"]
        assert not got["compiled"], "the refusal left the model half compiled"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
