"""The reference SparseLoRA YAML format read into Policy keyword arguments, and its errors."""
import ast
from pathlib import Path

import pytest

from sparselora_compile.yaml_policy import policy_kwargs_from_yaml

REFERENCE = """\
model_id: meta-llama/Llama-3.1-8B
mode: svd_16
start_step: 0.1
skip_output_tokens: true
ffn_sparsity: 0.9
sparsity:
  layers.3.mlp: 0.99
  layers.3.self_attn: 0.75
  layers.4.mlp: 0
"""


def test_reference_file(tmp_path):
    path = tmp_path / "llama.yaml"
    path.write_text(REFERENCE)
    kw = policy_kwargs_from_yaml(str(path), total_steps=100)
    assert kw == {"rank": 16, "warmup_fraction": 0.1, "total_steps": 100,
                  "dense_output_tokens": True,
                  "sparsity": {"layers.3.mlp": 0.99, "layers.3.self_attn": 0.75}}
    assert policy_kwargs_from_yaml(path, total_steps=100) == kw  # a PathLike too


def test_text_defaults_and_modes():
    assert policy_kwargs_from_yaml("") == {"rank": 8, "warmup_steps": 0,
                                           "dense_output_tokens": True, "sparsity": {}}
    kw = policy_kwargs_from_yaml("mode: dense\nstart_step: 20\nskip_output_tokens: false\n"
                                 "sparsity: {layers.1.mlp: 0.5}")
    assert kw == {"warmup_steps": 20, "dense_output_tokens": False, "sparsity": {}}
    # YAML 1.1 reads 1e-2 (no dot) as a string; it is still a number here.
    assert policy_kwargs_from_yaml("sparsity: {layers.1.mlp: 1e-2}")["sparsity"] == {
        "layers.1.mlp": 0.01}


@pytest.mark.parametrize("missing", ["missing.yaml", "configs/missing.yml",
                                     "configs/llama_policy", "a/b/c.YAML.yaml"])
def test_missing_path_is_named(missing):
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        policy_kwargs_from_yaml(missing)


def test_missing_pathlike_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        policy_kwargs_from_yaml(tmp_path / "nope")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("sparsity:\n  layers.1.mlp: [0.5\n")
    with pytest.raises(ValueError, match=r"broken\.yaml, line 3, column 1: not valid YAML: expected") as e:
        policy_kwargs_from_yaml(str(path))
    assert "<unicode string>" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string"])
def test_not_a_mapping(text):
    with pytest.raises(ValueError, match="must be a mapping"):
        policy_kwargs_from_yaml(text)


@pytest.mark.parametrize("value", ["'false'", '"true"', "0", "1", "no_thanks", "null"])
def test_skip_output_tokens_must_be_a_yaml_bool(value):
    with pytest.raises(ValueError, match="skip_output_tokens must be true or false"):
        policy_kwargs_from_yaml(f"skip_output_tokens: {value}\n")


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False),
                                             ("True", True), ("no", False)])
def test_skip_output_tokens_bools(value, expected):
    kw = policy_kwargs_from_yaml(f"skip_output_tokens: {value}\n")
    assert kw["dense_output_tokens"] is expected


@pytest.mark.parametrize("mode", ["svd_0", "svd_00"])
def test_rank_below_one(mode):
    with pytest.raises(ValueError, match="rank >= 1"):
        policy_kwargs_from_yaml(f"mode: {mode}\n")


@pytest.mark.parametrize("mode", ["svd", "svd_-2", "lowrank_8", "8"])
def test_unsupported_mode(mode):
    with pytest.raises(ValueError, match="not supported"):
        policy_kwargs_from_yaml(f"mode: {mode!r}\n")


@pytest.mark.parametrize("value", ["high", "true", "[0.5]", "{a: 1}"])
def test_non_numeric_sparsity_names_the_key(value):
    with pytest.raises(ValueError, match=r"sparsity\['layers\.7\.mlp'\] must be a number"):
        policy_kwargs_from_yaml(f"sparsity:\n  layers.6.mlp: 0.5\n  layers.7.mlp: {value}\n")


def test_non_numeric_start_step_and_bad_sparsity_map():
    with pytest.raises(ValueError, match="start_step must be a number"):
        policy_kwargs_from_yaml("start_step: soon\n")
    with pytest.raises(ValueError, match="sparsity must be a mapping"):
        policy_kwargs_from_yaml("sparsity: [0.5, 0.5]\n")


def test_unknown_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\).*'sparsty'"):
        policy_kwargs_from_yaml("sparsty: {}\n")


def test_yaml_policy_is_a_leaf():
    """It imports nothing from sparselora_compile, so policy.py can import it freely."""
    import sparselora_compile.yaml_policy as mod
    tree = ast.parse(Path(mod.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("sparselora_compile")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("sparselora_compile") for a in node.names)
