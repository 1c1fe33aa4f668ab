"""What stops a CUDA graph capture of the compiled decoder layers (cuda_graphs=True).

On a tiny CUDA Llama with LoRA: (1) one layer's forward and backward under
`torch.cuda.set_sync_debug_mode("error")`, which raises at any op that syncs with the host
(such an op cannot be captured); (2) `slc.compile(..., cuda_graphs=True)` training steps
with each inner compiler and SDPA backend, printing the capture's traceback when it fails.

    python bench/capture_check.py
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sparselora_compile as slc  # noqa: E402
from sparselora_compile import compile as slc_compile  # noqa: E402
from llama import ALL, batch, tiny_llama  # noqa: E402


def model_and_wrapper(inner, graphs):
    torch._dynamo.reset()
    model = tiny_llama(ALL, layers=3).cuda()
    wrapped = slc_compile(model, slc.Policy(mlp=0.5, attention=0.5), inner=inner, cuda_graphs=graphs)
    return model, wrapped


def sync_check(inner):
    model, wrapped = model_and_wrapper(inner, False)
    ids, labels = (t.cuda() for t in batch(t=12, n_out=3))
    for _ in range(2):
        wrapped(input_ids=ids, labels=labels).loss.backward()
    layer = model.base_model.model.model.layers[1]
    seen, call = {}, layer._compiled_call_impl

    def spy(*a, **kw):
        seen.update(args=a, kwargs=kw)
        return call(*a, **kw)
    layer._compiled_call_impl = spy
    wrapped(input_ids=ids, labels=labels).loss.backward()
    layer._compiled_call_impl = call
    kwargs = dict(seen["kwargs"])
    x = seen["args"][0] if seen["args"] else kwargs.pop("hidden_states")
    x = x.detach().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), [x] + [p for p in layer.parameters() if p.requires_grad])
        print(f"[{inner}] one layer forward + backward: no host sync")
    except Exception:  # noqa: BLE001
        print(f"[{inner}] a host sync inside the layer:\n{traceback.format_exc()}")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def capture_check(inner, sdpa=None):
    model, wrapped = model_and_wrapper(inner, True)
    ids, labels = (t.cuda() for t in batch(t=12, n_out=3))
    ctx = torch.nn.attention.sdpa_kernel(sdpa) if sdpa is not None else torch.enable_grad()
    with ctx:
        for _ in range(4):
            wrapped(input_ids=ids, labels=labels).loss.backward()
    g = wrapped.graphs
    print(f"[{inner}, sdpa {sdpa}] captures {g.captures}, graphed forwards {g.graphed_forwards}, "
          f"disabled: {g.disabled and g.disabled.splitlines()[0]}")
    if g.failure:
        print(g.failure)


def main():
    from torch.nn.attention import SDPBackend
    if not torch.cuda.is_available():
        sys.exit("capture_check: CUDA graphs need a GPU, and none is visible")
    for inner in ("aot_eager", "inductor"):
        sync_check(inner)
    capture_check("aot_eager")
    capture_check("aot_eager", SDPBackend.MATH)
    capture_check("inductor")


if __name__ == "__main__":
    main()
