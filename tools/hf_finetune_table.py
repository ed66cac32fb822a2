"""The table, plot and orderings of tools/hf_smollm2_finetune.sh: test perplexity of each model (off the
shelf, CE fine-tune, TRIME fine-tune) with each memory, from the per-token log-probs that
tools/hf_smollm2_example.sh leaves in OUT/<model>/logp-<memory>.npy, and paired bootstrap verdicts
(trime.pipelines.confidence) on the orderings the claim is about.

    python tools/hf_finetune_table.py OUT      # writes OUT/table.md, OUT/table.png, OUT/table.json
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from trime.pipelines.confidence import paired_perplexity, verdict

MODELS = {"base": "off the shelf", "ce": "CE fine-tune", "trime_long": "TRIME (`trime_long`) fine-tune"}
MEMORIES = {"none": "none", "local": "local", "long": "local + long", "knn": "kNN-LM"}
SWEEPS = {"local": ("local", r"--softmax-temp [^ ]+"), "long": ("long", r"--softmax-temp [^ ]+"),
          "knn": ("knn", r"--lmbda [^ ]+ --interp-temp [^ ]+")}  # fmt: skip


def tuned(run: Path, memory: str) -> str:
    """The setting the example's sweep chose on valid for this memory ("" for none)."""
    if memory not in SWEEPS:
        return ""
    name, pattern = SWEEPS[memory]
    best = [line for line in (run / f"sweep-{name}.txt").read_text().splitlines() if "| best:" in line]
    found = re.search(pattern, best[-1]) if best else None
    return found.group(0) if found else "?"


def ppl(logp: np.ndarray) -> float:
    return math.exp(-float(np.mean(logp)))


def ordering(claim: str, a: np.ndarray, b: np.ndarray):
    """Verdict on "a has lower perplexity than b" over the same test tokens."""
    p, spread = paired_perplexity(a, b)
    return verdict(claim, ppl(a), ppl(b), p, spread, higher_is_better=False)


def main(out: Path) -> None:
    logp = {(m, k): np.load(out / m / f"logp-{k}.npy") for m in MODELS for k in MEMORIES}
    n = {len(v) for v in logp.values()}
    if len(n) != 1:
        raise SystemExit(f"the settings scored different numbers of test tokens: {sorted(n)}")
    rows = []
    for m, model in MODELS.items():
        none = ppl(logp[m, "none"])
        cells = []
        for k in MEMORIES:
            v = ppl(logp[m, k])
            rel = "" if k == "none" else f" ({100 * (v / none - 1):+.1f}%)"
            cells.append(f"{v:.2f}{rel}")
        settings = ", ".join(f"{MEMORIES[k]}: {tuned(out / m, k)}" for k in SWEEPS)
        rows.append(f"| {model} | " + " | ".join(cells) + f" | {settings} |")
    orderings = [
        ordering(f"{MODELS[m]}: {MEMORIES[k]} < none", logp[m, k], logp[m, "none"])
        for m in MODELS
        for k in ("local", "long", "knn")
    ] + [
        ordering(f"{MEMORIES[k]}: TRIME fine-tune < CE fine-tune", logp["trime_long", k], logp["ce", k])
        for k in MEMORIES
    ]
    head = (
        "| model | " + " | ".join(MEMORIES.values()) + " | tuned on valid |\n|---|" + "---:|" * len(MEMORIES) + "---|"
    )
    text = "\n".join([f"Test perplexity, the first {n.pop():,} tokens of the test split (vs none):", "", head, *rows,
                      "", "Orderings (paired bootstrap over blocks of 256 tokens, 1,000 resamples):", "",
                      *(o.line() for o in orderings)])  # fmt: skip
    (out / "table.md").write_text(text + "\n")
    table = {f"{m}/{k}": ppl(v) for (m, k), v in logp.items()}
    (out / "table.json").write_text(json.dumps({"ppl": table, "orderings": [o.to_dict() for o in orderings]}, indent=1))
    plot(logp, out / "table.png")
    print(text)


def plot(logp: dict, path: Path) -> None:
    """What each memory does to each model: the change of test perplexity against the same model without memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memories = [k for k in MEMORIES if k != "none"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    width = 0.8 / len(MODELS)
    colors = ["#8c8c8c", "#d08c3c", "#3b6fb6"]
    for i, (m, model) in enumerate(MODELS.items()):
        none = ppl(logp[m, "none"])
        xs = np.arange(len(memories)) + (i - (len(MODELS) - 1) / 2) * width
        vals = [100 * (ppl(logp[m, k]) / none - 1) for k in memories]
        label = f"{model.replace('`', '')} (no memory: {none:.1f})"
        ax.bar(xs, vals, width, label=label, color=colors[i])
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:+.1f}%", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(memories)), [f"+ {MEMORIES[k]} memory" for k in memories])
    ax.set_ylabel("test perplexity vs no memory (%)\n(below 0: the memory helps)")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo))
    ax.set_title("SmolLM2-135M on Hamlet: what each memory does to each model", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
