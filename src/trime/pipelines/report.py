"""Results tables (markdown) and plots (PNG) of a reproduce run. matplotlib is imported lazily."""

from __future__ import annotations

from pathlib import Path

from trime import io


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


def claims(results: dict) -> list[tuple[str, bool]]:
    """The paper's orderings, checked on test perplexity."""
    t = {r["name"]: r["test"]["ppl"] for r in results["systems"]}
    checks = [
        ("TrimeLM < CE", "TrimeLM", "Transformer (CE)"),
        ("TrimeLM_long < TrimeLM", "TrimeLM_long", "TrimeLM"),
        ("CE + kNN-LM < CE", "kNN-LM", "Transformer (CE)"),
        ("TrimeLM_ext < CE + kNN-LM", "TrimeLM_ext", "kNN-LM"),
    ]
    return [(text, t[a] < t[b]) for text, a, b in checks if a in t and b in t]


def plot_systems(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["systems"]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    names = [r["name"] for r in rows]
    vals = [r["test"]["ppl"] for r in rows]
    colors = ["#8c8c8c" if r["model"] == "ce" else "#3b6fb6" for r in rows]
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    for y, v in enumerate(vals[::-1]):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("test perplexity (lower is better)")
    ax.set_xlim(min(vals) * 0.9, max(vals) * 1.08)
    ax.set_title(f"{Path(results['corpus']).name} / preset {results['preset']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


def write_report(results: dict, out: Path) -> None:
    """results.json, results.md, test_ppl.png, memory_curve.png; prints the table."""
    md = table(results)
    checks = claims(results)
    text = [
        f"# trime reproduce: {results['corpus']}, preset {results['preset']}",
        "",
        md,
        "",
        "Claims of the paper, on test perplexity:",
        "",
    ]
    text += [f"- {'holds' if ok else 'does NOT hold'}: {c}" for c, ok in checks]
    text += ["", f"Total time: {results['minutes']:.1f} min."]
    results["claims"] = {c: ok for c, ok in checks}
    io.write_json(out / "results.json", results)
    with io.atomic_file(out / "results.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    try:
        plot_systems(results, out / "test_ppl.png")
        plot_memory_curve(results, out / "memory_curve.png")
    except ImportError:
        print("| matplotlib is not installed: no plots (pip install 'trime[plot]')")
    print("\n".join(text))
