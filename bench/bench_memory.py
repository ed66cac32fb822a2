"""External memory backends: queries/s of 1, 2 and 4 Ray shards against the in-process index.

    python bench/bench_memory.py [--rows 2000000] [--dim 64] [--k 1024] [--probe 8] [--json]

One synthetic datastore (``--rows`` keys of width ``--dim`` drawn around 1,024 random centres, fp16
on disk, random tokens as values), one auto-sized IVF-PQ index over it, and shard sets of 2 and 4
filled from that index's trained quantizers (``trime index build --shards N --trained``), so every
backend returns the same neighbours. For batch sizes 1, 64 and 1,024 queries (k neighbours each,
nprobe ``--probe``): queries/s of the ``local`` backend (the baseline: one index in this process,
faiss on every core or on one thread, whichever is faster, measured again just before each
backend), of ``ray`` with 1, 2 and 4 actors (each reserving cores/shards CPUs and
searching with as many faiss threads), and of ``shards`` (IndexShards in this process) with 4. The
ratio is queries/s against the baseline; the goal at batch 1,024 is the issue's "Ray overhead ≤
1.3× the in-process search", i.e. a ratio ≥ 0.77. Build times are printed too (not ratios).

On one machine Ray should not beat the in-process index (the same cores do the same work, plus
serialising the answers), and more shards on the same cores cost more: every shard searches its own
copy of the coarse quantizer and keeps its own k-heap. What Ray buys is shards on other machines;
the numbers say what one shard costs and what the fan-out adds. Measured on the shared 2-core
development machine (2026-12-07, 10M keys, d 64, 16-byte codes, 4,096 lists, k 1,024, nprobe 8):
ray/in-process at batch 1,024 was 0.97 (1 shard), 0.80 (2), 0.59 (4; 4 in-process shards: 0.46).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row, timed

from trime.memory.backends import ray_init
from trime.memory.datastore import build_datastore
from trime.memory.external import ExternalMemory
from trime.memory.index import build_index


def keys_around_centres(n: int, d: int, seed: int, n_centres: int = 1024, chunk: int = 200_000):
    """(start, keys (c, d) float32, values (c,)) blocks of n synthetic keys: centres plus noise."""
    centres = np.random.default_rng(0).standard_normal((n_centres, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for a in range(0, n, chunk):
        c = min(chunk, n - a)
        keys = centres[rng.integers(0, n_centres, c)] + 0.5 * rng.standard_normal((c, d)).astype(np.float32)
        yield a, torch.from_numpy(keys), torch.from_numpy(rng.integers(4, 30000, c))


def qps(ext: ExternalMemory, queries: torch.Tensor, batch: int, seconds: float = 3.0) -> float:
    """Queries/s of ``ext.search`` over batches of ``batch`` queries, for about ``seconds`` after a warm-up."""
    ext.search(queries[:batch])
    done, t0, i = 0, time.perf_counter(), 0
    while True:
        a = (i * batch) % (len(queries) - batch + 1)
        ext.search(queries[a : a + batch])
        done, i = done + batch, i + 1
        if time.perf_counter() - t0 >= seconds and i >= 3:
            return done / (time.perf_counter() - t0)


def baseline(local: ExternalMemory, queries: torch.Tensor, batch: int, seconds: float, cores: int) -> float:
    """Queries/s of the in-process index with faiss on every core or on one thread, whichever is faster
    (spinning OpenMP threads can lose on a shared machine)."""
    best = 0.0
    for threads in sorted({cores, 1}, reverse=True):
        faiss.omp_set_num_threads(threads)
        best = max(best, qps(local, queries, batch, seconds))
    faiss.omp_set_num_threads(cores)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    rows, say = [], (lambda m: print(m, file=sys.stderr)) if a.json else print
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        meta = {"key_type": "last_ffn_input", "vocab_size": 30000}
        blocks = keys_around_centres(a.rows, a.dim, seed=1)
        ds, t = timed(build_datastore, blocks, root / "ds", a.dim, a.rows, meta, key_dtype="float16")
        rows.append(row("memory", f"datastore write, {a.rows:,} × {a.dim} fp16 keys", t, unit="s"))
        ivf = {"flat_below": 0, "train_size": a.train_size, "probe": a.probe}
        one, t = timed(build_index, ds, root / "one.index", **ivf)
        rows.append(row("memory", "index build (train + add), one file", t, unit="s"))
        sets = {1: one}
        for n in (2, 4):
            sets[n], t = timed(build_index, ds, root / f"s{n}.index", shards=n, trained=f"{one}.trained", **ivf)
            rows.append(row("memory", f"shard set of {n} (add only, trained quantizers reused)", t, unit="s"))
        say(f"| {a.rows:,} keys, index {sum(f.stat().st_size for f in root.glob('one.index')) / 2**20:.0f} MiB")
        queries = torch.cat([b for _, b, _ in keys_around_centres(4096, a.dim, seed=2, chunk=4096)])  # (4096, d)
        ray_init("", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        local = ExternalMemory.open(ds, one, **common(a))
        batches = (1, 64, 1024)
        for name, n in (("ray", 1), ("ray", 2), ("ray", 4), ("shards", 4)):
            ext = ExternalMemory.open(ds, sets[n], backend=name, ray_cpus=cores / n, **common(a))
            for b in batches:
                base = baseline(local, queries, b, a.seconds, cores)  # measured just before: the machine is shared
                value = qps(ext, queries, b, a.seconds)
                goal = "≥ 0.77 (≤ 1.3× time)" if b == 1024 and name == "ray" else ""
                rows.append(row("memory", f"{name}, {n} shards, batch {b}", value, base, goal, "q/s"))
                say(f"| {name} {n} shards, batch {b}: {value:.0f} q/s against {base:.0f} in process")
            getattr(ext.backend, "close", lambda: None)()  # frees the actors' CPUs for the next set
    emit(rows, a.json)


def common(a) -> dict:
    return {"k": a.k, "probe": a.probe, "dim": a.dim, "vocab_size": 30000, "keytype": "last_ffn_input"}


if __name__ == "__main__":
    main()
