"""Cached neighbours: re-score an evaluation at other τ, λ, kNN temperature and k without the
model or the index (`trime sweep`; spec §5.4, §5.5).

Letters: N scored tokens, M memory entries visible to a row, m entries kept per row, k external
neighbours, d key width.

What is stored, per scored token (a directory of .npy chunks, meta.json last):

    tok_logp   (N,)    float32  log p_tok(y): the output layer alone
    tok_log_z  (N,)    float32  log Z_tok: its partition function
    targets    (N,)    int32    the gold token
    mem_scores (N, m)  float32  raw local/long memory scores q·k/√d (no τ), any order; −inf pads
    mem_pos    (N, m)  bool     whether the entry's value equals the target
    mem_count  (N,)    int32    visible entries before truncation (> m: the row was truncated)
    ext_scores (N, k)  float32  raw faiss similarities (no √d, no τ), best first; −inf for holes
    ext_values (N, k)  int32    the neighbours' tokens

A row sees up to ≈ 15k local + long entries; keeping all of them costs ~60 kB per token, so the
writer keeps ``mem_top`` = m of them (None keeps all; the width then grows to the largest row):
the best ``mem_top_pos`` (default m/4) positives for sure, then the best of the other entries
(:func:`select_entries`). Dropping the lowest-scoring entries of each kind removes their mass
e^{s/τ} from the numerator / normaliser: negligible when m covers the mass (``mem_count`` tells
how many were visible); with all entries kept, re-scoring is exact.
External neighbours serve both the joint softmax (score/√d/τ, when ``ext_in_joint``) and the
kNN-LM interpolation (score/T); the first k of them are the top k.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trime.errors import DataError
from trime.io import atomic_dir, load_npy, read_meta, save_npy, write_meta
from trime.memory.scoring import MemoryRows, Setting, log_probs

KIND = "neighbor_cache"
NEG_INF = float("-inf")
FIELDS = ("tok_logp", "tok_log_z", "targets", "mem_scores", "mem_pos", "mem_count", "ext_scores", "ext_values")


def select_entries(
    scores: torch.Tensor, positive: torch.Tensor, m: int, m_pos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep m entries per row: the best ≤ m_pos positives for sure, then the best of the rest.

    scores (n, M) with −inf for invisible entries, positive (n, M) bool. Returns (n, m) scores
    (−inf pads) and flags. A row with ≤ m visible entries keeps them all; reserving slots for
    positives keeps the numerator of the joint softmax exact whenever a row has ≤ m_pos of them.
    """
    m = min(m, scores.shape[1])
    pos_top, pos_idx = scores.masked_fill(~positive, NEG_INF).topk(min(m_pos, m), dim=1)  # (n, p) reserved
    reserved = torch.zeros_like(positive).scatter(1, pos_idx, torch.isfinite(pos_top))  # (n, M)
    rest, rest_idx = scores.masked_fill(reserved, NEG_INF).topk(m, dim=1)  # (n, m) best of the others
    n_res = reserved.sum(1, keepdim=True)  # (n, 1)
    rest = rest.masked_fill(torch.arange(m, device=scores.device) >= m - n_res, NEG_INF)
    cand = torch.cat([pos_top, rest], 1)  # (n, p + m)
    flags = torch.cat([torch.isfinite(pos_top), positive.gather(1, rest_idx)], 1)
    order = torch.isfinite(cand).float().argsort(dim=1, descending=True, stable=True)[:, :m]  # kept first
    out = cand.gather(1, order)
    return out, flags.gather(1, order) & torch.isfinite(out)


class NeighborCacheWriter:
    """Collects rows window by window; ``finalize()`` writes the cache directory atomically."""

    def __init__(
        self,
        out_dir,
        *,
        dim: int,
        mem_top: int | None = 256,
        mem_top_pos: int | None = None,
        ext_in_joint: bool = False,
        meta: dict | None = None,
        chunk_rows: int = 16384,
        overwrite: bool = False,
    ):
        self.out, self.dim, self.mem_top, self.ext_in_joint = Path(out_dir), int(dim), mem_top, bool(ext_in_joint)
        self.mem_top_pos = mem_top // 4 if mem_top is not None and mem_top_pos is None else mem_top_pos
        self.meta, self.chunk_rows = dict(meta or {}), int(chunk_rows)
        self._stack = contextlib.ExitStack()
        self.dir = self._stack.enter_context(atomic_dir(self.out, overwrite=overwrite))
        self._buf: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
        self._buffered = self.rows = self.mem_width = 0
        self.ext_k: int | None = None
        self.chunks: list[dict] = []

    def add(
        self, tok_logp, tok_log_z, targets, mem_scores=None, mem_values=None, ext_scores=None, ext_values=None
    ) -> None:
        """Rows of one window (see :meth:`MemoryRows.build` for the arguments)."""
        self.add_rows(MemoryRows.build(tok_logp, tok_log_z, targets, mem_scores, mem_values, ext_scores, ext_values))

    def add_rows(self, rows: MemoryRows) -> None:
        """Append rows; local/long entries beyond ``mem_top`` per row are dropped (module docstring)."""
        n = len(rows)
        mem_scores, mem_pos = rows.mem_scores.float(), rows.mem_pos  # (n, M)
        count = torch.isfinite(mem_scores).sum(1)  # (n,)
        if self.mem_top is not None and mem_scores.shape[1] > self.mem_top:
            mem_scores, mem_pos = select_entries(mem_scores, mem_pos, self.mem_top, self.mem_top_pos)  # (n, m)
        if self.ext_k is None:
            self.ext_k = rows.ext_scores.shape[1]
        if rows.ext_scores.shape[1] != self.ext_k:
            raise DataError(
                f"every window must give the same number of external neighbours ({self.ext_k}), "
                f"got {rows.ext_scores.shape[1]}"
            )
        row = {
            "tok_logp": rows.tok_logp.float(),
            "tok_log_z": rows.tok_log_z.float(),
            "targets": rows.targets.int(),
            "mem_scores": mem_scores,
            "mem_pos": mem_pos,
            "mem_count": count.int(),
            "ext_scores": rows.ext_scores.float(),
            "ext_values": rows.ext_values.int(),
        }
        for f in FIELDS:
            self._buf[f].append(row[f].detach().cpu().numpy())
        self.mem_width = max(self.mem_width, mem_scores.shape[1])
        self._buffered += n
        if self._buffered >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        i = len(self.chunks)
        width = max(a.shape[1] for a in self._buf["mem_scores"])
        for f in FIELDS:
            parts = self._buf[f]
            if f in ("mem_scores", "mem_pos"):
                fill = NEG_INF if f == "mem_scores" else False
                parts = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in parts]
            save_npy(self.dir / f"{f}.{i:05d}.npy", np.concatenate(parts))
            self._buf[f] = []
        self.chunks.append({"rows": self._buffered, "mem_width": width})
        self.rows += self._buffered
        self._buffered = 0

    def finalize(self) -> dict:
        """Write the last chunk and meta.json, then move the directory into place."""
        self._flush()
        meta = write_meta(
            self.dir,
            KIND,
            **self.meta,
            dim=self.dim,
            rows=self.rows,
            mem_top=self.mem_top,
            mem_top_pos=self.mem_top_pos,
            mem_width=self.mem_width,
            ext_k=self.ext_k or 0,
            ext_in_joint=self.ext_in_joint,
            chunks=self.chunks,
        )
        self._stack.close()
        return meta

    def __enter__(self) -> NeighborCacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)  # on an error the partial directory is removed


@dataclass
class NeighborCache:
    """A loaded cache: the module docstring's arrays as :class:`~trime.memory.scoring.MemoryRows`."""

    meta: dict
    rows: MemoryRows
    mem_count: torch.Tensor  # (N,) visible local/long entries before truncation

    @classmethod
    def load(cls, directory, device: str | torch.device = "cpu") -> NeighborCache:
        directory = Path(directory)
        meta = read_meta(directory, KIND)
        width = meta["mem_width"]
        arrays = {}
        for f in FIELDS:
            parts = [load_npy(directory / f"{f}.{i:05d}.npy", mmap=False) for i in range(len(meta["chunks"]))]
            if f in ("mem_scores", "mem_pos"):
                fill = NEG_INF if f == "mem_scores" else False
                parts = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in parts]
            arrays[f] = torch.from_numpy(np.concatenate(parts)).to(device)
        arrays["targets"] = arrays["targets"].long()
        arrays["ext_values"] = arrays["ext_values"].long()
        count = arrays.pop("mem_count")
        return cls(meta=meta, rows=MemoryRows(**arrays), mem_count=count)

    def __len__(self) -> int:
        return len(self.rows)

    def __getattr__(self, name: str):  # cache.targets, cache.mem_scores ... read the rows
        if name in FIELDS:
            return getattr(self.rows, name)
        raise AttributeError(name)


def _setting(cache: NeighborCache, s: Mapping, ext_in_joint: bool | None) -> Setting:
    k_max = cache.meta["ext_k"]
    lam = float(s.get("lmbda", 0.0))
    k = k_max if s.get("k") is None else min(int(s["k"]), k_max)
    if lam > 0 and k == 0:
        raise DataError("interpolation (lambda > 0) needs external neighbours, and this cache has none")
    return Setting(
        softmax_temp=float(s.get("softmax_temp", 1.0)),
        lmbda=lam,
        interp_temp=float(s.get("interp_temp", 1.0)),
        k=k,
        ext_in_joint=cache.meta["ext_in_joint"] if ext_in_joint is None else bool(ext_in_joint),
    )


def rescore_tokens(
    cache: NeighborCache,
    softmax_temp: float,
    lmbda: float = 0.0,
    interp_temp: float = 1.0,
    k: int | None = None,
    *,
    ext_in_joint: bool | None = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """log p(y) of every cached token (N,) under new settings (spec §5.4, §5.5); k is capped at
    the cached k (None: all); ``ext_in_joint`` (default: as evaluated) puts the external
    neighbours in the joint softmax; λ > 0 mixes in p_knn at temperature ``interp_temp``."""
    s = _setting(
        cache, {"softmax_temp": softmax_temp, "lmbda": lmbda, "interp_temp": interp_temp, "k": k}, ext_in_joint
    )
    return log_probs(cache.rows, [s], cache.meta["dim"], chunk)[0]


def rescore(
    cache: NeighborCache, softmax_temp: float, lmbda: float = 0.0, interp_temp: float = 1.0, k: int | None = None, **kw
) -> float:
    """Total log-probability (nats) of the cached tokens under new settings."""
    return float(rescore_tokens(cache, softmax_temp, lmbda, interp_temp, k, **kw).double().sum())


def sweep(
    cache: NeighborCache,
    grid: Mapping[str, Iterable] | Iterable[Mapping],
    *,
    ext_in_joint: bool | None = None,
    chunk: int = 8192,
) -> list[dict]:
    """Perplexity for every setting: ``grid`` maps softmax_temp / lmbda / interp_temp / k to lists
    (their product) or is a list of dicts (missing: τ 1, λ 0, T 1, k all). Returns one row per
    setting, in order: the setting, nll_sum (nats), n_tokens, loss (base 2) and ppl. Scored by
    memory.scoring.log_probs, the function ``trime eval`` uses, with the whole grid at once."""
    if isinstance(grid, Mapping):
        names = list(grid)
        grid = [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]
    settings = [_setting(cache, s, ext_in_joint) for s in grid]
    rows, n = [], len(cache)
    for s, logp in zip(settings, log_probs(cache.rows, settings, cache.meta["dim"], chunk)):
        nll = -float(logp.double().sum())
        loss = nll / max(n, 1) / math.log(2)
        rows.append(
            {
                "softmax_temp": s.softmax_temp,
                "lmbda": s.lmbda,
                "interp_temp": s.interp_temp,
                "k": s.k,
                "nll_sum": nll,
                "n_tokens": n,
                "loss": loss,
                "ppl": 2.0**loss,
            }
        )
    return rows
