"""One shard of an external memory, as it runs in a Ray actor or in this process (memory/backends.py).

Letters: n queries, k neighbours, k_s one shard's neighbours.

Free of torch on purpose: an actor imports only numpy, faiss and this module, so it starts in
about a second. Answers are numpy arrays (scores (n, k_s) float32 similarities, values (n, k_s)
int64, rows (n, k_s) int64; holes −inf / 0 / −1), merged by :func:`merge_topk`.
"""

from __future__ import annotations

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


def merge_topk(parts, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact top-k of the shards' answers [(scores (n, k_s), values, ids)], best first; ties keep
    shard order (a stable sort)."""
    scores, values, ids = (np.concatenate([p[j] for p in parts], axis=1) for j in range(3))  # (n, Σ k_s)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (n, k)
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(scores), take(values), take(ids)
