"""Index settings for the external memory: recall@k against exact search, and queries/s.

    python bench/bench_index_recall.py [--keys model|clustered] [--rows 100000] [--k 64] [--json]

Keys. ``model`` (the default): the datastore of the tiny preset's model over a synthetic Zipf corpus
(``trime datastore`` on the training split, d = 256), queried with the keys of the valid split. The
weights are random (no trained model can be had offline here), so the keys carry the structure of
the token embeddings and positions, not of a trained LM: read the recalls as indicative. ``clustered``:
synthetic keys, Gaussian blobs around 1,000 centres (a cross-check).

Indexes (faiss factory strings; inner product, as ``trime index build`` makes for a language model):
- trime's default IVF-PQ (``IVF{lists},PQ{m}``, sized by memory.index.plan_index), with faiss's
  precomputed tables on (``use_precomputed_table``; faiss only uses them for L2 with residuals, so
  with inner product the row measures that they change nothing);
- fast-scan PQ (``PQ{m}x4fs``: 4-bit codes scanned with SIMD shuffles), bare and re-ranked by the
  exact keys (``RFlat``, k_factor 2, 8, 32: that many times k candidates re-scored exactly);
- an HNSW coarse quantizer (``IVF{lists}_HNSW32``): cheaper list selection at large list counts;
- OPQ (``OPQ{m}``: a learned rotation before PQ).
Each at a few nprobe, trained on ``--train`` sampled keys, searched on ``--threads`` threads (torch's
and faiss's alike; one by default, so that a shared machine's load moves every row alike). Exact search (one torch matmul + top-k, what trime uses for a flat index) is
the baseline of the queries/s ratio, measured on the same queries in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row


def model_keys(root: Path, rows: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(datastore keys (R, d), held-out query keys (n, d)) of the tiny preset's model, float32."""
    from bench_eval import setup

    from trime import config as C
    from trime.datastore_build import build_datastore
    from trime.memory.datastore import Datastore

    preset = C.load_preset("tiny")
    L = preset["model"]["max_positions"]
    data, ckpt = setup(root, preset, rows, queries)
    out = {}
    for split in ("train", "valid"):
        cfg = C.DatastoreConfig(data=str(data), path=str(ckpt), out=str(root / split), subset=split,
                                context_window=L // 2, device="cpu", amp="none")  # fmt: skip
        ds = Datastore.open(build_datastore(cfg))
        out[split] = ds.read_keys(0, ds.rows)
    return out["train"], out["valid"][:queries]


def clustered_keys(rows: int, queries: int, dim: int = 256, centres: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    pick = rng.integers(0, centres, rows + queries)
    x = c[pick] + 0.5 * rng.standard_normal((rows + queries, dim)).astype(np.float32)
    return x[:rows], x[rows:]


def exact(keys: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact inner-product top-k ids (n, k), torch matmul + topk."""
    kt, q = torch.from_numpy(keys), torch.from_numpy(queries)
    return torch.cat([(q[a : a + chunk] @ kt.T).topk(k, dim=1).indices for a in range(0, len(q), chunk)]).numpy()


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k."""
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def variants(lists: int, m: int) -> list[tuple[str, str, dict]]:
    """(label, factory string, extra settings)."""
    return [
        ("IVF-PQ (trime's default)", f"IVF{lists},PQ{m}", {}),
        ("IVF-PQ, precomputed tables", f"IVF{lists},PQ{m}", {"precomputed": True}),
        ("IVF-PQ fast-scan 4-bit", f"IVF{lists},PQ{m}x4fs", {}),
        ("IVF-PQ fast-scan + exact re-rank (2k)", f"IVF{lists},PQ{m}x4fs,RFlat", {"k_factor": 2}),
        ("IVF-PQ fast-scan + exact re-rank (8k)", f"IVF{lists},PQ{m}x4fs,RFlat", {"k_factor": 8}),
        ("IVF-PQ fast-scan + exact re-rank (32k)", f"IVF{lists},PQ{m}x4fs,RFlat", {"k_factor": 32}),
        ("IVF-HNSW32 coarse, PQ", f"IVF{lists}_HNSW32,PQ{m}", {}),
        ("OPQ + IVF-PQ", f"OPQ{m},IVF{lists},PQ{m}", {}),
    ]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", choices=("model", "clustered"), default="model")
    ap.add_argument("--rows", type=int, default=100_000, help="datastore keys (training tokens for model keys)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--probes", default="8,32,128")
    ap.add_argument("--train", type=int, default=40_000, help="keys sampled to train the quantizers")
    ap.add_argument("--threads", type=int, default=1, help="faiss and torch threads (the same for every row)")
    ap.add_argument("--only", default="", help="comma-separated labels' first words to keep (quick runs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import faiss

    from trime.memory.index import auto_code_size, auto_n_lists

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if a.keys == "model":
            (Path(tmp) / "m").mkdir()
            keys, queries = model_keys(Path(tmp) / "m", a.rows, a.queries)
        else:
            keys, queries = clustered_keys(a.rows, a.queries)
    R, d = keys.shape
    t = time.perf_counter()
    truth = exact(keys, queries, a.k)
    t_exact = time.perf_counter() - t
    qps_exact = len(queries) / t_exact
    lists, m = auto_n_lists(R), auto_code_size(d)[0]
    table = [("exact (torch matmul + top-k)", "-", 1.0, qps_exact, 4 * d)]
    sample = keys[np.sort(np.random.default_rng(1).choice(R, min(a.train, R), replace=False))]
    built = {}
    for label, spec, extra in variants(lists, m):
        if a.only and not any(label.startswith(x) for x in a.only.split(",")):
            continue
        if spec not in built:
            index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
            t = time.perf_counter()
            index.train(sample)
            index.add(keys)
            built[spec] = index
            print(f"built {spec} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        index = built[spec]
        ivf = faiss.extract_index_ivf(index)
        if extra.get("precomputed"):
            faiss.downcast_index(ivf).use_precomputed_table = 1
            faiss.downcast_index(ivf).precompute_table()
        if "k_factor" in extra:
            faiss.downcast_index(index).k_factor = extra["k_factor"]
        size = faiss.serialize_index(index).size / R
        for probe in (int(p) for p in a.probes.split(",")):
            ivf.nprobe = probe
            t = time.perf_counter()
            _, ids = index.search(queries, a.k)
            qps = len(queries) / (time.perf_counter() - t)
            table.append((f"{label}: {spec}", str(probe), recall(ids, truth), qps, size))
    good = [r for r in table[1:] if r[2] >= 0.95]
    best = max(good, key=lambda r: r[3]) if good else max(table[1:], key=lambda r: r[2])
    rows = [row("index recall", f"{r[0]}, nprobe {r[1]}: recall@{a.k} {r[2]:.3f}", r[3], qps_exact, unit="q/s")
            for r in table[1:]]  # fmt: skip
    rows.append(row("index recall", f"best: {best[0]}, nprobe {best[1]} (recall@{a.k} {best[2]:.3f})",
                    best[3], qps_exact, "recall ≥ 0.95, fastest", "q/s"))  # fmt: skip
    if a.json:
        emit(rows, True)
        return rows
    print(f"{a.keys} keys: R = {R}, d = {d}, {len(queries)} queries, k = {a.k}; ratio: queries/s against exact\n")
    print("| index | nprobe | recall@k | queries/s | × exact | bytes/key |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, probe, rec, qps, size in table:
        print(f"| {name} | {probe} | {rec:.3f} | {qps:.0f} | {qps / qps_exact:.2f} | {size:.0f} |")
    why = "recall ≥ 0.95, most queries/s" if good else "no setting reaches recall 0.95: the best recall"
    print(f"\nrecommended ({why}): {best[0]}, nprobe {best[1]}")
    return rows


if __name__ == "__main__":
    main()
