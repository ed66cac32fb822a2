"""One shard of an external memory, as it runs in a Ray actor or in this process (memory/backends.py).

Letters: n queries, k neighbours, k_s one shard's neighbours.

Free of torch on purpose: an actor imports only numpy, faiss and this module, so it starts in
about a second. Answers are numpy arrays (scores (n, k_s) float32 similarities, values (n, k_s)
int64, rows (n, k_s) int64; holes −inf / 0 / −1), merged by :func:`merge_topk`.
"""

from __future__ import annotations

import functools

import numpy as np

from trime.errors import ConfigError, DatastoreError


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise ConfigError("faiss is not installed (pip install faiss-cpu, or faiss-gpu for CUDA)") from None
    return faiss


class ShardServer:
    """One shard: its faiss index and the values of its rows. Plain Python; :class:`RayMemory` runs
    one per actor, :class:`ShardsMemory` several in one process."""

    def __init__(self, spec: dict, *, probe: int, mmap: bool = False, vocab_size: int | None = None, threads=0):
        faiss = faiss_module()
        if threads:
            faiss.omp_set_num_threads(threads)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        self.index = faiss.read_index(spec["index"], flags)
        if spec["kind"] == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = probe
        self.start, self.stop, self.metric = spec["start"], spec["stop"], spec["metric"]
        if self.index.ntotal != self.stop - self.start:
            raise DatastoreError(f"{spec['index']}: holds {self.index.ntotal} rows, its manifest says "
                                 f"{self.stop - self.start} (stale or mixed shards); rebuild the shard set")  # fmt: skip
        parts = [np.load(p, mmap_mode="r", allow_pickle=False) for p in spec["values"]]
        self.values = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (stop − start,) int32
        if self.values.shape != (self.stop - self.start,):
            raise DatastoreError(
                f"{spec['values'][0]}: holds {self.values.shape[0]} values, not {self.stop - self.start}"
            )
        top = spec["max_value"] if spec["max_value"] is not None else int(self.values.max(initial=0))
        if vocab_size is not None and top >= vocab_size:
            raise DatastoreError(
                f"{spec['index']}: holds token id {top}, outside the model's vocabulary of {vocab_size}"
            )

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Values (int64) of datastore rows ``ids`` (all in this shard)."""
        return np.asarray(self.values[ids - self.start], dtype=np.int64)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's top-k of queries x (n, d): (scores, values, ids), holes −inf / 0 / −1."""
        dist, ids = self.index.search(x, min(k, self.stop - self.start))  # (n, k_s)
        return finish(dist, ids, self.metric, self.lookup)


def finish(dist: np.ndarray, ids: np.ndarray, metric: str, lookup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss's (distances, ids) as (similarities, values, ids) with holes −inf / 0 / −1."""
    scores = np.ascontiguousarray(dist, dtype=np.float32)
    if metric == "l2":
        scores = -scores
    hole = ids < 0
    values = np.zeros(ids.shape, dtype=np.int64)
    values[~hole] = lookup(ids[~hole])
    scores[hole] = -np.inf
    return scores, values, ids.astype(np.int64, copy=False)


@functools.lru_cache(maxsize=8)
def _positions(S: int, n: int, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.arange(S * k, dtype=np.int64).reshape(S, 1, k), (S, n, k)))


def merge_topk(parts, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact top-k of the shards' answers [(scores (n, k_s), values, ids)], each best first, best
    first. faiss merges the sorted lists by position (a heap in C++: ten times numpy's sort at k =
    1024); scores, values and ids are then gathered from the shard that holds each position."""
    faiss = faiss_module()
    n, S = parts[0][0].shape[0], len(parts)
    if all(p[0].shape[1] == k for p in parts):
        scores, values, ids = (np.stack([p[j] for p in parts]) for j in range(3))  # (S, n, k) each
    else:  # short answers (a shard smaller than k) padded with holes
        scores = np.full((S, n, k), -np.inf, dtype=np.float32)
        values, ids = np.zeros((S, n, k), dtype=np.int64), np.full((S, n, k), -1, dtype=np.int64)
        for s, (sc, v, i) in enumerate(parts):
            w = min(k, sc.shape[1])
            scores[s, :, :w], values[s, :, :w], ids[s, :, :w] = sc[:, :w], v[:, :w], i[:, :w]
    _, where = faiss.merge_knn_results(scores, _positions(S, n, k), keep_max=True)  # (n, k)
    shard, col = np.divmod(where, k)
    row = np.arange(n)[:, None]
    return scores[shard, row, col], values[shard, row, col], ids[shard, row, col]
