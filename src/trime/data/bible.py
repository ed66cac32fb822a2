"""The offline default translation corpus: Spanish (Reina-Valera 1909) -> English (King James) Bible verses.

Where it comes from: two Debian packages of SWORD Bible modules, both public domain (their copyright files and
module .conf say so): ``sword-text-sparv`` 2.60-1 (module spaRV1909eb, "Santa Biblia — Reina Valera 1909", from
eBible.org) and ``sword-text-kjv`` 14.3-1 (module engKJV2006eb, the King James Version, 1769 text, from
eBible.org/CrossWire). They are fetched from the Debian archive pool (``mirror=`` replaces
http://deb.debian.org/debian) or taken from local .deb files (``debs=``, e.g. after ``apt-get download
sword-text-sparv sword-text-kjv``), and verified by sha256 (the values of Debian bookworm's signed package
index). The .deb (an ar archive) is unpacked in Python, and the zText modules are read with ``pysword``.

Alignment: both modules use the KJV versification, so verse (book, chapter, verse) of one is meant to be the
same verse of the other, but the Spanish text follows the Hebrew chapter divisions in a few places (Num 13,
Num 30, 1 Sam 24, Hos 12, Jonah 2, Job 39-40, ...) and merges a few verses, leaving 18 verses empty. So each
chapter is aligned with a small monotonic dynamic programme over verse lengths (Gale & Church's idea, 1-1
matches and skips): a match costs |log(len_es / len_en) - median|, a skip costs :data:`SKIP_COST`, and an empty
verse is skipped for free. Matched verse pairs whose length ratio is more than :data:`MAX_RATIO` times off the
median are dropped. Text cleaning: pysword's OSIS tag removal (footnotes and titles go), the KJV's pilcrows
(``¶``) removed, whitespace collapsed, and the Spanish chapter-opening capitals (``EN el principio``) turned
into ordinary case (``En el principio``). No tokenisation: ``trime data prepare --moses`` does that.

Split by books, so that validation and test are books never seen in training (:data:`BOOK_SPLITS`): a mix of
narrative, poetry, prophecy, a gospel and letters, each about 3-4% of the verses.
"""

from __future__ import annotations

import functools
import html
import io
import math
import os
import re
import shutil
import statistics
import tarfile
from dataclasses import dataclass
from pathlib import Path

from trime.data.fetch import download
from trime.data.pairs import CORPUS_KIND, SPLITS
from trime.data.prepare import check_out_dir
from trime.errors import DataError, NetworkError
from trime.io import atomic_dir, sha256_file, write_meta

DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Deb:
    lang: str
    package: str
    version: str
    pool_path: str  # relative to the mirror's base URL
    sha256: str
    size: int
    module: str  # SWORD module name inside the package
    chapter_caps: bool  # chapters open with an all-capitals word (Spanish typesetting) to be put in ordinary case

    @property
    def filename(self) -> str:
        return self.pool_path.rsplit("/", 1)[-1]


# sha256 and size as listed in Debian bookworm's Packages index (and re-measured on the downloaded files).
DEBS = {
    "es": Deb(
        "es", "sword-text-sparv", "2.60-1", "pool/main/s/sword-text-sparv/sword-text-sparv_2.60-1_all.deb",
        "5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf", 2722332, "spaRV1909eb", True,
    ),
    "en": Deb(
        "en", "sword-text-kjv", "14.3-1", "pool/main/s/sword-text-kjv/sword-text-kjv_14.3-1_all.deb",
        "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57", 2800476, "engKJV2006eb", False,
    ),
}  # fmt: skip
SOURCE, TARGET = "es", "en"

# OSIS book names (pysword's KJV canon); every other book is train.
BOOK_SPLITS = {
    "valid": ("Ruth", "Esth", "Lam", "Jonah", "Rom", "Jas"),
    "test": ("Dan", "John"),
}
SKIP_COST = 1.0  # cost of leaving a non-empty verse unaligned
MAX_RATIO = 3.0  # drop a matched pair whose length ratio is this many times off the median (either way)

Ref = tuple[str, int, int]  # (OSIS book, chapter, verse)


# ---------------------------------------------------------------------------------------------
# Debian packages


def read_ar(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of a Unix ar archive (the container of a .deb)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{path}: not a Debian package (no ar archive header)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), header[48:58].strip()
        if header[58:60] != b"`\n" or not size.isdigit():
            raise DataError(f"{path}: corrupt ar archive at byte {pos}")
        start = pos + 60
        members[name] = data[start : start + int(size)]
        pos = start + int(size) + (int(size) & 1)
    return members


def extract_sword(deb: Path, dest: Path) -> None:
    """Write the ``usr/share/sword/`` files of a .deb under ``dest`` (regular files only, no links)."""
    members = read_ar(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise DataError(f"{deb}: no data.tar.* member in the package")
    try:
        with tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*") as tar:
            for m in tar.getmembers():
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not m.isfile() or parts[:3] != ["usr", "share", "sword"] or ".." in parts:
                    continue
                out = dest.joinpath(*parts[3:])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{deb}: cannot read {name} ({e})") from None


def _local_deb(deb: Deb, debs) -> Path | None:
    """The given .deb for this package: a file named ``<package>_*.deb``, directly or inside a given folder."""
    for p in map(Path, debs):
        if p.is_dir():
            found = sorted(p.glob(f"{deb.package}_*.deb"))
            if found:
                return found[-1]
        elif p.name.startswith(f"{deb.package}_"):
            return p
    return None


def get_deb(deb: Deb, work: Path, mirror: str | None, debs) -> tuple[Path, str]:
    """The verified .deb and where it came from (a local file or a URL)."""
    if debs is not None:
        path = _local_deb(deb, debs)
        if path is None:
            raise DataError(
                f"no {deb.package}_*.deb among {', '.join(map(str, debs))} (apt-get download {deb.package})"
            )
        digest = sha256_file(path)
        if digest != deb.sha256:
            raise NetworkError(
                f"{path}: checksum mismatch (got sha256 {digest}, expected {deb.sha256} for {deb.package} {deb.version})"
            )
        return path, str(path.resolve())
    url = f"{(mirror or DEBIAN_MIRROR).rstrip('/')}/{deb.pool_path}"
    return download(url, work / deb.filename, deb.sha256, deb.size), url


# ---------------------------------------------------------------------------------------------
# SWORD modules


def read_module(sword_root: Path, module: str) -> dict[Ref, str]:
    """{(book, chapter, verse): raw text} of every verse slot of a SWORD Bible module (tags removed by pysword)."""
    from pysword.modules import SwordModules

    try:
        modules = SwordModules(str(sword_root))
        found = modules.parse_modules()
        if module not in found:
            raise DataError(f"{sword_root}: no SWORD module {module!r} (found: {', '.join(found) or 'none'})")
        bible = modules.get_bible_from_module(module)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{sword_root}: cannot open SWORD module {module!r} ({e})") from None
    if hasattr(bible, "_decompressed_text"):  # pysword re-inflates the whole book block for every verse: cache it
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    verses = {}
    for books in bible.get_structure().get_books().values():
        for book in books:
            for chapter, n in enumerate(book.chapter_lengths, 1):
                for verse in range(1, n + 1):
                    verses[(book.osis_name, chapter, verse)] = bible.get(
                        books=[book.name], chapters=[chapter], verses=[verse], clean=True
                    )
    return verses


_CAPS = re.compile(r"^(\W*)([^\W\d_]{2,})\b")


def clean_verse(text: str, chapter_caps: bool = False, first_in_chapter: bool = False) -> str:
    """One line of plain text: entities unescaped, pilcrows dropped, whitespace collapsed (module docstring)."""
    text = " ".join(html.unescape(text).replace("¶", " ").split())
    if chapter_caps and first_in_chapter:
        # "Y FUERON acabados" -> "Y fueron acabados", "EN el" -> "En el": the capitals of a chapter's first words
        words = text.split(" ")
        for i, w in enumerate(words):
            m = _CAPS.match(w)
            if not m or not m.group(2).isupper():
                if any(c.islower() for c in w):
                    break
                continue
            head, word = m.group(1), m.group(2)
            word = word.capitalize() if i == 0 else word.lower()
            words[i] = head + word + w[m.end() :]
        text = " ".join(words)
    return text


def _log_ratio(s: str, t: str) -> float:
    return math.log(len(s) / len(t))


def align_chapter(src: list[str], tgt: list[str], mu: float) -> list[tuple[int, int]]:
    """Monotonic 1-1 verse matches (i, j) of one chapter minimising length costs plus skips (module docstring)."""
    n, m = len(src), len(tgt)
    inf = float("inf")
    skip_s = [0.0 if not s else SKIP_COST for s in src]
    skip_t = [0.0 if not t else SKIP_COST for t in tgt]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]  # (n + 1, m + 1): best cost of src[:i] with tgt[:j]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 match, 2 skip src, 3 skip tgt
    cost[0][0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            c = cost[i][j]
            if c == inf:
                continue
            if i < n and j < m and src[i] and tgt[j]:
                v = c + abs(_log_ratio(src[i], tgt[j]) - mu)
                if v < cost[i + 1][j + 1]:
                    cost[i + 1][j + 1], move[i + 1][j + 1] = v, 1
            if i < n and c + skip_s[i] < cost[i + 1][j]:
                cost[i + 1][j], move[i + 1][j] = c + skip_s[i], 2
            if j < m and c + skip_t[j] < cost[i][j + 1]:
                cost[i][j + 1], move[i][j + 1] = c + skip_t[j], 3
    pairs, i, j = [], n, m
    while i or j:
        step = move[i][j]
        if step == 1:
            pairs.append((i - 1, j - 1))
        i, j = (i - 1, j - 1) if step == 1 else (i - 1, j) if step == 2 else (i, j - 1)
    return pairs[::-1]


def align_verses(src: dict[Ref, str], tgt: dict[Ref, str]) -> tuple[list[tuple[Ref, str, str]], dict]:
    """Aligned (target ref, source text, target text) in canonical order, and counts of what was left out."""
    both = [r for r in tgt if src.get(r) and tgt[r]]
    if not both:
        raise DataError("the two Bible modules share no non-empty verse")
    mu = statistics.median(_log_ratio(src[r], tgt[r]) for r in both)
    chapters: dict[tuple[str, int], list[int]] = {}
    for book, ch, v in tgt:
        chapters.setdefault((book, ch), []).append(v)
    out, moved, dropped_ratio = [], 0, 0
    for (book, ch), vs in chapters.items():
        s_text = [src.get((book, ch, v), "") for v in vs]
        t_text = [tgt[(book, ch, v)] for v in vs]
        for i, j in align_chapter(s_text, t_text, mu):
            if abs(_log_ratio(s_text[i], t_text[j]) - mu) > math.log(MAX_RATIO):
                dropped_ratio += 1
                continue
            moved += i != j
            out.append(((book, ch, vs[j]), s_text[i], t_text[j]))
    stats = {
        "verse_slots": len(tgt),
        "empty_source": sum(1 for r in tgt if not src.get(r)),
        "empty_target": sum(1 for r in tgt if not tgt[r]),
        "aligned_off_diagonal": moved,
        "dropped_length_ratio": dropped_ratio,
        "median_log_length_ratio": round(mu, 4),
        "pairs": len(out),
    }
    stats["unaligned"] = len(tgt) - len(out) - dropped_ratio
    return out, stats


def split_of(book: str) -> str:
    return next((s for s, books in BOOK_SPLITS.items() if book in books), "train")


def clean_module(raw: dict[Ref, str], chapter_caps: bool) -> dict[Ref, str]:
    return {r: clean_verse(t, chapter_caps, first_in_chapter=r[2] == 1) for r, t in raw.items()}


# ---------------------------------------------------------------------------------------------
# Entry point


def fetch_bible(
    out_dir: str | os.PathLike,
    *,
    mirror: str | None = None,
    debs: list[str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Fetch, align and split the Spanish -> English Bible into the pair corpus ``out_dir`` (module docstring).

    ``debs``: local .deb files or folders holding them, instead of downloading; ``mirror``: a Debian mirror URL.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, CORPUS_KIND, overwrite)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        work = tmp / ".download"
        sword = work / "sword"
        sword.mkdir(parents=True)
        sources, verses = {}, {}
        for lang in (SOURCE, TARGET):
            deb = DEBS[lang]
            path, origin = get_deb(deb, work, mirror, debs)
            extract_sword(path, sword)
            sources[lang] = {
                "package": deb.package,
                "version": deb.version,
                "module": deb.module,
                "from": origin,
                "sha256": deb.sha256,
                "licence": "public domain",
            }
            verses[lang] = clean_module(read_module(sword, deb.module), deb.chapter_caps)
        pairs, stats = align_verses(verses[SOURCE], verses[TARGET])
        shutil.rmtree(work)
        splits: dict[str, dict] = {}
        for split in SPLITS:
            rows = [p for p in pairs if split_of(p[0][0]) == split]
            if not rows:
                raise DataError(f"the Bible modules have no verses for the {split} split")
            for k, lang in ((1, SOURCE), (2, TARGET)):
                with open(tmp / f"{split}.{lang}", "w", encoding="utf-8", newline="\n") as f:
                    f.writelines(r[k] + "\n" for r in rows)
            splits[split] = {
                "pairs": len(rows),
                "books": list(dict.fromkeys(r[0][0] for r in rows)),
                "words": {lang: sum(len(r[k].split()) for r in rows) for k, lang in ((1, SOURCE), (2, TARGET))},
                "sha256": {lang: sha256_file(tmp / f"{split}.{lang}") for lang in (SOURCE, TARGET)},
            }
        write_meta(
            tmp,
            CORPUS_KIND,
            name="bible-es-en",
            langs={"source": SOURCE, "target": TARGET},
            sources=sources,
            alignment=stats,
            splits=splits,
        )
    return out_dir
