"""The direct launch of our Triton kernels (runtime/kernels/launch.py), with stand-ins for a
compiled kernel, so that its caching runs on CPU too (the GPU tests in test_kernels.py
check real kernels against their references through it)."""
import logging

import pytest
import torch

from sparselora_compile.runtime.kernels import launch


class Compiled:
    """What Triton returns for a compiled kernel: `compiled[grid](*every argument)`."""

    def __init__(self, calls, api_changed=False):
        self.calls, self.api_changed = calls, api_changed

    def __getitem__(self, grid):
        def run(*args):
            if self.api_changed:
                raise TypeError("run() takes 9 positional arguments")
            self.calls.append(("direct", grid, args))
        return run


class Jit:
    """A JITFunction: `kernel[grid](*args, **constexprs)` compiles if needed and launches."""
    arg_names = ["x_ptr", "n", "SCALE", "BLOCK"]
    params = ()  # present on a real JITFunction, absent under the interpreter

    def fn(self):  # the Python function a JITFunction wraps
        pass

    def __init__(self, api_changed=False):
        self.calls, self.compiles = [], 0
        self.compiled = Compiled(self.calls, api_changed)

    def __getitem__(self, grid):
        def run(*args, **kw):
            size = grid(kw) if callable(grid) else grid
            self.calls.append(("triton", size, args, kw))
            return self.compiled
        return run


class Tuner:
    """An autotuner over a Jit: picks BLOCK (one config) for each value of `n`."""

    def __init__(self, jit):
        self.fn, self.keys = jit, ["n"]
        self.configs = [type("Config", (), {"kwargs": {"BLOCK": 64}})()]
        self.best_config = self.configs[0]

    def __getitem__(self, grid):
        return lambda *args, **kw: self.fn[grid](*args, **kw, BLOCK=64)


def grid(meta):
    return (100 // meta["BLOCK"] + 1,)


def test_first_call_of_a_specialisation_goes_through_triton_then_direct():
    jit = Jit()
    run = launch.Launcher(Tuner(jit))
    assert run.names == Jit.arg_names and run.tune_keys == (1,) and not run.interpreted
    x = torch.zeros(8)
    for _ in range(3):
        run(grid, x, 32, SCALE=2)
    assert [c[0] for c in jit.calls] == ["triton", "direct", "direct"]
    # every argument in order, the autotuner's BLOCK included, and the grid from it
    assert jit.calls[1] == ("direct", (2, 1, 1), (x, 32, 2, 64))


@pytest.mark.parametrize("change", ["misaligned", "divisibility", "tune key", "dtype", "constexpr"])
def test_a_new_specialisation_compiles_first(change):
    jit = Jit()
    run = launch.Launcher(Tuner(jit))
    buf = torch.zeros(64)
    run(grid, buf, 32, SCALE=2)
    run(grid, buf, 32, SCALE=2)
    other = {"misaligned": (buf[1:], 32, 2), "divisibility": (buf, 33, 2), "tune key": (buf, 48, 2),
             "dtype": (buf.double(), 32, 2), "constexpr": (buf, 32, 3)}[change]
    assert change != "misaligned" or other[0].data_ptr() % 16
    run(grid, *other[:2], SCALE=other[2])
    run(grid, *other[:2], SCALE=other[2])
    assert [c[0] for c in jit.calls] == ["triton", "direct", "triton", "direct"]


def test_a_changed_compiled_kernel_api_falls_back_to_triton_and_says_so(caplog):
    jit = Jit(api_changed=True)
    run = launch.Launcher(Tuner(jit))
    x = torch.zeros(8)
    with caplog.at_level(logging.WARNING, logger="sparselora_compile"):
        for _ in range(4):
            run(grid, x, 32, SCALE=2)
    assert [c[0] for c in jit.calls] == ["triton"] * 4
    assert run.broken.startswith("TypeError") and caplog.text.count("launching fn directly failed") == 1


def test_disabled_or_interpreted_always_goes_through_triton(monkeypatch):
    jit = Jit()
    run = launch.Launcher(jit)  # no autotuner: the constexprs given are the meta-parameters
    x = torch.zeros(8)
    monkeypatch.setattr(launch, "ENABLED", False)
    run((1,), x, 32, SCALE=2, BLOCK=16)
    run((1,), x, 32, SCALE=2, BLOCK=16)
    monkeypatch.setattr(launch, "ENABLED", True)
    run((1,), x, 32, SCALE=2, BLOCK=16)
    run((1,), x, 32, SCALE=2, BLOCK=16)
    assert [c[0] for c in jit.calls] == ["triton", "triton", "triton", "direct"]
    assert jit.calls[-1] == ("direct", (1, 1, 1), (x, 32, 2, 16))
    interpreted = type("InterpretedFunction", (), {"arg_names": Jit.arg_names})()  # no `params`
    assert launch.Launcher(interpreted).interpreted


def test_unkeyed_argument_kinds_take_triton_every_time():
    jit = Jit()
    run = launch.Launcher(jit)
    for _ in range(2):
        run((1,), object(), 32, SCALE=2, BLOCK=16)
    assert [c[0] for c in jit.calls] == ["triton", "triton"]
