"""The whole LoRA training step: eager PEFT vs Inductor vs the sparselora backend.

A LLaMA-3-8B-shaped model (random weights, bf16) with PEFT LoRA r=32 alpha=64; each
variant runs forward + backward + AdamW on the LoRA params, a few warm-up steps
excluded, median of the timed steps (device-synchronised wall time per step):

    eager              plain PEFT
    inductor           torch.compile(model)         (the baseline of the ratios; --baseline)
    inductor_bf16      the same with the LoRA params cast to bf16 for this variant (what a
                       bf16-adapter baseline costs; = inductor under --bf16-adapters)
    inductor_regional  each decoder layer compiled with Inductor, one graph reused
                       (`layer.compile()`; the rest eager): its compile-time baseline
    inductor_regional_bf16  the same with the LoRA params cast to bf16, as inductor_bf16
    sl_math10k         slc.compile, presets.math10k, warm-up skipped
    sl_csr             slc.compile, presets.csr,     warm-up skipped
    sl_sparsity0       slc.compile, blocks rewritten, every op on its dense path (overhead)
    sl_*_whole         the same with regional=False (one whole-model graph)
    sl_math10k_mlp     presets.math10k with its attention blocks left dense (what attention
                       sparsity adds or costs)
    sl_*_lora_model    sl_math10k / _mlp / _whole / sl_csr with lora_dtype="model" (the compiled graph
                       computes the LoRA products in the model's dtype)

Inductor settings ride on a variant's name as suffixes (any variant but eager), each
passed as inductor_config (sl_*) or torch.compile options (inductor*):
    _cpp      cpp_wrapper=True: the generated wrapper launches from C++, not Python; with
              the settings Inductor patches in for it (store_cubin, compile-time autotune:
              sparselora_compile.backend.CPP_WRAPPER_SETTINGS), which torch 2.11 applies to
              the forward's compile only, so that backward graphs compile too
    _cppat    cpp_wrapper=True and triton.autotune_at_compile_time=True only (without
              store_cubin: fails on the backward)
    _combo    combo_kernels=True: independent small kernels share one launch
    _noassert size_asserts=False: no stride checks of graph inputs on every call
    _mk       triton.multi_kernel=1: a row reduction of up to 16,384 elements (the norms over
              the hidden size) compiles both persistent (one pass over the row) and looped,
              and the first call's timing picks one; on torch 2.11 a graph with one fails to
              load from Inductor's FX graph cache (a second run, bench/README.md)
Runtime suffixes (sl_* variants), after any Inductor suffix:
    _attn     min_attention_sparsity_cuda=0: the policy's attention sparsity runs on CUDA
              too (by default a block below 0.8 stays dense there), for an A/B
    _ctxrows  the sparse MLP's context part over the context rows only
              (`mlp_all_rows_max_k=0`, runtime/sparse_mlp.py), for an A/B in one run
    _graphs   slc.compile(..., cuda_graphs=True): the decoder layers replayed as CUDA graphs
    _bucket512, _bucket1024  with _graphs: slc.compile(..., graph_bucket=512 or 1024): padded
              batches run as packed rows, and packed rows run, filled up to a multiple of it
              (dense rows of the token split to a quarter of it), so that a few graph sets
              serve varying lengths
    _sets1, _sets2  with _graphs: slc.compile(..., graph_sets=1 or 2): fewer graph sets kept
              (less memory, fewer kinds of batches replayed) than the default 3
    _rowloop  row reductions over more than 1,024 elements looped, as Inductor makes them
              (inductor_choices.ROW_PERSISTENT_MAX = 1024), not persistent (the norms over the
              hidden size; sparselora_compile/inductor_choices.py), for an A/B
    _warm1    with _graphs: captures after the first run the layers once before capturing
              (cuda_graphs.LATER_WARMUP_ITERS = 1 instead of the code's 0), for an A/B
    _firstwarm1  with _graphs: the first capture runs the layers once before capturing
              (cuda_graphs.WARMUP_ITERS = 1 instead of the code's 2), for an A/B
    _ownfill  with _bucket*: padded rows fill to their own bucket only, never to a longer
              kept graph set's length (wrapper._fill_to off), for an A/B
    _pad8     slc.compile(..., pad_to_multiple_of=8): training batches right-padded to a
              multiple of 8 (Inductor's CUDA attention-mask alignment guard then never
              recompiles the layers at the first aligned length of packed rows)
    _masked   slc.compile(..., causal_right_padding=False): right-padded batches that keep
              their padding (with _padded or _novarlen) keep their attention mask too (the
              masked SDPA kernel), for an A/B of that option
    _novarlen slc.compile(..., varlen_attention=False): packed rows run HF's SDPA over its
              block-diagonal mask (and padded batches keep their padding), for an A/B
    _padded   slc.compile(..., padding_free=False): right-padded batches keep their padding
              (and run causal attention without their mask), for an A/B of padding_free
    _suphead  slc.compile(..., supervised_head=True): training batches run the LM head on
              the supervised positions only
Runtime suffixes of the dense inductor* baselines:
    _unmasked right-padded training batches lose their attention mask before the call, as
              slc.compile's causal_right_padding does (sparselora_compile/padding.py)
    _varlen   packed rows run variable-length attention and right-padded training batches
              run as one packed row of their real tokens, as slc.compile's varlen_attention
              and padding_free do (sparselora_compile/packing.py)
    _suphead  training batches run the LM head on the supervised positions only, as
              slc.compile's supervised_head does (sparselora_compile/supervised_head.py)
    _prow     Inductor compiles with our heuristics (row reductions of up to 4,096 elements
              persistent: sparselora_compile/inductor_choices.py)

Batches (--batches, bench/batches.py, one or several modes): `fixed` (the default) times
every compiled variant on the fixed batch shapes of --shapes (Math10K: 8 x 512 with 128
output tokens; CSR: 8 x 512 with 3 output tokens) without recompiling (same tensor
shapes), median of the timed steps. `padded`, `long` and `packed` feed what users' data
looks like: a different sequence length and token split nearly every step (SFT rows
right-padded to a multiple of 8 with an attention_mask; batch-4 long rows;
DataCollatorWithFlattening rows with position_ids). Every variant is compiled once and
then steps through each mode's batches in the order given (e.g. `--batches fixed padded
packed long`), the same batches for every variant; per mode the first --warmup steps
(Dynamo's compile and its automatic-dynamic recompiles at the mode's new shapes) are
reported apart, and every later step counts, first-seen shapes included: mean tokens/s of
non-padding tokens, mean/median/p90/max step time, the distinct shapes and what a
first-seen one cost, CUDA-graphed steps and captures, peak memory of the mode.

Ratios (per mode) are against the same run's dense baselines, --baseline whole (default:
`inductor` / `inductor_bf16`) or regional (`inductor_regional` / `inductor_regional_bf16`,
an 8 s compile instead of ~100 s and the faster of the two per step); the chosen pair is
added when missing with a varying mode or an explicit --baseline, and named in the JSON's
`ratio_baseline`. `speedup_vs_inductor` / `speedup_vs_inductor_bf16` are against that
pair, `speedup_vs` against every dense baseline in the run.

--time-budget SECONDS: once the process has run that long, the mode under way finishes and
the rest (modes, variants, layer counts, profiles, A/B rounds) is skipped and listed under
`skipped`; the JSON is rewritten after every mode, so a killed process leaves its results.

With fewer than 32 layers a preset's per-layer settings are sampled: small layer i takes
the settings of layer floor((i + 0.75) * 32 / L) (identity at L = 32; at L = 8, MLP sparse
on 7/8 layers and attention on 4/8, as in the 32-layer Math10K preset's 28/32 and 14/32).

Correctness first: a tiny model checks sparselora at sparsity 0 (and Inductor) against
eager (loss and LoRA grads); on the real model the step-0 losses of the dense variants are
compared too.

    python bench/train_step.py --smoke --device cpu --inner aot_eager    # CPU, ~1 min
    python bench/train_step.py --layers 4 8                              # H200
    python bench/train_step.py --layers 32 --variants inductor sl_math10k
    python bench/train_step.py --layers 32 --batches padded --variants inductor inductor_bf16 \
        sl_math10k_lora_model_graphs                                     # H200, 50 steps
    python bench/train_step.py --layers 32 --no-check --batches fixed padded packed long \
        --shapes math10k --baseline regional --time-budget 450 \
        --variants sl_math10k_lora_model sl_math10k_lora_model_graphs   # H200, all modes
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script it is sys.path[0]
    sys.path.append(str(Path(__file__).resolve().parent))
import batches as user_batches  # noqa: E402  (bench/batches.py)
import sparselora_compile as slc  # noqa: E402
# `slc.compile` resolves to the submodule after its first use (package __getattr__ +
# submodule import): take the function itself.
from sparselora_compile import compile as slc_compile  # noqa: E402
from sparselora_compile import cuda_graphs, inductor_choices  # noqa: E402

LATER_WARMUP_ITERS = cuda_graphs.LATER_WARMUP_ITERS  # the code's own, which _warm1 sets to 1
WARMUP_ITERS = cuda_graphs.WARMUP_ITERS  # the code's own, which _firstwarm1 sets to 1
ROW_PERSISTENT_MAX = inductor_choices.ROW_PERSISTENT_MAX  # the code's own; _rowloop sets Inductor's


def _process_start() -> float:
    """time.perf_counter() at this process's start, from /proc (the imports before this line
    included); where unreadable, now."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return now - age if 0 <= age < 600 else now
    except (OSError, ValueError, IndexError):
        return now


T_PROCESS = _process_start()  # --time-budget and the log's timestamps count from here
RESULTS = Path(__file__).parent / "results"
VARIANTS = ("eager", "inductor", "inductor_bf16", "inductor_regional", "inductor_regional_bf16",
            "sl_math10k", "sl_csr",
            "sl_sparsity0", "sl_math10k_whole", "sl_csr_whole", "sl_sparsity0_whole", "sl_math10k_mlp",
            "sl_math10k_lora_model", "sl_math10k_mlp_lora_model", "sl_math10k_whole_lora_model",
            "sl_csr_lora_model")
from sparselora_compile.backend import CPP_WRAPPER_SETTINGS  # noqa: E402

# the dense baselines a run's ratios can be against (--baseline): (fp32 adapters, bf16 adapters)
BASELINES = {"whole": ("inductor", "inductor_bf16"),
             "regional": ("inductor_regional", "inductor_regional_bf16")}
DENSE_BASELINES = tuple(b for pair in BASELINES.values() for b in pair)
BF16_CAST = ("inductor_bf16", "inductor_regional_bf16")  # variants that cast the LoRA params

INDUCTOR_SUFFIXES = {"_cpp": {"cpp_wrapper": True, **CPP_WRAPPER_SETTINGS}, "_combo": {"combo_kernels": True},
                     "_cppat": {"cpp_wrapper": True, "triton.autotune_at_compile_time": True},
                     "_noassert": {"size_asserts": False}, "_mk": {"triton.multi_kernel": 1}}


def _row_persistent_inductor(inductor_config):
    """Inductor as a backend, compiling with our heuristics (what our backend hands it)."""
    from torch._inductor.compile_fx import compile_fx
    return functools.partial(compile_fx, inner_compile=inductor_choices.compile_inner,
                             config_patches=inductor_choices.config_patches(inductor_config or None))


def strip_suffixes(name: str, suffixes) -> tuple[str, list]:
    """Peel any of `suffixes` off the end of `name`, repeatedly; returns the stem and the
    suffixes found, outermost first."""
    found, peeled = [], True
    while peeled:
        peeled = False
        for suffix in suffixes:
            if name.endswith(suffix):
                name, peeled = name.removesuffix(suffix), True
                found.append(suffix)
    return name, found


def split_variant(name: str) -> tuple[str, dict]:
    """'sl_math10k_lora_model_cpp' -> ('sl_math10k_lora_model', {'cpp_wrapper': True})."""
    name, found = strip_suffixes(name, INDUCTOR_SUFFIXES)
    config = {}
    for suffix in found:
        config.update(INDUCTOR_SUFFIXES[suffix])
    return name, config


GRAPH_BUCKETS = {"_bucket512": 512, "_bucket1024": 1024}
GRAPH_SETS = {"_sets1": 1, "_sets2": 2}
RUNTIME_SUFFIXES = ("_attn", "_ctxrows", "_graphs", "_rowloop", "_prow", "_warm1", "_firstwarm1", "_ownfill", "_pad8", "_masked", "_novarlen", "_padded", "_suphead",
                    "_unmasked", "_varlen", *GRAPH_BUCKETS, *GRAPH_SETS)
DENSE_ONLY = {"_unmasked", "_varlen", "_prow"}  # what slc.compile does anyway, given to a dense baseline
DENSE_FLAGS = DENSE_ONLY | {"_suphead"}  # the runtime flags a dense Inductor baseline takes


def runtime_flags(name: str) -> tuple[str, set]:
    """'sl_math10k_lora_model_cpp_graphs' -> ('sl_math10k_lora_model_cpp', {'_graphs'})."""
    name, found = strip_suffixes(name, RUNTIME_SUFFIXES)
    return name, set(found)


def variant_name(text: str) -> str:
    stem, flags = runtime_flags(text)
    base, config = split_variant(stem)
    sl = base.startswith("sl_") and "_whole" not in base
    allowed = set(RUNTIME_SUFFIXES) - DENSE_ONLY if sl else DENSE_FLAGS if base.startswith("inductor") else set()
    if flags & (set(GRAPH_BUCKETS) | set(GRAPH_SETS) | {"_warm1", "_firstwarm1", "_ownfill"}) and "_graphs" not in flags:
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: a _bucket, _sets, _warm1, _firstwarm1 or _ownfill suffix needs _graphs")
    if base not in VARIANTS or (config and base == "eager") or flags - allowed:
        raise argparse.ArgumentTypeError(
            f"unknown variant {text!r}: one of {VARIANTS}, plus any of the suffixes "
            f"{sorted(INDUCTOR_SUFFIXES)} except on eager, then {sorted(set(RUNTIME_SUFFIXES) - DENSE_ONLY)} "
            f"on regional sl_*, {sorted(DENSE_FLAGS)} on inductor*")
    return text


QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]
PRESET_LAYERS = 32  # the presets are LLaMA-3-8B's


# ---- model and data ---------------------------------------------------------------------

def llama_config(layers, smoke):
    from transformers import LlamaConfig
    if smoke:
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    else:
        kw = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0)
    cfg = LlamaConfig(num_hidden_layers=layers, initializer_range=0.02, use_cache=False,
                      tie_word_embeddings=False, **kw)
    return cfg


def build_model(cfg, device, seed=0):
    """bf16 LlamaForCausalLM built on the device directly, weights N(0, 0.02)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.config.use_cache = False
    return model


def add_lora(model, targets, bf16_adapters, seed=1):
    from peft import LoraConfig, get_peft_model
    peft = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                            target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # non-zero so the LoRA branch shows in the loss check
                p.normal_(0.0, 0.01)
    if bf16_adapters:
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    peft.train()
    return peft


def make_batch(cfg, batch, seq, n_out, device, seed):
    b = next(user_batches.fixed_batches(cfg.vocab_size, 1, batch, seq, n_out, seed))
    return b["input_ids"].to(device), b["labels"].to(device)


def make_stream(mode, cfg, args, n_out, device, steps, seed=7):
    """The batches a variant steps through, on the device: one dict for `fixed` (reused
    every step), else warm-up + timed steps' worth of user-shaped batches."""
    if mode == "fixed":
        steps = 1
    return [{k: v.to(device) for k, v in b.items()} for b in user_batches.make_batches(
        mode, cfg.vocab_size, steps, args.batch, args.seq, n_out, seed=seed)]


def lora_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def sampled_policy(preset, layers, total_steps):
    """The preset at L layers: small layer i takes preset layer floor((i + .75) * 32 / L)."""
    pol = getattr(slc.presets, preset)(total_steps=total_steps)
    if layers == PRESET_LAYERS:
        return pol, {i: i for i in range(layers)}
    src = {i: min(PRESET_LAYERS - 1, int((i + 0.75) * PRESET_LAYERS / layers)) for i in range(layers)}
    sparsity = {}
    for i, j in src.items():
        for kind in ("mlp", "self_attn"):
            s = pol.sparsity.get(f"layers.{j}.{kind}")
            if s is not None:
                sparsity[f"layers.{i}.{kind}"] = s
    return slc.Policy(sparsity=sparsity, warmup_fraction=pol.warmup_fraction,
                      total_steps=pol.total_steps), src


# ---- timing -----------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class GcWatch:
    """Python garbage collections during the timed steps: count per generation and the
    time they took (a host-bound step pays them in full)."""

    def __init__(self):
        self.counts, self.ms, self._t0 = [0, 0, 0], 0.0, None

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.counts[info["generation"]] += 1
            self.ms += (time.perf_counter() - self._t0) * 1e3
            self._t0 = None

    def start(self):
        gc.callbacks.append(self._callback)

    def stop(self) -> dict:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        return {"collections_per_generation": self.counts, "ms": round(self.ms, 2)}


def cpu_jiffies():
    """(steal, total) of /proc/stat's cpu line: on a VM, time the hypervisor gave this
    machine's CPUs to others; a host-bound step stretches by it. None where unreadable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[7], sum(v[:8])
    except (OSError, ValueError, IndexError):
        return None


def steal_share(before, after):
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def quantile(xs, q):
    """Nearest-rank quantile (p90 of 50 steps: the 45th smallest)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def unmasked(fn):
    """`fn` called with right-padded batches' attention masks dropped, as
    slc.compile(causal_right_padding=True) does (sparselora_compile/padding.py)."""
    from sparselora_compile.padding import unmask_right_padding

    def call(**batch):
        return fn(**unmask_right_padding(batch)[0]) if torch.is_grad_enabled() else fn(**batch)
    return call


def varlen(fn, model):
    """`fn` with packed rows running variable-length attention and right-padded training
    batches padding-free, as slc.compile(varlen_attention=True, padding_free=True) does
    (sparselora_compile/packing.py); (fn, undo)."""
    from sparselora_compile import packing
    undo = packing.install(model)
    if undo is None:
        raise RuntimeError("varlen: the model's attention is not HF's sdpa")

    def call(**batch):
        kwargs, unpadded = packing.unpad(batch) if torch.is_grad_enabled() else (batch, None)
        if unpadded is None:
            kwargs, packed = packing.add_sequence_starts(kwargs)
            return fn(**(packing.without_hf_mask(kwargs) if packed else kwargs))
        out = fn(**packing.without_hf_mask(kwargs))
        if out.logits is not None:  # None under supervised_head
            out["logits"] = unpadded.repad(out.logits)
        return out
    return call, undo


def supervised_head(fn, model):
    """`fn` with training batches' LM head on the supervised positions only, as
    slc.compile(supervised_head=True) does (sparselora_compile/supervised_head.py); (fn, undo)."""
    from sparselora_compile.supervised_head import SupervisedHead
    head = SupervisedHead(model)

    def call(**batch):
        return head.end(fn(**head.begin(batch))) if torch.is_grad_enabled() else fn(**batch)
    return call, head.undo


def graph_stats(fn) -> dict:
    """CUDA-graph counters of a `slc.compile(..., cuda_graphs=True)` model ({} without)."""
    g = getattr(fn, "graphs", None)
    return {} if g is None else dict(g.stats(), failure=g.failure)


def free(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(fn, opt, batch, labels=None):
    """One step on a batch dict; (fn, opt, input_ids, labels) as before batches were dicts
    (bench/sync_points.py calls it so)."""
    if labels is not None:
        batch = {"input_ids": batch, "labels": labels}
    loss = fn(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def profile_step(fn, opt, batch, device, step_ms):
    """One step under torch.profiler: time of each sparselora op, the kernel total, the
    estimator's share and which ops make the host wait for the device."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        train_step(fn, opt, batch)
        sync(device)  # recorded too: one parentless cudaDeviceSynchronize in sync_parents
    ka, events = prof.key_averages(), prof.events()
    if cuda:
        tot = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)  # noqa: E731
        self_of = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
        # Only the device-side events (kernels, memcpy, memset): a CPU op's self device time
        # repeats its kernels' (which are entries of their own), so summing every entry
        # double counts. time_range: a device event's duration in every torch version.
        kernel_us = sum(e.time_range.elapsed_us() for e in events
                        if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        tot = lambda e: e.cpu_time_total  # noqa: E731
        self_of = lambda e: e.self_cpu_time_total  # noqa: E731
        kernel_us = sum(e.self_cpu_time_total for e in ka)  # no kernels: all ops' CPU time
    ops = {e.key: {"time_ms": tot(e) / 1e3, "count": e.count}
           for e in ka if e.key.startswith("sparselora::")}
    select_ms = sum(v["time_ms"] for k, v in ops.items() if k.startswith("sparselora::select_"))
    # A host sync stalls the launch queue: count each by its chain of CPU ops (innermost first).
    syncs = {}
    for e in events:
        if e.name in SYNC_EVENTS:
            chain, p = [e.name], e.cpu_parent
            while p is not None and len(chain) <= 4:
                chain.append(p.name)
                p = p.cpu_parent
            key = " < ".join(chain)
            syncs[key] = syncs.get(key, 0) + 1
    top = sorted(ka, key=self_of, reverse=True)[:30]
    host = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:30]
    kernel_ms = kernel_us / 1e3
    return {"top_self_ms": [[e.key[:90], round(self_of(e) / 1e3, 3), e.count] for e in top],
            "top_host_self_ms": [[e.key[:90], round(e.self_cpu_time_total / 1e3, 3), e.count] for e in host],
            # total_ms = kernel_ms (kept for older readers): device busy time, i.e. the sum
            # of the kernel / memcpy / memset durations, not of every profiler entry
            "kernel_ms": kernel_ms, "total_ms": kernel_ms, "select_ms": select_ms, "step_ms": step_ms,
            # estimator_share: select time / the variant's median step time (what the estimator
            # costs the step); estimator_share_of_kernels: / the kernel time (no host-bound gaps)
            "estimator_share": select_ms / step_ms if step_ms else None,
            "estimator_share_of_kernels": select_ms / kernel_ms if kernel_ms else None,
            "host_syncs": sum(syncs.values()),
            "sync_parents": [[k, n] for k, n in sorted(syncs.items(), key=lambda kv: -kv[1])[:15]],
            "time": "device (CUDA kernels)" if cuda else "cpu",
            "ops": ops}


def _ab_settings(fn):
    """Runtime switches of a compiled sparselora variant (no recompile): name -> setter. The
    sparse MLP's layout threshold (runtime/sparse_mlp.py): the default, context rows only
    (0), and the context part over all rows up to 4096 kept channels; and our Triton kernels
    launched through Triton's own Python path (runtime/kernels/launch.py, `ENABLED`)."""
    from sparselora_compile.runtime.kernels import launch
    run = fn.run

    def setting(all_rows_max_k, direct=True):
        def apply():
            run.mlp_all_rows_max_k = all_rows_max_k
            launch.ENABLED = direct
        return apply
    default = run.mlp_all_rows_max_k
    return {"default": setting(default), "ctxrows": setting(0), "allrows4096": setting(4096),
            "triton_launch": setting(default, direct=False)}, setting(default)


def interleaved_ab(fn, opt, batches, args, device, log, name):
    """Steps of each setting in turn (A B C A B C ...): the host's speed drifts by 15% and
    more within one process, so settings timed one after the other are not comparable."""
    settings, restore = _ab_settings(fn)
    out = {}
    try:
        for shape, stream in batches.items():
            times = {k: [] for k in settings}
            for i in range(args.ab + 1):
                for k, apply in settings.items():
                    apply()
                    sync(device)
                    t0 = time.perf_counter()
                    train_step(fn, opt, stream[i % len(stream)])
                    sync(device)
                    if i:  # round 0 warms each setting up
                        times[k].append((time.perf_counter() - t0) * 1e3)
            out[shape] = {k: {"median_ms": statistics.median(v), "steps_ms": [round(t, 2) for t in v]}
                          for k, v in times.items()}
            log(f"  {name} [{shape}] interleaved A/B, median ms: "
                + ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in out[shape].items()))
    finally:
        restore()
    return out


@dataclasses.dataclass
class Stream:
    """One mode's batches as a variant steps through them: `fixed` has one batch per
    --shapes entry (reused every step), the others warm-up + timed steps' worth."""
    mode: str
    batches: list
    warmup: int
    steps: int


class Budget:
    """--time-budget: seconds since the process started after which no new work starts."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.exceeded_at = None

    def elapsed(self) -> float:
        return time.perf_counter() - T_PROCESS

    def over(self) -> bool:
        if self.seconds is None:
            return False
        if self.exceeded_at is None and self.elapsed() > self.seconds:
            self.exceeded_at = self.elapsed()
        return self.exceeded_at is not None


class RecompileLimitWatch(logging.Handler):
    """Counts Dynamo's "hit config.recompile_limit" warnings: past the limit a frame runs
    eagerly from then on, silently but for that warning, and a step time would lie."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record):
        try:
            if "hit config." in str(record.msg):
                self.hits += 1
        except Exception:  # a logging handler must not raise
            pass


_DYNAMO_LOG = "torch._dynamo.convert_frame"


def new_shape_cost_s(timed_ms, timed_new, warm_ms, warm_new) -> float | None:
    """What first-seen shapes cost, in seconds: each such step's time beyond the median
    timed step at a seen shape, summed; warm-up steps count (recompiles, captures), the
    caller marks the variant's cold first compile as not new. None without a seen step."""
    seen = [t for t, new in zip(timed_ms, timed_new) if not new]
    if not seen:
        return None
    base = statistics.median(seen)
    steps = zip([*timed_ms, *warm_ms], [*timed_new, *warm_new])
    return sum(t - base for t, new in steps if new) / 1e3


def time_stream(fn, opt, shape, st, res, args, device, layers, log, name):
    """Warm-up, then the timed steps of one stream; returns its figures (res["shapes"][shape])."""
    from torch._dynamo.utils import counters
    stream = st.batches
    times, launch, cpu, tokens, first_seen, compiles, graphed, lens = [], [], [], [], [], [], [], []
    warm_ms, warm_new, seen = [], [], set()
    compile_step = "first_step_s" not in res  # this stream's first step is the variant's compile
    gc_watch, limit_watch = GcWatch(), RecompileLimitWatch()
    logging.getLogger(_DYNAMO_LOG).addHandler(limit_watch)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()  # peak memory per mode
    graphs_start = counters["stats"]["unique_graphs"]
    log(f"  {name} [{shape}] {st.mode}: {st.warmup} warm-up + {st.steps} timed steps")
    t_mode = time.perf_counter()
    jiffies = None
    try:
        for i in range(st.warmup + st.steps):
            if i == st.warmup:
                gc_watch.start()
                jiffies = cpu_jiffies()
            batch = stream[i % len(stream)]
            seq_shape = tuple(batch["input_ids"].shape)
            new = seq_shape not in seen
            seen.add(seq_shape)
            graphs0, graphed0 = counters["stats"]["unique_graphs"], graph_stats(fn).get("graphed_forwards", 0)
            sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            loss = train_step(fn, opt, batch)
            t_host = time.perf_counter() - t0  # host done queueing; ~dt: the host is the bottleneck
            c_host = time.thread_time() - c0  # CPU time of this thread: without time it was descheduled
            if i == 0:
                loss0 = loss.item()
            sync(device)
            dt = time.perf_counter() - t0
            if "first_step_s" not in res:  # the variant's very first step: its compile
                res["first_step_s"] = dt
                res["first_step_mode"] = shape
                res["step0_loss"] = loss0
                # A backend that fails on a data-dependent shape becomes a silent graph
                # break (Dynamo falls back): count them so such a run is visible.
                res["graph_breaks"] = sum(counters["graph_break"].values())
                res["graphs_compiled"] = counters["stats"]["unique_graphs"]
                log(f"  {name}: first step {dt:.2f} s (loss {loss0:.5f}), "
                    f"{res['graph_breaks']} graph breaks, {res['graphs_compiled']} graphs compiled")
            if i < st.warmup:
                warm_ms.append(round(dt * 1e3, 2))
                warm_new.append(new and not (compile_step and i == 0))
                if i == st.warmup - 1:
                    log(f"  {name} [{shape}] warm-up steps {warm_ms} ms, "
                        f"{counters['stats']['unique_graphs'] - graphs_start} graphs compiled")
                continue
            times.append(dt)
            launch.append(t_host)
            cpu.append(c_host)
            tokens.append(user_batches.real_tokens(batch))
            first_seen.append(new)
            compiles.append(counters["stats"]["unique_graphs"] - graphs0)
            graphed.append(graph_stats(fn).get("graphed_forwards", 0) > graphed0)
            lens.append(seq_shape[-1])
    finally:
        logging.getLogger(_DYNAMO_LOG).removeHandler(limit_watch)
        gc_stats = gc_watch.stop()
    steal = steal_share(jiffies, cpu_jiffies())
    med, mean = statistics.median(times), statistics.fmean(times)
    varying = st.mode != "fixed"
    ntok = tokens[0]
    new_ms = [t * 1e3 for t, n in zip(times, first_seen) if n]
    old_ms = [t * 1e3 for t, n in zip(times, first_seen) if not n]
    r = {
        "batches": st.mode,
        "median_ms": med * 1e3, "mean_ms": mean * 1e3, "p90_ms": quantile(times, 0.9) * 1e3,
        "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
        # fixed: one batch's tokens / the median step; varying: all non-padding tokens of
        # the timed steps / their total time (the mean throughput a user sees)
        "tokens_per_s": sum(tokens) / sum(times) if varying else ntok / med,
        "tokens_per_s_mean": sum(tokens) / sum(times),
        # what the ratios vs Inductor compare: the mean over varying batches, else the median
        "ratio_basis": "mean" if varying else "median",
        "ratio_basis_ms": (mean if varying else med) * 1e3,
        "ms_per_layer": med * 1e3 / layers,
        "host_ms": statistics.median(launch) * 1e3,
        "steps_timed": len(times), "warmup_steps_ms": warm_ms, "step0_loss": loss0, "last_loss": loss.item(),
        "distinct_shapes": len(set(lens)), "distinct_shapes_incl_warmup": len(seen),
        "first_seen_steps": len(new_ms),
        "first_seen_mean_ms": statistics.fmean(new_ms) if new_ms else None,
        "seen_mean_ms": statistics.fmean(old_ms) if old_ms else None,
        "new_shape_steps": len(new_ms) + sum(warm_new),
        "new_shape_cost_s": new_shape_cost_s([t * 1e3 for t in times], first_seen, warm_ms, warm_new),
        # Dynamo graphs compiled during the timed steps (0 once automatic dynamic has settled)
        "graphs_compiled_timed": sum(compiles),
        # ... and during the whole mode, warm-up included (its recompiles at the mode's shapes)
        "graphs_compiled_in_mode": counters["stats"]["unique_graphs"] - graphs_start,
        # Dynamo's recompile-limit warnings: a frame past the limit runs eagerly from then on
        "recompile_limit_hits": limit_watch.hits,
        "mode_wall_s": time.perf_counter() - t_mode,
        # per timed step, in order: a host-bound step's drift and spikes show here
        "steps_ms": [round(t * 1e3, 2) for t in times],
        "steps_seq_len": lens, "steps_tokens": tokens, "steps_first_seen": first_seen,
        "host_steps_ms": [round(t * 1e3, 2) for t in launch],
        "host_cpu_ms": statistics.median(cpu) * 1e3,
        "host_cpu_steps_ms": [round(t * 1e3, 2) for t in cpu], "gc": gc_stats,
        "cpu_steal_share": steal}
    collector = getattr(fn, "_collect", None)  # slc.compile's collection after compiles
    if collector is not None:
        r["collections_after_compile"] = collector.collections
    g = graph_stats(fn)
    if g:
        r["graphed_steps"] = sum(graphed)
        r["cuda_graphs"] = g
    if device.type == "cuda":
        sync(device)
        r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log(f"  {name} [{shape}]: median {med * 1e3:.2f} ms, mean {mean * 1e3:.2f}, p90 {r['p90_ms']:.2f}, "
        f"max {max(times) * 1e3:.2f} ({r['tokens_per_s']:,.0f} tok/s); warm-up {warm_ms} ms; "
        f"{r['distinct_shapes']} shapes, {len(new_ms)} first-seen steps"
        + (f" (mean {r['first_seen_mean_ms']:.2f} ms vs {r['seen_mean_ms']:.2f} seen)" if new_ms and old_ms else "")
        + f", {sum(compiles)} graphs compiled while timed ({r['graphs_compiled_in_mode']} in the mode)"
        + (f", {limit_watch.hits} RECOMPILE-LIMIT HITS" if limit_watch.hits else "")
        + (f", {sum(graphed)} graphed steps, {g.get('captures')} captures" if g else "")
        + (f", peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else "")
        + f"; host queueing {statistics.median(launch) * 1e3:.2f} ms (CPU {statistics.median(cpu) * 1e3:.2f}), "
        f"gc {gc_stats['collections_per_generation']} {gc_stats['ms']:.1f} ms, CPU steal "
        f"{'n/a' if steal is None else f'{100 * steal:.1f}%'}; mode took {r['mode_wall_s']:.1f} s")
    return r


def run_variant(name, peft, init_state, streams, args, device, layers, log, res=None,
                checkpoint=lambda: None, budget=None):
    """Compile (if any) once, then time each stream (mode) in turn; fills and returns `res`,
    the variant's figures. `checkpoint()` runs after every mode (the caller writes the JSON);
    past `budget` the mode under way finishes and the rest is listed in res["skipped"]."""
    budget = budget or Budget(None)
    res = {} if res is None else res
    full_name, (stem, flags) = name, runtime_flags(name)
    name, inductor_config = split_variant(stem)
    res.update({"variant": full_name, "shapes": {}, "inductor_config": inductor_config})
    with torch.no_grad():  # same LoRA init for every variant, in the run's adapter dtype
        for n, p in peft.named_parameters():
            if n in init_state:
                # undoes a bf16 variant's cast, also when that variant failed midway
                if p.dtype != init_state[n].dtype:
                    p.data = p.data.to(init_state[n].dtype)
                p.copy_(init_state[n])
                if name in BF16_CAST:  # what add_lora(bf16_adapters=True) does
                    p.data = p.data.to(torch.bfloat16)
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    policy, layer_map, compiled_layers = None, None, []
    inductor_choices.ROW_PERSISTENT_MAX = (inductor_choices.INDUCTOR_ROW_PERSISTENT_MAX
                                           if "_rowloop" in flags else ROW_PERSISTENT_MAX)
    if name == "eager":
        fn = peft
    elif name in ("inductor", "inductor_bf16"):
        fn = (torch.compile(peft, backend=_row_persistent_inductor(inductor_config)) if "_prow" in flags
              else torch.compile(peft, options=inductor_config or None) if args.inner == "inductor"
              else torch.compile(peft, backend=args.inner))
    elif name in ("inductor_regional", "inductor_regional_bf16"):
        from sparselora_compile.passes.blocks import decoder_layers
        fn, compiled_layers = peft, [m for _, m in decoder_layers(peft)]
        # one backend object for every layer: Dynamo recompiles for a different one
        prow = _row_persistent_inductor(inductor_config) if "_prow" in flags else None
        for m in compiled_layers:
            if prow is not None:
                m.compile(backend=prow)
            else:
                m.compile(backend=args.inner, options=inductor_config or None)
    else:
        stem = name.removesuffix("_lora_model")
        # the compiled graph computes the LoRA products in the model's dtype (bf16)
        extra = {"lora_dtype": "model"} if stem != name else {}
        if inductor_config:
            extra["inductor_config"] = inductor_config
        base, regional = (stem[:-6], False) if stem.endswith("_whole") else (stem, True)
        if base == "sl_sparsity0":
            policy = slc.Policy(mlp=0.5, attention=0.5, warmup_steps=10**9)
        else:
            preset = base[3:].removesuffix("_mlp")
            policy, layer_map = sampled_policy(preset, layers, total_steps=args.total_steps)
            if base.endswith("_mlp"):
                policy = dataclasses.replace(
                    policy, sparsity={k: v for k, v in policy.sparsity.items() if k.endswith(".mlp")})
        if "_ctxrows" in flags:
            extra["mlp_all_rows_max_k"] = 0
        if "_attn" in flags:
            extra["min_attention_sparsity_cuda"] = 0.0
        cuda_graphs.LATER_WARMUP_ITERS = 1 if "_warm1" in flags else LATER_WARMUP_ITERS
        cuda_graphs.WARMUP_ITERS = 1 if "_firstwarm1" in flags else WARMUP_ITERS
        fn = slc_compile(peft, policy, inner=args.inner, regional=regional,
                         cuda_graphs="_graphs" in flags, pad_to_multiple_of=8 if "_pad8" in flags else 0,
                         graph_bucket=next((GRAPH_BUCKETS[f] for f in flags if f in GRAPH_BUCKETS), 0),
                         graph_sets=next((GRAPH_SETS[f] for f in flags if f in GRAPH_SETS), None),
                         causal_right_padding="_masked" not in flags,
                         varlen_attention="_novarlen" not in flags,
                         padding_free="_padded" not in flags,
                         supervised_head="_suphead" in flags, **extra)
        if "_ownfill" in flags:
            fn._fill_to = lambda kwargs: None
        if base != "sl_sparsity0":
            fn.set_step(10**6)  # past the dense warm-up
    if "_unmasked" in flags:  # a dense baseline given what causal_right_padding does
        fn = unmasked(fn)
    undo_varlen = undo_head = None
    if "_suphead" in flags and not name.startswith("sl_"):  # a dense baseline given what supervised_head does
        fn, undo_head = supervised_head(fn, peft)
    if "_varlen" in flags:  # a dense baseline given what varlen_attention does
        fn, undo_varlen = varlen(fn, peft)
    opt = torch.optim.AdamW(lora_params(peft), lr=1e-5)  # after the bf16 variants' cast
    name = full_name
    from torch._dynamo.utils import counters
    counters.clear()
    peaks = []
    skipped = []
    try:
        for shape, st in streams.items():
            if budget.over():
                skipped.append(shape)
                continue
            r = res["shapes"][shape] = time_stream(fn, opt, shape, st, res, args, device, layers, log, name)
            if "peak_mem_gib" in r:
                peaks.append(r["peak_mem_gib"])
            if policy is not None and args.profile:
                if budget.over():
                    res.setdefault("skipped", []).append(f"profile {shape}")
                else:
                    # the stream's last batch: a varying stream's shapes are seen by then
                    p = res.setdefault("profile", {})[shape] = profile_step(
                        fn, opt, st.batches[-1], device, r["median_ms"])
                    log(f"  {name} [{shape}] profile: select {p['select_ms']:.2f} ms, "
                        f"{100 * (p['estimator_share'] or 0):.2f}% of the step's {p['step_ms']:.2f} ms, "
                        f"{100 * (p['estimator_share_of_kernels'] or 0):.2f}% of {p['kernel_ms']:.2f} ms "
                        f"{'kernel' if device.type == 'cuda' else 'CPU'} time; "
                        f"{p['host_syncs']} host syncs")
            if device.type == "cuda":
                res["peak_mem_gib"] = max(peaks + [torch.cuda.max_memory_allocated() / 2**30])
            checkpoint()
        if skipped:
            res.setdefault("skipped", []).extend(f"mode {s}" for s in skipped)
            log(f"  {name}: time budget spent ({budget.elapsed():.0f} s), skipped modes {skipped}")
        if policy is not None and args.ab:
            if budget.over():
                res.setdefault("skipped", []).append("ab")
            else:
                res["ab"] = interleaved_ab(fn, opt, {k: st.batches for k, st in streams.items()
                                                     if k in res["shapes"]}, args, device, log, name)
        graphs = graph_stats(fn)
        if graphs:
            res["cuda_graphs"] = graphs
            log(f"  {name}: CUDA graphs {res['cuda_graphs']}")
        if policy is not None:
            res["policy_stats"] = fn.stats.as_dict()
            if layer_map is not None:
                res["layer_map"] = layer_map
        if device.type == "cuda":
            sync(device)
            res["peak_mem_gib"] = max(peaks + [torch.cuda.max_memory_allocated() / 2**30])
        res["graphs_compiled_total"] = counters["stats"]["unique_graphs"]
    finally:
        for m in compiled_layers:  # the next variant gets the plain model back
            m._compiled_call_impl = None
        if hasattr(fn, "uncompile"):
            fn.uncompile()
        if undo_varlen is not None:
            undo_varlen()
        if undo_head is not None:
            undo_head()
        del fn, opt, policy
        free(device)
    return res


# ---- correctness on a tiny model ----------------------------------------------------------

def check_tiny(args, device, log):
    """sparselora at sparsity 0 (and Inductor) vs eager: loss and LoRA grads, bf16 model."""
    cfg = llama_config(2, smoke=True)
    model = build_model(cfg, device, seed=123)
    peft = add_lora(model, ALL if args.lora == "all" else QKVO, args.bf16_adapters, seed=124)
    ids, labels = make_batch(cfg, 2, 32, 8, device, seed=125)

    def loss_grads(fn):
        for p in lora_params(peft):
            p.grad = None
        loss = fn(input_ids=ids, labels=labels).loss
        loss.backward()
        g = torch.cat([p.grad.float().reshape(-1) for p in lora_params(peft)])
        return loss.item(), g

    ref_loss, ref_g = loss_grads(peft)
    out = {"eager_loss": ref_loss}
    ok = True
    for name in ("inductor", "sl_sparsity0"):
        torch._dynamo.reset()
        if name == "inductor":
            fn = torch.compile(peft, backend="inductor" if args.check_inner == "inductor" else args.check_inner)
        else:
            fn = slc_compile(peft, slc.Policy(mlp=0.5, attention=0.5, warmup_steps=10**9),
                             inner=args.check_inner)
        loss, g = loss_grads(fn)
        rel_loss = abs(loss - ref_loss) / abs(ref_loss)
        rel_grad = ((g - ref_g).norm() / ref_g.norm()).item()
        passed = rel_loss <= 1e-2 and rel_grad <= 5e-2
        ok &= passed
        out[name] = {"loss": loss, "rel_loss_diff": rel_loss, "rel_grad_diff": rel_grad, "pass": passed}
        log(f"  check {name} vs eager: loss {loss:.6f} vs {ref_loss:.6f} (rel {rel_loss:.2e}), "
            f"grads rel {rel_grad:.2e} -> {'PASS' if passed else 'FAIL'}")
    out["pass"] = ok
    out["inner"] = args.check_inner
    del peft, model
    free(device)
    return out


# ---- output -------------------------------------------------------------------------------

def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def env_info(device):
    import peft
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "device": str(device), "host": platform.node(),
            # the host's speed sets a host-bound step's: the kernel tells a gVisor sandbox
            # (4.4.0) from a Firecracker VM; the CPU model and its load, the rest
            "kernel": platform.release(), "cpu_model": _cpu_model(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(),
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:  # which code ran: the working tree may hold others' uncommitted changes
        import subprocess
        root = Path(__file__).resolve().parent.parent
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout
        info["git_head"] = git("rev-parse", "HEAD").strip() or None
        info["git_dirty"] = [l[3:] for l in git("status", "--porcelain").splitlines() if l.strip()]
    except Exception:
        info["git_head"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def batches_info(args, mode) -> dict:
    """What a varying batch mode feeds (recorded with its results)."""
    b = user_batches
    info = {"mode": mode, "seed": 7, "source": "bench/batches.py", "scale_of_lengths": args.seq / 512}
    if mode == "packed":
        info.update(rows=1, max_tokens=args.batch * args.seq,
                    sequences=dataclasses.asdict(b.LENGTHS["padded"].scaled(args.seq / 512)))
    else:
        info.update(dataclasses.asdict(b.LENGTHS[mode].scaled(args.seq / 512)), pad_to_multiple_of=8)
    return info


def basis_ms(s) -> float:
    """The step time a shape's ratios compare: the mean over varying batches, else the median
    (results written before there were varying batches have no ratio_basis_ms)."""
    return s.get("ratio_basis_ms", s["median_ms"])


def ratio_pair(run) -> tuple[str, str]:
    """The (fp32-adapter, bf16-adapter) dense baselines the run's ratios are against."""
    rb = run.get("ratio_baseline") or {}
    return rb.get("speedup_vs_inductor", "inductor"), rb.get("speedup_vs_inductor_bf16", "inductor_bf16")


def summarize(run):
    """Per layer count and mode: ratios vs the run's baseline pair (`speedup_vs_inductor`,
    `speedup_vs_inductor_bf16`; run["ratio_baseline"] names them) and vs every dense baseline
    run (`speedup_vs`), peak memory vs the pair, and the step-0 loss check."""
    b32, b16 = ratio_pair(run)
    for lay in run["layers"].values():
        vs = {v["variant"]: v for v in lay["variants"]}
        base, base16 = vs.get(b32), vs.get(b16)
        for v in vs.values():
            for shape, s in v["shapes"].items():
                t = basis_ms(s)
                s["speedup_vs"] = {b: basis_ms(vs[b]["shapes"][shape]) / t for b in DENSE_BASELINES
                                   if b in vs and shape in vs[b]["shapes"]}
                for key, ref in (("inductor", base), ("inductor_bf16", base16)):
                    if ref and shape in ref["shapes"]:
                        rs = ref["shapes"][shape]
                        s[f"speedup_vs_{key}"] = basis_ms(rs) / t
                        if "peak_mem_gib" in s and "peak_mem_gib" in rs:
                            s[f"peak_mem_vs_{key}"] = s["peak_mem_gib"] / rs["peak_mem_gib"]
            for key, ref in (("inductor", base), ("inductor_bf16", base16)):
                if ref and "peak_mem_gib" in v and "peak_mem_gib" in ref:
                    v[f"peak_mem_vs_{key}"] = v["peak_mem_gib"] / ref["peak_mem_gib"]
        if "eager" in vs and "step0_loss" in vs["eager"]:
            ref = vs["eager"]["step0_loss"]
            lay["step0_loss_rel_diff_vs_eager"] = {
                n: abs(v["step0_loss"] - ref) / abs(ref) for n, v in vs.items() if "step0_loss" in v}
    # per-layer slope between two layer counts (removes embedding / lm_head / loss)
    ls = sorted(int(k) for k in run["layers"])
    if len(ls) >= 2:
        lo, hi = run["layers"][str(ls[0])], run["layers"][str(ls[-1])]
        slope = {}
        vlo = {v["variant"]: v for v in lo["variants"]}
        for v in hi["variants"]:
            if v["variant"] not in vlo:
                continue
            for shape, s in v["shapes"].items():
                if shape in vlo[v["variant"]]["shapes"]:
                    d = (s["median_ms"] - vlo[v["variant"]]["shapes"][shape]["median_ms"]) / (ls[-1] - ls[0])
                    fixed = s["median_ms"] - d * ls[-1]
                    slope.setdefault(v["variant"], {})[shape] = {
                        "ms_per_layer": d, "fixed_ms": fixed,
                        "projected_32_layers_ms": fixed + 32 * d}
        run["per_layer_slope"] = {"layers": [ls[0], ls[-1]], "variants": slope}


def plot(run, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = [(lay_n, v) for lay_n, lay in run["layers"].items() for v in lay["variants"]]
    shapes = list(dict.fromkeys(s for _, v in groups for s in v["shapes"]))  # run order
    if not shapes:
        return None
    b32, b16 = ratio_pair(run)
    key = "speedup_vs_inductor_bf16" if any(v["variant"] == b16 for _, v in groups) else "speedup_vs_inductor"
    fig, axes = plt.subplots(1, len(run["layers"]), figsize=(max(6, 1.2 * len(shapes) + 4) * len(run["layers"]), 4.2),
                             squeeze=False)
    for ax, (lay_n, lay) in zip(axes[0], run["layers"].items()):
        names = [v["variant"] for v in lay["variants"]]
        w = 0.8 / max(1, len(shapes))
        for si, shape in enumerate(shapes):
            ys = [v["shapes"].get(shape, {}).get("tokens_per_s", 0) / 1e3 for v in lay["variants"]]
            xs = [i + (si - (len(shapes) - 1) / 2) * w for i in range(len(names))]
            bars = ax.bar(xs, ys, w, label=shape)
            for b, v in zip(bars, lay["variants"]):
                r = v["shapes"].get(shape, {}).get(key)
                if r:
                    ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel("k tokens / s (non-padding)")
        ax.set_title(f"{lay_n} layers, LoRA {run['lora']}, {run['env'].get('gpu', run['env']['device'])}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA training step (fwd+bwd+AdamW), ratio vs "
                 f"{b16 if key.endswith('_bf16') else b32} per mode (fixed: median; varying: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def print_table(run, log):
    vs = [v for lay in run["layers"].values() for v in lay["variants"]]
    w = max([13] + [len(v["variant"]) for v in vs])
    shapes = list(dict.fromkeys(s for v in vs for s in v["shapes"]))
    b32, b16 = ratio_pair(run)
    ab32, ab16 = ("vs_reg", "vs_r16") if b32 == "inductor_regional" else ("vs_ind", "vs_i16")
    nan = float("nan")
    log(f"\nratios vs {b32} ({ab32}) and {b16} ({ab16}), per mode; ms: fixed median, varying mean")
    log(f"layers {'variant':<{w}} mode     {'shape':<8}        ms  tok/s      {ab32}  {ab16}"
        "  peak_GiB  first_s  est_share")
    for lay_n, lay in run["layers"].items():
        for v in lay["variants"]:
            for shape, s in v["shapes"].items():
                share = v.get("profile", {}).get(shape, {}).get("estimator_share")
                log(f"{lay_n:>6} {v['variant']:<{w}} {s.get('batches', 'fixed'):<8} {shape:<8} {basis_ms(s):9.2f} "
                    f"{s['tokens_per_s']:10,.0f} {s.get('speedup_vs_inductor', nan):6.3f} "
                    f"{s.get('speedup_vs_inductor_bf16', nan):7.3f} "
                    f"{s.get('peak_mem_gib', v.get('peak_mem_gib', nan)):9.2f} {v.get('first_step_s', nan):8.2f} "
                    f"{'' if share is None else f'{100 * share:.2f}%'}")
    log(f"\nper mode, timed steps incl. first-seen shapes (ratios: mean step time with varying batches)\n"
        f"layers {'variant':<{w}} {'shape':<8}    mean   median      p90      max  tok/s      {ab32}  {ab16} shapes "
        "new: n  mean_ms seen_ms cost_s compiles graphed captures peak_GiB breaks lim_hits")
    for shape in shapes:
        for lay_n, lay in run["layers"].items():
            for v in lay["variants"]:
                s = v["shapes"].get(shape)
                if s is None:
                    continue
                fs, sm = s.get("first_seen_mean_ms"), s.get("seen_mean_ms")
                log(f"{lay_n:>6} {v['variant']:<{w}} {shape:<8} {s['mean_ms']:7.2f} {s['median_ms']:8.2f} "
                    f"{s['p90_ms']:8.2f} {s['max_ms']:8.2f} {s['tokens_per_s']:10,.0f} "
                    f"{s.get('speedup_vs_inductor', nan):6.3f} {s.get('speedup_vs_inductor_bf16', nan):7.3f} "
                    f"{s['distinct_shapes']:6d} {s['first_seen_steps']:6d} {fs or nan:8.2f} {sm or nan:7.2f} "
                    f"{s.get('new_shape_cost_s') or nan:6.2f} {s['graphs_compiled_timed']:8d} {str(s.get('graphed_steps', '-')):>7} "
                    f"{str(s.get('cuda_graphs', {}).get('captures', '-')):>8} "
                    f"{s.get('peak_mem_gib', nan):8.2f} {v.get('graph_breaks', 0):6d} "
                    f"{s.get('recompile_limit_hits', 0):8d}")
    if len(shapes) > 1:  # one line per variant: the ratio vs the bf16 baseline in every mode
        log(f"\n{ab16} ({b16}) per mode\nlayers {'variant':<{w}} " + " ".join(f"{s:>8}" for s in shapes))
        for lay_n, lay in run["layers"].items():
            for v in lay["variants"]:
                log(f"{lay_n:>6} {v['variant']:<{w}} " + " ".join(
                    f"{v['shapes'].get(s, {}).get('speedup_vs_inductor_bf16', nan):8.3f}" for s in shapes))
    if run.get("skipped"):
        log("\nskipped (time budget): " + "; ".join(
            f"{k['layers']} layers {k.get('variant', 'all variants')}: {', '.join(k['what'])}" for k in run["skipped"]))
    if "per_layer_slope" in run:
        log(f"\nper-layer slope between {run['per_layer_slope']['layers']} layers:")
        for n, d in run["per_layer_slope"]["variants"].items():
            for shape, s in d.items():
                log(f"  {n:<{w}} {shape:<8} {s['ms_per_layer']:7.2f} ms/layer, fixed {s['fixed_ms']:7.2f} ms, "
                    f"projected 32 layers {s['projected_32_layers_ms']:8.2f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[32])
    ap.add_argument("--lora", choices=("qkvo", "all"), default="qkvo")
    ap.add_argument("--bf16-adapters", action="store_true", help="cast LoRA params to bf16")
    ap.add_argument("--variants", nargs="+", type=variant_name, default=list(VARIANTS))
    ap.add_argument("--batches", nargs="+", choices=user_batches.MODES, default=["fixed"],
                    help="one or several modes, run in this order by every variant after one compile: "
                         "fixed: one repeated batch per --shapes; padded / long / packed: user-shaped "
                         "batches that change every step (bench/batches.py)")
    ap.add_argument("--baseline", choices=tuple(BASELINES), default=None,
                    help="the dense pair the ratios are against: whole (inductor, inductor_bf16; the "
                         "default) or regional (inductor_regional, inductor_regional_bf16); added when "
                         "missing if given or with a varying mode")
    ap.add_argument("--shapes", nargs="+", choices=("math10k", "csr"), default=["math10k", "csr"],
                    help="the fixed batches' output tokens (128 / 3); the fixed mode only")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per mode (and per shape of the fixed mode); default 10 for fixed, "
                         "50 for a varying mode")
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="after a sparselora variant, this many rounds of interleaved steps of its runtime "
                         "settings (default; direct_launch: runtime/kernels/launch.py switched; ctxrows: "
                         "the MLP's context part over context rows only)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per mode, reported apart (default: 3 for fixed; 2 for a varying mode: "
                         "its new shapes' recompile and the automatic-dynamic recompile at its second length)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="once the process has run this long, finish the mode under way and skip the rest "
                         "(listed in the JSON's `skipped`); the JSON and tables are still written")
    ap.add_argument("--total-steps", type=int, default=1000, help="the presets' total_steps")
    ap.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    ap.add_argument("--check-inner", default=None, choices=("inductor", "aot_eager", "eager"),
                    help="inner backend of the tiny correctness check (default: aot_eager, or --inner with --smoke)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="SDPA without its cuDNN backend: cuDNN builds a graph at each new sequence "
                         "length, once per process, so whichever variant sees a length first pays it")
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 layers, few steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="train_step", help="file stem of the JSON / PNG")
    args = ap.parse_args(argv)
    modes = list(dict.fromkeys(args.batches))  # once each, in the order given
    varying = any(m != "fixed" for m in modes)
    steps = {m: args.steps if args.steps is not None else (10 if m == "fixed" else 50) for m in modes}
    warmup = {m: args.warmup if args.warmup is not None else (3 if m == "fixed" else 2) for m in modes}
    if args.smoke:
        if args.layers == [32]:
            args.layers = [2]
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 64)
        steps = {m: min(n, 3) for m, n in steps.items()}
        warmup = {m: min(n, 1 if m == "fixed" else 2) for m, n in warmup.items()}
    baseline = args.baseline or "whole"
    if varying or args.baseline:  # the ratios need both dense baselines, measured in this process
        missing = [b for b in BASELINES[baseline] if b not in args.variants]
        args.variants = missing + args.variants
    args.variants = list(dict.fromkeys(args.variants))
    if args.check_inner is None:
        args.check_inner = args.inner if args.smoke else "aot_eager"
    device = torch.device(args.device)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{args.name}.json", out / f"{args.name}.png"
    budget = Budget(args.time_budget)

    def log(msg):
        print(f"[{budget.elapsed():7.1f}s] {msg}" if msg and not msg.startswith("\n") else msg, flush=True)

    # Several modes in one process: one variant's layer code meets every mode's inputs
    # (static, dynamic length, batch 1, a mask or none), each a cache entry; past Dynamo's
    # recompile_limit (8) a frame would run eagerly from then on. A bench artefact (a user
    # has one kind of data), so raised here; hits are counted per mode regardless.
    if len(modes) > 1 and torch._dynamo.config.recompile_limit < 64:
        torch._dynamo.config.recompile_limit = 64
    n_out = {"math10k": min(128, args.seq // 4), "csr": 3}
    b32, b16 = BASELINES[baseline]
    run = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "argv": sys.argv,
           "env": env_info(device), "smoke": args.smoke, "lora": args.lora,
           "lora_targets": ALL if args.lora == "all" else QKVO, "lora_r": 32, "lora_alpha": 64,
           "adapter_dtype": "bf16" if args.bf16_adapters else "fp32 (PEFT default)",
           "model_dtype": "bf16", "inner": args.inner,
           "batches": modes,
           # what speedup_vs_inductor / speedup_vs_inductor_bf16 (and peak_mem_vs_*) are against
           "ratio_baseline": {"baseline": baseline, "speedup_vs_inductor": b32, "speedup_vs_inductor_bf16": b16},
           "batch_shapes": {
               **({s: {"mode": "fixed", "batch": args.batch, "seq": args.seq, "output_tokens": n_out[s]}
                   for s in args.shapes} if "fixed" in modes else {}),
               **{m: batches_info(args, m) for m in modes if m != "fixed"}},
           "steps_timed": steps, "warmup_steps": warmup, "timing": (
               "device-synchronised wall time per step (fwd + bwd + AdamW on LoRA params); per mode: "
               "fixed, the median of the timed steps; a varying mode, the mean over the timed steps, "
               "first-seen shapes included; the warm-up steps apart"),
           "variants_planned": args.variants,
           "dynamo_recompile_limit": torch._dynamo.config.recompile_limit,
           "time_budget_s": args.time_budget,
           "layers": {}}

    def save():
        summarize(run)
        run["elapsed_s"] = budget.elapsed()
        if budget.exceeded_at is not None:
            run["time_budget_exceeded_at_s"] = budget.exceeded_at
        tmp = json_path.with_suffix(".json.tmp")  # never a half-written file
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(json_path)

    def skip(layers, variant, what):
        run.setdefault("skipped", []).append({"layers": layers, "variant": variant, "what": what,
                                              "reason": "time budget"})

    log(f"env: {run['env']}")
    log(f"modes {modes}, timed steps {steps}, warm-up {warmup}; variants {args.variants}; ratios vs "
        f"{b32} / {b16}" + (f"; time budget {args.time_budget:.0f} s" if args.time_budget else ""))
    if not args.no_check:
        log("correctness check (tiny model, bf16, sparsity 0 vs eager)")
        run["check"] = check_tiny(args, device, log)
        save()
    for layers in args.layers:
        if budget.over():
            skip(layers, None, [f"layer count {layers}"])
            continue
        cfg = llama_config(layers, args.smoke)
        t0 = time.perf_counter()
        model = build_model(cfg, device)
        peft = add_lora(model, run["lora_targets"], args.bf16_adapters)
        sync(device)
        log(f"{layers} layers: model built in {time.perf_counter() - t0:.1f} s, "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
            f"{sum(p.numel() for p in lora_params(peft)) / 1e6:.1f} M LoRA params")
        init_state = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
        streams = {}
        for m in modes:
            if m == "fixed":
                for s in args.shapes:
                    streams[s] = Stream(m, make_stream(m, cfg, args, n_out[s], device, 1), warmup[m], steps[m])
            else:
                streams[m] = Stream(m, make_stream(m, cfg, args, 0, device, warmup[m] + steps[m]),
                                    warmup[m], steps[m])
        lay = run["layers"][str(layers)] = {"config": {k: getattr(cfg, k) for k in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "num_hidden_layers")}, "streams": list(streams), "variants": []}
        for k, name in enumerate(args.variants):
            if budget.over():
                skip(layers, name, ["all modes"])
                log(f"{name}: skipped, time budget spent ({budget.elapsed():.0f} s)")
                continue
            log(f"variant {k + 1}/{len(args.variants)}: {name}")
            res = {"variant": name, "shapes": {}}
            lay["variants"].append(res)
            try:
                run_variant(name, peft, init_state, streams, args, device, layers, log, res=res,
                            checkpoint=save, budget=budget)
            except Exception as e:  # keep the other variants' figures
                import traceback
                traceback.print_exc()
                lay.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:2000]
                res["error"] = lay["errors"][name]
                if not res["shapes"]:
                    lay["variants"].remove(res)
                free(device)
            if res.get("skipped"):
                skip(layers, name, res["skipped"])
            save()
        del model, peft, init_state, streams
        free(device)
    save()
    run["plot"] = plot(run, png_path)
    save()
    print_table(run, log)
    if "check" in run:
        log(f"\ncorrectness check: {'PASS' if run['check']['pass'] else 'FAIL'}")
    for lay_n, lay in run["layers"].items():
        if "step0_loss_rel_diff_vs_eager" in lay:
            log(f"{lay_n} layers, step-0 loss rel. diff vs eager: " + ", ".join(
                f"{k} {v:.2e}" for k, v in lay["step0_loss_rel_diff_vs_eager"].items()))
        if lay.get("errors"):
            log(f"{lay_n} layers, errors: {lay['errors']}")
    log(f"wrote {json_path}" + (f" and {png_path}" if run["plot"] else ""))
    return 0 if run.get("check", {}).get("pass", True) else 1


if __name__ == "__main__":
    sys.exit(main())
