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
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def _crash_point(step: str) -> None:
    """A no-op between the steps of a directory replacement; tests replace it to simulate a kill."""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # our own leftovers come from an earlier, failed attempt in this process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> list[tuple[str, Path]]:
    """(".partial" | ".old", dir) of interrupted writes/replacements of ``path`` by dead processes."""
    out = []
    if not path.parent.is_dir():
        return out
    prefix = f".{path.name}."
    for p in path.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        tag, _, pid = p.name[len(prefix) :].partition("-")
        if tag in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            out.append((tag, p))
    return sorted(out, key=lambda t: t[1].name)


def recover_dir(path: str | os.PathLike, say=print) -> None:
    """Finish or undo an interrupted replacement of the artifact ``path`` (see :func:`atomic_dir`).

    A replacement is: build ``.NAME.partial-PID``, rename ``NAME`` to ``.NAME.old-PID``, rename the
    partial to ``NAME``, delete the old one. A kill between any two steps leaves a state this puts
    right: when ``NAME`` is missing, the newest complete leftover (the finished partial, else the
    old one) is renamed into place; every other leftover is deleted. Each action is reported.
    """
    path = Path(path)
    left = _leftovers(path)
    if not left:
        return
    if not path.exists():
        for want in ("partial", "old"):
            pick = next((p for tag, p in left if tag == want and is_complete(p)), None)
            if pick is not None:
                os.replace(pick, path)
                say(f"| {path}: restored from {pick.name}, left by an interrupted replacement")
                left = [(t, p) for t, p in left if p != pick]
                break
    for tag, p in left:
        shutil.rmtree(p, ignore_errors=True)
        what = "an unfinished build" if tag == "partial" else "the old copy of an interrupted replacement"
        say(f"| {path}: removed {p.name}, {what}")


def check_not_a_file(path: str | os.PathLike, kind: str | None) -> None:
    """Refuse (one line) a directory output ``path`` where a file is: a user's file is never replaced."""
    if (os.path.exists(path) or os.path.islink(path)) and not os.path.isdir(path):
        raise DataError(f"{path}: a file is there, not a trime {kind or 'artifact'} directory; choose another path")


def check_replaceable(path: Path, kind: str | None, overwrite: bool) -> None:
    """Refuse to write ``path`` unless it is absent, an empty directory, or (with ``overwrite``) a
    complete artifact of ``kind`` holding only files it wrote: a user's files are never deleted."""
    if not path.exists() and not path.is_symlink():
        return
    check_not_a_file(path, kind)
    if not is_complete(path):
        if any(path.iterdir()):
            raise DataError(
                f"{path}: exists and is not a trime {kind or 'artifact'} directory (no {META}); "
                "choose another output path"
            )
        return
    meta = read_json(path / META)
    found = meta.get("kind") if isinstance(meta, dict) else None
    if kind is not None and found != kind:
        raise DataError(f"{path}: holds a {found!r} artifact, not a {kind!r} one; refusing to replace it")
    if not overwrite:
        raise DataError(f"{path}: already exists (remove it or pass --overwrite)")
    own = meta.get("files")
    if own is not None:
        foreign = sorted(set(os.listdir(path)) - set(own) - {META})
        if foreign:
            raise DataError(
                f"{path}: holds {foreign[0]!r}, which trime did not write there; move it away before replacing"
            )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Build an artifact directory under a temporary name; move it into place on success.

    The caller writes ``meta.json`` (with :func:`write_meta`) as its last step. What may be
    replaced is decided by :func:`check_replaceable`. The replacement is crash-safe at every instant
    (:func:`recover_dir` puts right what a kill between its steps leaves).
    """
    path = Path(path)
    recover_dir(path)
    check_replaceable(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / META).exists():
            raise RuntimeError(f"atomic_dir({path}): the writer did not write {META}")
        if path.exists() and is_complete(path):
            own = read_json(path / META).get("files")
            foreign = sorted(set(os.listdir(path)) - set(own if own is not None else os.listdir(tmp)) - {META})
            if foreign:
                raise DataError(
                    f"{path}: holds {foreign[0]!r}, which trime did not write there; move it away before replacing"
                )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _crash_point("written")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
        _crash_point("old aside")
    os.replace(tmp, path)
    _crash_point("new in")
    shutil.rmtree(old, ignore_errors=True)


# --- single files the user names (--out report.html, --results-path, --output-word-probs ...) ------

GENERATOR = "trime"  # the marker inside a file of ours, where its format has room for one
HTML_MARKER = f'<meta name="generator" content="{GENERATOR}">'


@dataclass(frozen=True)
class OutputKind:
    """A kind of single file a command writes at a path the user names, and how an earlier one of ours
    is recognised: by a marker inside where the format has room for one (HTML and JSON reports), else by
    its shape (a JSON list of ids, a .npy, fairseq's S-/T-/H-/D- lines), which a file the user keeps
    under that name is not expected to have."""

    what: str  # named in the refusal: "holds something that is not a {what}"
    is_own: Callable[[Path], bool]


def check_output_file(path: str | os.PathLike, kind: OutputKind) -> Path:
    """Refuse (one line) to write the file ``path`` over a directory or over a file that is not an earlier
    output of ``kind``; a user's file is never replaced. Call it before a long job, so that a path that
    will be refused is refused before the work; :func:`output_file` checks again when it writes."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a {kind.what} file; choose another path")
    if path.exists() and not kind.is_own(path):
        raise DataError(f"{path}: holds something that is not a {kind.what}; refusing to overwrite it")
    return path


@contextlib.contextmanager
def output_file(path: str | os.PathLike, kind: OutputKind) -> Iterator[Path]:
    """The one way to write a file the user named: refuse what is not ours (:func:`check_output_file`),
    then yield a temporary path that is renamed over ``path`` if the block succeeds (:func:`atomic_file`),
    so the path holds the old file or the whole new one, never a part."""
    with atomic_file(check_output_file(path, kind)) as tmp:
        yield tmp


def is_npy(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def is_id_list(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, list) and all(type(i) is int for i in obj)


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def has_html_marker(path: Path) -> bool:
    with open(path, "rb") as f:
        return HTML_MARKER.encode() in f.read(4096)  # it sits in <head>


def has_json_marker(path: Path) -> bool:
    try:
        obj = json.loads(_text(path) or "null")
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("generator") == GENERATOR


_HYPOTHESIS_LINE = re.compile(r"^[STHDP]-\d+\t")


def is_hypotheses(path: Path) -> bool:
    """Only fairseq-generate's lines (``S-0<tab>source``, ``H-0<tab>score<tab>text`` ...); an empty file too."""
    text = _text(path)
    return text is not None and all(_HYPOTHESIS_LINE.match(line) for line in text.splitlines() if line)


def is_segments(path: Path) -> bool:
    """BM25 segments: JSON lines ``{"id": 0, "contents": ...}`` from id 0 (the first line is looked at)."""
    with open(path, "rb") as f:
        first = f.readline()
    try:
        obj = json.loads(first) if first.strip() else {"id": 0, "contents": ""}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and set(obj) == {"id", "contents"} and obj["id"] == 0


def is_faiss_index(path: Path) -> bool:
    """A faiss index of trime's: its sidecar ``NAME.json`` holds the settings' key, or its ``NAME.building``
    claim says a build of ours was writing it (trime.memory.index.build_index writes both)."""
    side, claim = path.with_name(path.name + ".json"), path.with_name(path.name + ".building")
    if claim.is_file():
        return True
    try:
        obj = json.loads(_text(side) or "null") if side.is_file() else None
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "key" in obj


BATCH_ORDER = OutputKind("batch order (JSON list of ids)", is_id_list)
WORD_PROBS = OutputKind("word-probabilities .npy", is_npy)
HTML_REPORT = OutputKind("trime HTML report", has_html_marker)
JSON_REPORT = OutputKind("trime JSON report", has_json_marker)
HYPOTHESES = OutputKind("results file (S-/T-/H-/D- lines)", is_hypotheses)
SEGMENTS = OutputKind("segments file (JSON lines of id and contents)", is_segments)
FAISS_INDEX = OutputKind("trime index (a faiss file with its NAME.json sidecar)", is_faiss_index)


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
    directory = Path(directory)
    files = sorted([p.name for p in directory.iterdir()] if directory.is_dir() else [])
    meta = {
        "kind": kind,
        "trime_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **fields,
        "files": files,  # what the artifact wrote: anything else found there later is a user's
    }
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


_HASHED: dict[tuple, str] = {}  # sha256_file(remember=True): (real path, inode, size, mtime) -> digest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, *, remember: bool = False) -> str:
    """The sha256 of a file's bytes. ``remember``: hash a file once per process while its inode, size and
    modification time stay the same (a large model file that several steps of one command fingerprint)."""
    if remember:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _HASHED:
            _HASHED[key] = sha256_file(path, chunk)
        return _HASHED[key]
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
