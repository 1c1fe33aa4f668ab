"""Flash varlen attention's cost against the `max_len` it is given (CUDA).

`runtime/varlen_attention.py` hands the flash kernel the row's length N as the longest
sequence (no device sync, a static int in the graph). The kernel sizes its grid by it:
ceil(max_len / 128) row tiles per (sequence, head), most of which exit at once when the
sequences are short. This times forward + backward of one layer's attention (LLaMA-3-8B
heads) on the padded and long streams' filled rows, with max_len = N against the longest
sequence rounded up to a power of two, and the filler in 4 or 16 pieces.

    python3 bench/varlen_grid.py --out bench/results/varlen_grid.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparselora_compile.runtime.varlen_attention import _FlashVarlenCausal  # noqa: E402
from topk import time_ms  # noqa: E402  (bench/topk.py: CUDA events over `reps` calls)


def rows(mode: str, pieces: int, seed: int = 0) -> list[int]:
    """Sequence lengths of one filled row: real rows drawn uniformly near the lengths of
    bench/batches.py's streams (padded: 8 rows of 240-608 tokens; long: 4 rows of
    500-1300), then `pieces` filler sequences up to the next multiple of 1,024."""
    g = torch.Generator().manual_seed(seed)
    lo, hi, b = (240, 608, 8) if mode == "padded" else (500, 1300, 4)
    real = torch.randint(lo, hi + 1, (b,), generator=g).tolist()
    n = sum(real)
    total = -(-(n + pieces) // 1024) * 1024
    each, extra = divmod(total - n, pieces)
    return real + [each + (i < extra) for i in range(pieces)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev, hq, hkv, d = torch.device("cuda"), 32, 8, 128
    results = []
    for mode in ("padded", "long"):
        for pieces in (4, 16):
            for seed in range(args.seeds):
                seqs = rows(mode, pieces, seed)
                n = sum(seqs)
                cu = torch.tensor([0] + seqs, device=dev).cumsum(0).to(torch.int32)
                q = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(n, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(n, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                g = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
                longest = max(seqs)
                row = {"mode": mode, "filler_pieces": pieces, "seed": seed, "n": n, "sequences": len(seqs),
                       "longest": longest}
                outs = {}
                for name, m in (("max_len_n", n), ("max_len_pow2", 1 << (longest - 1).bit_length()),
                                ("max_len_exact", longest)):
                    def step(m=m):
                        o = _FlashVarlenCausal.apply(q, k, v, cu, m, d ** -0.5)
                        o.backward(g)
                        return o
                    outs[name] = step().detach().clone()
                    q.grad = k.grad = v.grad = None
                    row[name + "_ms"] = round(time_ms(step, args.reps, dev), 4)
                    q.grad = k.grad = v.grad = None
                row["same_output"] = all(torch.equal(outs["max_len_n"], o) for o in outs.values())
                results.append(row)
                print(row, flush=True)
    summary = {}
    for mode in ("padded", "long"):
        for pieces in (4, 16):
            rs = [r for r in results if r["mode"] == mode and r["filler_pieces"] == pieces]
            summary[f"{mode}_pieces{pieces}"] = {k: round(sum(r[k] for r in rs) / len(rs), 4)
                                                 for k in ("max_len_n_ms", "max_len_pow2_ms", "max_len_exact_ms")}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python3 " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "heads": [hq, hkv, d], "dtype": "bf16",
            "what": "one layer's flash varlen attention, forward + backward, mean of --reps calls (CUDA events)",
            "summary_ms": summary, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
