"""A frozen MLP's channel selection on a side stream, beside its dense rows' products.

The selection (estimator scores, then one top-k program: ~0.1 ms a layer on an H200, the
GPU mostly idle during the top-k) gates only the context part of `sparse_mlp`; the dense
rows' full products (~0.5 ms at 1,024 of 4,096 rows on LLaMA-3-8B) do not read it. So
`select_mlp(..., overlap=True)` queues the selection on a high-priority side stream forked
from the current one, and `sparse_mlp` joins it just before its context part. Inside a
CUDA graph capture the fork and the join become the graph's edges.

Memory across the two streams:
- what the side stream reads (the block input, the factors, the split) stays referenced
  by the pending entry until the join, so the current stream cannot reuse its blocks
  while the side stream still reads them;
- what the side stream allocates (the selection, temporaries) comes from its own pool, and
  every fork first waits on the current stream: a block the current stream frees back to
  that pool is reused only by side work queued after the current stream's last use of it.
"""
from __future__ import annotations

import torch

ENABLED = True  # False: the selection runs in line on the current stream (for an A/B)
_STREAMS: dict = {}  # device index -> the side stream


def _side(device: torch.device) -> torch.cuda.Stream:
    s = _STREAMS.get(device.index)
    if s is None:
        # high priority: its few small kernels take SMs as the products' blocks retire
        s = _STREAMS[device.index] = torch.cuda.Stream(device, priority=-1)
    return s


def fork(run, fn, keep: tuple):
    """fn() queued on the side stream after the current stream's work so far; its result
    is read by the current stream only after `join(run)`."""
    join(run)
    device = keep[0].device
    current, side = torch.cuda.current_stream(device), _side(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    run.side_work = (side, keep)
    return out


def join(run) -> None:
    """The current stream waits for the pending side work, if any."""
    if run.side_work is not None:
        side, _keep = run.side_work
        torch.cuda.current_stream(side.device).wait_stream(side)
        run.side_work = None
