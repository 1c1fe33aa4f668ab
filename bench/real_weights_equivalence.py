"""The rewrite against its reference semantics on real SmolLM2-135M weights (CPU).

Compiles the PEFT model (LoRA q,k,v,o) with the sparselora backend (`aot_eager`), runs
forward and backward on one arithmetic example, and compares the loss and every gradient
with the eager model under the reference semantics (`assert_rewrite_equivalent`).
Writes results/real_weights_equivalence.json.

    python bench/real_weights_equivalence.py
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    import sparselora_compile as slc
    from sparselora_compile.finetune.models import load_model
    from sparselora_compile.testing import assert_rewrite_equivalent

    torch.manual_seed(0)
    model, tok = load_model()
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    text = "Tom has 3 apples and buys 4 more. He gives 2 away. How many apples does he have now? Answer: 5"
    ids = tok(text, return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :-3] = -100
    with torch.no_grad():
        dense = peft_model(input_ids=ids, labels=labels).loss.item()
    policy = slc.presets.smollm2_default(estimator="svd")
    t = time.perf_counter()
    cmp = assert_rewrite_equivalent(peft_model, {"input_ids": ids, "labels": labels}, policy,
                                    atol=1e-3, rtol=1e-3)
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32)", "tokens": ids.shape[1],
        "policy": "presets.smollm2_default(estimator='svd')", "tolerance": 1e-3,
        "dense_loss": dense, "sparse_loss": cmp.loss, "reference_loss": cmp.reference_loss,
        "max_grad_error": cmp.max_grad_error, "blocks_checked": cmp.blocks_checked,
        "wall_s": time.perf_counter() - t,
    }
    out = Path(__file__).resolve().parent / "results" / "real_weights_equivalence.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
