"""`calibrate(model, batch, flops_budget)`: a per-block sparsity map from measured sensitivity.

The SparseLoRA paper picks its per-layer sparsities from a layer study (early layers and the
last ones are sensitive). This does the study automatically on one calibration batch:

1. One dense forward records each decoder layer's input, each block's input and output.
2. For every block and every candidate sparsity, the block alone is sparsified with the
   semantics the backend trains with (`testing.reference_semantics`), using the channels
   the rank-r SVD estimator picks from the block's real input (`runtime.selection`), and
   the model is re-run *from that block's layer on* (the layers before it are unchanged,
   so their outputs are reused). Sensitivity is the change |loss - dense loss| on the
   supervised tokens (metric="loss") or the error of the block's output relative to the
   residual stream entering its layer (metric="output", which only runs the block's own
   layer: much cheaper, less faithful).
3. A greedy over (block, candidate) upgrades, cheapest sensitivity per FLOP saved first,
   until the requested fraction of the blocks' base FLOPs is saved; then a clean-up pass
   lowers upgrades that are no longer needed to meet the budget.

FLOPs are counted as `explain` counts them: base products of every found block, every
token a context token, k rounded to the policy's `k_multiple`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparselora_compile.passes.blocks import BlockInfo, ModuleBlock, base_flops_per_token, model_blocks
from sparselora_compile.runtime.row_split import compute_split

from .policy import Policy

METRICS = ("loss", "output")


@dataclass
class _Block:
    name: str          # full module path
    key: str           # "layers.N.mlp" / "layers.N.self_attn"
    layer: int
    kind: str          # "mlp" / "attention"
    module: torch.nn.Module
    info: BlockInfo
    source: ModuleBlock | None = None  # its linears by role, its layout
    factors: tuple = ()
    x: torch.Tensor | None = None     # captured block input (dense run)
    y: torch.Tensor | None = None     # captured block output (dense run)
    rows: dict = field(default_factory=dict)  # candidate -> measurement


def find_blocks(model: torch.nn.Module) -> list[_Block]:
    """Every MLP and attention block of the model's decoder layers (`passes.blocks`)."""
    found = model_blocks(model)
    if not found:
        raise ValueError("calibrate: no MLP or attention blocks found in the model's decoder layers")
    blocks = [_Block(b.info.name, b.info.key, b.info.layer, b.info.kind, b.module, b.info, b) for b in found]
    blocks.sort(key=lambda b: (b.layer, b.kind))
    return blocks


def block_flops(policy: Policy, info: BlockInfo, sparsity: float) -> tuple[int, int]:
    """(dense, sparse) base FLOPs per context token, as the planner counts them."""
    return base_flops_per_token(info, None if sparsity <= 0 else policy.kept_channels(info, sparsity))


# ---- the model, run from one layer on ----------------------------------------------------

def _decoder(model, blocks):
    """(layers ModuleList, final norm, lm_head) or None if the model is not laid out so."""
    layers_name = blocks[0].name.rsplit(".", 2)[0]  # "...model.layers"
    try:
        layers = model.get_submodule(layers_name)
        parent = model.get_submodule(layers_name.rsplit(".", 1)[0]) if "." in layers_name else model
    except AttributeError:
        return None
    norm = getattr(parent, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, torch.nn.ModuleList) or norm is None or head is None:
        return None
    return layers, norm, head


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


class _Runner:
    """Runs the model from layer i (with the dense run's input to layer i) and returns the
    mean cross-entropy of the supervised tokens."""

    def __init__(self, model, blocks, batch):
        self.model, self.batch = model, batch
        self.labels = batch["labels"]
        self.dec = _decoder(model, blocks)
        self.inputs, self.kwargs = {}, None

    def capture(self, blocks):
        """The dense forward: records layer inputs and every block's input and output."""
        handles = []
        if self.dec is not None:
            layers = self.dec[0]

            def pre(i):
                def hook(mod, args, kwargs):
                    h = args[0] if args else kwargs["hidden_states"]
                    self.inputs[i] = h.detach()
                    if self.kwargs is None:
                        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                        self.extra_args = args[1:]
                return hook
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        for b in blocks:
            first = b.source.linear(next(iter(b.source.roles)))  # reads the block's input
            handles.append(first.register_forward_pre_hook(
                lambda m, args, b=b: setattr(b, "x", args[0].detach())))
            handles.append(b.module.register_forward_hook(
                lambda m, args, out, b=b: setattr(b, "y", _out(out).detach())))
        try:
            out = self.model(**self.batch)
        finally:
            for h in handles:
                h.remove()
        if self.dec is not None and self.kwargs is None:
            self.dec = None
        return float(out.loss)

    def loss_from(self, layer: int, stop: int | None = None) -> float | None:
        """Loss of the model run from `layer` on (None if it stops early at `stop`)."""
        if self.dec is None:  # unknown layout: a full forward
            return float(self.model(**self.batch).loss) if stop is None else None
        layers, norm, head = self.dec
        h = self.inputs[layer]
        end = len(layers) if stop is None else stop + 1
        for i in range(layer, end):
            h = _out(layers[i](h, *self.extra_args, **self.kwargs))
        if stop is not None:
            return None
        tgt = self.labels[:, 1:]
        sel = tgt != -100
        logits = head(norm(h[:, :-1][sel]))
        return float(F.cross_entropy(logits.float(), tgt[sel]))


# ---- selection ---------------------------------------------------------------------------

def _selection(block: _Block, k: int, dense_rows: torch.Tensor) -> dict:
    from sparselora_compile.runtime import selection
    x = block.x
    if block.kind == "mlp" and block.source.layout == "plain":
        # the modules do not say which activation runs; the non-gated families recognised
        # (GPT-NeoX, GPT-2) use gelu or its tanh approximation, which rank alike
        (a, b, r), = block.factors
        scores = selection.plain_mlp_scores(x, a, b, r, compute_split(dense_rows), act="gelu")
        return {"idx": selection.top_channels(scores, k), "dense_rows": dense_rows}
    if block.kind == "mlp":
        (ag, bg, rg), (au, bu, ru) = block.factors
        scores = selection.mlp_scores(x, ag, bg, au, bu, rg, ru, compute_split(dense_rows))
        return {"idx": selection.top_channels(scores, k), "dense_rows": dense_rows}
    i = block.info
    iq, ik, iv, io = selection.attention_selection(x, [f[:2] for f in block.factors], compute_split(dense_rows), k, k,
                                                   i.n_heads, i.n_kv_heads, i.head_dim)
    return {"idx_q": iq, "idx_k": ik, "idx_v": iv, "idx_o": io, "dense_rows": dense_rows}


def _factors(block: _Block, rank: int):
    from sparselora_compile.runtime.estimator import estimator_factors
    return tuple(estimator_factors(w, rank) for w in block.source.estimator_weights())


# ---- the greedy ----------------------------------------------------------------------------

def _greedy(options: dict, total: float, budget: float) -> dict:
    """options: block key -> [(saved_flops, cost)] in increasing saved order (level 0 is
    (0, 0)). Returns block key -> chosen level index."""
    level = {b: 0 for b in options}
    saved = 0.0
    target = budget * total
    eps = 1e-9 * total
    while saved < target - eps:
        best = None
        for b, opts in options.items():
            s0, c0 = opts[level[b]]
            for j in range(level[b] + 1, len(opts)):
                s1, c1 = opts[j]
                if s1 <= s0:
                    continue
                ratio = max(c1 - c0, 0.0) / (s1 - s0)
                # equal ratios: the smaller step overshoots less
                key = (ratio, s1 - s0)
                if best is None or key < best[0]:
                    best = (key, b, j)
        if best is None:
            break
        _, b, j = best
        saved += options[b][j][0] - options[b][level[b]][0]
        level[b] = j
    # clean-up: lower any upgrade the budget no longer needs, most costly first
    improved = True
    while improved:
        improved = False
        best = None
        for b, opts in options.items():
            for j in range(level[b]):
                ds = opts[level[b]][0] - opts[j][0]
                dc = opts[level[b]][1] - opts[j][1]
                if saved - ds >= target - eps and dc > 0 and (best is None or dc > best[0]):
                    best = (dc, b, j, ds)
        if best is not None:
            _, b, j, ds = best
            level[b], saved = j, saved - ds
            improved = True
    return level


# ---- the entry point -------------------------------------------------------------------------

def calibrate(model: torch.nn.Module, batch: dict, flops_budget: float, *,
              kinds=("mlp", "attention"), candidates=(0.5, 0.75, 0.9, 0.95), rank: int = 8,
              metric: str = "loss", return_report: bool = False, progress: bool = True,
              **policy_kwargs):
    """A Policy whose per-block sparsity map saves `flops_budget` (a fraction in (0, 1)) of
    the found blocks' base FLOPs, spending it where the measured sensitivity is lowest.

    batch: model kwargs with `input_ids` and `labels` (and e.g. `attention_mask`).
    kinds: which block kinds may be made sparse ("mlp", "attention"); the others stay dense
        but still count in the FLOPs total, as in `explain`.
    candidates: sparsities each block may take (besides 0).
    metric: "loss" (increase of the supervised loss, the model re-run from the block's
        layer on) or "output" (the block's relative output error; one layer per forward).
    policy_kwargs: other Policy fields (warmup_fraction, total_steps, k_multiple, ...);
        `dense_layers` / `dense_edges` blocks are kept dense and not measured.
    With return_report=True returns (policy, the measured table); `resolve` re-reads it.
    Raises ValueError when the budget is not in (0, 1) or above what the largest candidate
    on every allowed block saves (the message gives that maximum).
    """
    from tqdm.auto import tqdm

    from .runtime.ops import dense_token_rows
    from .testing.reference import reference_semantics

    if "sparsity" in policy_kwargs:
        raise TypeError("calibrate() chooses the sparsity map; do not pass sparsity=")
    if metric not in METRICS:
        raise ValueError(f"calibrate metric={metric!r}; expected one of {METRICS}")
    bad_kinds = set(kinds) - {"mlp", "attention"}
    if bad_kinds:
        raise ValueError(f"calibrate kinds {sorted(bad_kinds)}: expected 'mlp' and/or 'attention'")
    cands = sorted({float(c) for c in candidates})
    if not cands or not all(0.0 < c < 1.0 for c in cands):
        raise ValueError(f"calibrate candidates {candidates!r} must be sparsities in (0, 1)")
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError("calibrate batch needs 'input_ids' and 'labels'")

    base = Policy(rank=rank, **policy_kwargs)
    blocks = find_blocks(model)
    total = float(sum(block_flops(base, b.info, 0.0)[0] for b in blocks))
    allowed = [b for b in blocks if b.kind in kinds and not base.forced_dense(b.info)]
    max_saved = sum(d - s for d, s in (block_flops(base, b.info, cands[-1]) for b in allowed)) / total
    if not isinstance(flops_budget, (int, float)) or not 0.0 < flops_budget < 1.0:
        raise ValueError(f"flops_budget={flops_budget!r} must be a fraction in (0, 1); the most "
                         f"these candidates can save is {max_saved:.4f}")
    if flops_budget > max_saved + 1e-12:
        raise ValueError(
            f"flops_budget={flops_budget:.4f} is not achievable: sparsity {cands[-1]} on every "
            f"allowed block ({len(allowed)} of {len(blocks)}, kinds={tuple(kinds)}) saves at most "
            f"{max_saved:.4f} of the base FLOPs; lower the budget or add larger candidates")

    t0 = time.perf_counter()
    labels = batch["labels"]
    if base.dense_output_tokens:
        dense_rows = dense_token_rows(labels)
    else:
        dense_rows = torch.zeros_like(labels, dtype=torch.bool)
    was_training = model.training
    model.eval()
    runner = _Runner(model, blocks, batch)
    try:
        with torch.no_grad():
            full_loss = runner.capture(blocks)
            dense_loss = runner.loss_from(0) if runner.dec is not None else full_loss
            work = [(b, c) for b in allowed for c in cands]
            bar = tqdm(work, desc="calibrate", disable=not progress, dynamic_ncols=True)
            for b in allowed:
                b.factors = _factors(b, rank)
            for b, c in bar:
                d, s = block_flops(base, b.info, c)
                k = base.kept_channels(b.info, c)
                row = {"k": k, "saved_flops_per_token": d - s, "loss_delta": None, "rel_err": None,
                       "resid_err": None}
                b.rows[c] = row
                if k >= b.info.channels or bool(dense_rows.all()):
                    row["loss_delta"], row["rel_err"], row["resid_err"] = 0.0, 0.0, 0.0
                    continue
                sel = _selection(b, k, dense_rows)
                got = {}
                h = b.module.register_forward_hook(
                    lambda m, a, out: got.__setitem__("y", _out(out)))
                try:
                    with reference_semantics(model, {b.name: sel}):
                        if metric == "loss":
                            row["loss_delta"] = runner.loss_from(b.layer) - dense_loss
                        elif runner.dec is not None:
                            runner.loss_from(b.layer, stop=b.layer)
                        else:
                            model(**batch)
                finally:
                    h.remove()
                err = (got["y"].float() - b.y.float()).norm()
                row["rel_err"] = float(err / b.y.float().norm().clamp_min(1e-30))
                # relative to the residual stream entering the layer: a block that writes
                # little into the stream matters little, however badly it is approximated
                h = runner.inputs.get(b.layer)
                row["resid_err"] = row["rel_err"] if h is None else float(
                    err / h.float().norm().clamp_min(1e-30))
                bar.set_postfix(block=b.key, s=c)
    finally:
        model.train(was_training)
        for b in blocks:
            b.x = b.y = None

    # cost of an upgrade: |loss change| (a decrease on one batch is noise, not a gift), with
    # the residual-relative output error as a small tie-breaker, so blocks whose loss
    # change is nil (e.g. the last MLP, whose context rows feed nothing when output tokens
    # are dense) still order by their error; metric="output": that error alone
    tie = 1e-3 * max(abs(dense_loss), 1e-6)
    options = {}
    for b in allowed:
        opts = [(0.0, 0.0)]
        for c in cands:
            r = b.rows[c]
            base_cost = abs(r["loss_delta"]) if metric == "loss" else 0.0
            cost = base_cost + (tie if metric == "loss" else 1.0) * r["resid_err"]
            opts.append((float(r["saved_flops_per_token"]), cost))
        options[b.key] = opts
    levels = _greedy(options, total, flops_budget)

    sparsity, table = {}, []
    chosen_saved = 0.0
    for b in blocks:
        lv = levels.get(b.key, 0)
        s = cands[lv - 1] if lv > 0 else 0.0
        sparsity[b.key] = s
        if lv > 0:
            chosen_saved += options[b.key][lv][0]
        table.append({"block": b.key, "layer": b.layer, "kind": b.kind, "channels": b.info.channels,
                      "dense_flops_per_token": block_flops(base, b.info, 0.0)[0],
                      "measured": b.kind in kinds and b in allowed,
                      "candidates": {str(c): r for c, r in b.rows.items()},
                      "chosen": s})
    report = {"flops_budget": flops_budget, "flops_saved": chosen_saved / total,
              "max_saved": max_saved, "metric": metric, "candidates": cands, "rank": rank,
              "kinds": list(kinds), "dense_loss": dense_loss, "full_forward_loss": full_loss,
              "tokens": int(labels.numel()), "output_tokens": int(dense_rows.sum()),
              "seconds": time.perf_counter() - t0, "blocks": table}
    policy = Policy(sparsity=sparsity, rank=rank, **policy_kwargs)
    if progress:
        print(f"calibrate: {len(allowed)} blocks x {len(cands)} candidates in "
              f"{report['seconds']:.0f} s; base FLOPs saved {100 * report['flops_saved']:.1f}% "
              f"(budget {100 * flops_budget:.1f}%)")
    return (policy, report) if return_report else policy


def resolve(report: dict, flops_budget: float, *, return_report: bool = False, **policy_kwargs):
    """Re-run the budget greedy on an earlier `calibrate` report (no new measurements):
    the same table, another budget. Blocks not measured then stay dense. With
    return_report=True returns (policy, the report with this budget's choices)."""
    total = float(sum(b["dense_flops_per_token"] for b in report["blocks"]))
    cands = [float(c) for c in report["candidates"]]
    metric = report["metric"]
    tie = 1e-3 * max(abs(report["dense_loss"]), 1e-6)
    options = {}
    for b in report["blocks"]:
        if not b["candidates"]:
            continue
        opts = [(0.0, 0.0)]
        for c in cands:
            r = b["candidates"][str(c)]
            base_cost = abs(r["loss_delta"]) if metric == "loss" else 0.0
            opts.append((float(r["saved_flops_per_token"]),
                         base_cost + (tie if metric == "loss" else 1.0) * r["resid_err"]))
        options[b["block"]] = opts
    max_saved = sum(o[-1][0] for o in options.values()) / total
    if not 0.0 < flops_budget < 1.0 or flops_budget > max_saved + 1e-12:
        raise ValueError(f"flops_budget={flops_budget!r} is not achievable: this table saves at "
                         f"most {max_saved:.4f}")
    levels = _greedy(options, total, flops_budget)
    sparsity = {b["block"]: (cands[levels[b["block"]] - 1] if levels.get(b["block"], 0) else 0.0)
                for b in report["blocks"]}
    rank = policy_kwargs.pop("rank", report.get("rank", 8))
    policy = Policy(sparsity=sparsity, rank=rank, **policy_kwargs)
    saved = sum(options[k][lv][0] for k, lv in levels.items()) / total
    report = {**report, "flops_budget": flops_budget, "flops_saved": saved,
              "blocks": [{**b, "chosen": sparsity[b["block"]]} for b in report["blocks"]]}
    return (policy, report) if return_report else policy
