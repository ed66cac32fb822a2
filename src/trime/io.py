"""The one place that writes artifacts.

An artifact is a directory whose ``meta.json`` is written last: a directory without it is
incomplete and is never read as complete. Files are written under a temporary name and renamed
into place, so a killed process never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trime import __version__
from trime.errors import DataError

META = "meta.json"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save an array as .npy, atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build an artifact directory under a temporary name; rename it into place on success.

    The caller writes ``meta.json`` (with :func:`write_meta`) as its last step. If ``path``
    already holds a complete artifact and ``overwrite`` is false, that is an error; anything else
    already at ``path`` (a file, or a directory that is not an empty one or a trime artifact) is
    never replaced, so a mistyped output path cannot delete a user's files.
    """
    path = Path(path)
    if is_complete(path) and not overwrite:
        raise DataError(f"{path}: already exists (remove it or pass --overwrite)")
    if path.exists() and not is_complete(path) and (not path.is_dir() or any(path.iterdir())):
        raise DataError(f"{path}: exists and is not a trime artifact (no {META}); choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / META).exists():
            raise RuntimeError(f"atomic_dir({path}): the writer did not write {META}")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Items [start, end) of shard ``shard`` of ``num_shards`` over n items: contiguous, in order,
    sizes differing by at most one (datastore rows per rank, BM25 queries per search shard)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    return n * shard // num_shards, n * (shard + 1) // num_shards


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is an artifact directory whose meta.json was written."""
    return (Path(path) / META).is_file()


def write_meta(directory: str | os.PathLike, kind: str, **fields: Any) -> dict:
    """Write ``directory/meta.json`` (last step of an artifact) and return it."""
    meta = {"kind": kind, "trime_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    write_json(Path(directory) / META, meta)
    return meta


def read_meta(directory: str | os.PathLike, kind: str | None = None) -> dict:
    """Read an artifact's meta.json; a missing one means the artifact is incomplete."""
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"{directory}: no such directory")
    if not is_complete(directory):
        raise DataError(f"{directory}: incomplete or not a trime artifact (no {META})")
    meta = read_json(directory / META)
    if kind is not None and meta.get("kind") != kind:
        raise DataError(f"{directory}: is a {meta.get('kind')!r} artifact, expected {kind!r}")
    return meta


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_array(array: np.ndarray) -> str:
    """A short content hash of an array (dtype, shape and bytes)."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    step = 1 << 24
    for i in range(0, flat.size, step):
        h.update(flat[i : i + step].tobytes())
    return h.hexdigest()[:16]


class JsonlLogger:
    """Appends one JSON object per line; each line is flushed so a killed run keeps its log."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
