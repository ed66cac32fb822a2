"""`trime data fetch bible-es-en`: Debian packages -> SWORD modules -> aligned verses -> book splits.

A fake package holds a tiny zText module written here in the format pysword reads (a New Testament with a few
verses); the real Debian packages are used when a folder holding them is given in TRIME_BIBLE_DEBS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import math
import os
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import pytest

from trime.data import bible
from trime.data.bible import align_chapter, align_verses, clean_verse, extract_sword, fetch_bible, read_ar
from trime.data.pairs import prepare_pairs
from trime.errors import DataError, NetworkError

ES = {
    ("Matt", 1, 1): "LIBRO de la generación de Jesucristo.",
    ("Matt", 1, 2): "Abraham engendró á Isaac.",
    ("Matt", 1, 3): "",  # an empty slot: its English verse stays unaligned
    ("Matt", 1, 4): "Y Aram engendró á Aminadab.",
    # Matt 2: the Spanish chapter starts one verse early (as Num 13 in the real modules)
    ("Matt", 2, 1): "Y LOS magos vinieron del oriente á Jerusalem.",  # (the previous chapter's last verse)
    ("Matt", 2, 2): "Y cuando Jesús nació en Bethlehem de Judea, en días del rey Herodes, he aquí vinieron magos.",
    ("Matt", 2, 3): "Diciendo: ¿Dónde está el Rey de los Judíos, que ha nacido? porque su estrella hemos visto.",
    ("Matt", 2, 4): "Y oyendo esto el rey Herodes, se turbó, y toda Jerusalem con él.",
    ("Matt", 2, 5): "Y convocados todos los príncipes de los sacerdotes, y los escribas del pueblo, les preguntó.",
    ("Matt", 2, 6): "Y ellos le dijeron: En Bethlehem de Judea; porque así está escrito por el profeta.",
    ("Mark", 1, 1): "PRINCIPIO del evangelio de Jesucristo, Hijo de Dios.",
    ("Mark", 1, 2): "Como está escrito en Isaías el profeta: He aquí yo envío á mi mensajero.",
    ("John", 1, 1): "EN el principio era el Verbo, y el Verbo era con Dios.",
    ("John", 1, 2): "Este era en el principio con Dios.",
}
EN = {
    ("Matt", 1, 1): "The book of the generation of Jesus Christ.",
    ("Matt", 1, 2): "Abraham begat Isaac.",
    ("Matt", 1, 3): "And Judas begat Phares and Zara of Thamar.",
    ("Matt", 1, 4): " ¶ And Aram begat Aminadab.",
    (
        "Matt",
        2,
        1,
    ): "Now when Jesus was born in Bethlehem of Judaea in the days of Herod the king, behold, there came wise men.",
    ("Matt", 2, 2): "Saying, Where is he that is born King of the Jews? for we have seen his star in the east.",
    ("Matt", 2, 3): "When Herod the king had heard these things, he was troubled, and all Jerusalem with him.",
    ("Matt", 2, 4): "And when he had gathered all the chief priests and scribes of the people together, he demanded.",
    ("Matt", 2, 5): "And they said unto him, In Bethlehem of Judaea: for thus it is written by the prophet.",
    ("Matt", 2, 6): "And thou Bethlehem.",
    ("Mark", 1, 1): "The beginning of the gospel of Jesus Christ, the Son of God;",
    ("Mark", 1, 2): "As it is written in the prophets, Behold, I send my messenger.<note>Or, angel</note>",
    ("John", 1, 1): "In the beginning was the Word, and the Word was with God.",
    ("John", 1, 2): "The same was in the beginning with God.",
}
SPLITS = {"valid": ("Mark",), "test": ("John",)}


def write_ztext(root: Path, module: str, verses: dict) -> None:
    """A zText SWORD module (KJV versification, New Testament only, one zlib block) under ``root``."""
    from pysword.books import BibleStructure

    structure = BibleStructure("kjv", ["nt"])
    blob, records = b"", {}
    for (book, ch, v), text in verses.items():
        [idx] = structure.ref_to_indicies(books=[book], chapters=[ch], verses=[v])["nt"]
        data = text.encode()
        records[idx] = (0, len(blob), len(data))  # block, start, length
        blob += data
    data_dir = root / "modules" / "texts" / "ztext" / module
    data_dir.mkdir(parents=True)
    packed = zlib.compress(blob)
    (data_dir / "nt.bzz").write_bytes(packed)
    (data_dir / "nt.bzs").write_bytes(struct.pack("<III", 0, len(packed), len(blob)))
    (data_dir / "nt.bzv").write_bytes(
        b"".join(struct.pack("<IIH", *records.get(i, (0, 0, 0))) for i in range(max(records) + 1))
    )
    (root / "mods.d").mkdir(parents=True, exist_ok=True)
    (root / "mods.d" / f"{module.lower()}.conf").write_text(
        f"[{module}]\nDataPath=./modules/texts/ztext/{module}/\nModDrv=zText\nSourceType=OSIS\nEncoding=UTF-8\n"
        "CompressType=ZIP\nBlockType=BOOK\nVersification=KJV\n"
    )


def make_deb(path: Path, module: str, verses: dict) -> bytes:
    """A .deb (ar archive: debian-binary, control.tar.xz, data.tar.xz) installing the module under /usr/share/sword."""
    stage = path.parent / f"stage-{module}"
    write_ztext(stage, module, verses)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tar.add(stage, arcname="./usr/share/sword")
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:xz"):
        pass
    out = b"!<arch>\n"
    for name, data in (
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", control.getvalue()),
        ("data.tar.xz", buf.getvalue()),
    ):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    path.write_bytes(out)
    return out


@pytest.fixture
def fake_debs(tmp_path, monkeypatch):
    """Fake sword-text-{sparv,kjv} packages in tmp_path/debs, pinned in place of the real ones."""
    folder = tmp_path / "debs"
    folder.mkdir()
    for lang, verses in (("es", ES), ("en", EN)):
        deb = bible.DEBS[lang]
        data = make_deb(folder / deb.filename, deb.module, verses)
        sha = hashlib.sha256(data).hexdigest()
        monkeypatch.setitem(bible.DEBS, lang, dataclasses.replace(deb, sha256=sha, size=len(data)))
    monkeypatch.setattr(bible, "BOOK_SPLITS", SPLITS)
    return folder


# ---------------------------------------------------------------------------------------------


def test_clean_verse():
    assert clean_verse("  ¶ And  Aram\tbegat. ") == "And Aram begat."
    assert (
        clean_verse("Y FUERON acabados los cielos", chapter_caps=True, first_in_chapter=True)
        == "Y fueron acabados los cielos"
    )
    assert clean_verse("¡OH Jehová, cuánto", chapter_caps=True, first_in_chapter=True) == "¡Oh Jehová, cuánto"
    assert clean_verse("EN el principio", chapter_caps=True, first_in_chapter=False) == "EN el principio"
    assert clean_verse("the LORD &amp; me", chapter_caps=False, first_in_chapter=True) == "the LORD & me"


def test_align_chapter_follows_a_shift_and_skips_empty_verses():
    words = ["uno dos", "tres cuatro cinco seis siete", "ocho", "nueve diez once doce trece catorce quince", "x" * 200]
    en = [w.upper() + "!" for w in words]
    assert align_chapter(words, en, mu=math.log(len(words[0]) / len(en[0]))) == [(i, i) for i in range(5)]
    shifted = ["previous chapter's last verse, long enough to matter"] + words[:-1]
    pairs = align_chapter(shifted, en, mu=0.0)
    assert pairs == [(i + 1, i) for i in range(4)]  # the source is one verse ahead; the last target is left out
    assert align_chapter(["", "abc", "defgh"], ["abc", "", "defgh"], mu=0.0) == [(1, 0), (2, 2)]


def test_read_ar_rejects_other_files(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(DataError, match="not a Debian package"):
        read_ar(tmp_path / "x.deb")


def test_fetch_from_local_debs(tmp_path, fake_debs):
    out = fetch_bible(tmp_path / "bible", debs=[fake_debs])
    lines = {
        f"{s}.{lang}": (out / f"{s}.{lang}").read_text().split("\n")[:-1]
        for s in ("train", "valid", "test")
        for lang in ("es", "en")
    }
    assert lines["test.es"] == [
        "En el principio era el Verbo, y el Verbo era con Dios.",
        "Este era en el principio con Dios.",
    ]
    assert lines["valid.en"][1] == "As it is written in the prophets, Behold, I send my messenger."  # the note is gone
    assert lines["train.es"][:3] == [
        "Libro de la generación de Jesucristo.",
        "Abraham engendró á Isaac.",
        "Y Aram engendró á Aminadab.",
    ]
    assert lines["train.en"][2] == "And Aram begat Aminadab."
    # Matt 2: Spanish verse v+1 is English verse v
    assert lines["train.es"][3].startswith("Y cuando Jesús nació") and lines["train.en"][3].startswith(
        "Now when Jesus was born"
    )
    assert lines["train.es"][-1].startswith("Y ellos le dijeron") and lines["train.en"][-1].startswith(
        "And they said unto him"
    )
    assert (
        len(lines["train.es"]) == len(lines["train.en"]) == 3 + 5
    )  # Matt 1 without its empty slot; Matt 2:2-6 with English 2:1-5
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "pair_corpus" and meta["langs"] == {"source": "es", "target": "en"}
    assert meta["alignment"]["empty_source"] == bible_slots() - len([t for t in ES.values() if t])
    assert meta["alignment"]["pairs"] == 12 and meta["alignment"]["aligned_off_diagonal"] == 5
    assert {s: v["pairs"] for s, v in meta["splits"].items()} == {"train": 8, "valid": 2, "test": 2}
    assert meta["splits"]["train"]["books"] == ["Matt"] and meta["sources"]["es"]["package"] == "sword-text-sparv"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + sorted(lines)
    data = prepare_pairs(out, tmp_path / "data", moses=True)  # languages from the corpus meta
    assert json.loads((data / "meta.json").read_text())["langs"] == {"source": "es", "target": "en"}


def bible_slots() -> int:
    from pysword.books import BibleStructure

    return sum(sum(b.chapter_lengths) for b in BibleStructure("kjv", ["nt"]).get_books()["nt"])


def test_fetch_from_a_debian_mirror_and_checksums(tmp_path, fake_debs):
    root = tmp_path / "www"
    for deb in bible.DEBS.values():
        (root / deb.pool_path).parent.mkdir(parents=True, exist_ok=True)
        (root / deb.pool_path).write_bytes((fake_debs / deb.filename).read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        out = fetch_bible(tmp_path / "bible", mirror=url)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["sources"]["en"]["from"] == f"{url}/{bible.DEBS['en'].pool_path}"
        (root / bible.DEBS["es"].pool_path).write_bytes(b"!<arch>\n")  # the mirror serves another file
        with pytest.raises(NetworkError, match="checksum mismatch"):
            fetch_bible(tmp_path / "b2", mirror=url)
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(DataError, match="no sword-text-kjv_\\*.deb among"):
        fetch_bible(tmp_path / "b3", debs=[fake_debs / bible.DEBS["es"].filename])
    (fake_debs / bible.DEBS["es"].filename).write_bytes(b"!<arch>\n")
    with pytest.raises(NetworkError, match="checksum mismatch .*sword-text-sparv 2.60-1"):
        fetch_bible(tmp_path / "b3", debs=[fake_debs])
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists() and not list(tmp_path.glob(".b*"))


def test_extract_keeps_only_sword_files(tmp_path, fake_debs):
    extract_sword(fake_debs / bible.DEBS["en"].filename, tmp_path / "x")
    files = sorted(str(p.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert files == ["mods.d/engkjv2006eb.conf"] + [f"modules/texts/ztext/engKJV2006eb/nt.bz{c}" for c in "svz"]


def test_align_needs_common_verses():
    with pytest.raises(DataError, match="share no non-empty verse"):
        align_verses({("Gen", 1, 1): ""}, {("Gen", 1, 1): "x"})


REAL = os.environ.get("TRIME_BIBLE_DEBS")
NETWORK = os.environ.get("TRIME_NETWORK_TESTS") == "1"


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("local", marks=pytest.mark.skipif(not REAL, reason="TRIME_BIBLE_DEBS: a folder with the .debs")),
        pytest.param(
            "debian", marks=[pytest.mark.network, pytest.mark.skipif(not NETWORK, reason="TRIME_NETWORK_TESTS=1")]
        ),
    ],
)
def test_real_packages(tmp_path, where):
    out = fetch_bible(tmp_path / "bible", debs=[REAL] if where == "local" else None)
    meta = json.loads((out / "meta.json").read_text())
    assert {s: v["pairs"] for s, v in meta["splits"].items()} == {"train": 28840, "valid": 993, "test": 1236}
    assert meta["splits"]["test"]["books"] == ["Dan", "John"] and meta["alignment"]["empty_source"] == 18
    assert (out / "test.es").read_text().startswith("En el año tercero del reinado de Joacim rey de Judá")
