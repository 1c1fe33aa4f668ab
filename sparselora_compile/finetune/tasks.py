"""Supervised data for the fine-tune: a built-in arithmetic task, the user's JSONL, and
encoding with the prompt masked out of the loss (SparseLoRA keeps exactly the supervised
tokens dense, so the mask must be right)."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


# ---- built-in task: multi-step arithmetic word problems -------------------------------

_NAMES = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Ken", "Zoe", "Raj", "Ida", "Leo"]
_ITEMS = ["apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps", "marbles",
          "cookies", "stickers", "balloons"]
_ADD = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
_SUB = ["gives {n} away", "loses {n}", "sells {n}", "uses {n}"]


def _split_of(prompt: str, eval_fraction: float = 0.2) -> str:
    """Stable train/eval assignment by hash, so the two splits can never share a problem
    whatever the seed or sizes."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def _problem(rng: random.Random) -> Example:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start = total = rng.randint(2, 20)
    clauses = []
    for _ in range(rng.randint(2, 3)):
        if total > 1 and rng.random() < 0.5:
            n = rng.randint(1, total - 1)  # the count stays positive
            total -= n
            clauses.append(rng.choice(_SUB).format(n=n))
        else:
            n = rng.randint(1, 9)
            total += n
            clauses.append(rng.choice(_ADD).format(n=n))
    prompt = f"{name} has {start} {item}, {', '.join(clauses)}. How many {item} now?"
    return Example(prompt, str(total))


def arithmetic_task(n: int, split: str = "train", seed: int = 0) -> list[Example]:
    """`n` distinct seeded problems from `split` ("train" or "eval"); the splits are
    disjoint by construction (hash-assigned)."""
    return _distinct(_problem, n, split, seed)


def _distinct(make, n: int, split: str, seed: int) -> list[Example]:
    """`n` distinct problems from `make(rng)` that hash into `split`; the arithmetic task
    keeps its original RNG stream (earlier results stay reproducible)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}-{split}" + (f"-{make.__name__}" if make is not _problem else ""))
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        ex = make(rng)
        if ex.prompt not in seen and _split_of(ex.prompt) == split:
            seen.add(ex.prompt)
            out.append(ex)
    raise RuntimeError(f"could not generate {n} distinct {split} problems")


# ---- built-in task: longer chains with multiplication and division ---------------------
#
# 3-5 operations on one running count (add, subtract, multiply, divide exactly), the start
# sometimes a product itself ("4 bags of 6"), so every step carries the previous result.
# The response is a worked chain on one line, "4*6=24, 24+5=29, 29*2=58 #### 58"; scoring
# compares only the final answer after "####" (exact match).

_MUL = {2: ["doubles them", "gets twice as many"], 3: ["triples them"]}
_MUL_N = ["multiplies them by {n}", "ends up with {n} times as many"]
_DIV = ["shares them equally among {n} friends and keeps one share",
        "splits them into {n} equal piles and keeps one pile"]
_CHAIN_MAX = 999  # every intermediate count stays in 1..999


def _chain_problem(rng: random.Random) -> Example:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    steps = []
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        total = a * b
        start = f"{a} bags of {item} with {b} in each bag"
        steps.append(f"{a}*{b}={total}")
    else:
        total = rng.randint(5, 60)
        start = f"{total} {item}"
    clauses = []
    n_ops = rng.randint(3, 5)
    while len(clauses) < n_ops:
        op = rng.choice("+-*/")
        prev = total
        if op == "+":
            n = rng.randint(2, 40)
            if total + n > _CHAIN_MAX:
                continue
            total += n
            clauses.append(rng.choice(_ADD).format(n=n))
        elif op == "-":
            if total < 3:
                continue
            n = rng.randint(1, min(total - 1, 40))
            total -= n
            clauses.append(rng.choice(_SUB).format(n=n))
        elif op == "*":
            n = rng.randint(2, 5)
            if total * n > _CHAIN_MAX:
                continue
            total *= n
            clauses.append(rng.choice(_MUL.get(n, []) + [t.format(n=n) for t in _MUL_N]))
        else:
            divisors = [d for d in range(2, 10) if total % d == 0 and total // d >= 1]
            if not divisors:
                continue
            n = rng.choice(divisors)
            total //= n
            clauses.append(rng.choice(_DIV).format(n=n))
        steps.append(f"{prev}{op}{n}={total}")
    body = ", then ".join(clauses)
    prompt = (f"{name} has {start}. {name} {body}. "
              f"How many {item} does {name} have now?")
    return Example(prompt, f"{', '.join(steps)} #### {total}")


def chain_task(n: int, split: str = "train", seed: int = 0) -> list[Example]:
    """`n` distinct seeded chain problems (3-5 operations, multiplication and exact
    division included) from `split`; the splits are disjoint by construction."""
    return _distinct(_chain_problem, n, split, seed)


def final_answer(text: str) -> str:
    """The answer a chain response ends with: what follows the last "####" on the first
    line (the whole first line if there is no "####")."""
    line = normalize_answer(text)
    return line.rsplit("####", 1)[-1].strip()


@dataclass(frozen=True)
class Task:
    name: str
    make: object        # fn(n, split, seed) -> list[Example]
    answer: object      # fn(text) -> the part scored by exact match
    description: str
    max_len: int = 96   # tokens per example that fit prompt and response (SmolLM2, chat)


TASKS = {
    "arithmetic": Task("arithmetic", lambda n, split, seed: arithmetic_task(n, split, seed),
                       lambda t: normalize_answer(t),
                       "2-3 additions/subtractions, answer only (the default)", 96),
    "chain": Task("chain", lambda n, split, seed: chain_task(n, split, seed), final_answer,
                  "3-5 steps with multiplication and exact division, worked chain "
                  "'a*b=c, c+d=e #### e', scored on the final answer", 192),
}
DEFAULT_TASK = "arithmetic"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


# ---- user data ------------------------------------------------------------------------

def load_jsonl(path: str | Path) -> list[Example]:
    """Read {"prompt": str, "response": str} objects, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: expected an object with \"prompt\" and "
                                f"\"response\", got {type(obj).__name__}")
            for key in ("prompt", "response"):
                if key not in obj:
                    raise DataError(f"{path}:{i}: missing key {key!r} (keys: {sorted(obj)})")
                if not isinstance(obj[key], str):
                    raise DataError(f"{path}:{i}: {key!r} must be a string, got "
                                    f"{type(obj[key]).__name__}")
            out.append(Example(obj["prompt"], obj["response"]))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def split_examples(examples: list[Example], eval_size: int, seed: int = 0):
    """(train, eval): a seeded shuffle, the first `eval_size` held out."""
    if not 0 <= eval_size < len(examples):
        raise DataError(f"eval size {eval_size} leaves no training data "
                        f"({len(examples)} examples)")
    ex = list(examples)
    random.Random(seed).shuffle(ex)
    return ex[eval_size:], ex[:eval_size]


# ---- encoding -------------------------------------------------------------------------

def prompt_text(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template if the tokenizer has
    one, else a plain Question/Answer format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return f"Question: {prompt}\nAnswer:"


def _response_text(tokenizer, response: str) -> str:
    return response if getattr(tokenizer, "chat_template", None) else " " + response


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> dict:
    """input_ids, attention_mask, labels (lists); labels are -100 on prompt tokens, so only
    the response and EOS are supervised. Prompt and response are tokenized separately so
    the prompt ids equal what generation starts from. Too long: the prompt loses its
    start."""
    p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    r = tokenizer(_response_text(tokenizer, response), add_special_tokens=False)["input_ids"]
    r = r + [tokenizer.eos_token_id]
    r = r[:max_len - 1]  # keep at least one context token to predict from
    p = p[len(p) + len(r) - max_len:] if len(p) + len(r) > max_len else p
    ids = p + r
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE] * len(p) + r}


def collate(encoded: list[dict], pad_id: int, pad_to_multiple_of: int = 1,
            length: int | None = None) -> dict:
    """Right-pad to `length`, else to the longest (rounded up); padding is masked and
    unsupervised."""
    n = max(len(e["input_ids"]) for e in encoded)
    n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    if length is not None:
        if length < n:
            raise ValueError(f"collate: an example has {n} tokens > length={length}")
        n = length
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in encoded:
        pad = n - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append(e["attention_mask"] + [0] * pad)
        batch["labels"].append(e["labels"] + [IGNORE] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---- scoring --------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def exact_hits(predictions: list[str], references: list[str], answer=None) -> int:
    """How many predictions match their reference exactly: the first line, whitespace-
    trimmed (`answer`, e.g. `final_answer`, extracts the scored part of both instead)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if answer is None:
        return sum(normalize_answer(p) == r.strip() for p, r in zip(predictions, references))
    return sum(answer(p) == answer(r) for p, r in zip(predictions, references))


def exact_match(predictions: list[str], references: list[str], answer=None) -> float:
    """Fraction of predictions whose first line equals the reference (whitespace-trimmed);
    see `exact_hits`."""
    hits = exact_hits(predictions, references, answer)
    return hits / len(references) if references else 0.0


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 8,
                     batch_size: int = 16, device=None) -> list[str]:
    """Greedy answers, from the same prompt ids as training (left-padded batches)."""
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
               for p in prompts[i:i + batch_size]]
        n = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out += tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True)
    return out
