"""Benchmark batches shaped like users' fine-tuning data.

A single repeated batch flatters anything keyed on exact shapes (CUDA graphs, autotuning,
allocator reuse). Real SFT data has its own prompt and response length in every row, so
the sequence length and the split into context and output tokens change every step. The
modes, each an iterator of `steps` dicts of CPU tensors, deterministic for a seed:

    fixed   one batch repeated: `batch` rows of `seq` random tokens, the last `n_out` of
            each supervised (the bench's original batch)
    padded  SFT rows: prompt ~ a few hundred tokens, response tens to ~150; right-padded
            to the batch's longest row rounded up to a multiple of 8; `attention_mask`;
            labels -100 on prompt and padding (what DataCollatorForSeq2Seq with
            pad_to_multiple_of=8 gives)
    long    the same with batch 4, prompts a few hundred to ~900, responses up to ~400
    packed  HF DataCollatorWithFlattening: one row of at most `batch * seq` tokens holding
            whole sequences (padded mode's lengths) back to back, `position_ids`
            restarting at 0 per sequence, labels -100 on each prompt and on each
            sequence's first token (the collator's separator), no attention_mask

Lengths are log-normal (skewed to the right as real ones are), clipped to a range; the
figures are in LENGTHS. Token ids are uniform over the vocabulary except the padding id.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

import torch

MODES = ("fixed", "padded", "long", "packed")
PAD_ID = 0
IGNORE = -100


@dataclass(frozen=True)
class LogNormal:
    """A length: exp(N(log(median), sigma)), rounded, clipped to [lo, hi]."""
    median: float
    sigma: float
    lo: int
    hi: int

    def draw(self, rng: random.Random) -> int:
        return max(self.lo, min(self.hi, round(rng.lognormvariate(math.log(self.median), self.sigma))))

    def scaled(self, f: float) -> "LogNormal":
        return LogNormal(self.median * f, self.sigma, max(1, round(self.lo * f)), max(1, round(self.hi * f)))


@dataclass(frozen=True)
class Lengths:
    prompt: LogNormal
    response: LogNormal
    batch: int  # rows per batch (padded modes); packed mode takes its row length from the caller

    def scaled(self, f: float) -> "Lengths":
        """Every length times f (a tiny model's smoke run), rows per batch kept."""
        return Lengths(self.prompt.scaled(f), self.response.scaled(f), self.batch)


LENGTHS = {
    # 8 rows padded to 430-600 tokens (median ~520): the fixed batch's 8 x 512 in size
    "padded": Lengths(prompt=LogNormal(230, 0.45, 48, 448), response=LogNormal(60, 0.6, 8, 160), batch=8),
    # 4 rows padded to ~600-1300 tokens
    "long": Lengths(prompt=LogNormal(420, 0.45, 150, 900), response=LogNormal(150, 0.6, 16, 400), batch=4),
}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tokens(n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=g)  # never the padding id


def _sft_row(lengths: Lengths, vocab: int, rng: random.Random, g: torch.Generator):
    p, r = lengths.prompt.draw(rng), lengths.response.draw(rng)
    ids = _tokens(p + r, vocab, g)
    labels = ids.clone()
    labels[:p] = IGNORE
    return ids, labels


def fixed_batches(vocab: int, steps: int, batch: int = 8, seq: int = 512, n_out: int = 128,
                  seed: int = 0) -> Iterator[dict]:
    """The same batch `steps` times (the very same tensors)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq - n_out] = IGNORE
    b = {"input_ids": ids, "labels": labels}
    for _ in range(steps):
        yield b


def padded_batches(vocab: int, steps: int, lengths: Lengths, batch: int | None = None,
                   seed: int = 0, multiple: int = 8) -> Iterator[dict]:
    """Right-padded SFT batches (see the module docstring)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    batch = batch or lengths.batch
    for _ in range(steps):
        rows = [_sft_row(lengths, vocab, rng, g) for _ in range(batch)]
        t = round_up(max(len(ids) for ids, _ in rows), multiple)
        ids = torch.full((batch, t), PAD_ID, dtype=torch.long)
        labels = torch.full((batch, t), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch, t), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(rows):
            n = len(row_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = row_ids, row_labels, 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batches(vocab: int, steps: int, tokens: int, lengths: Lengths = LENGTHS["padded"],
                   seed: int = 0) -> Iterator[dict]:
    """DataCollatorWithFlattening rows of at most `tokens` tokens (see the module docstring).
    Sequences are drawn until the next would not fit; it opens the next row, so no
    sequence is cut and the row length varies from step to step."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pending = None
    for _ in range(steps):
        ids, labels, pos, used = [], [], [], 0
        while True:
            seq = pending if pending is not None else _sft_row(lengths, vocab, rng, g)
            pending = None
            n = len(seq[0])
            if used + n > tokens and used:
                pending = seq
                break
            seq_ids, seq_labels = seq[0][:tokens], seq[1][:tokens].clone()
            seq_labels[0] = IGNORE  # the collator's separator: [-100] + labels[1:]
            ids.append(seq_ids)
            labels.append(seq_labels)
            pos.append(torch.arange(len(seq_ids)))
            used += len(seq_ids)
        yield {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
               "position_ids": torch.cat(pos)[None]}


def make_batches(mode: str, vocab: int, steps: int, batch: int = 8, seq: int = 512, n_out: int = 128,
                 seed: int = 0) -> Iterator[dict]:
    """`steps` batches of `mode`. `batch` and `seq` size the fixed batch and the packed row
    (batch * seq tokens); padded and long take their rows per batch from LENGTHS and their
    lengths from it times seq / 512 (the figures are for seq 512; up to 1,304 positions)."""
    scale = seq / 512
    if mode == "fixed":
        return fixed_batches(vocab, steps, batch, seq, n_out, seed)
    if mode in ("padded", "long"):
        return padded_batches(vocab, steps, LENGTHS[mode].scaled(scale), seed=seed)
    if mode == "packed":
        return packed_batches(vocab, steps, batch * seq, LENGTHS["padded"].scaled(scale), seed=seed)
    raise ValueError(f"unknown batch mode {mode!r}: one of {MODES}")


def retokened(b: dict, vocab: int, g: torch.Generator) -> dict:
    """`b` with new token ids at its real positions (padding kept), the supervised labels
    following them: same shapes, lengths and split, other text."""
    ids = b["input_ids"]
    new = torch.where(ids == PAD_ID, ids, _tokens(ids.numel(), vocab, g).view_as(ids))
    out = dict(b, input_ids=new)
    if "labels" in b:
        out["labels"] = torch.where(b["labels"] == IGNORE, b["labels"], new)
    return out


def real_tokens(b: dict) -> int:
    """Tokens that are not padding."""
    mask = b.get("attention_mask")
    return int(mask.sum()) if mask is not None else b["input_ids"].numel()


def output_tokens(b: dict) -> int:
    """Tokens the loss supervises."""
    return int((b["labels"] != IGNORE).sum())
