"""Results tables (markdown) and plots (PNG) of a reproduce run. matplotlib is imported lazily."""

from __future__ import annotations

import math
from pathlib import Path

from trime import io
from trime.pipelines.confidence import ALPHA, Ordering, paired_perplexity, verdict


def table(results: dict) -> str:
    """The paper-shaped table: model, memory, valid and test perplexity, change against CE."""
    rows = results["systems"]
    base = next((r for r in rows if r["model"] == "ce" and r["memory"] == "none"), rows[0])
    lines = ["| model | memory | tuned | valid ppl | test ppl | test vs CE |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        tuned = ", ".join(f"{_short[k]}={v:g}" for k, v in r["settings"].items()) or "-"
        change = (r["test"]["ppl"] / base["test"]["ppl"] - 1) * 100
        lines.append(
            f"| {r['name']} | {r['memory']} | {tuned} | {r['valid']['ppl']:.2f} | {r['test']['ppl']:.2f} | "
            f"{change:+.1f}% |"
        )
    return "\n".join(lines)


_short = {"softmax_temp": "τ", "lmbda": "λ", "interp_temp": "T"}
_VERDICT = {"holds": "holds", "does NOT hold": "fails", "not shown": "not shown", True: "holds", False: "fails"}


def orderings(results: dict, out: Path | None = None) -> list[Ordering]:
    """The paper's orderings on test perplexity, each with its verdict (trime.pipelines.confidence): the
    paired bootstrap over blocks of the test set's per-token log-probabilities, kept under ``out`` by
    the job; a result without them (a run of an older version) gets "not shown"."""
    t = {r["name"]: r["test"] for r in results["systems"]}
    found = []
    for a, b in CLAIMS:
        if a not in t or b not in t:
            continue
        files = [out / t[x]["word_probs"] for x in (a, b) if out is not None and "word_probs" in t[x]]
        if len(files) == 2 and all(f.exists() for f in files):
            p, spread = paired_perplexity(io.load_npy(files[0]), io.load_npy(files[1]))
        else:
            p, spread = math.nan, "no per-token scores kept"
        found.append(verdict(f"{a} < {b}", t[a]["ppl"], t[b]["ppl"], p, spread, higher_is_better=False))
    return found


# (better, worse) on test perplexity: the paper's orderings (WikiText-103, 247M: CE 18.70 > kNN-LM 16.65;
# TrimeLM 17.76 > TrimeLM_long 17.64 > TrimeLM_ext 15.46), then what the variants test
CLAIMS = [
    ("TrimeLM", "Transformer (CE)"),
    ("TrimeLM_long", "TrimeLM"),
    ("TrimeLM_ext", "TrimeLM_long"),
    ("kNN-LM", "Transformer (CE)"),
    ("TrimeLM_ext", "kNN-LM"),
    ("TrimeLM_long, shuffled groups", "TrimeLM"),
    ("TrimeLM_long, shuffled groups", "TrimeLM_long"),
    ("TrimeLM_ext", "TrimeLM_ext, random batches"),
    ("TrimeLM_ext", "TrimeLM_ext, cross-sent ratio 0"),
]


def plot_bars(results: dict, path: Path, metric: str, baseline_model: str, xlabel: str, fmt: str) -> None:
    """One horizontal bar per system of ``results`` (its test ``metric``); the baseline model's rows grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["systems"]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 0.8), dpi=110)
    names = [r["name"] for r in rows]
    vals = [r["test"][metric] for r in rows]
    colors = ["#8c8c8c" if r["model"] == baseline_model else "#3b6fb6" for r in rows]
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    for y, v in enumerate(vals[::-1]):
        ax.text(v, y, f" {v:{fmt}}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(min(vals) * 0.9, max(vals) * 1.08)
    ax.set_title(f"{Path(results['corpus']).name} / preset {results['preset']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_systems(results: dict, path: Path) -> None:
    plot_bars(results, path, "ppl", "ce", "test perplexity (lower is better)", ".1f")


def plot_memory_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    for name, pts in results["memory_curve"].items():
        ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("long-term memory size (tokens)")
    ax.set_ylabel("valid perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# training.png: what each panel shows, from the training log (train.py, losses.memory_diagnostics)
TRAINING_PANELS = (
    ("ce_loss", "token part's cross-entropy (bits)"),
    ("mem_share", "memory share Z_mem / (Z_tok + Z_mem)"),
    ("mem_score_mean", "mean memory score s"),
    ("mem_score_max", "max memory score s"),
    ("mem_cos", "mean cosine(query, visible key)"),
    ("key_norm", "mean key norm"),
)


def plot_training(results: dict, path: Path) -> None:
    """One panel per training diagnostic, one line per model: a collapse shows as it happens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), dpi=100)
    color = {name: f"C{i}" for i, name in enumerate(results["training"])}  # one colour per model in every panel
    for ax, (key, title) in zip(axes.flat, TRAINING_PANELS):
        for name, rows in results["training"].items():
            pts = [(r["update"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2, color=color[name])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    """results.json, results.md, test_ppl.png, memory_curve.png, training.png; prints the table."""
    md = table(results)
    checks = orderings(results, out)
    text = [
        f"# trime reproduce: {results['corpus']}, preset {results['preset']}",
        "",
        md,
        "",
        "Claims of the paper, on test perplexity (paired bootstrap over blocks of 256 test tokens; "
        f"an ordering within the noise, p ≥ {ALPHA:g}, is not shown):",
        "",
    ]
    text += [o.line() for o in checks]
    text += ["", f"Total time: {results['minutes']:.1f} min."]
    results["claims"] = {o.claim: o.verdict for o in checks}
    results["orderings"] = [o.to_dict() for o in checks]
    io.write_json(out / "results.json", results)
    with io.atomic_file(out / "results.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    try:
        plot_systems(results, out / "test_ppl.png")
        plot_memory_curve(results, out / "memory_curve.png")
        if results.get("training"):
            plot_training(results, out / "training.png")
    except ImportError:
        print("| matplotlib is not installed: no plots (pip install 'trime[plot]')")
    print("\n".join(text))


def study_table(done: list[dict]) -> str:
    """Test perplexity of every system at every budget, then which orderings hold at which budget."""
    cols = [f"{r['max_update']} upd. ({r['epochs']:.1f} ep.)" for r in done]
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    names = list(dict.fromkeys(s["name"] for r in done for s in r["systems"]))
    for name in names:
        cells = [next((f"{s['test']['ppl']:.2f}" for s in r["systems"] if s["name"] == name), "-") for r in done]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ordering (test ppl) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    held = [r.get("claims", {}) for r in done]
    for claim in dict.fromkeys(c for h in held for c in h):
        lines.append(f"| {claim} | " + " | ".join(_VERDICT.get(h.get(claim), "-") for h in held) + " |")
    return "\n".join(lines)


def plot_study(done: list[dict], path: Path) -> None:
    """Left: test perplexity of every system against the budget. Right: the TRIME models (with their
    memories) relative to TrimeLM at the same budget, where the paper's orderings are read off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    names = list(dict.fromkeys(s["name"] for r in done for s in r["systems"]))
    color = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    budgets = [r["max_update"] for r in done]
    labels = [f"{r['max_update']}\n{r['epochs']:.1f} ep." for r in done]
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(11, 5.2), dpi=110)

    def points(name):
        return [(r["max_update"], s["test"]["ppl"]) for r in done for s in r["systems"] if s["name"] == name]

    for name in names:
        style = "--" if "," in name else "-"  # variants dashed
        ax.plot(*zip(*points(name)), style, marker="o", color=color[name], label=name)
    ax.set_yscale("log")
    ppl = [v for n in names for _, v in points(n)]
    step = 10 ** max(int(math.log10(max(ppl) - min(ppl) + 1e-9)) - 1, 0) * 5  # about 5–20 ticks
    ticks = [step * k for k in range(int(min(ppl) // step), int(max(ppl) // step) + 2)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("test perplexity (log scale)")

    base = {r["max_update"]: s["test"]["ppl"] for r in done for s in r["systems"] if s["name"] == "TrimeLM"}
    for name in names:
        if name.startswith("Trime") and name != "TrimeLM" and base:
            pts = [(b, 100 * (v / base[b] - 1)) for b, v in points(name) if b in base]
            rel.plot(*zip(*pts), "--" if "," in name else "-", marker="o", color=color[name], label=name)
    rel.axhline(0, color=color.get("TrimeLM", "k"), lw=1.5)
    rel.set_ylabel("test perplexity vs TrimeLM at the same budget (%)")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    for a in (ax, rel):
        a.set_xscale("log")
        a.set_xticks(budgets, labels)
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xlabel("training budget: updates (epochs), the same for every model")
        a.grid(alpha=0.3)
    fig.suptitle(f"{Path(done[0]['corpus']).name} / preset {done[0]['preset']}: test perplexity by budget", fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_study(done: list[dict], out: Path) -> None:
    """study.json, study.md and study.png of the budgets evaluated so far; prints the table."""
    md = study_table(done)
    text = [f"# trime reproduce: budget study on {done[0]['corpus']}, preset {done[0]['preset']}", "", md, ""]
    text += [f"Total time: {done[-1]['minutes']:.1f} min."]
    summary = [
        {k: r[k] for k in ("max_update", "epochs", "systems", "memory_curve", "claims", "minutes")} for r in done
    ]
    io.write_json(out / "study.json", {"preset": done[0]["preset"], "corpus": done[0]["corpus"], "budgets": summary})
    with io.atomic_file(out / "study.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    try:
        plot_study(done, out / "study.png")
    except ImportError:
        print("| matplotlib is not installed: no plot (pip install 'trime[plot]')")
    print("\n".join(text))
