"""The external datastore: keys and values of every scored training position (spec §6.1).

Letters: R rows, n rows of one block, d key width.

Layout of one datastore (or of one shard ``shard{rank}/`` of a sharded one)::

    keys.npy        (R, d) float16 (or float32)   real .npy files, memory-mapped
    vals.npy        (R,)   int32                  the token that followed each key
    progress.json   completed row ranges          only while the build is unfinished
    meta.json       written LAST                  kind "datastore", dim, rows, key_dtype, ...

The files are built *in place* (not under a temporary name) so that a killed build can resume:
after each flushed group of blocks the memmaps are flushed and then ``progress.json`` is
replaced atomically, so it never claims a row that is not on disk. ``meta.json`` is written
only after every row was written, so a directory without it is incomplete and is never read as
complete. Row r of a datastore is the r-th scored position the builder visits; the builder
decides the mapping to stream positions. Fixes against the original (spec §6.1, §11 item 8):
values are int32 (not int64, never int16), the files carry .npy headers, and there are no
trailing zero rows: the row count is exact.

Sharding: rank w of W writes rows ``shard_range(R, w, W)`` into ``out_dir/shard{w}``; once all
are complete, :func:`merge_shards` writes ``out_dir/meta.json`` listing them (no copy), and
:class:`Datastore` reads a sharded datastore as one.

Growing (:func:`grow`, ``trime datastore add``): the rows of new text are built as a datastore of their
own in ``out_dir/add-<fingerprint of the text>`` and appended as one more part: its rows follow every
earlier row, so the rows of an index built before keep their numbers and the index only needs the new
ones (``trime index add``). A one-directory datastore becomes ``part0`` first, by hard links (no copy).
The meta lists where each range of rows came from (``sources``) and the fingerprints the datastore had
before each growth (``grown_from``), by which an index of an earlier state finds the rows it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from trime.errors import DataError, DatastoreError
from trime.io import fingerprint_array, is_complete, read_json, read_meta, shard_range, write_json, write_meta

KIND = "datastore"
KEY_DTYPES = ("float16", "float32")
PROGRESS = "progress.json"
# meta fields the caller is expected to give (stored as None when missing)
CALLER_FIELDS = ("key_type", "vocab_size", "model_fingerprint", "split_fingerprint")
# what made the rows besides the caller fields: a resumed or reused build must agree on all of them
BUILD_FIELDS = CALLER_FIELDS + ("split", "context_window", "tokens_per_sample", "precision")


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


class DatastoreWriter:
    """Writes one datastore directory (or shard) block by block; resumable (module docstring).

    ``flush_rows``: rows written between flushes (each flush also records progress); a killed
    build redoes at most that many rows. ``row_offset``: global row of local row 0 (a shard's
    start), so ``write`` takes global row numbers.
    """

    def __init__(
        self,
        out_dir,
        dim: int,
        *,
        key_dtype: str = "float16",
        expected_rows: int,
        meta: dict | None = None,
        row_offset: int = 0,
        flush_rows: int = 1 << 16,
        overwrite: bool = False,
    ):
        if key_dtype not in KEY_DTYPES:
            raise DatastoreError(f"key dtype must be one of {KEY_DTYPES}, got {key_dtype!r}")
        if expected_rows <= 0 or dim <= 0:
            raise DatastoreError(f"a datastore needs rows > 0 and dim > 0 (got rows {expected_rows}, dim {dim})")
        self.dir = Path(out_dir)
        self.dim, self.rows, self.key_dtype = int(dim), int(expected_rows), key_dtype
        self.meta, self.row_offset, self.flush_rows = dict(meta or {}), int(row_offset), int(flush_rows)
        if is_complete(self.dir):
            if not overwrite:
                raise DatastoreError(
                    f"{self.dir}: a complete datastore is already there (remove it or pass --overwrite)"
                )
            (self.dir / "meta.json").unlink()
        elif self.dir.exists() and not (self.dir / PROGRESS).exists() and not _empty_dir(self.dir):
            raise DatastoreError(
                f"{self.dir}: exists and is neither a trime datastore nor an unfinished build of one; "
                "choose another output directory"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._settings = {"dim": self.dim, "rows": self.rows, "key_dtype": key_dtype, "row_offset": self.row_offset}
        self._settings.update({k: self.meta[k] for k in BUILD_FIELDS if k in self.meta})
        self.ranges = self._load_progress()
        if not (self.dir / PROGRESS).exists():  # claims the directory before any row file is made
            write_json(self.dir / PROGRESS, {"settings": self._settings, "ranges": []})
        mode = "r+" if self.ranges else "w+"
        open_memmap = np.lib.format.open_memmap
        self.keys = open_memmap(self.dir / "keys.npy", mode=mode, dtype=key_dtype, shape=(self.rows, self.dim))
        self.vals = open_memmap(self.dir / "vals.npy", mode=mode, dtype=np.int32, shape=(self.rows,))
        if self.keys.shape != (self.rows, self.dim) or self.keys.dtype != np.dtype(key_dtype):
            raise DatastoreError(f"{self.dir}: keys.npy does not match the progress file; remove the directory")
        self._pending: list[list[int]] = []
        self._pending_rows = 0

    def _load_progress(self) -> list[list[int]]:
        path = self.dir / PROGRESS
        if not path.exists():
            return []
        prog = read_json(path)
        old = prog.get("settings") or {}
        diff = sorted(k for k in set(old) | set(self._settings) if old.get(k) != self._settings.get(k))
        if diff:
            raise DatastoreError(
                f"{self.dir}: an unfinished build with another {', '.join(diff)} is there "
                "(resuming would mix rows of both); remove it or use another directory"
            )
        return _merge_ranges(prog["ranges"])

    def resume_from(self) -> int:
        """First global row not yet written (on disk and recorded)."""
        done = self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0
        return self.row_offset + done

    def write(self, row_start: int, keys, values) -> None:
        """Write rows [row_start, row_start + n) from keys (n, d) and values (n,)."""
        if torch.is_tensor(keys):  # cast on the keys' device: half the transfer for float16
            cast = keys.detach().to(getattr(torch, self.key_dtype)).cpu().numpy()
        else:
            with np.errstate(over="ignore"):
                cast = np.asarray(keys).astype(self.key_dtype)
        values = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
        n = values.shape[0]
        a = row_start - self.row_offset
        if cast.shape != (n, self.dim) or values.shape != (n,):
            raise DatastoreError(f"block of keys {cast.shape} / values {values.shape} does not fit dim {self.dim}")
        if a < 0 or a + n > self.rows:
            raise DatastoreError(
                f"rows {row_start}..{row_start + n} fall outside this datastore's "
                f"{self.row_offset}..{self.row_offset + self.rows}"
            )
        if not np.isfinite(cast).all():
            raise DatastoreError(
                f"non-finite keys in rows {row_start}..{row_start + n} "
                f"(overflow in {self.key_dtype}? try key dtype float32)"
            )
        if n and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise DatastoreError(f"values in rows {row_start}..{row_start + n} do not fit int32 token ids")
        self.keys[a : a + n] = cast
        self.vals[a : a + n] = values
        self._pending.append([a, a + n])
        self._pending_rows += n
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Flush the memmaps, then record the written ranges (atomically)."""
        if not self._pending:
            return
        self.keys.flush()
        self.vals.flush()
        self.ranges = _merge_ranges(self.ranges + self._pending)
        self._pending, self._pending_rows = [], 0
        write_json(self.dir / PROGRESS, {"settings": self._settings, "ranges": self.ranges})

    def close(self) -> None:
        """Flush and record progress; the build stays resumable (no meta.json)."""
        self.flush()

    def finalize(self) -> dict:
        """Check every row was written, then write meta.json (last). Returns the meta."""
        self.flush()
        if self.ranges != [[0, self.rows]]:
            missing = self.rows - sum(b - a for a, b in self.ranges)
            raise DatastoreError(f"{self.dir}: {missing} of {self.rows} rows were never written; cannot finalize")
        fields = {f: None for f in CALLER_FIELDS}
        fields.update(self.meta)
        fields.update(
            dim=self.dim,
            rows=self.rows,
            key_dtype=self.key_dtype,
            row_offset=self.row_offset,
            values_fingerprint=fingerprint_array(np.asarray(self.vals)),
        )
        fields["fingerprint"] = _fingerprint(fields)
        del self.keys, self.vals
        meta = write_meta(self.dir, KIND, **fields)
        (self.dir / PROGRESS).unlink(missing_ok=True)
        return meta

    def __enter__(self) -> DatastoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "keys"):
            self.close()


def _fingerprint(meta: dict) -> str:
    """Identity of a datastore's content: values, shape and what made the keys (never the keys'
    bytes: hashing hundreds of GB would cost more than the build)."""
    parts = {
        k: meta.get(k)
        for k in (
            "dim",
            "rows",
            "key_dtype",
            "key_type",
            "model_fingerprint",
            "split_fingerprint",
            "values_fingerprint",
            "shards",
        )
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_datastore(
    batches: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    out_dir,
    dim: int,
    n_rows: int,
    meta: dict | None = None,
    key_dtype: str = "float16",
    *,
    rank: int = 0,
    world: int = 1,
    flush_rows: int = 1 << 16,
) -> Path:
    """Consume (row_start, keys (n, d), values (n,)) blocks in row order and finalize (spec §6.1).

    With world > 1, this rank writes only ``out_dir/shard{rank}`` (rows ``shard_range``; blocks
    outside it are skipped) and returns the shard directory; run :func:`merge_shards` once all
    ranks are done. Blocks already on disk from an interrupted build are skipped (ask
    ``resume_from(out_dir, ...)`` first to skip the model forward too). A complete datastore with
    the same settings is returned as is.
    """
    shard_dir = Path(out_dir) if world == 1 else Path(out_dir) / f"shard{rank}"
    start, end = shard_range(n_rows, rank, world)
    if is_complete(shard_dir):
        _check_same_build(read_meta(shard_dir, KIND), shard_dir, dim, end - start, key_dtype, meta or {})
        return shard_dir
    with DatastoreWriter(
        shard_dir,
        dim,
        key_dtype=key_dtype,
        expected_rows=end - start,
        meta=meta,
        row_offset=start,
        flush_rows=flush_rows,
    ) as writer:
        done = writer.resume_from()
        for row_start, keys, values in batches:
            n = int(values.shape[0])
            if row_start + n <= done or row_start >= end or row_start + n <= start:
                continue
            lo, hi = max(row_start, start), min(row_start + n, end)  # clip a block straddling shards
            writer.write(lo, keys[lo - row_start : hi - row_start], values[lo - row_start : hi - row_start])
        writer.finalize()
    return shard_dir


def resume_from(out_dir, n_rows: int, *, rank: int = 0, world: int = 1) -> int:
    """First global row the (shard) build in ``out_dir`` still needs; ``end`` when complete."""
    shard_dir = Path(out_dir) if world == 1 else Path(out_dir) / f"shard{rank}"
    start, end = shard_range(n_rows, rank, world)
    if is_complete(shard_dir):
        return end
    path = shard_dir / PROGRESS
    if not path.exists():
        return start
    ranges = _merge_ranges(read_json(path)["ranges"])
    return start + (ranges[0][1] if ranges and ranges[0][0] == 0 else 0)


def build_mismatch(out_dir, meta: dict, *, rank: int = 0, world: int = 1) -> list[str]:
    """The fields of ``meta`` (BUILD_FIELDS) on which the datastore (complete or unfinished) in
    ``out_dir`` differs: a build there would mix rows or return a stale datastore. Empty when
    there is none or it agrees."""
    shard_dir = Path(out_dir) if world == 1 else Path(out_dir) / f"shard{rank}"
    if is_complete(shard_dir):
        old = read_json(shard_dir / "meta.json")
    elif (shard_dir / PROGRESS).exists():
        old = read_json(shard_dir / PROGRESS).get("settings") or {}
    else:
        return []
    return sorted(k for k in BUILD_FIELDS if k in meta and old.get(k) != meta[k])


def _check_same_build(old: dict, where: Path, dim: int, rows: int, key_dtype: str, meta: dict) -> None:
    want = {"dim": dim, "rows": rows, "key_dtype": key_dtype, **{k: meta[k] for k in BUILD_FIELDS if k in meta}}
    diff = [f"{k} {old.get(k)} != {v}" for k, v in want.items() if old.get(k) != v]
    if diff:
        raise DatastoreError(f"{where}: a different datastore is already there ({', '.join(diff)}); remove it")


def merge_shards(out_dir, world: int) -> dict:
    """Write ``out_dir/meta.json`` for a datastore made of ``shard0..shard{world-1}`` (no copy).

    Checks each shard is complete, covers its ``shard_range`` and has the same dim, key dtype
    and key/model/split identity."""
    out_dir = Path(out_dir)
    metas = []
    for w in range(world):
        d = out_dir / f"shard{w}"
        if not is_complete(d):
            raise DatastoreError(f"{d}: shard {w} of {world} is missing or unfinished")
        metas.append(read_meta(d, KIND))
    n_rows = sum(m["rows"] for m in metas)
    same = ("dim", "key_dtype") + CALLER_FIELDS
    for w, m in enumerate(metas):
        if (m["row_offset"], m["row_offset"] + m["rows"]) != shard_range(n_rows, w, world):
            raise DatastoreError(
                f"{out_dir}/shard{w}: holds rows {m['row_offset']}..+{m['rows']}, "
                f"expected {shard_range(n_rows, w, world)} of {n_rows}"
            )
        diff = [k for k in same if m.get(k) != metas[0].get(k)]
        if diff:
            raise DatastoreError(f"{out_dir}/shard{w}: differs from shard0 in {', '.join(diff)}")
    fields = {k: metas[0].get(k) for k in same}
    extra = {
        k: v
        for k, v in metas[0].items()
        if k not in fields
        and k
        not in ("kind", "trime_version", "created", "files", "rows", "row_offset", "values_fingerprint", "fingerprint")
    }
    joined = "".join(m["values_fingerprint"] for m in metas).encode()
    fields.update(
        extra,
        rows=n_rows,
        shards=[f"shard{w}" for w in range(world)],
        values_fingerprint=hashlib.sha256(joined).hexdigest()[:16],
    )
    fields["fingerprint"] = _fingerprint(fields)
    return write_meta(out_dir, KIND, **fields)


class Datastore:
    """A complete datastore (single or sharded), read-only: keys memory-mapped lazily, values in
    RAM as an int64 tensor. Open with :meth:`Datastore.open`."""

    def __init__(self, directory: Path, meta: dict):
        self.dir, self.meta = directory, meta
        self.dim, self.rows, self.key_dtype = int(meta["dim"]), int(meta["rows"]), meta["key_dtype"]
        parts = [directory / s for s in meta["shards"]] if meta.get("shards") else [directory]
        self._parts = parts
        self._offsets = (
            np.cumsum([0] + [read_meta(p, KIND)["rows"] for p in parts]) if len(parts) > 1 else np.array([0, self.rows])
        )
        self._keys: list[np.ndarray] | None = None
        vals = np.concatenate([np.load(p / "vals.npy", allow_pickle=False) for p in parts])
        if vals.shape != (self.rows,):
            raise DatastoreError(f"{directory}: vals.npy holds {vals.shape[0]} rows, meta.json says {self.rows}")
        self.values = torch.from_numpy(vals.astype(np.int64))  # (R,)
        self._values_on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def open(cls, directory) -> Datastore:
        directory = Path(directory)
        try:
            meta = read_meta(directory, KIND)
        except DataError as e:  # restate as a datastore problem
            raise DatastoreError(str(e)) from None
        return cls(directory, meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def __len__(self) -> int:
        return self.rows

    def _key_parts(self) -> list[np.ndarray]:
        if self._keys is None:
            self._keys = [np.load(p / "keys.npy", mmap_mode="r", allow_pickle=False) for p in self._parts]
        return self._keys

    def read_keys(self, start: int, end: int) -> np.ndarray:
        """Keys of rows [start, end) as float32, (end − start, d), read from the memmaps."""
        out = np.empty((end - start, self.dim), dtype=np.float32)  # (n, d)
        for part, a, b in zip(self._key_parts(), self._offsets[:-1], self._offsets[1:], strict=True):
            lo, hi = max(start, a), min(end, b)
            if lo < hi:
                out[lo - start : hi - start] = part[lo - a : hi - a]
        return out

    def take_keys(self, rows: np.ndarray) -> np.ndarray:
        """Keys of the given rows (sort them first for memmap locality) as float32, (n, d)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)  # (n, d)
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        for s, part in enumerate(self._key_parts()):
            sel = np.nonzero(shard == s)[0]
            if sel.size:
                out[sel] = part[rows[sel] - self._offsets[s]]
        return out

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Values of rows ``ids`` (any shape, int64, no −1) on ids' device."""
        if ids.device not in self._values_on:
            self._values_on[ids.device] = self.values.to(ids.device)
        return self._values_on[ids.device][ids]

    def check_compatible(self, dim: int, vocab_size: int, keytype: str, model_fingerprint: str | None = None) -> None:
        """Raise DatastoreError (one line naming what differs) when this datastore does not fit
        the model: key dimension, key type, vocabulary, model fingerprint (when both known)."""
        check_fits(self.meta, self.dir, dim, vocab_size, keytype, model_fingerprint)
        if self.rows and int(self.values.max()) >= vocab_size:
            raise DatastoreError(
                f"{self.dir}: holds token id {int(self.values.max())}, outside the model's vocabulary of {vocab_size}"
            )


def check_fits(meta: dict, where, dim: int, vocab_size: int, keytype: str, model_fingerprint: str | None) -> None:
    """:meth:`Datastore.check_compatible` from the datastore's meta.json alone (no values read): for
    index shards, which check the values they own themselves."""
    if int(meta["dim"]) != dim:
        raise DatastoreError(f"{where}: key dimension {meta['dim']} differs from the model's {dim}")
    if meta.get("key_type") is not None and meta["key_type"] != keytype:
        raise DatastoreError(f"{where}: key type {meta['key_type']!r} differs from the requested {keytype!r}")
    if meta.get("vocab_size") is not None and meta["vocab_size"] != vocab_size:
        raise DatastoreError(f"{where}: vocabulary of {meta['vocab_size']} differs from the model's {vocab_size}")
    if model_fingerprint and meta.get("model_fingerprint") and meta["model_fingerprint"] != model_fingerprint:
        raise DatastoreError(
            f"{where}: built with model {meta['model_fingerprint']}, not this model ({model_fingerprint})"
        )


# ---------------------------------------------------------------------------------------------
# Growing a datastore

GROW_SAME = ("dim", "key_dtype", "key_type", "vocab_size", "model_fingerprint", "precision")  # a new part must agree
PER_BUILD = ("kind", "trime_version", "created", "files", "rows", "row_offset", "shards", "values_fingerprint",
             "fingerprint", "split", "split_fingerprint", "sources", "grown_from")  # fmt: skip


def sources(meta: dict) -> list[dict]:
    """Where each range of a datastore's rows came from, in row order: ``{"parts", "split",
    "split_fingerprint", "rows"}`` (one entry for a datastore that never grew)."""
    if meta.get("sources"):
        return meta["sources"]
    parts = meta.get("shards") or ["."]
    return [{"parts": parts, "split": meta.get("split"), "split_fingerprint": meta.get("split_fingerprint"),
             "rows": meta["rows"]}]  # fmt: skip


def part_name(split_fingerprint: str) -> str:
    """The directory, inside the datastore, that the rows of a split with this fingerprint are added in."""
    return f"add-{split_fingerprint[:16]}"


def check_growable(meta: dict, where, new: dict) -> None:
    """Raise DatastoreError (one line) unless rows made with ``new`` (a datastore's build fields) may be
    added to the datastore of ``meta``: the same key width, dtype, key type, vocabulary and model, and
    text it does not hold yet."""
    diff = [f"{k} {new.get(k)} (it has {meta.get(k)})" for k in GROW_SAME
            if k in new and new[k] != meta.get(k) and not (k == "precision" and k not in meta)]  # fmt: skip
    if diff:
        raise DatastoreError(f"{where}: cannot take rows with another {', '.join(diff)}; build a new datastore")
    held = [s for s in sources(meta) if s.get("split_fingerprint") == new.get("split_fingerprint")]
    if held and not (held[0]["parts"] == [part_name(new["split_fingerprint"])]):
        raise DatastoreError(f"{where}: already holds this text (split {held[0]['split']!r}, fingerprint "
                             f"{new['split_fingerprint']}); nothing to add")  # fmt: skip


def _as_parts(ds_dir: Path, meta: dict) -> list[str]:
    """The parts of a datastore; a one-directory datastore is first made ``part0`` by hard links (its
    files stay where they are until the grown meta.json is written: a killed run leaves it readable)."""
    if meta.get("shards"):
        return list(meta["shards"])
    part0 = ds_dir / "part0"
    if not is_complete(part0):
        tmp = ds_dir / ".part0.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("keys.npy", "vals.npy"):
            os.link(ds_dir / name, tmp / name)
        shutil.copy2(ds_dir / "meta.json", tmp / "meta.json")  # last: a complete part
        shutil.rmtree(part0, ignore_errors=True)
        os.replace(tmp, part0)
    return ["part0"]


def grow(ds_dir, part: str) -> dict:
    """Append the complete datastore ``ds_dir/part`` to the complete datastore ``ds_dir`` as its last
    rows (module docstring); returns the new meta. Idempotent: a part already appended is left as is."""
    ds_dir = Path(ds_dir)
    meta, new = read_meta(ds_dir, KIND), read_meta(ds_dir / part, KIND)
    if part in (meta.get("shards") or []):
        return meta
    check_growable(meta, ds_dir, new)
    parts = _as_parts(ds_dir, meta) + [part]
    fields = {k: v for k, v in meta.items() if k not in PER_BUILD}
    added = {"parts": [part], "split": new.get("split"), "split_fingerprint": new.get("split_fingerprint"),
             "rows": new["rows"]}  # fmt: skip
    was = [{**s, "parts": ["part0"]} if s["parts"] == ["."] else s for s in sources(meta)] + [added]
    values = "".join(read_meta(ds_dir / p, KIND)["values_fingerprint"] for p in parts)
    fields.update(
        rows=meta["rows"] + new["rows"],
        shards=parts,
        sources=was,
        grown_from=meta.get("grown_from", []) + [{"fingerprint": meta["fingerprint"], "rows": meta["rows"]}],
        split=None,  # several texts: see sources
        split_fingerprint=hashlib.sha256("".join(str(s["split_fingerprint"]) for s in was).encode()).hexdigest()[:16],
        values_fingerprint=hashlib.sha256(values.encode()).hexdigest()[:16],
    )
    fields["fingerprint"] = _fingerprint(fields)
    out = write_meta(ds_dir, KIND, **fields)
    if not meta.get("shards"):  # the hard links in part0 hold them now
        for name in ("keys.npy", "vals.npy"):
            (ds_dir / name).unlink(missing_ok=True)
        out = write_meta(ds_dir, KIND, **fields)  # its file list without them
    return out


def rows_since(meta: dict, fingerprint: str) -> int | None:
    """How many rows the datastore had when its fingerprint was ``fingerprint`` (None: never)."""
    if meta["fingerprint"] == fingerprint:
        return int(meta["rows"])
    return next((int(g["rows"]) for g in meta.get("grown_from", []) if g["fingerprint"] == fingerprint), None)
