"""Where the external index is searched: one interface, three backends (shared/DESIGN.md "Memory backends").

Letters: n queries, d key width, k neighbours, S shards.

Every backend answers ``search(x (n, d) float32, k) -> (scores (n, k'), values (n, k'), ids (n, k'))``,
k' = min(k, rows): similarities best first (−inf for a hole), the tokens that followed the keys (0
for a hole) and the datastore rows (−1 for a hole). Consumers hold an :class:`ExternalMemory`
(memory/external.py) and never know which backend is behind it.

- ``local``: one index in this process, today's path (:class:`trime.memory.index.Index`, exact torch
  search for a flat index); values from the datastore.
- ``shards``: the shards of a shard set (``trime index build --shards N``) in this process, searched
  by one faiss ``IndexShards`` (a thread per shard); optionally memory-mapped (``IO_FLAG_MMAP``), so
  an index larger than RAM is searched from the page cache.
- ``ray``: one Ray actor per shard, each holding its index and the values of its rows only; the
  queries go to every actor at once and the answers merge into the exact top-k (:func:`merge_topk`).
  ``address`` "auto" or "HOST:PORT" joins a running cluster, "" starts a local one.

A shard owns rows [start, stop) of the datastore and their values; no process but a shard's holds
them. A plain index file given to ``shards`` or ``ray`` is one shard owning every row. Why the merge
is exact: every shard was filled from a copy of one trained index, so a query probes the same lists
and a key gets the same code in any shard; the union of the shards' top-k holds the global top-k.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from trime.errors import ConfigError, DataError, DatastoreError
from trime.io import read_json, read_meta
from trime.memory.datastore import Datastore, check_fits
from trime.memory.index import Index, stale_index
from trime.memory.shard import ShardServer, faiss_module, finish, merge_topk

BACKENDS = ("local", "shards", "ray")


def shard_specs(indexfile, dstore) -> tuple[dict, list[dict]]:
    """(the index's sidecar, one spec per shard) for a shard set or a plain index file. A shard set
    whose files are missing or were replaced since its manifest was written is refused in one line."""
    path = Path(indexfile)
    side = path.with_name(path.name + ".json")
    if not side.exists():
        raise DatastoreError(f"{path}: no complete index there (build it with `trime index build`)")
    info = read_json(side)
    base = {"kind": info["kind"], "metric": info["metric"], "dim": int(info["dim"]), "max_value": None}
    if not info.get("shards"):
        if not path.exists():
            raise DatastoreError(f"{path}: no complete index there (build it with `trime index build`)")
        ds = read_meta(dstore, "datastore")  # a plain index is one shard owning every row
        parts = [Path(dstore) / p for p in ds["shards"]] if ds.get("shards") else [Path(dstore)]
        values = [str(p / "vals.npy") for p in parts]
        return info, [{**base, "index": str(path), "values": values, "start": 0, "stop": int(info["rows"])}]
    specs = []
    for s in info["shards"]:
        file, vals = path.with_name(s["index"]), path.with_name(s["values"])
        if not file.exists() or not vals.exists() or file.stat().st_size != s["bytes"]:
            raise DatastoreError(
                f"{file}: missing or not the shard {side.name} lists (stale or mixed shards); rebuild the shard set"
            )
        specs.append({**base, "index": str(file), "values": [str(vals)], "start": s["start"],
                      "stop": s["stop"], "max_value": s["max_value"]})  # fmt: skip
    return info, specs


class LocalMemory:
    """``local``: one index and its datastore in this process (the embedded default)."""

    def __init__(self, datastore: Datastore, index: Index):
        self.datastore, self.index = datastore, index
        self.rows = index.ntotal

    def search(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, ids, valid = self.index.search(x, k)
        values = self.datastore.lookup(ids)
        return scores.float().masked_fill(~valid, float("-inf")), values, ids.masked_fill(~valid, -1)


class _Sharded:
    """What ``shards`` and ``ray`` share: queries as float32 numpy in, tensors on the queries' device out."""

    rows: int
    dim: int

    def search(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xq = np.ascontiguousarray(x.detach().float().cpu().numpy())  # (n, d)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise DatastoreError(f"queries of shape {xq.shape} do not match the index width {self.dim}")
        out = self.search_np(xq, min(k, self.rows))
        return tuple(torch.from_numpy(a if a.flags.writeable else a.copy()).to(x.device) for a in out)

    def search_np(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class ShardsMemory(_Sharded):
    """``shards``: every shard in this process, searched by one faiss IndexShards (a thread per shard)."""

    def __init__(self, specs: list[dict], *, probe: int, mmap: bool = False, vocab_size: int | None = None):
        faiss = faiss_module()
        self.servers = [ShardServer(s, probe=probe, mmap=mmap, vocab_size=vocab_size) for s in specs]
        self.dim, self.metric = specs[0]["dim"], specs[0]["metric"]
        self.rows = sum(s.stop - s.start for s in self.servers)
        self.starts = np.array([s.start for s in self.servers])
        self.index = faiss.IndexShards(self.dim, True, False)  # threaded, ids as the shards give them
        for s in self.servers:
            self.index.add_shard(s.index)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty(ids.shape, dtype=np.int64)
        for j, server in enumerate(self.servers):
            sel = shard == j
            if sel.any():
                out[sel] = server.lookup(ids[sel])
        return out

    def search_np(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dist, ids = self.index.search(x, k)  # (n, k), merged by faiss
        return finish(dist, ids, self.metric, self.lookup)


def ray_init(address: str = "", **kw) -> None:
    """Join the Ray cluster at ``address`` ("auto", "HOST:PORT"), or start a local one ("")."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--memory-backend ray needs Ray: pip install "trime[ray]"') from None
    if not ray.is_initialized():
        ray.init(address=address or "local", **kw)


class RayMemory(_Sharded):
    """``ray``: one actor per shard (a :class:`ShardServer`), queried at once, merged by :func:`merge_topk`."""

    def __init__(self, specs: list[dict], *, probe: int, mmap: bool = False, vocab_size: int | None = None,
                 address: str = "", cpus: float = 0.0):  # fmt: skip
        """``cpus`` > 0: each actor reserves that many CPUs and runs faiss on as many threads (at least
        one); 0: nothing reserved, one faiss thread (Ray's default for a worker)."""
        ray_init(address)
        import ray

        if cpus:
            need, deadline = cpus * len(specs), time.monotonic() + 2  # killed actors' CPUs come back in moments
            while (free := ray.available_resources().get("CPU", 0)) < need and time.monotonic() < deadline:
                time.sleep(0.1)
            if need > free:  # Ray would wait for them forever
                raise ConfigError(f"{len(specs)} shards × {cpus:g} CPUs do not fit the {free:g} CPUs free in the Ray "
                                  "cluster; lower --ray-shard-cpus or add machines")  # fmt: skip
        actor = ray.remote(ShardServer).options(num_cpus=cpus) if cpus else ray.remote(ShardServer)
        threads = max(1, round(cpus))
        self.actors = [actor.remote(s, probe=probe, mmap=mmap, vocab_size=vocab_size, threads=threads) for s in specs]
        self.dim, self.rows = specs[0]["dim"], sum(s["stop"] - s["start"] for s in specs)
        ray.get([a.__ray_ready__.remote() for a in self.actors])  # a shard that fails to open fails here

    def search_np(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import ray

        ref = ray.put(x) if x.nbytes > 100_000 else x  # one copy read by every actor; small ones travel inline
        parts = ray.get([a.search.remote(ref, k) for a in self.actors])
        return parts[0] if len(parts) == 1 else merge_topk(parts, k)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def open_backend(backend: str, dstore, indexfile, *, probe: int, dim: int, vocab_size: int, keytype: str,
                 fingerprint: str | None = None, mmap: bool = False, ray_address: str = "", ray_cpus: float = 0.0):  # fmt: skip
    """(the backend named ``backend`` over ``indexfile``, a plain index or a shard set, the datastore's
    meta), both checked against the model (key width, key type, vocabulary, fingerprint) and each other."""
    if backend not in BACKENDS:
        raise ConfigError(f"memory backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "local":  # the datastore is checked first, then its index
        ds = Datastore.open(dstore)
        ds.check_compatible(dim, vocab_size, keytype, fingerprint)
        info, specs = shard_specs(indexfile, dstore)
        if info.get("shards"):
            raise ConfigError(
                f"{indexfile}: is a set of {len(specs)} shards; search it with --memory-backend shards or ray"
            )
        index = Index.open(indexfile, probe=probe, mmap=mmap)
        index.check_datastore(ds)
        return LocalMemory(ds, index), ds.meta
    try:
        meta = read_meta(dstore, "datastore")
    except DataError as e:
        raise DatastoreError(str(e)) from None
    check_fits(meta, dstore, dim, vocab_size, keytype, fingerprint)
    info, specs = shard_specs(indexfile, dstore)
    if info["datastore_fingerprint"] != meta["fingerprint"]:
        raise DatastoreError(stale_index(indexfile, info, dstore, meta))
    kw = {"probe": probe, "mmap": mmap, "vocab_size": vocab_size}
    if backend == "shards":
        return ShardsMemory(specs, **kw), meta
    return RayMemory(specs, address=ray_address, cpus=ray_cpus, **kw), meta
