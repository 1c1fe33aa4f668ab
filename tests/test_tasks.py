"""Data: only response tokens are supervised, splits are disjoint, scoring, JSONL errors."""
import json

import pytest
import torch

from sparselora_compile.finetune import tasks
from sparselora_compile.finetune.models import tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = tiny_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def _supervised(tok, enc):
    return [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != tasks.IGNORE]


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_only_response_and_eos_are_supervised(tok, chat_tok, which):
    t = tok if which == "plain" else chat_tok
    enc = tasks.encode_example(t, "Tom has 3 apples, buys 4 more. How many apples now?", "7", 256)
    sup = _supervised(t, enc)
    assert sup[-1] == t.eos_token_id
    assert t.decode(sup[:-1]).strip() == "7"
    # Supervised ids equal the input ids at those positions, and they are a suffix.
    n = len(sup)
    assert enc["input_ids"][-n:] == sup
    assert all(l == tasks.IGNORE for l in enc["labels"][:-n])
    prompt = t.decode([i for i, l in zip(enc["input_ids"], enc["labels"]) if l == tasks.IGNORE])
    assert "buys 4 more" in prompt
    assert ("<assistant>" in prompt) == (which == "chat")
    assert ("Question:" in prompt) == (which == "plain")


def test_truncation_keeps_the_response(tok):
    enc = tasks.encode_example(tok, "x" * 500, "42", 32)
    assert len(enc["input_ids"]) == 32
    assert tok.decode(_supervised(tok, enc)[:-1]).strip() == "42"


def test_collate_pads_unsupervised_and_masked(tok):
    encs = [tasks.encode_example(tok, p, r, 256) for p, r in [("1+1?", "2"), ("a long one: 10+10?", "20")]]
    b = tasks.collate(encs, tok.pad_token_id, pad_to_multiple_of=8)
    assert b["input_ids"].shape[1] % 8 == 0
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    pad = b["attention_mask"] == 0
    assert pad[0].any()  # the shorter example was padded
    assert (b["labels"][pad] == tasks.IGNORE).all()
    assert (b["input_ids"][pad] == tok.pad_token_id).all()
    for row, e in zip(b["labels"], encs):
        assert row[: len(e["labels"])].tolist() == e["labels"]
    fixed = tasks.collate(encs, tok.pad_token_id, length=64)
    assert fixed["input_ids"].shape == (2, 64)
    with pytest.raises(ValueError, match="length=8"):
        tasks.collate(encs, tok.pad_token_id, length=8)


def test_arithmetic_answers_are_correct_and_seeded():
    a = tasks.arithmetic_task(200, "train", seed=3)
    assert a == tasks.arithmetic_task(200, "train", seed=3)
    assert a != tasks.arithmetic_task(200, "train", seed=4)
    assert len({e.prompt for e in a}) == 200
    for e in a:
        # Re-derive the answer from the text.
        words = e.prompt.replace(",", "").replace(".", "").split()
        total = int(words[2])
        clauses = e.prompt.split(", ")[1:]
        for c in clauses:
            n = int(next(w for w in c.replace(".", " ").split() if w.isdigit()))
            total += -n if c.split()[0] in ("gives", "loses", "sells", "uses") else n
        assert e.response == str(total) and total > 0


def test_held_out_split_is_disjoint_across_seeds():
    train = {e.prompt for s in range(3) for e in tasks.arithmetic_task(300, "train", seed=s)}
    evals = {e.prompt for s in range(3) for e in tasks.arithmetic_task(100, "eval", seed=s)}
    assert len(evals) > 100 and not train & evals


def test_exact_match_scoring():
    assert tasks.exact_match(["5", " 12\nmore text", "7 apples", ""], ["5", "12", "7", "3"]) == 0.5
    assert tasks.exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        tasks.exact_match(["1"], ["1", "2"])


class _EchoModel(torch.nn.Module):
    """generate() appends a fixed answer: checks the prompt/answer slicing of scoring."""

    def __init__(self, tok, answers):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.seen = tok, answers, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert (input_ids[attention_mask == 0] == self.tok.pad_token_id).all()
        assert attention_mask[:, -1].all()  # left-padded: the prompt ends at the right
        self.seen.append(input_ids)
        new = [self.tok(a, add_special_tokens=False)["input_ids"] for a in
               self.answers[: len(input_ids)]]
        self.answers = self.answers[len(input_ids):]
        n = max(map(len, new))
        new = torch.tensor([x + [self.tok.eos_token_id] * (n - len(x)) for x in new])
        return torch.cat([input_ids, new], 1)


def test_generate_answers_decodes_only_the_new_tokens(tok):
    ex = tasks.arithmetic_task(5, "eval")
    model = _EchoModel(tok, [" " + e.response for e in ex[:4]] + ["wrong"])
    preds = tasks.generate_answers(model, tok, [e.prompt for e in ex], batch_size=2)
    assert tasks.exact_match(preds, [e.response for e in ex]) == 0.8
    assert len(model.seen) == 3


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_jsonl_ok(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "a", "response": "b"}), "",
                          json.dumps({"prompt": "c", "response": "d", "extra": 1})])
    assert tasks.load_jsonl(p) == [tasks.Example("a", "b"), tasks.Example("c", "d")]


@pytest.mark.parametrize("bad,match", [
    ('{"prompt": "a"}', r"d.jsonl:2: missing key 'response'"),
    ('{"response": "a"}', r"d.jsonl:2: missing key 'prompt'"),
    ('{"prompt": "a", "response": 3}', r"d.jsonl:2: 'response' must be a string"),
    ('{"prompt": "a", ', r"d.jsonl:2: invalid JSON"),
    ('["a", "b"]', r"d.jsonl:2: expected an object"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, bad, match):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "response": "ok"}), bad])
    with pytest.raises(tasks.DataError, match=match):
        tasks.load_jsonl(p)


def test_load_jsonl_empty_and_missing(tmp_path):
    with pytest.raises(tasks.DataError, match="no examples"):
        tasks.load_jsonl(_write(tmp_path, [""]))
    with pytest.raises(tasks.DataError, match="no such file"):
        tasks.load_jsonl(tmp_path / "nope.jsonl")


def test_split_examples_disjoint_and_checked():
    ex = [tasks.Example(str(i), str(i)) for i in range(20)]
    train, ev = tasks.split_examples(ex, 5, seed=1)
    assert len(ev) == 5 and len(train) == 15 and not set(train) & set(ev)
    with pytest.raises(tasks.DataError, match="leaves no training data"):
        tasks.split_examples(ex, 20)


# ---- the chain task ---------------------------------------------------------------------

import re

# The test's own reading of the prompt text (not the generator's templates).
_OPS = [
    (r"(?:buys|finds|gets|is given) (\d+) more", lambda t, n: t + n),
    (r"(?:gives (\d+) away|loses (\d+)|sells (\d+)|uses (\d+))", lambda t, n: t - n),
    (r"doubles them|gets twice as many", lambda t, n: 2 * t),
    (r"triples them", lambda t, n: 3 * t),
    (r"(?:multiplies them by|ends up with) (\d+)(?: times as many)?", lambda t, n: t * n),
    (r"(?:shares them equally among (\d+) friends and keeps one share|"
     r"splits them into (\d+) equal piles and keeps one pile)", None),
]


def _solve(prompt):
    m = re.match(r"(\w+) has (?:(\d+) bags of (\w+) with (\d+) in each bag|(\d+) (\w+))\. "
                 r"\1 (.*)\. How many (\w+) does \1 have now\?$", prompt)
    assert m, prompt
    name, a, item1, b, start, item2, body, item = m.groups()
    assert item == (item1 or item2)
    total = int(a) * int(b) if a else int(start)
    values = [total]
    clauses = body.split(", then ")
    for c in clauses:
        for pat, fn in _OPS:
            mm = re.fullmatch(pat, c)
            if mm:
                n = next((int(g) for g in mm.groups() if g), 0)
                if fn is None:
                    assert total % n == 0, f"inexact division in {prompt!r}"
                    total //= n
                else:
                    total = fn(total, n)
                break
        else:
            raise AssertionError(f"unknown clause {c!r}")
        values.append(total)
    return total, values, len(clauses)


def test_chain_task_is_seeded_and_distinct():
    a = tasks.chain_task(300, "train", seed=5)
    assert a == tasks.chain_task(300, "train", seed=5)
    assert a != tasks.chain_task(300, "train", seed=6)
    assert len({e.prompt for e in a}) == 300


def test_chain_answers_are_correct_exact_and_multi_step():
    ex = tasks.chain_task(1000, "train", seed=0) + tasks.chain_task(500, "eval", seed=0)
    kinds = set()
    for e in ex:
        total, values, n_ops = _solve(e.prompt)
        assert 3 <= n_ops <= 5
        assert all(isinstance(v, int) and 1 <= v <= 999 for v in values), e
        assert tasks.final_answer(e.response) == str(total), e
        # the worked chain's steps are true equations ending in the answer
        steps = e.response.split(" #### ")[0].split(", ")
        for s in steps:
            lhs, rhs = s.split("=")
            x, op, y = re.fullmatch(r"(\d+)([-+*/])(\d+)", lhs).groups()
            kinds.add(op)
            want = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y),
                    "/": int(x) // int(y)}[op]
            assert op != "/" or int(x) % int(y) == 0
            assert int(rhs) == want, e
        assert int(steps[-1].split("=")[1]) == total
    assert kinds == set("+-*/")


def test_chain_held_out_split_is_disjoint_across_seeds():
    train = {e.prompt for s in range(3) for e in tasks.chain_task(1000, "train", seed=s)}
    evals = {e.prompt for s in range(3) for e in tasks.chain_task(500, "eval", seed=s)}
    assert len(evals) > 500 and not train & evals
    # and by construction: the split is a function of the prompt alone
    assert all(tasks._split_of(p) == "eval" for p in evals)


def test_chain_prompt_masked_out_of_the_loss(tok):
    e = tasks.chain_task(1, "train", seed=1)[0]
    enc = tasks.encode_example(tok, e.prompt, e.response, 1024)
    sup = _supervised(tok, enc)
    assert sup[-1] == tok.eos_token_id
    assert tok.decode(sup[:-1]).strip() == e.response
    n_prompt = len(enc["labels"]) - len(sup)
    assert all(l == tasks.IGNORE for l in enc["labels"][:n_prompt])
    assert e.prompt in tok.decode(enc["input_ids"][:n_prompt])


def test_chain_scoring_uses_the_final_answer_only():
    refs = ["2*3=6, 6+1=7 #### 7", "4-1=3, 3*2=6 #### 6", "1+1=2 #### 2"]
    preds = ["2*3=6, 6+1=8 #### 7\nnoise", "4-1=3, 3*2=6 #### 5", " 2 "]
    assert tasks.exact_hits(preds, refs, tasks.final_answer) == 2
    assert tasks.exact_match(preds, refs, tasks.get_task("chain").answer) == pytest.approx(2 / 3)
    assert tasks.final_answer("#### 12 ####  13") == "13"


def test_task_registry():
    assert tasks.DEFAULT_TASK == "arithmetic"
    assert set(tasks.TASKS) >= {"arithmetic", "chain"}
    assert tasks.get_task("arithmetic").make(5, "eval", 0) == tasks.arithmetic_task(5, "eval", 0)
    assert tasks.get_task("chain").make(5, "eval", 0) == tasks.chain_task(5, "eval", 0)
    with pytest.raises(ValueError, match="chain"):
        tasks.get_task("nope")
