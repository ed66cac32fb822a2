"""fairseq-preprocess output ("data-bin") read where it lies: memory-mapped, nothing converted or copied.

A data-bin is a directory fairseq-preprocess wrote (its default ``--dataset-impl mmap``)::

    pairs:  dict.{S}.txt, dict.{T}.txt, {split}.{S}-{T}.{S}.bin/.idx, {split}.{S}-{T}.{T}.bin/.idx
    LM:     dict.txt, {split}.bin/.idx                  (fairseq-preprocess --only-source)

Each ``.bin`` is every sentence's ids (eos included) laid end to end in one integer dtype; its ``.idx``
(fairseq's MMapIndexedDataset index) is, little-endian::

    magic b"MMIDIDX\\x00\\x00" | version u64 (1) | dtype code u8 | n u64 | sizes int32 (n,) | pointers int64 (n,)

``sizes[i]`` is sentence i's length in tokens, ``pointers[i]`` its byte offset in the .bin. fairseq-preprocess
writes the sentences contiguously in order (pointer i = sum of the earlier sizes × itemsize), which is checked:
the .bin then *is* the token stream of trime's own prepared directories (``{split}.npy``), only in fairseq's
dtype (uint16 below 65,500 types), and the sentence offsets are the cumulative sizes.

What trime needs besides the arrays, its prepared directories' meta.json, is made here from the files: the
languages from the file names, the vocabulary sizes and sha256 from the dictionaries, and each split's counts
and fingerprint from one pass over its .bin (cached per file and modification time, about a second per 100M
tokens). The fingerprint is the one trime's prepare records for the same ids (of the int32 stream), so a
datastore or run made on either form of the same data accepts the other. Only the splits present are read:
a test split and the dictionaries are enough to translate or evaluate.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trime.data.dictionary import Dictionary
from trime.errors import DataError
from trime.io import META, sha256_file

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"  # fairseq's --dataset-impl lazy/cached index
_HEADER = len(MAGIC) + 8 + 1 + 8  # magic, version, dtype code, n
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16, 9: np.uint32, 10: np.uint64}
FORMAT = "fairseq-bin"
LM_DICT = "dict.txt"
_PAIR_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)\.(?P<a>[^.\-]+)-(?P<b>[^.\-]+)\.(?P<lang>[^.\-]+)\.idx$")
_LM_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)\.idx$")
_CHUNK = 1 << 22  # tokens hashed at a time


# ---------------------------------------------------------------------------------------------
# One indexed file


@dataclass(frozen=True)
class Indexed:
    """One ``.bin``/``.idx`` pair: the token stream (a read-only memmap in fairseq's dtype) and sentence offsets."""

    tokens: np.ndarray  # (n_tokens,) fairseq's integer dtype
    offsets: np.ndarray  # (n + 1,) int64: sentence i is tokens[offsets[i]:offsets[i+1]]


def read_indexed(prefix: str | os.PathLike) -> Indexed:
    """The dataset ``prefix``.bin/.idx, memory-mapped (one DataError line when it is not fairseq's mmap format)."""
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, binf):
        if not path.is_file():
            raise DataError(f"{path}: no such file (a fairseq data-bin has each split as .bin and .idx)")
    with open(idx, "rb") as f:
        head = f.read(_HEADER)
    if head[: len(LEGACY_MAGIC)] == LEGACY_MAGIC:
        raise DataError(
            f"{idx}: fairseq's legacy lazy/cached format; binarise with fairseq-preprocess --dataset-impl mmap"
        )
    if len(head) < _HEADER or head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{idx}: not a fairseq mmap index (no MMIDIDX header)")
    version, code, n = struct.unpack("<QBQ", head[len(MAGIC) :])
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{idx}: unsupported fairseq index (version {version}, dtype code {code})")
    dtype = np.dtype(_DTYPES[code])
    if idx.stat().st_size < _HEADER + 12 * n:
        raise DataError(f"{idx}: truncated ({n} sentences announced)")
    sizes = np.memmap(idx, dtype="<i4", mode="r", offset=_HEADER, shape=(n,)) if n else np.zeros(0, np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)  # (n + 1,)
    np.cumsum(sizes, out=offsets[1:])
    if n:
        pointers = np.memmap(idx, dtype="<i8", mode="r", offset=_HEADER + 4 * n, shape=(n,))
        if not np.array_equal(pointers, offsets[:-1] * dtype.itemsize):
            raise DataError(f"{idx}: sentences are not stored in order, end to end (not fairseq-preprocess output)")
    size = binf.stat().st_size
    if size != offsets[-1] * dtype.itemsize:
        raise DataError(f"{binf}: {size} bytes, its .idx describes {offsets[-1]} tokens of {dtype.itemsize} bytes")
    tokens = np.memmap(binf, dtype=dtype.newbyteorder("<"), mode="r") if size else np.zeros(0, dtype)
    return Indexed(tokens, offsets)


def stream_stats(tokens: np.ndarray, unk: int) -> dict:
    """{"tokens", "unk", "max_id", "fingerprint"} of a token stream; the fingerprint is trime.io.fingerprint_array's
    of the same ids as int32 (what trime's prepare records), computed chunk by chunk."""
    h = hashlib.sha256(f"{np.dtype(np.int32).str}{(len(tokens),)}".encode())
    n_unk, top = 0, -1
    for i in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[i : i + _CHUNK], dtype="<i4")
        h.update(chunk.tobytes())
        n_unk += int(np.count_nonzero(chunk == unk))
        top = max(top, int(chunk.max()))
    return {"tokens": len(tokens), "unk": n_unk, "max_id": top, "fingerprint": h.hexdigest()[:16]}


@functools.lru_cache(maxsize=64)
def _stats(prefix: str, unk: int, stamp: tuple) -> dict:
    """Counts of one dataset, cached per ``stamp``: the (size, mtime) of its .bin and .idx."""
    ds = read_indexed(prefix)
    return {"lines": len(ds.offsets) - 1, **stream_stats(ds.tokens, unk)}


def split_stats(prefix: Path, d: Dictionary, dict_path: Path) -> dict:
    """meta.json-style counts of the dataset ``prefix`` encoded with ``d``; ids outside ``d`` are refused."""
    files = [Path(f"{prefix}.{ext}") for ext in ("bin", "idx")]
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in files)
    stats = dict(_stats(str(prefix), d.unk, stamp))
    top = stats.pop("max_id")
    if top >= len(d):
        raise DataError(
            f"{prefix}.bin: holds ids up to {top} but {dict_path.name} has {len(d)} types: "
            "not the dictionary it was binarised with"
        )
    return stats


# ---------------------------------------------------------------------------------------------
# Directories


def _files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.is_file()) if data_dir.is_dir() else []


def databin_kind(data_dir: str | os.PathLike) -> str | None:
    """ "pairs" or "lm" when ``data_dir`` is a fairseq data-bin (no trime meta.json, .idx files), else None."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir() or (data_dir / META).exists():
        return None
    names = _files(data_dir)
    if any(_PAIR_FILE.match(n) for n in names) and any(n.startswith("dict.") and n != LM_DICT for n in names):
        return "pairs"
    if any(_LM_FILE.match(n) for n in names) and LM_DICT in names:
        return "lm"
    return None


def _have(data_dir: Path) -> str:
    return ", ".join(_files(data_dir)) or "nothing"


def pair_langs(data_dir: str | os.PathLike, source_lang: str | None = None, target_lang: str | None = None):
    """(source, target, file stem "S-T") of a pairs data-bin: the languages its file names hold, chosen by
    ``source_lang``/``target_lang`` when it holds several pairs (fairseq also reads T-S files for S→T)."""
    data_dir = Path(data_dir)
    pairs = sorted({(m["a"], m["b"]) for n in _files(data_dir) if (m := _PAIR_FILE.match(n))})
    names = ", ".join(f"{a}-{b}" for a, b in pairs)
    wanted = [(a, b) for a, b in pairs if source_lang in (None, a, b) and target_lang in (None, a, b)]
    if source_lang and target_lang:
        wanted = [p for p in wanted if set(p) == {source_lang, target_lang}]
    if not wanted:
        asked = f"{source_lang or '?'}-{target_lang or '?'}"
        raise DataError(f"{data_dir}: no {asked} files in this fairseq data-bin (its pairs: {names})")
    if len(wanted) > 1:
        raise DataError(f"{data_dir}: a fairseq data-bin of several pairs ({names}): pass --source-lang/--target-lang")
    a, b = wanted[0]
    src = source_lang or (a if target_lang in (None, b) else b)
    tgt = target_lang or (b if src == a else a)
    for lang in (src, tgt):
        if not (data_dir / f"dict.{lang}.txt").is_file():
            raise DataError(f"{data_dir}: no dict.{lang}.txt in this fairseq data-bin (has: {_have(data_dir)})")
    return src, tgt, f"{a}-{b}"


def _dict_entry(path: Path) -> dict:
    return {"source": str(path.resolve()), "sha256": sha256_file(path)}


def pairs_meta(data_dir: str | os.PathLike, source_lang: str | None = None, target_lang: str | None = None) -> dict:
    """The meta.json trime's prepare would write for this pairs data-bin (trime.data.pairs), from its files."""
    data_dir = Path(data_dir)
    src, tgt, stem = pair_langs(data_dir, source_lang, target_lang)
    dicts = {lang: data_dir / f"dict.{lang}.txt" for lang in (src, tgt)}
    loaded = {lang: Dictionary.load(p) for lang, p in dicts.items()}
    splits: dict[str, dict] = {}
    for name in _files(data_dir):
        m = _PAIR_FILE.match(name)
        if not m or f"{m['a']}-{m['b']}" != stem or m["lang"] != src:
            continue
        split = m["split"]
        entry = {
            lang: split_stats(data_dir / f"{split}.{stem}.{lang}", loaded[lang], dicts[lang]) for lang in (src, tgt)
        }
        if entry[src]["lines"] != entry[tgt]["lines"]:
            raise DataError(
                f"{data_dir}/{split}.{stem}.*: {entry[src]['lines']} {src} sentences but {entry[tgt]['lines']} {tgt}"
            )
        splits[split] = {"pairs": entry[src].pop("lines"), **entry}
        entry[tgt].pop("lines")
    return {
        "kind": "pairs",
        "format": FORMAT,
        "stem": stem,
        "langs": {"source": src, "target": tgt},
        "vocab_size": {lang: len(d) for lang, d in loaded.items()},
        "joined_dictionary": loaded[src].symbols == loaded[tgt].symbols,
        "dictionaries": {lang: _dict_entry(p) for lang, p in dicts.items()},
        "splits": splits,
    }


def pair_split_files(data_dir: str | os.PathLike, meta: dict, split: str) -> tuple[Indexed, Indexed]:
    """The (source, target) datasets of ``split`` of a pairs data-bin whose :func:`pairs_meta` is ``meta``."""
    stem = meta["stem"]
    return tuple(read_indexed(Path(data_dir) / f"{split}.{stem}.{meta['langs'][k]}") for k in ("source", "target"))


def _byte_level(d: Dictionary) -> bool:
    """A dictionary of byte values written as decimals (enwik8's fairseq preparation): char-level data."""
    words = d.symbols[d.nspecial :]
    return bool(words) and all(w.isdigit() and int(w) < 256 for w in words)


def lm_meta(data_dir: str | os.PathLike) -> dict:
    """The meta.json trime's prepare would write for this LM data-bin (trime.data.prepare), from its files.
    The level is "char" when every word of dict.txt is a byte value (enwik8), else "word"."""
    data_dir = Path(data_dir)
    path = data_dir / LM_DICT
    d = Dictionary.load(path)
    splits = {}
    for name in _files(data_dir):
        if m := _LM_FILE.match(name):
            splits[m["split"]] = split_stats(data_dir / m["split"], d, path)
    return {
        "kind": "data",
        "format": FORMAT,
        "level": "char" if _byte_level(d) else "word",
        "vocab_size": len(d),
        "dictionary": _dict_entry(path),
        "splits": splits,
    }


def databin_meta(data_dir: str | os.PathLike, source_lang: str | None = None, target_lang: str | None = None):
    """:func:`pairs_meta` or :func:`lm_meta` of a data-bin; None when ``data_dir`` is not one."""
    kind = databin_kind(data_dir)
    if kind == "pairs":
        return pairs_meta(data_dir, source_lang, target_lang)
    return lm_meta(data_dir) if kind == "lm" else None


def refuse_as_input(data_dir: str | os.PathLike) -> None:
    """``trime data prepare`` takes text: a data-bin is already binarised, and every command reads it as it is."""
    kind = databin_kind(data_dir)
    if kind is not None:
        use = "trime mt generate/train/datastore" if kind == "pairs" else "trime eval/train/datastore build"
        raise DataError(
            f"{data_dir}: already binarised (fairseq-preprocess output); nothing to prepare: pass it to `{use}` as it is"
        )
