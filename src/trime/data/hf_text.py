"""Prepare text with a Hugging Face tokenizer into the data directory format of ``trime data prepare``.

    out_dir/{split}.npy     int32 (n_tokens,) token stream: each line's ids (no special tokens), then eos
    out_dir/meta.json       written last: {"kind": "data", "level": "hf", "vocab_size", "eos", "pad",
                            "tokenizer": {"source", "sha256", "class"}, "corpus": fetch's meta or null,
                            "splits": {split: {"tokens", "lines", "unk", "replaced", "fingerprint",
                                               "source", "source_sha256", "source_bytes"}}}

Lines are read as ``trime data prepare`` reads them (UTF-8, universal newlines, an empty line is just
eos) and tokenised in batches of lines without special tokens. There is no dict.txt: ids are the
tokenizer's. ``eos`` is the tokenizer's eos id. ``pad`` is an id that never occurs in any prepared
split, so batching can pad with it and mask it: the tokenizer's pad id when it does not occur, else
the smallest id that does not. ``unk`` counts the tokenizer's unk id (0 without one); ``replaced`` is 0
(a subword tokenizer replaces nothing). ``vocab_size`` is ``len(tokenizer)``; the model's head may be
larger, never smaller.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from trime import hf_cache
from trime.data.prepare import _check_sources, _lines, _text_chunks, check_out_dir
from trime.errors import ConfigError, DataError
from trime.io import atomic_dir, fingerprint_array, read_json, save_npy, sha256_file, write_meta

BATCH_LINES = 1000


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (fast tokenizers) or of its vocabulary, plus its specials."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def encode_lines(
    path: str | os.PathLike, tokenizer, eos: int, batch_lines: int = BATCH_LINES
) -> tuple[np.ndarray, int]:
    """((n_tokens,) int32 ids of a text file, each line's tokens then eos; number of lines)."""
    path = Path(path)
    pieces: list[np.ndarray] = []
    n_lines = 0
    for text in _text_chunks(path, f"tokenize {path.name}"):
        lines = _lines(text)
        n_lines += len(lines)
        for i in range(0, len(lines), batch_lines):
            batch = lines[i : i + batch_lines]
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            flat = [t for line in ids for t in (*line, eos)]
            pieces.append(np.asarray(flat, dtype=np.int64))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)  # (n_tokens,)
    if len(ids) and (ids.min() < 0 or ids.max() >= np.iinfo(np.int32).max):
        raise DataError(f"{path}: the tokenizer produced ids outside int32")
    return ids.astype(np.int32), n_lines


def choose_pad(preferred: int | None, counts: np.ndarray) -> int:
    """``preferred`` when it never occurs (counts (V,) per id), else the smallest id that never occurs."""
    if preferred is not None and preferred >= 0 and (preferred >= len(counts) or counts[preferred] == 0):
        return int(preferred)
    free = np.flatnonzero(counts == 0)
    if not len(free):
        raise DataError("every token id occurs in the data: no id is free to serve as padding")
    return int(free[0])


def _binarize(name: str, path: Path, tokenizer, eos: int, out: Path) -> tuple[dict, np.ndarray]:
    ids, n_lines = encode_lines(path, tokenizer, eos)
    save_npy(out / f"{name}.npy", ids)
    unk = tokenizer.unk_token_id
    entry = {
        "tokens": len(ids),
        "lines": int(n_lines),
        "unk": int(np.count_nonzero(ids == unk)) if unk is not None else 0,
        "replaced": 0,
        "fingerprint": fingerprint_array(ids),
        "source": str(path.resolve()),
        "source_sha256": sha256_file(path),
        "source_bytes": path.stat().st_size,
        "source_mtime_ns": path.stat().st_mtime_ns,
    }
    return entry, ids


def _prepare(splits, out_dir, tokenizer, tokenizer_name: str, overwrite: bool, corpus: dict | None) -> Path:
    sources = _check_sources(splits, need_train=False)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "data", overwrite)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer {tokenizer_name} has no eos token to end lines with")
    vocab = len(tokenizer)
    counts = np.zeros(vocab, dtype=np.int64)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        split_meta = {}
        for name, path in sources.items():
            split_meta[name], ids = _binarize(name, path, tokenizer, eos, tmp)
            if len(ids) and int(ids.max()) >= vocab:
                raise DataError(f"{path}: the tokenizer produced id {int(ids.max())} beyond its {vocab} tokens")
            counts += np.bincount(ids, minlength=vocab)[:vocab]
        write_meta(
            tmp,
            "data",
            level="hf",
            vocab_size=vocab,
            eos=int(eos),
            pad=choose_pad(tokenizer.pad_token_id, counts),
            tokenizer={
                "source": tokenizer_name,
                "sha256": tokenizer_fingerprint(tokenizer),
                "class": type(tokenizer).__name__,
            },
            corpus=corpus,
            splits=split_meta,
        )
    return out_dir


def load_tokenizer(name_or_dir: str | os.PathLike, *, gguf_file: str | None = None):
    """The tokenizer of a save_pretrained directory, a hub name, or a GGUF file (a .gguf path, or a
    directory with ``gguf_file``). transformers is imported here (``pip install trime[hf]``)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face tokenizers need the transformers package: pip install trime[hf]") from None
    path = Path(name_or_dir)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: not a tokenizer directory or .gguf file")
    if not path.exists() and str(name_or_dir).startswith((".", "/", "~")):
        raise DataError(f"{name_or_dir}: no such tokenizer directory")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise DataError(f"{path / gguf_file}: no such GGUF file")
    source = str(path) if path.exists() else str(name_or_dir)
    entry = hf_cache.lookup(path / gguf_file) if gguf_file is not None else None
    if entry is not None and (entry / "tokenizer_config.json").is_file():  # the GGUF's converted copy
        source, gguf_file = str(entry), None
    try:
        with hf_cache.quiet():
            return transformers.AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except ImportError as e:
        raise ConfigError(f"the tokenizer of {source} needs a missing package ({e}): pip install trime[hf]") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        text = " ".join(str(e).split())[:300]
        raise DataError(f"cannot load a tokenizer from {source}: {text}") from None


def _tokenizer(tokenizer, gguf_file: str | None):
    """(tokenizer object, its name for meta.json) from a name / directory / GGUF path or an object."""
    if isinstance(tokenizer, (str, os.PathLike)):
        name = str(tokenizer) if gguf_file is None else f"{tokenizer}:{gguf_file}"
        return load_tokenizer(tokenizer, gguf_file=gguf_file), name
    return tokenizer, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def prepare_hf(
    splits: dict[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    gguf_file: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenise ``{split: file}`` into ``out_dir`` (module docstring); return ``out_dir``.

    ``tokenizer``: a tokenizer object, or a name / save_pretrained directory / .gguf path to load one from.
    """
    tok, name = _tokenizer(tokenizer, gguf_file)
    return _prepare(splits, out_dir, tok, name, overwrite, corpus=None)


def prepare_hf_corpus(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    gguf_file: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenise a corpus directory (train.txt, valid.txt, test.txt; at least one of them)."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"{corpus_dir}: no such corpus directory (run `trime data fetch` first)")
    splits = {s: corpus_dir / f"{s}.txt" for s in ("train", "valid", "test") if (corpus_dir / f"{s}.txt").exists()}
    if not splits:
        raise DataError(f"{corpus_dir}: no train.txt, valid.txt or test.txt in the corpus directory")
    corpus = read_json(corpus_dir / "meta.json") if (corpus_dir / "meta.json").is_file() else None
    tok, name = _tokenizer(tokenizer, gguf_file)
    return _prepare(splits, out_dir, tok, name, overwrite, corpus=corpus)
