"""Training the tiny Llama with and without cuda_graphs=True, shared by test_cuda_graphs*.py.

On CPU the capture is replaced by a stand-in that returns the layer functions unchanged,
which checks the bookkeeping (when a key is captured, which forwards replay, FLOP counts,
fallbacks); on CUDA the real graphs are checked against ungraphed training step by step.
"""
import functools

import torch

import sparselora_compile as slc
from sparselora_compile.cuda_graphs import LayerGraphs
from sparselora_compile.runtime.run import Run

from llama import ALL, batch, tiny_llama

CUDA = torch.cuda.is_available()
POLICY = dict(mlp=0.5, attention=0.5, sparsity={"layers.1.mlp": 0.75})


class StandIn:
    """The capture's contract without a GPU: the functions come back, run without
    the ops' Python side effects (the FLOP counters), as a replay would."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, fns, samples, **kwargs):
        self.calls.append([[t.requires_grad for t in s] for s in samples])
        self.samples, self.links = samples, kwargs.get("links")
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return tuple(self._replaying(fn) for fn in fns)

    @staticmethod
    def _replaying(forward):
        def replay(*tensors):
            count = Run.count_flops
            Run.count_flops = lambda *a: None
            try:
                return forward(*tensors)
            finally:
                Run.count_flops = count
        return replay


def split_batches(sizes, seed=10):
    """Two rows of 12 tokens per step, the last `sizes[i]` supervised at step i (the split's
    sizes key the graph sets); different tokens each step."""
    return [batch(t=12, n_out=n, seed=seed + i) for i, n in enumerate(sizes)]


def train(graphs, batches, device="cpu", monkeypatch=None, stand_in=None, inner="aot_eager",
          dtype=torch.float32, graph_bucket=0, accumulate=1, graph_sets=None, casts=(None,), layers=3,
          dynamic=None):
    """(losses, LoRA weights, stats, graphs) after training on `batches`."""
    torch._dynamo.reset()
    model = tiny_llama(ALL, layers=layers).to(device, dtype)
    if monkeypatch is not None:
        monkeypatch.setattr(LayerGraphs, "needs_cuda", False)
        monkeypatch.setattr(LayerGraphs, "make_graphed", stand_in)
    policy = slc.Policy(**POLICY)
    wrapped = slc.compile(model, policy, inner=inner, cuda_graphs=graphs, graph_bucket=graph_bucket,
                          dynamic=dynamic, **({} if graph_sets is None else {"graph_sets": graph_sets}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i, b in enumerate(batches, 1):
        b = b if isinstance(b, dict) else {"input_ids": b[0], "labels": b[1]}
        cast = casts[(i - 1) % len(casts)]  # this step's autocast dtype (None: off)
        with torch.autocast(torch.device(device).type, dtype=cast, enabled=cast is not None):
            loss = wrapped(**{k: v.to(device) for k, v in b.items()}).loss
        loss.backward()
        if i % accumulate == 0:  # gradients of `accumulate` micro-batches summed in .grad
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().cpu())
    params = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return losses, params, wrapped.stats.as_dict(), wrapped.graphs


@functools.cache
def plain_run(sizes, seed=10, layers=3):
    """Ungraphed training on split_batches(sizes, seed), trained once for the tests that compare
    with it."""
    return train(False, split_batches(sizes, seed), layers=layers)


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for n in b[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=rtol, atol=atol, msg=n)


def padded_sft_batch(lengths, t, n_out=3, seed=0):
    """Right-padded rows of `lengths` real tokens, the last `n_out` of each supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(lengths), t), generator=g)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):
        labels[i, : n - n_out] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


PADDED_LENGTHS = [(9, 12), (11, 7), (12, 10), (8, 8), (10, 12), (12, 9)]  # 16-24 real tokens


def packed_row(lengths, n_out=1, seed=0):
    """A caller's packed row (DataCollatorWithFlattening's form): sequences of `lengths`
    back to back, position ids restarting, the last `n_out` tokens of each supervised."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(1, 64, pos.shape, generator=g)
    labels = torch.full_like(ids, -100)
    at = 0
    for n in lengths:
        labels[0, at + n - n_out: at + n] = ids[0, at + n - n_out: at + n]
        at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


PACKED_LENGTHS = [(9, 8), (7, 6, 5), (11, 10), (6, 6, 6), (10, 9), (8, 7, 6)]  # 17-21 tokens
