"""Where the time of each external-memory consumer goes: forward, search, scoring, copies, the rest.

    python bench/profile_memory.py [--consumers eval,neighbors,generate,mt] [--repeats 3] [--json]

Consumers (random weights of the tiny / mt_cpu presets, a synthetic Zipf corpus, k = 64; MT k = 16):
- ``eval``: ``trime eval --use-external`` over a flat (exact) index and over an IVF-PQ index;
- ``neighbors``: the same with ``--save-neighbors`` (the rows ``trime sweep`` reads);
- ``generate``: greedy LM generation with the KV cache and the external memory;
- ``mt``: beam-5 kNN-MT and TrimeMT decoding over an IVF-PQ index (``--mt-modes``).

Each is run once to warm up, then ``--repeats`` times with and without the memory; the table gives
the medians. Buckets are *exclusive* wall-clock times of the seams they name, measured by wrapping
those functions from this script only (the library carries no instrumentation):
- forward: the model (TransformerLM.forward, the MT encoder and decoder step) and its output layer;
- search: the index itself (faiss ``search``, or the exact torch matmul + top-k of a flat index);
- copies: torch↔numpy conversions and value look-ups around the search (Index.search, the backend);
- score: the memories' scores and the joint softmax / interpolation (memory.scoring, the combiner);
- write: neighbour rows written for ``trime sweep``;
- rest: everything else (windows, batching, the beam search's bookkeeping, the FIFO).
A search that runs in a background thread while the model computes is counted where it runs but
hidden from the wall clock; ``overlap`` is then the seconds it did not cost.

The machine may be shared: read the ratios within one run, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row

from trime import config as C

BUCKETS = ("forward", "search", "copies", "score", "write")


class Seams:
    """Exclusive wall-clock seconds per bucket of the functions it wraps (nested wrapped calls are
    subtracted from their caller); thread-safe, so a search in a worker thread counts too."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._undo: list[tuple[object, str, object]] = []

    def timed(self, fn, bucket: str):
        def wrapper(*args, **kw):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t
                inner = stack.pop()
                with self._lock:
                    self.seconds[bucket] += dt - inner
                if stack:
                    stack[-1] += dt

        return wrapper

    def wrap(self, owner, name: str, bucket: str) -> None:
        """Replace ``owner.name`` (a class's method or a module's function) by its timed twin."""
        raw = owner.__dict__[name]
        fn = raw.__func__ if isinstance(raw, classmethod) else raw
        new = self.timed(fn, bucket)
        setattr(owner, name, classmethod(new) if isinstance(raw, classmethod) else new)
        self._undo.append((owner, name, raw))

    def reset(self) -> None:
        self.seconds.clear()

    def undo(self) -> None:
        for owner, name, raw in reversed(self._undo):
            setattr(owner, name, raw)
        self._undo.clear()


class _TimedFaiss:
    """A faiss index whose ``search`` is timed as the search bucket; everything else passes through."""

    def __init__(self, index, seams: Seams):
        self._index = index
        self.search = seams.timed(index.search, "search")

    def __getattr__(self, name):
        return getattr(self._index, name)


def instrument(seams: Seams) -> None:
    """Wrap the seams of every consumer (module docstring)."""
    import trime.evaluate as ev
    import trime.generate.lm as lm
    from trime.generate.memory import MemoryCombiner
    from trime.memory import backends, index, neighbors
    from trime.model import adaptive, encoder_decoder, transformer

    for cls, names in (
        (transformer.TransformerLM, ("forward",)),
        (adaptive.AdaptiveSoftmax, ("target_logp", "log_probs")),
        (adaptive.PlainSoftmax, ("target_logp", "log_probs", "log_probs_and_log_z")),
        (encoder_decoder.TransformerMT, ("encode", "decode_step")),
    ):
        for name in names:
            if name in cls.__dict__:
                seams.wrap(cls, name, "forward")
    seams.wrap(index.Index, "_exact_search", "search")
    seams.wrap(index.Index, "search", "copies")
    seams.wrap(backends.LocalMemory, "search", "copies")
    init = index.Index.__init__

    def timed_init(self, faiss_index, info, path):
        init(self, _TimedFaiss(faiss_index, seams), info, path)

    index.Index.__init__ = timed_init
    seams._undo.append((index.Index, "__init__", init))
    for owner, name in ((ev, "log_probs"), (ev.Scorer, "window_rows"), (lm, "vocab_log_probs"),
                        (lm.LMDecoder, "_rows"), (MemoryCombiner, "_mix"), (MemoryCombiner, "__call__")):  # fmt: skip
        seams.wrap(owner, name, "score")
    seams.wrap(neighbors.NeighborCacheWriter, "add_rows", "write")


# -- the consumers: each returns a function () -> units done (tokens or sentences) -------------------


def lm_setup(root: Path, n_train: int, n_valid: int) -> dict:
    """A tiny LM, its datastore over the training split, a flat and an IVF-PQ index over it."""
    from bench_eval import setup

    from trime.datastore_build import build_datastore
    from trime.memory.index import build_index

    preset = C.load_preset("tiny")
    root.mkdir(parents=True, exist_ok=True)
    data, ckpt = setup(root, preset, n_train, n_valid)
    L = preset["model"]["max_positions"]
    build_datastore(C.DatastoreConfig(data=str(data), path=str(ckpt), out=str(root / "dstore"), context_window=L // 2,
                                      batch_size=8, device="cpu", amp="none"))  # fmt: skip
    flat = build_index(root / "dstore", root / "dstore" / "flat.ip", metric="ip")
    ivf = build_index(root / "dstore", root / "dstore" / "ivfpq.ip", metric="ip", n_lists=256)
    return {"data": data, "ckpt": ckpt, "L": L, "root": root, "flat": flat, "ivfpq": ivf}


def eval_job(env: dict, tokens: int, memory: str | None, neighbors: bool = False, overlap: bool | None = None):
    import trime.evaluate as ev

    base = {"data": str(env["data"]), "path": str(env["ckpt"]), "device": "cpu", "amp": "none",
            "context_window": env["L"] // 2, "batch_size": 8, "max_eval_tokens": tokens}  # fmt: skip
    if memory:
        base |= {"use_external": True, "dstore": str(env["root"] / "dstore"), "indexfile": str(env[memory]), "k": 64}
    if neighbors:
        base |= {"save_neighbors": str(env["root"] / "nb")}
    cfg = C.build(C.EvalConfig, base)

    def run():
        ev.OVERLAP_SEARCH = overlap
        try:
            return ev.evaluate(cfg).n_tokens
        finally:
            ev.OVERLAP_SEARCH = None

    return run


def generate_job(env: dict, new_tokens: int, memory: str | None):
    from bench_generate import generate_tokens

    from trime.data.prepare import load_split

    prompt = [int(t) for t in load_split(env["data"], "valid")[: env["L"] // 4]]
    base = {"path": str(env["ckpt"]), "device": "cpu", "amp": "none", "context_window": env["L"] // 2,
            "max_new_tokens": new_tokens, "stop_at_eos": False}  # fmt: skip
    if memory:
        base |= {"use_external": True, "dstore": str(env["root"] / "dstore"), "indexfile": str(env[memory]), "k": 64}
    cfg = C.build(C.GenerateConfig, base)
    return lambda: generate_tokens(cfg, prompt)


def mt_jobs(root: Path, pairs: int, sentences: int, lists: int = 64, modes=("knn",)) -> tuple:
    """(vanilla decode, {mode: decode with that memory mode}): beam 5 over ``sentences`` valid sentences."""
    from bench_mt_memory import checkpoint, corpus

    from trime.checkpoint import load_model, model_fingerprint
    from trime.data.pairs import load_pair_split
    from trime.datastore_build import build_mt_datastore
    from trime.generate.beam import BeamConfig
    from trime.memory.index import build_index
    from trime.mt_generate import decode, memory_combiner

    data = corpus(root, pairs)
    ckpt = checkpoint(root, data, "mt_cpu")
    model, mcfg, _ = load_model(ckpt, task="mt")
    ds = build_mt_datastore(C.MTDatastoreConfig(data=str(data), path=str(ckpt), out=str(root / "ds")))
    n_rows = int(np.load(Path(ds) / "vals.npy", mmap_mode="r").shape[0])
    index = build_index(ds, root / "ds" / "knn.index.l2", metric="l2", n_lists=lists, train_size=n_rows)
    valid, ids = load_pair_split(data, "valid"), np.arange(sentences)
    beam = BeamConfig(beam=5, max_len_a=1.2, max_len_b=10)

    def job(mode: str | None):
        kw = {}
        if mode:
            cfg = C.TranslateConfig(data=str(data), path=str(ckpt), dstore=str(ds), indexfile=str(index),
                                    knn_mode=mode, k=16, lmbda=0.3, knn_temp=10.0, probe=8)  # fmt: skip
            kw["combiner"] = memory_combiner(cfg, model, mcfg, model_fingerprint(ckpt))

        def run():
            decode(model, valid, ids, beam, **kw)
            return sentences

        return run

    return job(None), {mode: job(mode) for mode in modes}


def measure(seams: Seams, job, repeats: int) -> dict:
    """Medians over ``repeats`` runs (after one warm-up): wall seconds, units/s and each bucket's seconds."""
    job()
    runs = []
    for _ in range(repeats):
        seams.reset()
        t = time.perf_counter()
        units = job()
        wall = time.perf_counter() - t
        parts = {b: seams.seconds.get(b, 0.0) for b in BUCKETS}
        counted = sum(parts.values())
        runs.append({"wall": wall, "rate": units / wall, **parts, "rest": max(wall - counted, 0.0),
                     "overlap": max(counted - wall, 0.0)})  # fmt: skip
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


COLUMNS = BUCKETS + ("rest",)


def print_profile(results: list[tuple[str, dict, dict]]) -> None:
    """One row per consumer: rate against memory-free, then each bucket as a share of the wall clock."""
    print("| consumer | units/s | × memory-free | wall s | " + " | ".join(COLUMNS) + " | overlap s |")
    print("|---|---:|---:|---:|" + "---:|" * len(COLUMNS) + "---:|")
    for name, m, free in results:
        shares = " | ".join(f"{100 * m[c] / m['wall']:.0f}% ({m[c]:.2f})" for c in COLUMNS)
        print(f"| {name} | {m['rate']:.4g} | {m['rate'] / free['rate']:.3f} | {m['wall']:.2f} | {shares} | "
              f"{m['overlap']:.2f} |")  # fmt: skip


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", default="eval,neighbors,generate,mt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4000, help="valid tokens scored per evaluation")
    ap.add_argument("--train-tokens", type=int, default=100_000, help="LM datastore size")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--pairs", type=int, default=3000, help="MT training pairs (datastore)")
    ap.add_argument("--sentences", type=int, default=32, help="sentences decoded per MT run")
    ap.add_argument("--mt-lists", type=int, default=64, help="IVF lists of the MT index (bench_mt_memory's 64)")
    ap.add_argument("--mt-modes", default="knn,trime", help="memory decoding modes of the mt consumer")
    ap.add_argument("--indexes", default="flat,ivfpq", help="the indexes eval and generate search")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--faiss-threads", type=int, default=0,
                    help="faiss OpenMP threads (0: faiss's default); torch's too, when they share one libgomp")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.faiss_threads:
        from trime.memory.index import search_threads

        search_threads(a.faiss_threads)
    want = set(a.consumers.split(","))
    seams = Seams()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = lm_setup(root / "lm", a.train_tokens, a.tokens) if want & {"eval", "neighbors", "generate"} else {}
        instrument(seams)
        try:
            if "eval" in want or "neighbors" in want:
                free = measure(seams, eval_job(env, a.tokens, None), a.repeats)
                results.append(("eval, memory-free", free, free))
                for kind in a.indexes.split(",") if "eval" in want else ():
                    for overlap in (False, True):
                        job = eval_job(env, a.tokens, kind, overlap=overlap)
                        name = f"eval, external {kind}, {'overlapped' if overlap else 'sequential'}"
                        results.append((name, measure(seams, job, a.repeats), free))
                if "neighbors" in want:
                    job = eval_job(env, a.tokens, "ivfpq", neighbors=True)
                    results.append(("eval --save-neighbors, ivfpq (overlap when it pays)", measure(seams, job, a.repeats),
                                    free))  # fmt: skip
            if "generate" in want:
                free = measure(seams, generate_job(env, a.new_tokens, None), a.repeats)
                results.append(("generate, memory-free (KV cache)", free, free))
                for kind in a.indexes.split(","):
                    job = generate_job(env, a.new_tokens, kind)
                    results.append((f"generate, external {kind}", measure(seams, job, a.repeats), free))
            if "mt" in want:
                (root / "mt").mkdir()
                vanilla, jobs = mt_jobs(root / "mt", a.pairs, a.sentences, a.mt_lists, a.mt_modes.split(","))
                free = measure(seams, vanilla, a.repeats)
                results.append(("mt beam 5, vanilla", free, free))
                for mode, job in jobs.items():
                    results.append((f"mt beam 5, {mode} ivf {a.mt_lists}", measure(seams, job, a.repeats), free))
        finally:
            seams.undo()
    rows = [
        row(
            "profile",
            f"{name} (ratio to memory-free; search {100 * m['search'] / m['wall']:.0f}% of wall)",
            m["rate"],
            free["rate"],
            unit="units/s",
        )  # fmt: skip
        for name, m, free in results
        if m is not free
    ]
    if a.json:
        emit(rows, True)
    else:
        print(f"medians of {a.repeats} runs; buckets: % of wall clock (seconds)\n")
        print_profile(results)
    return rows


if __name__ == "__main__":
    main()
