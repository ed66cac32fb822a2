"""`trime data fetch iwslt14` (spec §2): the prepare-iwslt14.sh rules, through a local HTTP server, no network."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from trime.data import pair_corpora as pc
from trime.data.pair_corpora import clean_corpus, fetch_pairs, split_every, strip_train_tags, xml_segments
from trime.data.pairs import load_pair_split, prepare_pairs
from trime.errors import DataError, NetworkError

N = 50  # numbered sentence pairs in the fake train.tags files
HEADER = {
    "de": [
        "<url>http://www.ted.com/talks/max.html</url>",
        "<keywords>talks, wissenschaft</keywords>",
        "<speaker>Max Muster</speaker>",
        "<talkid>7</talkid>",
        "<title>Max Muster: Der Titel</title>",
        "<description>TED Talk: eine Beschreibung</description>",
    ],
    "en": [
        "<url>http://www.ted.com/talks/max.html</url>",
        "<keywords>talks, science</keywords>",
        "<speaker>Max Muster</speaker>",
        "<talkid>7</talkid>",
        "<title>Max Muster: The Title</title>",
        "<description>TED Talk: a description</description>",
    ],
}
BODY = {
    "de": [f"Satz Nummer {i} ist Gut." for i in range(1, N + 1)],
    "en": [f'Sentence "number" {i} is Good.' for i in range(1, N + 1)],
}
DROPPED = {  # each pair breaks one cleaning rule
    "de": ["Ja", " ".join(["wort"] * 176), "", "eins zwei"],
    "en": ["Yes, of course, really, indeed, sure", " ".join(["word"] * 176), "", ""],
}


def _xml(name: str, lang: str) -> str:
    segs = [f'<seg id="1"> {name} {"eins" if lang == "de" else "it’s one"} . </seg>', f'<seg id="2">Zwei{lang}</seg>']
    return "\n".join(
        ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<srcset setid="{name}" srclang="x">', '<doc docid="1">',
         "<url>http://x</url>", "<talkid>1</talkid>", *segs, "</doc>", "</srcset>", "</mteval>", ""]
    )  # fmt: skip


def make_archive(path, drop=()) -> bytes:
    files = {
        f"train.tags.de-en.{lang}": "\n".join(HEADER[lang] + BODY[lang] + DROPPED[lang]) + "\n" for lang in ("de", "en")
    }
    for name in pc.IWSLT14_TEST:
        for lang in ("de", "en"):
            files[f"{name}.de-en.{lang}.xml"] = _xml(name.split(".")[-1], lang)
    files["README"] = "fake IWSLT14 de-en\n"
    files["IWSLT14.TED.tst2013.de-en.de.xml"] = _xml("tst2013", "de")  # not one of the five test sets
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            if name in drop:
                continue
            data = text.encode()
            info = tarfile.TarInfo(f"de-en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served directory) of an HTTP server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


def pin(monkeypatch, data: bytes, sha256: bool = False):
    h = hashlib.sha256(data).hexdigest() if sha256 else None
    monkeypatch.setattr(pc, "IWSLT14", dataclasses.replace(pc.IWSLT14, md5=hashlib.md5(data).hexdigest(), sha256=h))


# ---------------------------------------------------------------------------------------------


def test_text_rules():
    assert strip_train_tags(["<url>u</url>", "<title>T</title>", "a <description>d</description>", "<speaker>S</speaker>"]) == [
        "T", "a d", "<speaker>S</speaker>"
    ]  # fmt: skip
    assert xml_segments(['<seg id="12">\t a ’b’ </seg> ', "<doc>", '<seg id="x">y</seg>']) == ["a 'b'", '<seg id="x">y']
    s, t = clean_corpus(["a  b", "a", "", "x " * 3, "p|q r"], ["c\td ", "a b c", "z", "y", "r s"], ratio=1.5, max_len=2)
    assert (s, t) == (["a b", "pq r"], ["c d", "r s"])  # collapsed; ratio 3 > 1.5; empty; 3 words > max 2; '|' deleted
    s, t = clean_corpus(["a|b c"], ["d e"])
    assert s == ["a|b c"]  # a '|' on the first line marks a factored corpus: kept
    assert split_every([str(i) for i in range(1, 50)]) == ([str(i) for i in range(1, 50) if i % 23], ["23", "46"])


def test_iwslt14_from_a_mirror(tmp_path, monkeypatch, server):
    url, root = server
    pin(monkeypatch, make_archive(root / "de-en.tgz"))
    out = fetch_pairs("iwslt14", tmp_path / "iwslt", mirror=url)
    read = {
        f"{s}.{lang}": (out / f"{s}.{lang}").read_text().split("\n")[:-1]
        for s in ("train", "valid", "test")
        for lang in ("de", "en")
    }
    # cleaned train: speaker, title, description, then the N sentences; the DROPPED pairs are gone
    assert len(read["train.de"]) + len(read["valid.de"]) == 3 + N
    assert read["valid.de"] == ["satz nummer 20 ist gut .", "satz nummer 43 ist gut ."]  # cleaned lines 23 and 46
    assert read["valid.en"] == [
        "sentence &quot; number &quot; 20 is good .",
        "sentence &quot; number &quot; 43 is good .",
    ]
    assert read["train.de"][:3] == [
        "&lt; speaker &gt; max muster &lt; / speaker &gt;",
        "max muster : der titel",
        "ted talk : eine beschreibung",
    ]
    assert (
        read["train.de"][3] == "satz nummer 1 ist gut ."
        and read["train.en"][-1] == "sentence &quot; number &quot; 50 is good ."
    )
    everything = "".join("".join(v) for v in read.values())
    assert (
        "talks" not in everything
        and "http" not in everything
        and "wort" not in everything
        and "ja" not in read["train.de"]
    )
    assert everything == everything.lower()
    # test: the five sets in the script's order, seg tags gone, ’ -> ' (then escaped), tokenised, lowercased
    assert read["test.de"] == [
        x for name in ("dev2010", "dev2012", "tst2010", "tst2011", "tst2012") for x in (f"{name} eins .", "zweide")
    ]
    assert read["test.en"][0] == "dev2010 it &apos;s one ." and len(read["test.en"]) == 10
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "pair_corpus" and meta["langs"] == {"source": "de", "target": "en"}
    assert meta["source"]["from"] == url.rstrip("/") + "/de-en.tgz" and meta["counts"]["after_cleaning"] == 3 + N
    assert {s: v["pairs"] for s, v in meta["splits"].items()} == {"train": 3 + N - 2, "valid": 2, "test": 10}
    assert not any(p.name.startswith(".") for p in out.iterdir())
    # and it prepares: the corpus meta names the languages
    data = prepare_pairs(out, tmp_path / "data", bpe_merges=20)
    assert len(load_pair_split(data, "test")) == 10


def test_iwslt14_sha256_pin_local_archive_and_errors(tmp_path, monkeypatch, server):
    url, root = server
    data = make_archive(root / "de-en.tgz")
    pin(monkeypatch, data, sha256=True)  # with a sha256 pinned, trime.data.fetch.download does the download
    assert (fetch_pairs("iwslt14", tmp_path / "a", mirror=url) / "train.de").is_file()
    assert (fetch_pairs("iwslt14", tmp_path / "b", local=root / "de-en.tgz") / "test.en").is_file()
    pin(monkeypatch, b"something else")
    with pytest.raises(NetworkError, match="checksum mismatch"):
        fetch_pairs("iwslt14", tmp_path / "c", mirror=url)
    with pytest.raises(NetworkError, match="checksum mismatch .*md5"):
        fetch_pairs("iwslt14", tmp_path / "c", local=root / "de-en.tgz")
    with pytest.raises(NetworkError, match="could not download .*404"):
        fetch_pairs("iwslt14", tmp_path / "c", mirror=url + "nothing/")
    pin(monkeypatch, make_archive(tmp_path / "broken.tgz", drop=("IWSLT14.TED.tst2011.de-en.en.xml",)))
    with pytest.raises(DataError, match="missing IWSLT14.TED.tst2011.de-en.en.xml in the archive"):
        fetch_pairs("iwslt14", tmp_path / "c", local=tmp_path / "broken.tgz")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))
    with pytest.raises(DataError, match="already exists"):
        fetch_pairs("iwslt14", tmp_path / "a", mirror=url)
