"""`sparselora-compile finetune` end to end on the tiny model: run record, plot, adapter;
one-line errors for bad input."""
import json
import re

import pytest
import torch

from sparselora_compile.finetune import cli
from sparselora_compile.finetune.models import tiny_llama

# The default backend end to end; its inner compiler "eager" keeps the test fast (Inductor
# costs tens of seconds per compile on 2 cores) and makes the dense twin run uncompiled.
SPARSE = ["--backend", "sparselora", "--inner", "eager"]


def _finetune(tmp_path, *args):
    out = tmp_path / "run"
    assert cli.main(["finetune", "--no-progress", "--out", str(out), *args]) == 0
    return out, json.loads((out / "run.json").read_text())


def test_table_lists_both_runs():
    rows = {"dense": False, "backend": "sparselora", "flops_saved": 0.42, "train_loss": 1.0,
            "eval_loss": 2.0, "exact_match": 0.5,
            "timing": {"first_step_s": 9.0, "steady_step_s": 1.0, "tokens_per_s": 100.0}}
    table = cli.format_table([rows, {**rows, "dense": True, "backend": "inductor", "flops_saved": 0.0}])
    head, _, *body = table.splitlines()
    assert head.split() == ["sparselora", "dense"]
    assert any(line.split()[-2:] == ["42.0%", "0.0%"] for line in body)
    assert any(line.startswith("eval exact-match") and line.split()[-1] == "50.0%" for line in body)


def _reload(adapter_dir, base=None):
    from peft import PeftModel
    base = base if base is not None else tiny_llama(seed=0)[0]
    return PeftModel.from_pretrained(base, adapter_dir)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One --compare-dense run of the default backend, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cmp")
    out, rec = _finetune(tmp, "--tiny", *SPARSE, "--steps", "3", "--eval-size", "4",
                         "--compare-dense")
    return out, rec


def test_tiny_run_writes_record_plot_and_adapter(compared):
    out, rec = compared
    assert rec["config"]["tiny"] and rec["config"]["steps"] == 3
    assert {"torch", "transformers", "peft", "sparselora_compile"} <= set(rec["versions"])
    for r in rec["runs"]:
        assert len(r["losses"]) == len(r["step_times"]) == 3
        assert all(isinstance(x, float) and x > 0 for x in r["losses"])
        assert 0.0 <= r["exact_match"] <= 1.0 and r["eval_loss"] > 0
        assert r["timing"]["train_s"] > 0 and len(r["samples"]) == 4
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The adapter reloads like any PEFT adapter and holds trained (non-zero) B matrices:
    # PEFT initialises lora_B to zero, so an untrained save would fail here.
    model = _reload(out / "adapter")
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = tiny_llama(seed=0)[0](ids).logits
        assert not torch.allclose(model(ids).logits, base)


def test_tiny_sparselora_compare_dense(compared):
    out, rec = compared
    sparse, dense = rec["runs"]
    assert (sparse["backend"], sparse["dense"]) == ("sparselora", False)
    assert (dense["backend"], dense["dense"]) == ("eager", True)
    assert set(sparse["flops"]) == {"steps", "base_flops_dense", "base_flops_executed", "saved_fraction",
                                    "unmasked_forwards", "varlen_forwards",
                                    "padding_free_forwards"}
    assert sparse["flops"]["steps"] == 3
    assert dense["flops_saved"] == 0.0
    # Same seed and data order; the tiny policy's first step is dense warm-up.
    assert sparse["losses"][0] == pytest.approx(dense["losses"][0], rel=1e-5)
    assert (out / "adapter").is_dir() and (out / "adapter_dense").is_dir()
    assert [s["prompt"] for s in sparse["samples"]] == [s["prompt"] for s in dense["samples"]]
    table = (out / "summary.txt").read_text().splitlines()
    assert table[0].split() == ["sparselora", "dense"]
    for row in ("base FLOPs saved", "train loss", "eval loss", "eval exact-match"):
        assert any(line.startswith(row) for line in table)


def test_tiny_sparselora_saves_flops(compared):
    sparse = compared[1]["runs"][0]
    f = sparse["flops"]
    assert 0 < f["base_flops_executed"] < f["base_flops_dense"]
    assert sparse["flops_saved"] == pytest.approx(f["saved_fraction"]) and sparse["flops_saved"] > 0.05


def test_user_data_and_model_dir(tmp_path):
    model, tok = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus 1?", "response": str(i + 1)}) + "\n"
                            for i in range(12)))
    _, rec = _finetune(tmp_path, "--model", str(tmp_path / "m"), "--data", str(data),
                       "--backend", "eager", "--steps", "2", "--eval-size", "4",
                       "--batch-size", "4", "--lora-targets", "all")
    r = rec["runs"][0]
    assert len(r["losses"]) == 2 and len(r["samples"]) == 4
    assert {s["prompt"] for s in r["samples"]} <= {f"{i} plus 1?" for i in range(12)}
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) >= {"gate_proj", "down_proj", "q_proj"}


def _fails(capsys, argv, *needles):
    """main(argv) exits 2 with one `sparselora-compile[ finetune]: error: ...` line, no
    traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--no-progress", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert re.match(r"sparselora-compile( finetune)?: error: ", last), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in last
    return last


def test_bad_flags_are_argparse_errors(capsys):
    _fails(capsys, ["--tiny", "--model", "x.gguf"], "not allowed with")
    _fails(capsys, ["--tiny", "--no-such-flag"], "--no-such-flag")
    _fails(capsys, ["--tiny", "--steps", "many"], "--steps", "'many'")
    _fails(capsys, ["--tiny", "--estimator", "exact"], "--estimator")
    _fails(capsys, ["--tiny", "--task", "nope"], "--task", "'nope'")


@pytest.mark.parametrize("argv, needles", [
    (["--tiny", *SPARSE, "--policy", "nope"], ["'nope'", "not a preset"]),
    (["--tiny", *SPARSE, "--policy", "missing/policy.yaml"], ["missing/policy.yaml"]),
    (["--tiny", *SPARSE, "--sparsity", "1.5"], ["1.5"]),
    (["--tiny", "--steps", "0"], ["steps must be >= 1"]),
    (["--tiny", "--backend", "nosuch"], ["'nosuch'", "not a torch.compile backend"]),
    (["--tiny", "--device", "gpu0"], ["--device 'gpu0'"]),
    (["--model", "no/such/model.gguf"], ["no/such/model.gguf"]),
    (["--tiny", "--backend", "eager", "--data", "no/such.jsonl"], ["no/such.jsonl"]),
    (["--tiny", *SPARSE, "--policy", "."], ["'.'", "not a preset"]),
    (["--tiny", "--task", "chain", "--data", "d.jsonl"], ["--task and --data"]),
])
def test_bad_values_and_missing_files_fail_in_one_line(tmp_path, capsys, argv, needles):
    _fails(capsys, [*argv, "--out", str(tmp_path / "run")], *needles)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _fails(capsys, ["--tiny", "--backend", "eager", "--steps", "1", "--eval-size", "2",
                    "--out", str(tmp_path / "file" / "run")], "file")


def test_rank_the_model_cannot_have_fails_in_one_line(tmp_path, capsys):
    """Found in the graph, at the first forward (the --tiny model's attention blocks have 32
    channels)."""
    policy = tmp_path / "rank.yaml"
    policy.write_text("mode: svd_40\nsparsity:\n  layers.1.self_attn: 0.5\n")
    _fails(capsys, ["--tiny", *SPARSE, "--policy", str(policy), "--steps", "1", "--eval-size", "2",
                    "--out", str(tmp_path / "run")], "Policy.rank=40", "rank <= 32")


def test_malformed_yaml_policy_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: [unclosed\n")
    _fails(capsys, ["--tiny", *SPARSE, "--policy", str(bad), "--out", str(tmp_path / "run")],
           "bad.yaml")


def test_backend_log_lines_reach_the_user(monkeypatch):
    """The library adds only a NullHandler; the CLI makes its INFO lines visible."""
    import logging
    monkeypatch.setattr(cli, "finetune_main", lambda a: 0)
    log = logging.getLogger("sparselora_compile")
    monkeypatch.setattr(log, "level", logging.NOTSET)
    assert cli.main(["finetune", "--tiny"]) == 0
    assert log.isEnabledFor(logging.INFO)


def test_help_lists_the_tasks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--task {arithmetic,chain}" in out and "(default: arithmetic)" in out
    assert "chain: 3-5 steps" in out


def test_tiny_chain_task(tmp_path):
    _, rec = _finetune(tmp_path, "--tiny", *SPARSE, "--task", "chain", "--steps", "2",
                       "--eval-size", "3")
    assert rec["config"]["task"] == "chain" and rec["config"]["max_len"] == 192
    r = rec["runs"][0]
    assert r["eval_n"] == 3 and 0 <= r["exact_match_hits"] <= 3
    assert all(" #### " in s["reference"] for s in r["samples"])
    assert all(" bags of " in s["prompt"] or "How many" in s["prompt"] for s in r["samples"])
