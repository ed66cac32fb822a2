"""Shared pieces of the benchmarks: a synthetic prepared corpus, timing, and one row format.

Each benchmark prints rows ``| benchmark | measure | value | baseline | ratio | goal |`` where the
baseline is measured in the same run on the same machine, and ``--json`` prints them for bench/run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def synthetic_corpus(root: Path, n_train: int, n_valid: int, vocab: int = 20000, seed: int = 0) -> Path:
    """A prepared data directory of Zipf-distributed words (lines of 20 words); built once per root."""
    from trime.data.prepare import prepare
    from trime.io import is_complete

    out = root / "data-bin"
    if is_complete(out):
        return out
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    files = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        ids = rng.choice(vocab, size=n, p=p)
        lines = [" ".join(words[ids[i : i + 20]]) for i in range(0, n, 20)]
        files[split] = root / f"{split}.txt"
        files[split].write_text("\n".join(lines) + "\n")
    return prepare(files, out)


def timed(fn, *args, **kw):
    """(result, wall seconds) of one call."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def row(
    bench: str,
    measure: str,
    value: float,
    baseline: float | None = None,
    goal: str = "",
    unit: str = "",
    ratio: float | None = None,
) -> dict:
    if ratio is None and baseline:
        ratio = value / baseline
    return {
        "bench": bench,
        "measure": measure,
        "value": value,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
        "unit": unit,
    }


def emit(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("| benchmark | measure | value | baseline | ratio | goal |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.4g}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"| {r['bench']} | {r['measure']} | {r['value']:.4g} {r['unit']} | {base} | {ratio} | {r['goal']} |")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux): VmRSS, VmHWM (peak) ..."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def memory_children(script: str, kinds: tuple[str, ...], device, threads: int) -> dict[str, dict]:
    """Run ``script --memory-child KIND`` once per kind in a fresh process (so each peak is its own)
    and return the JSON dict each prints last."""
    import json
    import subprocess
    import sys

    out = {}
    for kind in kinds:
        cmd = [sys.executable, script, "--memory-child", kind, "--device", str(device), "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    return out
