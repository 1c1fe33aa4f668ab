"""CUDA graphs of the compiled decoder layers: `slc.compile(model, cuda_graphs=True)`.

A sparse training step of a 32-layer model queues ~4,000 kernels, each through Python
(Inductor's wrappers, cuBLAS dispatch, our ops). On an H200 the GPU needs ~127 ms for them
and the host 150-185 ms to queue them, so the step waits on the host. A graph replays one
layer's forward or backward with one launch. `chained_graphs.capture_chain` captures
every layer's forward and backward as `torch.cuda.make_graphed_callables` does, except that
a layer's static input is its predecessor's static output (and its input gradient the
predecessor's output-gradient buffer), so replays copy no hidden states between layers; a
layer handed another tensor than its predecessor's output runs ungraphed. All sets of
graphs share one memory pool, which is sound because a set's replays run as a whole (its
forwards, then its backwards) before another set's begin (a forward waits, ungraphed,
while a graphed backward is pending), so a set's temporaries are dead when another set
reuses their memory. Each kept set still holds its own static tensors: two hidden states
of the batch per layer (its output and its input's gradient), plus the first layer's input
and the last layer's output gradient.

A replay runs no Python, so what the layers read from Python is kept valid this way:
- the token split (index tensors whose sizes depend on the labels): the capturing forward's
  split tensors become static; each graphed forward copies its own split into them, and a
  set of graphs serves only the split sizes, shapes and settings it was captured with (the
  forward's `key`); a layer whose arguments differ from its capture runs ungraphed;
- the ops' FLOP counters: a graphed layer adds what it counted when it last ran ungraphed;
- the dense warm-up, eval and recording change what the ops do: only training forwards past
  the warm-up with recording off use graphs;
- the static activations: a replay overwrites the previous replay's, so while the previous
  graphed forward's autograd graph is alive and its backward has not run, a forward runs
  ungraphed;
- the static gradients: the parameters' are copied out of the replay's buffers;
- not graphed at all: layers under gradient checkpointing (recomputed in the backward) and
  layers with active dropout (random masks under replay are not verified on a GPU yet).
Every ungraphed forward records its layers' arguments and token split; once CAPTURE_AFTER
of the last WINDOW forwards had the recorded one's key, that key is captured at the start
of the next forward (whatever that forward's own key). With bucketing (`graph_bucket`,
wrapper.py) keys stand for shape buckets, so a handful of sets serves a dataset of
varying lengths. At most `graph_sets` sets are kept (compile's option, MAX_SETS by
default), and a model captures at most MAX_CAPTURES times; with all kept, a key is
captured only if it came more often in the window than the rarest kept one, which it
replaces (else two common keys and a rare one would evict each other, a capture costing
a step or more each time). Graphs that do not pay (replayed steps no faster than
ungraphed ones: the GPU sets the pace, see graph_payoff.py) are dropped and turned off,
with a warning. A failing
capture (a layer that syncs with the host, say) turns graphs off with a warning; training
goes on ungraphed.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
import weakref
from collections import OrderedDict, deque

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from sparselora_compile.chained_graphs import capture_chain, chain_links
from sparselora_compile.graph_payoff import Payoff

log = logging.getLogger("sparselora_compile")

MAX_SETS = 3        # the default of graph_sets: each kept set holds its own static inputs,
                    # outputs and gradients
MAX_CAPTURES = 8
CAPTURE_AFTER = 2   # forwards with a key in the window before it is captured
WINDOW = 32         # recent forwards whose keys are counted
# the first capture runs every layer's forward and backward this many times on a side
# stream before capturing, so that lazy set-up (cuBLAS, the allocator, Triton autotuning at
# the key's sizes) stays out of the capture. After it the process-wide set-up is done, and a
# later key ran ungraphed CAPTURE_AFTER times before its capture (its sizes' autotuning
# is done), so later captures run none: a warm-up run cost ~0.16 s of a ~0.4 s capture at
# 32 layers on an H200 (bench/README.md, "Capture cost").
WARMUP_ITERS = 2
LATER_WARMUP_ITERS = 0
_TENSOR = object()  # where a tensor goes among a call's leaves


SPLIT_TENSORS = ("dense", "ctx", "score_weight", "n_unscored", "row_weight")


def refuse_sharded(model: torch.nn.Module) -> None:
    """FSDP2 gathers a layer's parameters into memory that it frees after the layer (and
    gathers again, possibly elsewhere, for the backward): a replay would read stale
    addresses. DDP keeps whole parameters in place, so its layers can be graphed."""
    from torch.distributed.tensor import DTensor
    sharded = next((n for n, p in model.named_parameters() if isinstance(p, DTensor)), None)
    if sharded is not None:
        raise ValueError(f"sparselora: cuda_graphs=True cannot graph FSDP2-sharded layers "
                         f"({sharded} is a DTensor): FSDP2 gathers the parameters into new "
                         f"memory at each forward and backward, which a replayed graph would not "
                         f"read; compile with cuda_graphs=False (DDP can use graphs)")


def _clone_split(split):
    return dataclasses.replace(split, **{n: getattr(split, n).clone() for n in SPLIT_TENSORS
                                         if getattr(split, n) is not None})


def call_signature(args, kwargs):
    """(signature, tensors): the call's structure, its non-tensor values and each tensor's
    shape, dtype, device and requires_grad; the tensors in leaf order."""
    leaves, spec = tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    consts = tuple(_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves)
    metas = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors)
    return (spec, consts, metas), tensors


def same_signature(a, b) -> bool:
    try:
        return a[0] == b[0] and a[2] == b[2] and len(a[1]) == len(b[1]) and all(
            x is y or x == y for x, y in zip(a[1], b[1]))
    except Exception:  # a non-tensor argument without a usable ==
        return False


class _LayerFn:
    """One layer as a function of its tensor arguments and trainable parameters, the form
    make_graphed_callables takes.

    The parameters are arguments, not the module's own: the capture runs the layer with
    fresh leaf aliases of them (same storage). A parameter's gradient accumulator made in
    an earlier step lives on the default stream while that step's autograd graph is alive
    (a caller holding the last loss keeps it), and a captured backward that syncs with it
    fails ("operation would make the legacy stream depend on a capturing blocking
    stream"). A replay passes the real parameters, so their gradients land in `.grad`."""

    def __init__(self, layer, call, signature):
        self._call, (self._spec, self._consts, _) = call, signature
        self._slots = [(mod, name) for mod in layer.modules()
                       for name, p in mod._parameters.items() if p is not None and p.requires_grad]

    def params(self) -> tuple:
        return tuple(mod._parameters[name] for mod, name in self._slots)

    def aliases(self) -> tuple:
        return tuple(torch.nn.Parameter(p.detach(), requires_grad=True) for p in self.params())

    def __call__(self, *flat):
        n = len(flat) - len(self._slots)
        it = iter(flat[:n])
        args, kwargs = tree_unflatten([next(it) if c is _TENSOR else c for c in self._consts], self._spec)
        real = self.params()
        for (mod, name), p in zip(self._slots, flat[n:]):
            mod._parameters[name] = p
        try:
            return self._call(*args, **kwargs)
        finally:
            for (mod, name), p in zip(self._slots, real):
                mod._parameters[name] = p


class _Watch(torch.autograd.Function):
    """Identity on a graphed forward's output; its node tells whether that forward's
    autograd graph is alive and whether its backward has run."""

    @staticmethod
    def forward(ctx, x):
        ctx.done = False
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.done = True
        return g


class _OwnGrads(torch.autograd.Function):
    """Identity on the parameters passed to a replay (one node per layer); its backward
    copies their gradients. A replayed backward returns gradients in static buffers, and a
    parameter whose `.grad` is None takes the buffer itself as `.grad`
    (pytorch/pytorch#181723): the next replay would overwrite it, and gradient
    accumulation would sum a corrupted value."""

    @staticmethod
    def forward(ctx, *params):
        ctx.set_materialize_grads(False)  # an unused parameter's .grad stays None, not zeros
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        out = list(grads)
        for dtype in {g.dtype for g in grads if g is not None}:
            at = [i for i, g in enumerate(grads) if g is not None and g.dtype == dtype]
            # one cat into one buffer, whose pieces are the copies: a layer's LoRA gradients
            # (~1 M values) took 16 us by _foreach_copy_'s 14 blocks on the H200
            flat = torch.cat([grads[i].reshape(-1) for i in at])
            for i, piece in zip(at, flat.split([grads[i].numel() for i in at])):
                out[i] = piece.view(grads[i].shape)
        return tuple(out)


class _GraphSet:
    def __init__(self, layers: dict, rows, split, flops: dict):
        self.layers = layers      # prefix -> (signature, graphed callable, its _LayerFn)
        self.rows, self.split = rows, split  # the static token split the graphs read
        self.flops = flops        # prefix -> (dense, executed) FLOPs one layer counts
        self.keep = None          # tensors the graphs read from caches (kept alive)


class LayerGraphs:
    """Graphs of the decoder layers of one compiled model (installed by the wrapper).
    `make_graphed` and `needs_cuda` are attributes so that CPU tests can run the
    bookkeeping with a stand-in for the capture."""

    make_graphed = staticmethod(capture_chain)
    needs_cuda = True

    def __init__(self, run, max_sets: int | None = None):
        self.run = run
        self.max_sets = MAX_SETS if max_sets is None else max_sets  # compile's graph_sets
        self.sets: "OrderedDict[tuple, _GraphSet]" = OrderedDict()
        self.calls: dict = {}      # prefix -> (layer, its compiled call)
        self.active: _GraphSet | None = None
        self.recording: dict | None = None
        self.recorded: tuple | None = None  # (key, {prefix: (signature, tensors, flops)}, rows, split)
        self.recent: "deque[tuple]" = deque(maxlen=WINDOW)  # the keys of recent forwards
        self.recent_graphed: "deque[bool]" = deque(maxlen=WINDOW)  # whether each replayed
        self.last_key = None
        self.captures = 0
        self.disabled: str | None = None
        self.failure: str | None = None  # the failed capture's traceback
        self.watch = None          # the last graphed forward's _Watch node (a weakref)
        self._unwatched = False    # the running graphed forward has not placed its _Watch
        self._dropout = False      # a layer holds a Dropout with p > 0
        self._said: set = set()    # blockers already logged
        self.graphed_forwards = 0
        self.longer_fills = 0      # padded batches filled to a longer kept set's length
        self.capture_s = 0.0       # wall time spent capturing
        self.capture_phases: dict = {}  # of it: warm-up, forwards' and backwards' captures
        self.pool = None           # the memory pool every set's graphs share
        self.payoff = Payoff()     # whether replayed steps are faster than ungraphed ones

    def stats(self) -> dict:
        """Training forwards that replayed graphs, padded batches filled to a longer kept
        set's length (wrapper._fill_to), captures made and their wall time
        (with its phases: warm-up runs, the forwards' and the backwards' captures), graph
        sets kept, and why graphs are off (None while they are on). `window`: of the last
        WINDOW forwards that could use graphs, how many there were, how many distinct keys
        they had and how many replayed; keys spread over more than `graph_sets` mean that
        steps run ungraphed (a larger `graph_bucket` or more uniform lengths help)."""
        return {"graphed_forwards": self.graphed_forwards, "longer_fills": self.longer_fills,
                "captures": self.captures,
                "capture_s": round(self.capture_s, 3),
                "capture_phases_s": {k: round(v, 3) for k, v in self.capture_phases.items()},
                "sets": len(self.sets), "disabled": self.disabled,
                "window": {"forwards": len(self.recent), "keys": len(set(self.recent)),
                           "graphed": sum(self.recent_graphed)},
                "payoff": self.payoff.figures and {**self.payoff.figures, "pays": self.payoff.verdict is True}}

    def _filled_keys(self, device, sequences, cast):
        """The kept sets' keys for filled rows (with estimator weights) on this device, with
        this count of sequences and autocast dtype."""
        return [k for k in self.sets if k[1] == device and k[3] and k[4] == sequences and k[5] == cast]

    def capacities_for(self, shape: tuple, device, sequences, cast) -> tuple:
        """The (dense, context) token-split capacities of the kept sets captured for filled
        rows of this shape (and `_filled_keys`' conditions)."""
        return tuple(k[2] for k in self._filled_keys(device, sequences, cast) if k[0] == shape)

    def filled_row_capacities(self, device, sequences, cast) -> dict:
        """{length: capacities} of the kept sets captured for one filled row, shortest first."""
        found: dict = {}
        for k in self._filled_keys(device, sequences, cast):
            if len(k[0]) == 2 and k[0][0] == 1:
                found.setdefault(k[0][1], []).append(k[2])
        return dict(sorted(found.items()))

    # ---- installing ----------------------------------------------------------------------

    def install(self, prefix: str, layer: torch.nn.Module) -> None:
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules()):
            self._dropout = True
        inner = layer._compiled_call_impl
        self.calls[prefix] = (layer, inner)

        def call(*args, **kwargs):
            return self._dispatch(prefix, inner, args, kwargs)
        layer._compiled_call_impl = call

    # ---- per forward -----------------------------------------------------------------------

    def begin(self, key) -> None:
        """Before a forward: pick its graph set, capturing one if due. `key` is None when
        this forward must not use graphs."""
        self.active, self.recording = None, None
        self.last_key = key
        self.payoff.boundary()
        if key is None or self.disabled or self.needs_cuda and key[1].type != "cuda":
            return
        verdict = self.payoff.judge()
        if isinstance(verdict, str):
            self._turn_off(verdict)
            return
        blocker = self._blocker()
        if blocker:
            if blocker not in self._said:
                self._said.add(blocker)
                log.info("sparselora: cuda_graphs: the layers run ungraphed: %s", blocker)
            return
        if self._previous_pending():
            log.debug("sparselora: the previous graphed forward's backward has not run; "
                      "this forward runs ungraphed")
            return
        self.recent.append(key)
        graphs = self.sets.get(key)
        if graphs is None and self.recorded and self._due(self.recorded[0]):
            self._capture(self.recorded[0])
            graphs = self.sets.get(key)
        self.recent_graphed.append(graphs is not None)
        self.payoff.start(key, graphs is not None)
        if graphs is None:
            self.recording = {}
            return
        self.sets.move_to_end(key)
        self._load_split(graphs)
        self.active, self._unwatched = graphs, True
        self.graphed_forwards += 1

    def end(self) -> None:
        """After a forward: keep the layer arguments and the token split it recorded (for a
        capture of its key)."""
        if self.recording:
            rows = self.run.shared_rows[1]
            self.recorded = (self.last_key, self.recording, rows.clone(),
                             _clone_split(self.run.splits.of(rows)))
        self.active = self.recording = None

    def _due(self, key) -> bool:
        """Whether `key` (the recorded forward's) is to be captured now."""
        if key in self.sets or self.recent.count(key) < CAPTURE_AFTER:
            return False
        return len(self.sets) < self.max_sets or self.recent.count(key) > self.recent.count(self._rarest())

    def _rarest(self):
        """The kept set's key that came least often in the window (the least recently
        used of those)."""
        return min(self.sets, key=self.recent.count)  # self.sets runs from least recently used

    def _turn_off(self, reason: str) -> None:
        self.disabled = f"graphs did not pay: {reason}"
        self.sets.clear()  # their static tensors and graphs go back to the allocator
        self.recorded = None
        log.warning("sparselora: cuda_graphs: %s; the layers run ungraphed from now on and the "
                    "graph sets are dropped (leave cuda_graphs off for batches like these)", reason)

    def _blocker(self) -> str | None:
        if self._dropout and any(m.training for layer, _ in self.calls.values()
                                 for m in layer.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0):
            return "active dropout (random masks under graph replay are not verified yet)"
        if any(getattr(layer, "gradient_checkpointing", False) for layer, _ in self.calls.values()):
            return "gradient checkpointing recomputes the layers in the backward"
        return None

    def _previous_pending(self) -> bool:
        node = self.watch() if self.watch is not None else None
        return node is not None and not node.done

    # ---- per layer call --------------------------------------------------------------------

    def _dispatch(self, prefix, inner, args, kwargs):
        graphs = self.active
        if graphs is not None and prefix in graphs.layers:
            sig, tensors = call_signature(args, kwargs)
            want, fn, layer_fn = graphs.layers[prefix]
            # a layer whose input is not its predecessor's static output (to which the graphs
            # chain it) runs ungraphed: chained_graphs.py
            if same_signature(sig, want) and getattr(fn, "accepts", lambda t: True)(tensors):
                # the parameters as they are now: one replaced since the capture gets its
                # values copied into the captured storage, and its gradient
                params = layer_fn.params()
                out = fn(*tensors, *(_OwnGrads.apply(*params) if params else ()))
                self._count(graphs.flops.get(prefix))
                if self._unwatched:  # until a graphed output that needs a gradient carries it
                    out = self._watched(out)
                return out
        if self.recording is None:
            return inner(*args, **kwargs)
        sig, tensors = call_signature(args, kwargs)
        stats = self.run.stats
        before = (stats.base_flops_dense, stats.base_flops_executed)
        out = inner(*args, **kwargs)
        flops = (stats.base_flops_dense - before[0], stats.base_flops_executed - before[1])
        outputs = [x.detach() if isinstance(x, torch.Tensor) else x for x in tree_flatten(out)[0]]
        self.recording[prefix] = (sig, [t.detach() for t in tensors], flops, outputs)
        return out

    def _watched(self, out):
        # on the first graphed layer's output: its backward runs last but one, so `done`
        # says the backward reached the first layer
        leaves, spec = tree_flatten(out)
        for i, x in enumerate(leaves):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                leaves[i] = _Watch.apply(x)
                self.watch, self._unwatched = weakref.ref(leaves[i].grad_fn), False
                break
        return tree_unflatten(leaves, spec)

    def _count(self, flops) -> None:
        if flops is not None:
            self.run.stats.base_flops_dense += flops[0]
            self.run.stats.base_flops_executed += flops[1]

    # ---- capturing ---------------------------------------------------------------------------

    def _load_split(self, graphs: _GraphSet) -> None:
        rows = self.run.shared_rows[1]
        if rows is graphs.rows:
            return
        split = self.run.splits.of(rows)
        graphs.rows.copy_(rows)
        for name in SPLIT_TENSORS:
            dst, src = getattr(graphs.split, name), getattr(split, name)
            if dst is not None:
                dst.copy_(src)

    def _capture(self, key):
        if self.captures >= MAX_CAPTURES:
            if "max captures" not in self._said:
                self._said.add("max captures")
                log.warning("sparselora: %d CUDA graph captures made, and new keys (batch shape "
                            "and token split sizes) run ungraphed: the last %d forwards had %d "
                            "distinct keys for %d kept sets; a larger graph_bucket, or batches of "
                            "more uniform lengths (length-grouped sampling), let more replay",
                            MAX_CAPTURES, len(self.recent), len(set(self.recent)), self.max_sets)
            return None
        _, recorded, rows, split = self.recorded
        order = [p for p in self.calls if p in recorded]  # the layers' order
        run = self.run
        # the layers' token_rows op reads this forward's split: during the capture, the
        # recorded forward's (its key's sizes), whose tensors the graphs then read
        outer = run.shared_rows
        run.shared_rows = ((run.forward_id, tuple(rows.shape), rows.device, True), rows)
        run.splits.remember(rows, split)
        t0 = time.perf_counter()
        stats = self.run.stats
        saved = (stats.base_flops_dense, stats.base_flops_executed)
        self.recorded = None
        try:
            fns, samples = [], []
            for prefix in order:
                sig, tensors, _, _ = recorded[prefix]
                layer, inner = self.calls[prefix]
                fns.append(_LayerFn(layer, inner, sig))
                # fresh static inputs, with the recorded call's requires_grad (tensors were
                # kept detached), then the parameters' aliases
                samples.append(tuple(t.clone().requires_grad_(meta[3])
                                     for t, meta in zip(tensors, sig[2])) + fns[-1].aliases())
            if self.pool is None and self.needs_cuda:
                self.pool = torch.cuda.graph_pool_handle()
            warmup = WARMUP_ITERS if self.captures == 0 else LATER_WARMUP_ITERS
            # a layer's input that was its predecessor's output shares its static buffer
            links = chain_links([recorded[p][1] for p in order], [recorded[p][3] for p in order])
            graphed = self.make_graphed(tuple(fns), tuple(samples), links=links,
                                        num_warmup_iters=warmup, pool=self.pool,
                                        phases=self.capture_phases)
        except Exception as e:  # noqa: BLE001 - any failure: go on ungraphed, and say why
            self.disabled = f"{type(e).__name__}: {e}"
            self.failure = traceback.format_exc()
            log.debug("sparselora: CUDA graph capture failed:\n%s", self.failure)
            log.warning("sparselora: capturing the decoder layers in CUDA graphs failed, so "
                        "they run ungraphed: %s", self.disabled)
            return None
        finally:
            stats.base_flops_dense, stats.base_flops_executed = saved
            run.shared_rows = outer
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        graphs = _GraphSet({p: (recorded[p][0], g, f) for p, g, f in zip(order, graphed, fns)},
                           rows, split, {p: recorded[p][2] for p in order})
        # the graphs read cached tensors by address: hold them while the graphs exist
        graphs.keep = self.run.joined.tensors()
        while len(self.sets) >= self.max_sets:
            evicted = self._rarest()
            del self.sets[evicted]
            self.payoff.forget(evicted)
        self.sets[key] = graphs
        log.info("sparselora: captured %d decoder layers in CUDA graphs in %.1f s "
                 "(key %d of at most %d)", len(order), time.perf_counter() - t0,
                 self.captures, MAX_CAPTURES)
        return graphs
