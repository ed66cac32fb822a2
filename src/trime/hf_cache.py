"""A GGUF file de-quantised once into a cached save_pretrained directory; quiet Hugging Face loading.

transformers de-quantises every tensor of a GGUF file each time it loads one (20-30 s for SmolLM2-135M
on 2 CPU cores), and the Hugging Face workflow loads the model in every command. The first load of a
GGUF file converts it into a directory keyed by the file's content fingerprint; every later load reads
that directory's safetensors (config + weights + tokenizer) instead:

    $TRIME_CACHE/hf/<fingerprint>/    (default ~/.cache/trime/hf/, or $XDG_CACHE_HOME/trime/hf/)
      config.json, model.safetensors  save_pretrained of the de-quantised (float32) model
      tokenizer files                 the GGUF's tokenizer, save_pretrained
      meta.json                       written last: the source, transformers' version, each file's size and sha256

The entry is built under ``.<fingerprint>.partial-<pid>`` and renamed when complete, so a killed
conversion never leaves a half entry (the next one removes its leftovers); two processes converting
at once keep the first finished. An entry whose files no longer match their recorded size and sha256
is rebuilt, with one line on stderr. ``TRIME_CACHE=off`` turns the cache off; a cache that cannot be
written falls back to loading the GGUF file itself.

:func:`quiet` hides what the loaders print (progress bars, warnings, transformers / accelerate / gguf
logging) unless ``TRIME_VERBOSE`` is set (``trime --verbose`` sets it). Standard library only at import.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from trime import io

CACHE_ENV, VERBOSE_ENV = "TRIME_CACHE", "TRIME_VERBOSE"
KIND = "hf-cache"
_OFF = ("off", "0", "none", "false")
_LOGGERS = ("transformers", "accelerate", "gguf", "huggingface_hub", "peft", "tokenizers")


def verbose() -> bool:
    """True when the loaders may print (``TRIME_VERBOSE`` set to anything but '' or 0)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide the loaders' output for the block unless :func:`verbose`: tqdm bars and anything else written
    to sys.stderr, Python warnings, and records of the libraries' loggers below ERROR. Exceptions pass
    through unchanged. Import transformers before the block: a library that sets up its logging inside
    it would keep the hidden stream."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in _LOGGERS]  # transformers' verbosity is its logger's level
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(_io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def cache_root() -> Path | None:
    """Where cache entries live, or None when ``TRIME_CACHE=off``."""
    given = os.environ.get(CACHE_ENV, "")
    if given.lower() in _OFF and given:
        return None
    if given:
        return Path(given).expanduser() / "hf"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trime" / "hf"


def fingerprint(gguf: str | os.PathLike) -> str:
    """The content fingerprint of a GGUF file: the one trime.checkpoint.model_fingerprint gives it."""
    return io.sha256_file(gguf, remember=True)[:16]


def _files(directory: Path) -> dict[str, list]:
    """{file name: [size, sha256]} of every file of an entry but meta.json."""
    return {
        p.name: [p.stat().st_size, io.sha256_file(p)]
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != io.META
    }


def problem(entry: Path, fp: str) -> str | None:
    """Why ``entry`` cannot be used (None when it can): incomplete, another file's, or damaged."""
    if not io.is_complete(entry):
        return "incomplete (no meta.json)"
    try:
        meta = io.read_json(entry / io.META)
    except Exception:  # DataError: unreadable JSON
        return "unreadable meta.json"
    if not isinstance(meta, dict) or meta.get("kind") != KIND or meta.get("fingerprint") != fp:
        return "not the cache entry of this file"
    files = meta.get("sha256")
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
        return "unreadable meta.json"
    for name, (size, digest) in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or truncated"
        if io.sha256_file(path) != digest:
            return f"{name} is damaged (its sha256 differs)"
    return None if files else "records no files"


def lookup(gguf: str | os.PathLike) -> Path | None:
    """The usable cache entry of a GGUF file, or None (no cache, no entry yet, or a damaged one)."""
    root = cache_root()
    if root is None:
        return None
    fp = fingerprint(gguf)
    entry = root / fp
    return entry if entry.is_dir() and problem(entry, fp) is None else None


def ensure(gguf: str | os.PathLike, convert) -> Path | None:
    """The cache entry of ``gguf``, converting it first when there is none (or a damaged one).

    ``convert(directory)`` writes the save_pretrained files of the GGUF's model (and tokenizer) into
    ``directory``. None when the cache is off or cannot be written (the caller loads the file itself)."""
    root = cache_root()
    if root is None:
        return None
    gguf = Path(gguf)
    fp = fingerprint(gguf)
    entry = root / fp
    try:
        io.recover_dir(entry, say=lambda line: None)  # a killed conversion's leftovers
        if entry.exists():
            why = problem(entry, fp)
            if why is None:
                if verbose():
                    _say(f"| {gguf.name}: read from the cache entry {entry}")
                return entry
            _say(f"| GGUF cache entry {entry}: {why}; converting {gguf.name} again")
            shutil.rmtree(entry)
        if verbose():
            _say(f"| {gguf.name}: converting it once into the cache entry {entry}")
        return _build(entry, gguf, fp, convert)
    except OSError as e:
        where = e.filename if e.filename is not None else root
        _say(f"| cannot write the GGUF cache ({where}: {e.strerror or e}); loading {gguf.name} directly")
        return None


def _build(entry: Path, gguf: Path, fp: str, convert) -> Path:
    import transformers

    tmp = entry.with_name(f".{entry.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(tmp)
        io.write_meta(
            tmp, KIND, fingerprint=fp, source=str(gguf.resolve()), transformers=transformers.__version__,
            sha256=_files(tmp),
        )  # fmt: skip
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished first: keep its entry
            if problem(entry, fp) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry
