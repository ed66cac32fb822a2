"""faiss index over a datastore's keys: build, load, search (spec §6.2, §6.3).

Letters: R datastore rows, d key width, n queries, k neighbours.

Kinds (chosen by :func:`plan_index` from R unless forced):
- flat (IndexFlatIP / IndexFlatL2, exact) below ``flat_below`` = 262,144 rows. Why there: an
  IVF index with 4·sqrt(R) lists scans about probe·R/lists = 2·sqrt(R) candidates at probe 8,
  which is under the default k = 1024 neighbours until R ≈ 262k, so a smaller IVF index would
  return holes; a flat index of that size costs ≤ 1 GiB (d = 1024, fp32) and is exact.
- IVF-PQ (IndexIVFPQ, flat coarse quantizer of the same metric, m = code_size sub-quantizers of
  n_bits bits) above. n_lists = 4·sqrt(R) rounded down to a power of two, at most 4096 (the
  original's value) and at most R/39 (faiss wants ≥ 39 training points per centroid). code_size
  = the largest m ≤ 64 dividing d with ≥ 4 dims per sub-quantizer that the faiss GPU kernels
  support (d/m ≤ 32, m in their list); when none, the largest such divisor ≤ 64 (CPU only).
  d = 1024 gives the original's 4096 × 64-byte codes; d = 32 gives 8 bytes. (Fewer than 4 dims
  per sub-quantizer compresses little and makes training cost m k-means runs for nothing.)

Training sample: all rows when R ≤ train_size, else train_size rows drawn without replacement by
``np.random.default_rng(seed).choice(R, train_size, replace=False)`` (then sorted for memmap
locality), cast to float32; faiss's k-means seeds are set to ``seed`` too. Same seed and same R
give the same sample and the same index; the original used numpy's legacy global RNG, so its
sample differs. The trained empty index is saved as ``<out>.trained`` (+ ``.trained.json``) and
reused when its settings match. Rows are added in chunks with ids = row numbers; every
``save_every`` rows the partial index is saved as ``<out>.partial`` so a killed build resumes.
The final index is written under a temporary name and renamed, then ``<out>.json`` (metric,
dim, rows, datastore fingerprint, kind, n_lists, code_size) is written LAST: an index without
its sidecar is incomplete. GPU: with faiss-gpu and a visible GPU, training and adding run on one
GPU (the original needed ≥ 2 and discarded its GPU copy, spec §11 item 9).

Scores returned by :meth:`Index.search` are similarities, larger = closer: the inner product
for metric ip, minus the *squared* L2 distance for l2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trime import distributed as dist
from trime.errors import ConfigError, DatastoreError
from trime.io import FAISS_INDEX, check_output_file, read_json, save_npy, sha256_file, shard_range, write_json
from trime.memory.cost import build_cost, describe, refuse_unless_fits
from trime.memory.datastore import Datastore, rows_since
from trime.memory.shard import faiss_module

FLAT_BELOW = 1 << 18
MAX_LISTS = 4096
GPU_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
GPU_SUBDIM = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)


def auto_n_lists(n_rows: int, cap: int = MAX_LISTS, n_train: int | None = None) -> int:
    """4·sqrt(R) rounded down to a power of two, ≤ cap and ≤ (training rows)/39 (at least 1)."""
    want = min(4 * math.sqrt(n_rows), cap, min(n_rows, n_train or n_rows) / 39)
    return 1 << max(0, int(math.floor(math.log2(max(want, 1)))))


def auto_code_size(dim: int, most: int = 64, min_subdim: int = 4) -> tuple[int, bool]:
    """(m, gpu_ok): PQ sub-quantizers for width ``dim`` (module docstring)."""
    divisors = [m for m in range(1, min(dim, most) + 1) if dim % m == 0 and (dim // m >= min_subdim or m == 1)]
    gpu = [m for m in divisors if m in GPU_M and dim // m in GPU_SUBDIM]
    return (gpu[-1], True) if gpu else (divisors[-1], False)


def plan_index(
    n_rows: int,
    dim: int,
    *,
    metric: str = "ip",
    n_lists: int | None = None,
    code_size: int | None = None,
    n_bits: int = 8,
    flat_below: int = FLAT_BELOW,
    train_size: int = 1_000_000,
) -> dict:
    """The index to build for R rows of width d (a plain dict, stored in the sidecar)."""
    if metric not in ("ip", "l2"):
        raise ConfigError(f"metric must be ip or l2, got {metric!r}")
    if n_rows < flat_below and n_lists is None and code_size is None:
        return {"kind": "flat", "metric": metric, "dim": dim, "n_lists": None, "code_size": None, "n_bits": None}
    n_train = min(n_rows, train_size)
    n_lists = n_lists or auto_n_lists(n_rows, n_train=n_train)
    gpu_ok = True
    if code_size is None:
        code_size, gpu_ok = auto_code_size(dim)
    if dim % code_size:
        raise ConfigError(f"code size {code_size} must divide the key dimension {dim}")
    if n_train < 39 * max(n_lists, 1 << n_bits):
        raise ConfigError(
            f"{n_train} training rows are too few for IVF-PQ with {n_lists} lists and {n_bits}-bit codes "
            f"(need ≥ {39 * max(n_lists, 1 << n_bits)}); use a flat index or more training rows"
        )
    return {
        "kind": "ivfpq",
        "metric": metric,
        "dim": dim,
        "n_lists": n_lists,
        "code_size": code_size,
        "n_bits": n_bits,
        "gpu_ok": gpu_ok,
    }


def _gpu_wanted(use_gpu) -> bool:
    faiss = faiss_module()
    have = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not have:
        raise ConfigError("a GPU index was asked for but this faiss has no GPU support or sees no GPU")
    return have and use_gpu is not False


def _new_index(plan: dict, seed: int):
    faiss = faiss_module()
    d, metric = plan["dim"], faiss.METRIC_INNER_PRODUCT if plan["metric"] == "ip" else faiss.METRIC_L2
    flat = faiss.IndexFlatIP(d) if plan["metric"] == "ip" else faiss.IndexFlatL2(d)
    if plan["kind"] == "flat":
        return flat
    index = faiss.IndexIVFPQ(flat, d, plan["n_lists"], plan["code_size"], plan["n_bits"], metric)
    index.own_fields = True
    flat.this.disown()  # the IVF index owns and frees its quantizer
    index.cp.seed = seed
    index.pq.cp.seed = seed
    return index


def _write_index(index, path: Path) -> None:
    faiss = faiss_module()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_stage(path: Path, key: dict):
    """A saved stage (index file + JSON) if its key matches, else None."""
    side = path.with_name(path.name + ".json")
    if not (path.exists() and side.exists()):
        return None, None
    info = read_json(side)
    if info.get("key") != key:
        return None, None
    return faiss_module().read_index(str(path)), info


def _save_stage(index, path: Path, key: dict, **info) -> None:
    _write_index(index, path)
    write_json(path.with_name(path.name + ".json"), {"key": key, **info})


def _train(ds: Datastore, plan: dict, stage: Path, key: dict, *, train_size: int, seed: int, chunk: int, gpu: bool):
    """The trained, empty index: from the ``.trained`` stage when it matches, else trained now."""
    index = _new_index(plan, seed)
    if plan["kind"] == "flat":
        return index
    cached, _ = _read_stage(stage, key)
    if cached is not None:
        return cached
    from tqdm.auto import tqdm

    n = min(train_size, ds.rows)
    rng = np.random.default_rng(seed)
    rows = np.arange(ds.rows) if n == ds.rows else np.sort(rng.choice(ds.rows, n, replace=False))
    sample = np.concatenate(
        [ds.take_keys(rows[i : i + chunk]) for i in tqdm(range(0, n, chunk), desc="read training sample", unit="chunk")]
    )  # (n, d)
    faiss = faiss_module()
    if gpu:
        gindex = _gpu_clone(index)
        gindex.train(sample)
        index = faiss.index_gpu_to_cpu(gindex)
    else:
        index.train(sample)
    _save_stage(index, stage, key, trained_on=n)
    return index


def _gpu_clone(index):
    faiss = faiss_module()
    res = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = True  # fp16 lookup tables, as the original searched; needed for 64-byte codes
    gindex = faiss.index_cpu_to_gpu(res, torch.cuda.current_device() if torch.cuda.is_available() else 0, index, opts)
    gindex.referenced_resources = res  # keep the resources alive as long as the index
    return gindex


def _add(ds: Datastore, index, partial: Path, key: dict, *, chunk: int, save_every: int, gpu: bool, rows=None):
    """Add rows [first, last) (default: every row; ids = row numbers) in chunks, resuming from ``partial``."""
    from tqdm.auto import tqdm

    faiss = faiss_module()
    first, last = rows or (0, ds.rows)
    cached, info = _read_stage(partial, key)
    resume = cached is not None and info.get("rows", [0, ds.rows]) == [first, last]
    index = cached if resume else index
    start = int(info["added"]) if resume else first
    with_ids = key["kind"] == "ivfpq" or isinstance(index, faiss.IndexIDMap)  # a flat shard is an IndexIDMap
    work = _gpu_clone(index) if gpu else index
    since = 0
    bar = tqdm(total=last - first, initial=start - first, desc="add keys", unit="row", unit_scale=True)
    for a in range(start, last, chunk):
        b = min(a + chunk, last)
        x = ds.read_keys(a, b)  # (b − a, d) float32
        if with_ids:
            work.add_with_ids(x, np.arange(a, b, dtype=np.int64))
        else:
            work.add(x)  # flat: ids are the insertion order = row numbers
        bar.update(b - a)
        since += b - a
        if save_every and since >= save_every and b < last:
            _save_stage(faiss.index_gpu_to_cpu(work) if gpu else work, partial, key, added=b, rows=[first, last])
            since = 0
    bar.close()
    return faiss.index_gpu_to_cpu(work) if gpu else work


@dataclass(frozen=True)
class IndexSettings:
    """How to build an index (module docstring); ``n_lists`` / ``code_size`` None: sized from the datastore."""

    metric: str = "ip"  # ip | l2
    n_lists: int | None = None
    code_size: int | None = None
    n_bits: int = 8
    train_size: int = 1_000_000  # keys sampled to train the quantizers
    seed: int = 1
    chunk: int = 500_000  # keys added at a time
    probe: int = 8  # default nprobe stored with the index
    use_gpu: str | bool = "auto"
    flat_below: int = FLAT_BELOW
    save_every: int = 10_000_000  # rows between saves of the partial index
    shards: int = 1  # > 1: a shard set (one index file per slice of rows, same trained quantizers) + manifest
    trained: str = ""  # start from this trained index (another build's OUT.trained) instead of training
    only: tuple[int, ...] | None = None  # add only these shards (no manifest until a build finds every one)


def build_index(
    datastore_dir, out_path, settings: IndexSettings | None = None, *, overwrite: bool = False, say=None, **fields
) -> Path:
    """Build the faiss index of a complete datastore and write it to ``out_path`` (spec §6.2).

    ``settings`` (or its ``fields`` as keywords) say how. Returns ``out_path``. A complete index
    with the same settings is returned as is; one with other settings is an error unless
    ``overwrite``. See the module docstring for the choices. Before any work, a build the machine
    cannot hold is refused (memory/cost.py); ``say`` (e.g. print) also gets what it will cost.
    """
    st = settings or IndexSettings(**fields)
    metric, n_lists, code_size, train_size, seed = st.metric, st.n_lists, st.code_size, st.train_size, st.seed
    chunk, probe, use_gpu, save_every = st.chunk, st.probe, st.use_gpu, st.save_every
    n_bits, flat_below = st.n_bits, st.flat_below
    ds = Datastore.open(datastore_dir)
    out = Path(out_path)
    plan = plan_index(
        ds.rows,
        ds.dim,
        metric=metric,
        n_lists=n_lists,
        code_size=code_size,
        n_bits=n_bits,
        flat_below=flat_below,
        train_size=train_size,
    )
    key = {**plan, "rows": ds.rows, "datastore": ds.fingerprint, "train_size": train_size, "seed": seed}
    side = out.with_name(out.name + ".json")
    claim = out.with_name(out.name + ".building")  # marks an index file of ours before its sidecar exists
    check_output_file(out, FAISS_INDEX)  # a directory, or a file that is not an index of ours, is refused
    if st.shards > 1:
        key["shards"] = st.shards
    if st.trained:
        key["trained"] = sha256_file(st.trained)
    old = read_json(side) if side.exists() else {}
    if side.exists() and (out.exists() or _shards_complete(out, old)):
        if not (isinstance(old, dict) and "key" in old):
            raise DatastoreError(f"{side}: not a trime index sidecar; choose another --out")
        if old.get("key") == key:
            return out
        if not overwrite:
            raise DatastoreError(
                f"{out}: an index with other settings is already there (remove it or pass --overwrite)"
            )
    cost = build_cost(plan, ds.rows, key_bytes=np.dtype(ds.key_dtype).itemsize, train_size=train_size, chunk=chunk,
                      shards=st.shards)  # fmt: skip
    if say:
        say(f"| {out.name}: {describe(cost)}")
    refuse_unless_fits(cost, out, say=say or (lambda _: None))
    side.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = _gpu_wanted(use_gpu) and plan.get("gpu_ok", True)
    stage = out.with_name(out.name + ".trained")
    partial = out.with_name(out.name + ".partial")
    if st.trained:
        index = _trained_from(Path(st.trained), plan)
    else:
        index = _train(ds, plan, stage, key, train_size=train_size, seed=seed, chunk=chunk, gpu=gpu)
    if plan["kind"] == "ivfpq":
        index.nprobe = probe
    about = {"key": key, "kind": plan["kind"], "metric": metric, "dim": ds.dim, "rows": ds.rows,
             "datastore_fingerprint": ds.fingerprint, "n_lists": plan["n_lists"], "code_size": plan["code_size"],
             "probe": probe}  # fmt: skip
    if st.shards > 1:
        shards = _add_shards(ds, index, out, key, about, st, gpu)
        if len(shards) < st.shards:  # --only-shards: the others are added elsewhere
            return out
        out.unlink(missing_ok=True)  # a plain index of ours that this shard set replaces
        trained = sha256_file(st.trained or stage) if plan["kind"] == "ivfpq" else None
        write_json(side, {**about, "trained_fingerprint": trained, "shards": shards})  # the manifest, last
    else:
        index = _add(ds, index, partial, key, chunk=chunk, save_every=save_every, gpu=gpu)
        if index.ntotal != ds.rows:
            raise DatastoreError(f"{out}: index holds {index.ntotal} rows, the datastore {ds.rows}")
        write_json(claim, {"building": str(out.name)})
        _write_index(index, out)
        write_json(side, about)
    keep, stale = _shard_files(read_json(side)), _shard_files(old)
    for p in [partial, partial.with_name(partial.name + ".json"), claim] + [out.with_name(n) for n in stale - keep]:
        p.unlink(missing_ok=True)
    return out


def _shards_complete(out: Path, info) -> bool:
    """A shard set's manifest whose every file is there with the size it recorded."""
    shards = info.get("shards") if isinstance(info, dict) else None
    return bool(shards) and all(
        out.with_name(sh["values"]).exists()
        and out.with_name(sh["index"]).exists()
        and out.with_name(sh["index"]).stat().st_size == sh["bytes"]
        for sh in shards
    )


def _shard_files(info) -> set[str]:
    """The names of a shard set's files (none for a plain index's sidecar)."""
    shards = info.get("shards") if isinstance(info, dict) else None
    return {n for sh in shards or [] for n in (sh["index"], sh["index"] + ".json", sh["values"])}


def shard_file(out: Path, s: int, n: int) -> Path:
    return out.with_name(f"{out.name}.shard-{s}-of-{n}")


def _add_shards(ds: Datastore, trained, out: Path, key: dict, about: dict, st, gpu: bool) -> list[dict]:
    """Each slice of the datastore added into its own copy of the trained index: one file per shard and
    its values, each written atomically and reused by a rerun (its stage sidecar matches)."""
    faiss, n = faiss_module(), st.shards
    shards = []
    for s in range(n):
        a, b = shard_range(ds.rows, s, n)
        path = shard_file(out, s, n)
        vals = path.with_name(path.name + ".vals.npy")
        side = path.with_name(path.name + ".json")
        made = read_json(side) if side.exists() and path.exists() and vals.exists() else {}
        if (made.get("key"), made.get("start"), made.get("bytes")) != (key, a, path.stat().st_size if made else -1):
            if st.only is not None and s not in st.only:
                continue
            copy = faiss.clone_index(trained)
            if about["kind"] == "flat":  # ids = datastore rows, as in an IVF shard
                copy = faiss.IndexIDMap2(copy)
            partial = path.with_name(path.name + ".partial")
            copy = _add(ds, copy, partial, key, chunk=st.chunk, save_every=st.save_every, gpu=gpu, rows=(a, b))
            save_npy(vals, ds.values[a:b].numpy().astype(np.int32))
            _write_index(copy, path)
            write_json(side, {**about, "rows": b - a, "start": a, "stop": b, "bytes": path.stat().st_size})
            for p in (partial, partial.with_name(partial.name + ".json")):
                p.unlink(missing_ok=True)
        top = int(ds.values[a:b].max()) if b > a else 0
        shards.append({"index": path.name, "values": vals.name, "start": a, "stop": b,
                       "bytes": path.stat().st_size, "max_value": top})  # fmt: skip
    return shards


def build_index_ranks(datastore_dir, out_path, settings: IndexSettings, *, say=None) -> Path | None:
    """:func:`build_index` by the ranks of a torchrun job (the identity on one process): rank 0 trains
    (or reuses ``OUT.trained``), then rank r adds shards r, r + W, ..., then rank 0 writes the manifest.
    The ranks meet at barriers only; what each writes is resumable as in one process. Returns the index
    on rank 0, None on the others."""
    if dist.world_size() == 1:
        return build_index(datastore_dir, out_path, settings, say=say)
    if dist.is_main():  # an index of one shard is built by rank 0 alone
        build_index(datastore_dir, out_path, dataclasses.replace(settings, only=()), say=say)
    dist.barrier()
    mine = tuple(range(dist.rank(), settings.shards, dist.world_size()))
    if settings.shards > 1 and mine:
        build_index(datastore_dir, out_path, dataclasses.replace(settings, only=mine))
    dist.barrier()
    out = build_index(datastore_dir, out_path, settings) if dist.is_main() else None  # every shard there: manifest
    dist.barrier()
    return out


def stale_index(path, info: dict, dstore, meta: dict) -> str:
    """The line that refuses an index not built from the datastore ``meta``: grown since (trime index
    add catches it up) or another one (rebuild)."""
    if rows_since(meta, info["datastore_fingerprint"]) is not None:
        return f"{path}: the datastore {dstore} grew since this index was built; run `trime index add {dstore}`"
    return (f"{path}: built from datastore {info['datastore_fingerprint']}, not from {dstore} "
            f"({meta['fingerprint']}); rebuild the index")  # fmt: skip


def grow_index(datastore_dir, out_path, *, chunk: int = 500_000, use_gpu="auto",
               save_every: int = 10_000_000) -> tuple[Path, int]:  # fmt: skip
    """Add the rows a datastore gained (``trime datastore add``) since ``out_path``, a plain index or a
    shard set, was built from it: into the index, or as one more shard filled from a copy of the shard
    set's trained quantizers (``OUT.trained``). Nothing is trained again and no row is added twice;
    resumable like a build. Returns (out_path, rows added)."""
    ds, out = Datastore.open(datastore_dir), Path(out_path)
    side = out.with_name(out.name + ".json")
    if not side.exists() or not (out.exists() or _shards_complete(out, read_json(side))):
        raise DatastoreError(f"{out}: no complete index there (build it with `trime index build`)")
    info = read_json(side)
    if info["datastore_fingerprint"] == ds.fingerprint:
        return out, 0
    old = rows_since(ds.meta, info["datastore_fingerprint"])
    if old != info["rows"]:
        raise DatastoreError(f"{out}: built from datastore {info['datastore_fingerprint']}, which {ds.dir} did not "
                             "grow from (trime datastore add); rebuild it with trime index build")  # fmt: skip
    key = {**info["key"], "rows": ds.rows, "datastore": ds.fingerprint}
    about = {**info, "key": key, "rows": ds.rows, "datastore_fingerprint": ds.fingerprint}
    gpu = _gpu_wanted({"auto": "auto", "yes": True, "no": False}.get(use_gpu, use_gpu))
    partial = out.with_name(out.name + ".partial")
    faiss = faiss_module()
    if info.get("shards"):
        path = out.with_name(f"{out.name}.shard-rows-{old}")  # one more shard, named by its first row
        copy = _empty_copy(out, info)
        copy = _add(ds, copy, partial, key, chunk=chunk, save_every=save_every, gpu=gpu, rows=(old, ds.rows))
        vals = path.with_name(path.name + ".vals.npy")
        save_npy(vals, ds.values[old:].numpy().astype(np.int32))
        _write_index(copy, path)
        shard = {"index": path.name, "values": vals.name, "start": old, "stop": ds.rows,
                 "bytes": path.stat().st_size, "max_value": int(ds.values[old:].max())}  # fmt: skip
        write_json(path.with_name(path.name + ".json"), {**about, "rows": ds.rows - old, "start": old,
                                                         "stop": ds.rows, "bytes": shard["bytes"]})  # fmt: skip
        write_json(side, {**about, "shards": info["shards"] + [shard]})  # the manifest, last
    else:
        index = faiss.read_index(str(out))
        if index.ntotal != ds.rows:  # (else a killed run wrote the index but not yet its sidecar)
            if index.ntotal != old:
                raise DatastoreError(f"{out}: holds {index.ntotal} rows, its sidecar says {old}; rebuild it")
            index = _add(ds, index, partial, key, chunk=chunk, save_every=save_every, gpu=gpu, rows=(old, ds.rows))
            _write_index(index, out)
        write_json(side, about)
    for p in (partial, partial.with_name(partial.name + ".json")):
        p.unlink(missing_ok=True)
    return out, ds.rows - old


def _empty_copy(out: Path, info: dict):
    """An empty index with a shard set's trained quantizers: ``OUT.trained`` (checked against the
    manifest's fingerprint of it) for IVF-PQ, a new exact index with row ids for flat."""
    faiss = faiss_module()
    if info["kind"] == "flat":  # ids = datastore rows, as in the set's other flat shards
        return faiss.IndexIDMap2(_new_index(info, seed=0))
    trained = out.with_name(out.name + ".trained")
    if not trained.is_file() or sha256_file(trained) != info.get("trained_fingerprint"):
        raise DatastoreError(f"{trained}: missing or not the trained quantizers this shard set was built with; "
                             "copy them there (the build's OUT.trained or its --trained file) or rebuild")  # fmt: skip
    return faiss.read_index(str(trained))


def _trained_from(path: Path, plan: dict):
    """The trained, empty index of another build (its ``.trained`` file), checked against ``plan``."""
    faiss = faiss_module()
    if plan["kind"] != "ivfpq":
        raise ConfigError("--trained reuses the quantizers of an IVF-PQ index; this datastore gets a flat one")
    if not path.is_file():
        raise ConfigError(f"{path}: no such trained index (an IVF-PQ build leaves OUT.trained)")
    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    got = (index.d, ivf.nlist, faiss.downcast_index(index).pq.M, index.is_trained)
    metric = faiss.METRIC_INNER_PRODUCT if plan["metric"] == "ip" else faiss.METRIC_L2
    if got != (plan["dim"], plan["n_lists"], plan["code_size"], True) or ivf.metric_type != metric:
        raise ConfigError(f"{path}: trained for (d, lists, code size) = {got[:3]}, this build needs "
                          f"{(plan['dim'], plan['n_lists'], plan['code_size'])} with metric {plan['metric']}")  # fmt: skip
    return index


# A faiss search of fewer queries than this runs on one OpenMP thread. Measured on the shared 2-core
# machine (IVF-PQ 64 and 512 lists, 50k keys, probe 8, k 16): with the other core busy a two-thread search
# of 2–20 queries sometimes waited ~10 ms for its second thread (4–10× one thread's time); from 40 queries
# two threads took 0.6–0.95× one thread's time. Beam decoding sends batch × beam queries a step.
ONE_THREAD_BELOW = 32


@contextmanager
def threads_for(n_queries: int):
    """Run the block's faiss search of ``n_queries`` queries on one OpenMP thread when they are fewer than
    :data:`ONE_THREAD_BELOW`, then restore the thread count it found. Why restore: with torch imported first,
    faiss's OpenMP calls resolve to torch's libgomp, so ``faiss.omp_set_num_threads`` also sets the threads of
    every torch op that follows in this thread (``torch.get_num_threads()``)."""
    faiss = faiss_module()
    before = faiss.omp_get_max_threads()
    if n_queries >= ONE_THREAD_BELOW or before == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_threads(n: int) -> None:
    """Make faiss search on ``n`` OpenMP threads *in the calling thread* (OpenMP's thread count is per
    thread), e.g. in a thread that searches while the model runs on the other cores. Torch's ops in that
    thread get ``n`` too when the two share torch's libgomp (:func:`threads_for`)."""
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


class Index:
    """A built index, ready to search (spec §6.3). Open with :meth:`Index.open`."""

    def __init__(self, index, info: dict, path: Path):
        self.index, self.info, self.path = index, info, path
        self.metric, self.dim, self.rows = info["metric"], int(info["dim"]), int(info["rows"])
        self._warned_k = self._warned_holes = False
        self._vectors: torch.Tensor | None = None  # flat kind on CPU: the keys, for exact search in torch

    @classmethod
    def open(cls, path, *, probe: int = 8, use_gpu="auto", mmap: bool = False) -> Index:
        """Read an index and its sidecar; set nprobe; clone to one GPU when wanted and possible.
        ``mmap`` maps the file instead of reading it (CPU only; less RAM, slower first searches)."""
        path = Path(path)
        side = path.with_name(path.name + ".json")
        if not (path.exists() and side.exists()):
            raise DatastoreError(f"{path}: no complete index there (build it with `trime index build`)")
        info = read_json(side)
        faiss = faiss_module()
        gpu = _gpu_wanted(use_gpu)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and not gpu else 0
        index = faiss.read_index(str(path), flags)
        if info["kind"] == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = probe
        if gpu:
            index = _gpu_clone(index)
            if info["kind"] == "ivfpq":
                index.nprobe = probe
        out = cls(index, info, path)
        if info["kind"] == "flat" and not gpu:  # exact search is faster as one matmul + topk in torch
            out._vectors = torch.from_numpy(index.reconstruct_n(0, index.ntotal))  # (R, d) float32
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def check_datastore(self, ds: Datastore) -> None:
        """Raise DatastoreError when this index was not built from ``ds``."""
        if self.info["datastore_fingerprint"] != ds.fingerprint:
            raise DatastoreError(stale_index(self.path, self.info, ds.dir, ds.meta))

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k neighbours of queries (n, d) (tensor on any device, or array).

        Returns (scores (n, k') float32, ids (n, k') int64, valid (n, k') bool) on the queries'
        device (CPU for arrays), k' = min(k, index size) (a warning when clamped). Scores are
        similarities: inner product (ip) or −squared distance (l2). Holes (faiss id −1, fewer
        than k' hits in the probed lists) get score −inf, id 0 (a valid row, so gathers never
        fail) and valid False.
        """
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        x = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
        x = np.ascontiguousarray(x)  # (n, d)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DatastoreError(f"queries of shape {x.shape} do not match the index width {self.dim}")
        k_eff = min(k, self.ntotal)
        if k_eff < k and not self._warned_k:
            warnings.warn(f"k = {k} is larger than the index ({self.ntotal} rows); searching k = {k_eff}", stacklevel=2)
            self._warned_k = True
        if self._vectors is not None:
            scores, ids = self._exact_search(torch.from_numpy(x), k_eff)
            return scores.to(device), ids.to(device), torch.ones_like(ids, dtype=torch.bool).to(device)
        with threads_for(len(x)):
            dist, ids = self.index.search(x, k_eff)  # (n, k'), (n, k')
        scores = torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32))
        if self.metric == "l2":
            scores = -scores
        ids = torch.from_numpy(ids.astype(np.int64, copy=False))
        valid = ids >= 0
        if not bool(valid.all()):
            if not self._warned_holes:
                warnings.warn("the index returned fewer than k hits for some queries (raise --probe)", stacklevel=2)
                self._warned_holes = True
            scores = scores.masked_fill(~valid, float("-inf"))
            ids = ids.masked_fill(~valid, 0)
        return scores.to(device), ids.to(device), valid.to(device)

    def _exact_search(self, x: torch.Tensor, k: int, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k similarities of queries x (n, d) against every key, ``chunk`` queries at a time
        (0: as many as keep the (chunk, R) similarities within 128 MiB, at least 64: fewer, larger
        matmuls are faster)."""
        keys = self._vectors  # (R, d)
        chunk = chunk or max(64, (1 << 25) // max(len(keys), 1))
        if torch.is_autocast_enabled("cpu"):  # float32 like faiss, in any thread
            with torch.autocast("cpu", enabled=False):
                return self._exact_search(x, k, chunk)
        sq = (keys * keys).sum(1) if self.metric == "l2" else None  # (R,)
        scores, ids = [], []
        for a in range(0, x.shape[0], chunk):
            q = x[a : a + chunk]
            sim = q @ keys.T  # (c, R)
            if sq is not None:  # −‖q − k‖² = 2 q·k − ‖k‖² − ‖q‖²
                sim = 2 * sim - sq - (q * q).sum(1, keepdim=True)
            top = sim.topk(k, dim=1)
            scores.append(top.values)
            ids.append(top.indices)
        return torch.cat(scores), torch.cat(ids)
