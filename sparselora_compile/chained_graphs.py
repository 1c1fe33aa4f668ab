"""Capture a chain of layer functions in CUDA graphs whose static buffers are shared along
the chain.

`torch.cuda.make_graphed_callables` gives each callable its own static inputs and its own
buffer for the incoming gradient. In a decoder stack layer i + 1 takes layer i's output,
so each replay copies that output into layer i + 1's static input, and each replayed
backward copies layer i + 1's input gradient into layer i's gradient buffer: two copies of
a batch's hidden states per layer and step, and two more hidden states per layer held by
every kept set. Here a link (i + 1, j) -> (i, m) makes layer i + 1's static input j be
layer i's static output m, and layer i's buffer for the gradient of output m be layer
i + 1's static gradient of input j, so a replay that is handed those very tensors copies
nothing. Otherwise the capture follows make_graphed_callables: warm-up runs on a side
stream, the forwards captured in order and the backwards in reverse order into one memory
pool (so they must replay in that order, as a training step does), replays that copy
unlinked arguments whose address differs.

A linked input handed some other tensor cannot be copied into: its static buffer is the
producer's output, which whoever made the argument may still need. `accepts(tensors)`
tells the caller, who runs that layer ungraphed.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def _memory(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def chain_links(inputs: list, outputs: list) -> list[dict]:
    """For each call of a recorded chain, {argument index: (earlier call, output index)}
    where the argument was that earlier call's output (the same memory, the latest call's
    if several). `inputs[i]` are call i's tensor arguments, `outputs[i]` its output's
    flattened leaves."""
    produced, links = {}, []
    for args, outs in zip(inputs, outputs):
        links.append({j: produced[_memory(t)] for j, t in enumerate(args) if _memory(t) in produced})
        produced.update({_memory(t): (len(links) - 1, m) for m, t in enumerate(outs)
                         if isinstance(t, torch.Tensor)})
    return links


class _Replay:
    """One captured call: its graphs and static tensors, callable like the function."""

    def __init__(self, inputs, linked):
        self.inputs = inputs        # static input tensors (leaves), linked ones included
        self.linked = linked        # argument indices whose static input is a producer's output
        self.outputs = self.spec = None
        self.grad_outputs = self.grad_inputs = None
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.captured_bwd = False   # no output needs a gradient: nothing to replay
        replay = self

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                for j, (static, arg) in enumerate(zip(replay.inputs, args)):
                    if static.data_ptr() != arg.data_ptr():
                        if j in replay.linked:  # the producer's output: not ours to overwrite
                            raise RuntimeError("a chained graph was handed another tensor than "
                                               "its producer's output; check accepts() first")
                        static.copy_(arg)
                replay.fwd.replay()
                return tuple(o.detach() for o in replay.outputs)

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, *grads):
                for static, g in zip(replay.grad_outputs, grads):
                    if static is not None and static.data_ptr() != g.data_ptr():
                        static.copy_(g)
                if replay.captured_bwd:
                    replay.bwd.replay()
                return tuple(None if g is None else g.detach() for g in replay.grad_inputs)

        self._graphed = Graphed

    def accepts(self, args) -> bool:
        """Whether every linked argument is its producer's static output."""
        return all(args[j].data_ptr() == self.inputs[j].data_ptr() for j in self.linked)

    def __call__(self, *args):
        return tree_unflatten(list(self._graphed.apply(*args)), self.spec)


def capture_chain(fns, samples, *, links=None, num_warmup_iters=2, pool=None, phases=None):
    """Graphed versions of `fns` (each takes only tensors), captured with `samples`.
    `links[i]` maps argument j of call i to (producer call, output index); a linked
    sample is used for the warm-up only. Arguments' gradients the function does not use
    come back None. Under autocast the casts are captured too: replay under the same
    autocast state (the caller keys its graphs on it). `phases`, a dict, gains the wall
    seconds of the warm-up, the forwards' and the backwards' captures (instantiation
    included)."""
    with _uncached_autocast():
        return _capture(fns, samples, links or [{} for _ in fns], num_warmup_iters,
                        torch.cuda.graph_pool_handle() if pool is None else pool,
                        {} if phases is None else phases)


def autocast_dtype(device: torch.device):
    """The dtype autocast casts to on `device`'s kind now (None: off); a capture bakes it in."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _uncached_autocast():
    """Under autocast with its cache on, the same autocast with the cache off. A cast served
    from the cache would not be captured: the graph would read a copy of the weights made
    before the capture, stale after the next optimizer step and freed with the cache. With
    the cache off each cast runs inside the graph, from the weights' current values."""
    if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return contextlib.nullcontext()


def _lap(phases, name, since):
    now = time.perf_counter()
    phases[name] = phases.get(name, 0.0) + now - since
    return now


def _capture(fns, samples, links, num_warmup_iters, pool, phases):
    t = time.perf_counter()
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        for fn, args in zip(fns, samples):
            for _ in range(num_warmup_iters):
                outs = [o for o in tree_flatten(fn(*args))[0] if o.requires_grad]
                if outs:
                    torch.autograd.grad(outs, [a for a in args if a.requires_grad],
                                        [torch.empty_like(o) for o in outs], allow_unused=True)
                del outs
    torch.cuda.synchronize()
    t = _lap(phases, "warmup_s", t)

    replays = []
    for fn, args, link in zip(fns, samples, links):
        inputs = [replays[link[j][0]].outputs[link[j][1]].detach().requires_grad_(a.requires_grad)
                  if j in link else a for j, a in enumerate(args)]
        replay = _Replay(inputs, tuple(link))
        with torch.cuda.graph(replay.fwd, pool=pool):
            outputs = fn(*inputs)
        flat, replay.spec = tree_flatten(outputs)
        replay.outputs = tuple(flat)
        replays.append(replay)
    t = _lap(phases, "forward_s", t)

    # the consumer's static input gradient serves as its producer's output-gradient buffer
    # when it is the output's only consumer among the calls
    consumers: dict = {}
    for i, link in enumerate(links):
        for j, src in link.items():
            consumers.setdefault(src, []).append((i, j))

    def grad_buffer(i, m, out):
        if not out.requires_grad:
            return None
        (only, *more) = consumers.get((i, m), [None])
        shared = None if more or only is None else replays[only[0]].grad_inputs[only[1]]
        return torch.empty_like(out) if shared is None else shared

    for i in reversed(range(len(replays))):
        replay = replays[i]
        replay.grad_outputs = tuple(grad_buffer(i, m, o) for m, o in enumerate(replay.outputs))
        wanted = [a for a in replay.inputs if a.requires_grad]
        outs = [(o, g) for o, g in zip(replay.outputs, replay.grad_outputs) if g is not None]
        grads = iter(())
        if outs and wanted:
            with torch.cuda.graph(replay.bwd, pool=pool):
                grads = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs],
                                                 allow_unused=True))
            replay.captured_bwd = True
        replay.grad_inputs = tuple(next(grads, None) if a.requires_grad else None for a in replay.inputs)
    _lap(phases, "backward_s", t)
    return tuple(replays)
