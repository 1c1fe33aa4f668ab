"""On-disk cache of estimator factors (A, B) and the residual variance R, one safetensors
file per entry.

Factors cost an SVD per linear layer, so they are computed once and reused across
runs. Entries are keyed by the weight's content, never by its name, so a changed
checkpoint can never be served stale factors.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# Bump when the factor math or the file layout changes: old entries then miss.
# 2: entries hold the residual variance R next to A and B.
CACHE_FORMAT_VERSION = 2
# Below this size the weight is copied to the host and hashed byte for byte.
HOST_HASH_LIMIT_BYTES = 64 << 20
# Words per chunk of the on-device hash, to bound the temporary int64 memory.
_DEVICE_HASH_CHUNK = 1 << 22


def default_cache_dir() -> Path:
    """`$SPARSELORA_CACHE`, else `~/.cache/sparselora_compile/factors`."""
    env = os.environ.get("SPARSELORA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sparselora_compile" / "factors"


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 (wrapping arithmetic): position -> pseudo-random word."""
    x = x * -7046029254386353131  # 0x9E3779B97F4A7C15 as signed int64
    x = x ^ ((x >> 30) & ((1 << 34) - 1))  # logical shift: mask the sign-extended bits
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    return x


def _device_content_hash(flat_bytes: torch.Tensor) -> bytes:
    """Content hash computed where the tensor lives, for weights too big to copy.

    The bytes are read as uint32 words w_i and reduced to two sums of w_i * m_i
    (mod 2^64) with odd position-dependent multipliers m_i. Changing one word by
    d != 0 (|d| < 2^32) changes each sum by d * m_i, which is never 0 mod 2^64 for
    odd m_i, so any single-element change is always detected. Integer sums are
    exact, hence the result is the same on every device and reduction order.
    """
    pad = (-flat_bytes.numel()) % 4
    if pad:
        flat_bytes = torch.cat([flat_bytes, flat_bytes.new_zeros(pad)])
    words = flat_bytes.view(torch.int32)
    lanes = [torch.zeros((), dtype=torch.int64, device=words.device) for _ in range(2)]
    for start in range(0, words.numel(), _DEVICE_HASH_CHUNK):
        w = words[start : start + _DEVICE_HASH_CHUNK].to(torch.int64) & 0xFFFFFFFF
        pos = torch.arange(start, start + w.numel(), dtype=torch.int64, device=w.device)
        for lane_id in range(2):
            m = _mix64(pos * 2 + lane_id) | 1
            lanes[lane_id] = lanes[lane_id] + (w * m).sum()
    return b"".join(int(v.item()).to_bytes(8, "little", signed=True) for v in lanes)


def weight_fingerprint(weight: torch.Tensor, host_hash_limit: int = HOST_HASH_LIMIT_BYTES) -> str:
    """Hex digest of a tensor's dtype, shape and every element's bits.

    Small tensors are hashed byte for byte on the host with sha256; larger ones with
    an exact on-device integer hash (see `_device_content_hash`) to skip the copy.
    """
    t = weight.detach().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    flat_bytes = t.reshape(-1).view(torch.uint8)
    if flat_bytes.numel() <= host_hash_limit:
        h.update(b"host:")
        # a copy: numpy would mark a CPU tensor's own storage non-resizable for good, and
        # FSDP2 frees unsharded parameters by resizing their storage to 0
        h.update(flat_bytes.to("cpu", copy=True).numpy().tobytes())
    else:
        h.update(b"device:")
        h.update(_device_content_hash(flat_bytes))
    return h.hexdigest()[:32]


def factor_key(weight: torch.Tensor, rank: int, kind: str, moment_fingerprint: str = "") -> str:
    """Cache key of the factors of `weight` at `rank` for estimator `kind`."""
    parts = f"v{CACHE_FORMAT_VERSION}:{weight_fingerprint(weight)}:{rank}:{kind}:{moment_fingerprint}"
    return f"{kind}-r{rank}-" + hashlib.sha256(parts.encode()).hexdigest()[:32]


class FactorCache:
    """Directory of `<key>.safetensors` files holding tensors `A` [in, r], `B` [r, out] and
    `R` [out] (the residual variance)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str, device: torch.device | str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The cached (A, B, R), or None on a miss; an unreadable or malformed file (or one
        without R) is a miss."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            a, b, r = tensors["A"], tensors["B"], tensors["R"]
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
            return None
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or r.shape != (b.shape[1],):
            return None
        if device is not None:
            a, b, r = a.to(device), b.to(device), r.to(device)
        return a, b, r

    def put(self, key: str, a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> Path:
        """Store (A, B, R) atomically: write a temp file in the same directory, then rename."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)
        os.close(fd)
        try:
            save_file(
                {"A": a.detach().contiguous().cpu(), "B": b.detach().contiguous().cpu(),
                 "R": r.detach().contiguous().cpu()},
                tmp,
                metadata={"format_version": str(CACHE_FORMAT_VERSION), "key": key},
            )
            os.replace(tmp, self.path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return self.path(key)
