"""Binarise text or bytes into a data directory (spec §8, the front of DESIGN's flow of data).

The result is what ``fairseq-preprocess --only-source`` makes (same dictionary, same ids), stored
as numpy instead of fairseq's .bin/.idx::

    out_dir/dict.txt        fairseq dict.txt, built from the train split only (or the one given)
    out_dir/{split}.npy     int32 (n_tokens,) token stream, every line ended by eos
    out_dir/meta.json       written last: {"kind": "data", "level": "word"|"char", "vocab_size",
                            "dictionary": {"source", "sha256"}, "corpus": fetch's meta or null,
                            "splits": {split: {"tokens", "lines", "unk", "replaced", "fingerprint",
                                               "source", "source_sha256", "source_bytes"}}}

With sentencepiece (trime.data.spm) the text is encoded into pieces first and ``sentencepiece.model``
is saved next to dict.txt. A fairseq LM data-bin (``dict.txt``, ``{split}.bin/.idx``) is read wherever
a data directory is (:func:`read_data_meta`, :func:`load_split`; trime.data.fairseq_bin).

``unk`` counts the ids equal to unk in the split; ``replaced`` is fairseq's "replaced by <unk>"
count (out-of-dictionary tokens, not literal ``<unk>`` ones).

Word level: files are read as fairseq reads them: UTF-8, universal newlines (``\\n``, ``\\r\\n``
and a lone ``\\r`` end a line), whitespace tokens, one eos per line (an empty line is just eos).

Char level (raw bytes, enwik8): the standard preparation writes every byte as its decimal value,
space-separated, with byte 10 kept as a real newline, and fairseq then tokenises that text. So here
every byte b != 10 is the token ``str(b)`` and byte 10 ends a line (eos); after the last byte 10,
a final non-empty piece also gets its eos. Token count = n_bytes + (1 if the last byte is not 10).
"""

from __future__ import annotations

import os
import re
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trime.data.dictionary import Dictionary
from trime.data.fairseq_bin import FORMAT as FAIRSEQ_BIN
from trime.data.fairseq_bin import databin_kind, lm_meta, read_indexed, refuse_as_input
from trime.data.spm import Pieces
from trime.errors import DataError
from trime.io import (
    atomic_dir,
    check_replaceable,
    fingerprint_array,
    load_npy,
    read_json,
    read_meta,
    save_npy,
    sha256_file,
    write_meta,
)

DICT = "dict.txt"
CHUNK = 1 << 23  # bytes read at a time (8 MiB)
NEWLINE = 10
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HINT = "run `trime data prepare` first"


# ---------------------------------------------------------------------------------------------
# Reading


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=None, leave=False)


def _byte_chunks(path: Path, whole_lines: bool) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of the file; with ``whole_lines`` each non-final piece ends in b'\\n'."""
    with open(path, "rb") as f:
        offset, carry = 0, b""
        while block := f.read(CHUNK):
            data = carry + block if carry else block
            cut = data.rfind(b"\n") + 1 if whole_lines else len(data)
            if cut == 0:
                carry = data
                continue
            yield offset, data[:cut]
            offset, carry = offset + cut, data[cut:]
        if carry:
            yield offset, carry


def _text_chunks(path: Path, desc: str) -> Iterator[str]:
    """Decoded UTF-8 text of whole lines, newlines normalised to '\\n' (fairseq's text-mode read)."""
    with _progress(path.stat().st_size, desc) as bar:
        for offset, data in _byte_chunks(path, whole_lines=True):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not UTF-8 at byte offset {offset + e.start} ({e.reason}); "
                    "word-level data must be UTF-8 (use char level for raw bytes)"
                ) from None
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            yield text
            bar.update(len(data))


def _lines(text: str) -> list[str]:
    """The lines of a chunk from :func:`_text_chunks` (a final '\\n' does not start a new line)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


# ---------------------------------------------------------------------------------------------
# Counting (pass 1, train only)


def _word_lines(path: Path, desc: str, pieces: Pieces | None) -> Iterator[list[str]]:
    """The lines of a text file, chunk by chunk, encoded by ``pieces`` (a sentencepiece model) when given."""
    for text in _text_chunks(path, desc):
        lines = _lines(text)
        yield pieces.encode(lines) if pieces is not None else lines


def count_words(path: str | os.PathLike, pieces: Pieces | None = None) -> Counter:
    """Whitespace-token counts of a text file, plus one ``</s>`` per line (as fairseq counts)."""
    path = Path(path)
    counts: Counter = Counter()
    n_lines = 0
    for lines in _word_lines(path, f"count {path.name}", pieces):
        for line in lines:
            counts.update(line.split())
        n_lines += len(lines)
    counts["</s>"] += n_lines
    return counts


def _byte_histogram(path: Path, desc: str) -> tuple[np.ndarray, int]:
    """(256,) int64 byte counts and the last byte of the file."""
    hist = np.zeros(256, dtype=np.int64)
    last = NEWLINE
    with _progress(path.stat().st_size, desc) as bar:
        for _, data in _byte_chunks(path, whole_lines=False):
            hist += np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
            last = data[-1]
            bar.update(len(data))
    return hist, last


def count_bytes(path: str | os.PathLike) -> Counter:
    """Char-level token counts: ``str(b)`` for each byte b != 10, plus ``</s>`` per line."""
    path = Path(path)
    hist, last = _byte_histogram(path, f"count {path.name}")
    counts = Counter({str(b): int(n) for b, n in enumerate(hist.tolist()) if n and b != NEWLINE})
    counts["</s>"] += int(hist[NEWLINE]) + (last != NEWLINE)
    return counts


# ---------------------------------------------------------------------------------------------
# Encoding (pass 2)


class _Lookup(dict):
    """symbol -> id with unk for misses, counting them (fairseq's "replaced")."""

    def __init__(self, dictionary: Dictionary):
        super().__init__(dictionary.indices)
        self.unk = dictionary.unk
        self.misses = 0

    def __missing__(self, key: str) -> int:
        self.misses += 1
        return self.unk


def encode_words(
    path: str | os.PathLike, dictionary: Dictionary, pieces: Pieces | None = None
) -> tuple[np.ndarray, dict]:
    """(n_tokens,) int32 ids of a text file (each line's tokens then eos) and {lines, replaced};
    ``pieces``: the lines' sentencepiece pieces instead of their words."""
    path = Path(path)
    lookup = _Lookup(dictionary)
    get, eos = lookup.__getitem__, dictionary.eos
    out = array("i")
    assert out.itemsize == 4
    n_lines = 0
    for lines in _word_lines(path, f"encode {path.name}", pieces):
        n_lines += len(lines)
        for line in lines:
            out.extend(map(get, line.split()))
            out.append(eos)
    ids = np.frombuffer(out, dtype=np.int32) if len(out) else np.zeros(0, dtype=np.int32)  # (n_tokens,)
    return ids, {"lines": n_lines, "replaced": lookup.misses}


def encode_bytes(path: str | os.PathLike, dictionary: Dictionary) -> tuple[np.ndarray, dict]:
    """(n_tokens,) int32 ids of a file's bytes: byte b -> id of ``str(b)``, byte 10 -> eos."""
    path = Path(path)
    lut = np.array([dictionary.index(str(b)) for b in range(256)], dtype=np.int32)  # (256,)
    lut[NEWLINE] = dictionary.eos
    size = path.stat().st_size
    ids = np.empty(size + 1, dtype=np.int32)  # (n_bytes + 1,)
    hist = np.zeros(256, dtype=np.int64)
    pos, last = 0, NEWLINE
    with _progress(size, f"encode {path.name}") as bar:
        for _, data in _byte_chunks(path, whole_lines=False):
            a = np.frombuffer(data, dtype=np.uint8)
            ids[pos : pos + len(a)] = lut[a]
            hist += np.bincount(a, minlength=256)
            pos, last = pos + len(a), data[-1]
            bar.update(len(data))
    if pos and last != NEWLINE:
        ids[pos] = dictionary.eos
        pos += 1
    unk_bytes = (lut == dictionary.unk) & (np.arange(256) != NEWLINE)
    stats = {"lines": int(hist[NEWLINE]) + (last != NEWLINE), "replaced": int(hist[unk_bytes].sum())}
    return ids[:pos], stats


# ---------------------------------------------------------------------------------------------
# Data directories


def _check_sources(splits: dict, need_train: bool) -> dict[str, Path]:
    if not splits:
        raise DataError("no splits to prepare (expected at least a 'train' file)")
    if need_train and "train" not in splits:
        raise DataError(
            "a 'train' split is needed to build the dictionary or train --sentencepiece-vocab "
            "(or pass an existing dict.txt with --dict, and --sentencepiece-model)"
        )
    sources = {}
    for name, path in splits.items():
        if not _SPLIT_NAME.match(str(name)):
            raise DataError(f"bad split name {name!r} (letters, digits, '_', '.', '-')")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{name} split: {path}: no such file")
        if path.stat().st_size == 0:
            raise DataError(f"{name} split: {path}: empty file")
        sources[str(name)] = path
    return sources


def _resolve_dictionary(
    sources: dict[str, Path], char_level: bool, given, pieces: Pieces | None
) -> tuple[Dictionary, str]:
    """The dictionary to encode with and where it came from ('train' or the given path)."""
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = path / DICT
        return Dictionary.load(path), str(path.resolve())
    counts = count_bytes(sources["train"]) if char_level else count_words(sources["train"], pieces)
    return Dictionary.build(counts), "train"


def _binarize(name: str, path: Path, d: Dictionary, char_level: bool, out: Path, pieces: Pieces | None) -> dict:
    """Encode one split into ``out/{name}.npy``; return its meta.json entry."""
    ids, stats = encode_bytes(path, d) if char_level else encode_words(path, d, pieces)
    save_npy(out / f"{name}.npy", ids)
    return {
        "tokens": len(ids),
        "lines": int(stats["lines"]),
        "unk": int(np.count_nonzero(ids == d.unk)),
        "replaced": int(stats["replaced"]),
        "fingerprint": fingerprint_array(ids),
        "source": str(path.resolve()),
        "source_sha256": sha256_file(path),
        "source_bytes": path.stat().st_size,
        "source_mtime_ns": path.stat().st_mtime_ns,
    }


def check_out_dir(out_dir: Path, kind: str, overwrite: bool) -> None:
    """Refuse to replace anything but a complete artifact of the same kind holding only its own files
    (and that only with overwrite): see :func:`trime.io.check_replaceable`."""
    check_replaceable(Path(out_dir), kind, overwrite)


UNK_WARN = 0.10  # share of <unk> among a split's words above which prepare warns


def data_warnings(meta: dict) -> list[str]:
    """Suspicious splits of a data directory's meta.json, as lines with the numbers: a split with
    no words (only line ends), or one whose words are mostly <unk> (e.g. --dict of another corpus)."""
    out = []
    for name, sp in meta.get("splits", {}).items():
        words = sp["tokens"] - sp["lines"]
        if words <= 0:
            out.append(f"the {name} split has no words: {sp['lines']} lines, all of them empty")
        elif sp["unk"] / words > UNK_WARN:
            out.append(
                f"{sp['unk'] / words:.0%} of the {name} split's words are <unk> ({sp['unk']} of {words}); "
                "was the dictionary made for another corpus?"
            )
    return out


def warn_data(meta: dict, where) -> None:
    for line in data_warnings(meta):
        print(f"trime: warning: {where}: {line}", file=sys.stderr, flush=True)


def _pieces(sources: dict[str, Path], char_level: bool, model, vocab: int | None) -> Pieces | None:
    """The sentencepiece model to encode with: the given one, or one trained on the train split."""
    if model is None and vocab is None:
        return None
    if char_level or (model is not None and vocab is not None):
        raise DataError("--sentencepiece-model or --sentencepiece-vocab: one of them, and not with --char-level")
    if model is not None:
        return Pieces.load(model)
    lines = (ln for chunk in _word_lines(sources["train"], "read train", None) for ln in chunk)
    return Pieces.train(lines, vocab)


def _prepare(
    splits, out_dir, *, char_level: bool, dictionary, overwrite: bool, corpus: dict | None, spm_model=None,
    spm_vocab: int | None = None,
) -> Path:  # fmt: skip
    sources = _check_sources(splits, need_train=dictionary is None or spm_vocab is not None)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "data", overwrite)
    pieces = _pieces(sources, char_level, spm_model, spm_vocab)
    d, origin = _resolve_dictionary(sources, char_level, dictionary, pieces)
    with atomic_dir(out_dir, overwrite=overwrite, kind="data") as tmp:
        d.save(tmp / DICT)
        spm_meta = pieces.save(tmp) if pieces is not None else None
        split_meta = {name: _binarize(name, path, d, char_level, tmp, pieces) for name, path in sources.items()}
        meta = write_meta(
            tmp,
            "data",
            level="char" if char_level else "word",
            vocab_size=len(d),
            dictionary={"source": origin, "sha256": sha256_file(tmp / DICT)},
            **({"sentencepiece": spm_meta} if spm_meta else {}),  # what encoded the text, when not just words
            corpus=corpus,
            splits=split_meta,
        )
    warn_data(meta, out_dir)
    return out_dir


def prepare(
    splits: dict[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    char_level: bool = False,
    dictionary: str | os.PathLike | None = None,
    sentencepiece_model: str | os.PathLike | None = None,
    sentencepiece_vocab: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Binarise ``{split: file}`` into ``out_dir`` (module docstring); return ``out_dir``.

    The dictionary is built from the ``train`` split unless ``dictionary`` (a dict.txt, or a data
    directory holding one) is given, e.g. a checkpoint's vocabulary; other splits are encoded with
    it, unknown tokens becoming unk. ``sentencepiece_model`` encodes the text with that model first,
    ``sentencepiece_vocab`` with one of that many pieces trained on train (trime.data.spm; either is
    saved in the directory). The directory is built under a temporary name and appears complete
    (with meta.json) only at the end.
    """
    return _prepare(
        splits, out_dir, char_level=char_level, dictionary=dictionary, overwrite=overwrite, corpus=None,
        spm_model=sentencepiece_model, spm_vocab=sentencepiece_vocab,
    )  # fmt: skip


def prepare_corpus(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    char_level: bool | None = None,
    dictionary: str | os.PathLike | None = None,
    sentencepiece_model: str | os.PathLike | None = None,
    sentencepiece_vocab: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Binarise a corpus directory (train.txt, valid.txt, test.txt; train.txt is required unless
    ``dictionary`` is given and nothing is trained). Options as :func:`prepare`.

    When ``char_level`` is None it is taken from the corpus meta.json's ``level`` written by
    :func:`trime.data.fetch.fetch` (word level when there is none).
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"{corpus_dir}: no such corpus directory (run `trime data fetch` first)")
    refuse_as_input(corpus_dir)
    splits = {s: corpus_dir / f"{s}.txt" for s in ("train", "valid", "test") if (corpus_dir / f"{s}.txt").exists()}
    if "train" not in splits and (dictionary is None or sentencepiece_vocab is not None or not splits):
        have = ", ".join(sorted(p.name for p in corpus_dir.iterdir() if p.is_file())) or "nothing"
        raise DataError(
            f"{corpus_dir}: no train.txt (has: {have}); a corpus is train.txt, valid.txt, test.txt "
            "(train.txt may be left out when --dict gives the dictionary; translation pairs: --source-lang/--target-lang)"
        )
    corpus = read_json(corpus_dir / "meta.json") if (corpus_dir / "meta.json").is_file() else None
    if char_level is None:
        char_level = bool(corpus and corpus.get("level") == "char")
    return _prepare(
        splits, out_dir, char_level=char_level, dictionary=dictionary, overwrite=overwrite, corpus=corpus,
        spm_model=sentencepiece_model, spm_vocab=sentencepiece_vocab,
    )  # fmt: skip


def read_data_meta(data_dir: str | os.PathLike) -> dict:
    """The meta.json of a complete data directory, or the same made from a fairseq LM data-bin's files
    (trime.data.fairseq_bin); DataError with a hint otherwise."""
    kind = databin_kind(data_dir)
    if kind == "lm":
        return lm_meta(data_dir)
    if kind == "pairs":
        raise DataError(f"{data_dir}: a fairseq data-bin of translation pairs, not language-model data (dict.txt)")
    try:
        return read_meta(data_dir, kind="data")
    except DataError as e:
        raise DataError(f"{e}; {_HINT}") from None


def data_fingerprint(data_dir: str | os.PathLike, splits=None) -> dict:
    """What a data directory holds, from its meta.json (no file is re-hashed): the dictionary's
    sha256 and each split's token fingerprint (``splits``: only these). Compared by whatever reuses
    the data (a resumed run, a datastore, a pipeline stage), never its path."""
    meta = read_data_meta(data_dir)
    have = meta.get("splits", {})
    names = sorted(have) if splits is None else [s for s in splits if s in have]
    return {
        "dictionary": (meta.get("dictionary") or {}).get("sha256"),
        **{f"split:{s}": have[s]["fingerprint"] for s in names},
    }


def describe_difference(old: dict, new: dict) -> str:
    """'a, b' naming the keys whose values differ (for one-line errors)."""
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def load_dictionary(data_dir: str | os.PathLike) -> Dictionary:
    """The dict.txt of a complete data directory."""
    read_data_meta(data_dir)
    return Dictionary.load(Path(data_dir) / DICT)


def load_split(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """(n_tokens,) int32 token stream of ``split``, memory-mapped read-only (a data-bin's: in its own dtype)."""
    meta = read_data_meta(data_dir)
    splits = meta.get("splits", {})
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        hint = "" if meta.get("format") == FAIRSEQ_BIN else f"; {_HINT} with a {split} file"
        raise DataError(f"{data_dir}: no {split!r} split (has: {have}){hint}")
    if meta.get("format") == FAIRSEQ_BIN:
        return read_indexed(Path(data_dir) / split).tokens
    ids = load_npy(Path(data_dir) / f"{split}.npy", mmap=True)
    if ids.dtype != np.int32 or ids.ndim != 1 or len(ids) != splits[split]["tokens"]:
        raise DataError(f"{data_dir}/{split}.npy: does not match meta.json; rerun `trime data prepare --overwrite`")
    return ids


def special_ids(data_dir: str | os.PathLike) -> tuple[int, int]:
    """(pad, eos) of a prepared data directory: its meta.json's when it names them (data prepared
    with another tokenizer), else the fairseq dictionary's (1, 2). ``pad`` never occurs as a token."""
    meta = read_data_meta(data_dir)
    return int(meta.get("pad", Dictionary.pad)), int(meta.get("eos", Dictionary.eos))


def check_vocabulary(data_dir: str | os.PathLike, vocab_size: int, dictionary: Dictionary | None = None) -> None:
    """Raise DataError when the data's vocabulary does not fit a model's: its dict.txt differs from
    the model's ``dictionary`` (when the model has one), or its size differs from ``vocab_size``
    (for data made with a Hugging Face tokenizer: exceeds it)."""
    meta = read_data_meta(data_dir)
    if (Path(data_dir) / DICT).exists():
        mine = load_dictionary(data_dir)
        if dictionary is not None and mine.symbols != dictionary.symbols:
            raise DataError(
                f"{data_dir}/{DICT} differs from the model's dictionary: prepare the data with "
                "`trime data prepare ... --dict` from the checkpoint"
            )
        size = len(mine)
    else:
        size = int(meta["vocab_size"])
        if meta.get("level") == "hf":  # ids of a Hugging Face tokenizer: the model's head may have spare rows
            if dictionary is not None:
                raise DataError(
                    f"{data_dir}: prepared with a Hugging Face tokenizer, but the model has a "
                    "fairseq dictionary: prepare the data with `trime data prepare ... --dict`"
                )
            if size > vocab_size:
                raise DataError(
                    f"{data_dir}: the tokenizer has {size} tokens but the model only {vocab_size}: "
                    "prepare the data with the model's own tokenizer (--hf-tokenizer)"
                )
            return
    if size != vocab_size:
        raise DataError(f"{data_dir}: the vocabulary has {size} types but the model expects {vocab_size}")
