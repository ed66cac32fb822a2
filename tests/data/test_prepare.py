"""Binarisation (spec §8): fairseq-preprocess semantics for words and enwik8-style bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trime.data import prepare as prep
from trime.data.dictionary import Dictionary
from trime.data.prepare import load_dictionary, load_split, prepare, prepare_corpus, read_data_meta
from trime.errors import DataError
from trime.io import fingerprint_array, sha256_file

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

TRAIN = (
    "the cat <unk> sat\n"
    "\n"
    "  the dog  \r\n"  # CRLF
    "b a\tc\r"  # a lone CR ends a line too (text-mode universal newlines)
    "\u00e9t\u00e9 the\u3000end\n"
    "   \n"
    "z z"  # no final newline
)
VALID = "the zebra <unk>\n\nété cat\n"


def ref_fairseq(train_path, paths):
    """fairseq-preprocess by brute force: readline loop, dict counting, per-line encoding."""

    def lines(path):
        with open(path, encoding="utf-8") as f:
            while line := f.readline():
                yield line

    counts = {}
    for line in lines(train_path):
        for w in line.split() + ["</s>"]:
            counts[w] = counts.get(w, 0) + 1
    types = sorted((w for w in counts if w not in SPECIALS), key=lambda w: (-counts[w], w))
    symbols = SPECIALS + types
    i = 0
    while len(symbols) % 8:
        if f"madeupword{i:04d}" not in symbols:
            symbols.append(f"madeupword{i:04d}")
        i += 1
    index = {s: k for k, s in enumerate(symbols)}
    out = {}
    for name, path in paths.items():
        ids = []
        for line in lines(path):
            ids += [index.get(w, 3) for w in line.split()] + [2]
        out[name] = ids
    return symbols, out


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def test_word_level_matches_reference(tmp_path):
    tr, va = write(tmp_path, "train.txt", TRAIN), write(tmp_path, "valid.txt", VALID)
    out = prepare({"train": tr, "valid": va}, tmp_path / "data")
    symbols, ref = ref_fairseq(tr, {"train": tr, "valid": va})
    d = load_dictionary(out)
    assert d.symbols == symbols
    for split in ("train", "valid"):
        arr = load_split(out, split)
        assert arr.dtype == np.int32 and isinstance(arr, np.memmap)
        assert arr.tolist() == ref[split]
    meta = read_data_meta(out)
    assert meta["kind"] == "data" and meta["level"] == "word" and meta["vocab_size"] == len(symbols)
    v = meta["splits"]["valid"]
    assert v["tokens"] == len(ref["valid"]) and v["lines"] == 3
    assert v["unk"] == 2 and v["replaced"] == 1  # "zebra" replaced; the literal <unk> is not counted
    assert v["fingerprint"] == fingerprint_array(load_split(out, "valid"))
    assert v["source_sha256"] == sha256_file(va)
    assert meta["dictionary"]["source"] == "train"


def test_round_trip_gives_whitespace_normalised_lines(tmp_path):
    text = "First  line\there .\n\nsecond\u2003line , with  spaces \n third\n"
    p = write(tmp_path, "train.txt", text)
    out = prepare({"train": p}, tmp_path / "data")
    d, arr = load_dictionary(out), load_split(out, "train")
    ends = np.flatnonzero(arr == d.eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [d.string(arr[s:e]) for s, e in zip(starts, ends)]
    assert decoded == [" ".join(line.split()) for line in text.split("\n")[:-1]]


def test_chunk_boundaries_do_not_change_the_result(tmp_path, monkeypatch):
    p = write(tmp_path, "train.txt", TRAIN * 3 + "\r\n\r\r\n" + "ü" * 5)
    a = prepare({"train": p}, tmp_path / "a")
    monkeypatch.setattr(prep, "CHUNK", 5)
    b = prepare({"train": p}, tmp_path / "b")
    assert load_split(a, "train").tolist() == load_split(b, "train").tolist()
    assert load_dictionary(a) == load_dictionary(b)


def standard_enwik8_prep(data: bytes) -> str:
    """The standard enwik8 preparation's text: bytes as decimals, byte 10 as a real newline."""
    return " ".join(str(c) if c != 10 else "\n" for c in data)


@pytest.mark.parametrize(
    "data",
    [
        b"ab\ncd",
        b"ab\ncd\n",
        b"\nab\n\n\ncd\r\n\x00\xff \t\x0b\x0c",
        b"\n",
        b"\n\n",
        b"x",
        bytes(range(256)) * 2 + b"\n\n",
    ],
)
def test_char_level_equals_standard_prep_then_fairseq(tmp_path, data):
    raw = write(tmp_path, "train.bin", data)
    txt = write(tmp_path, "train.txt", standard_enwik8_prep(data))
    char = prepare({"train": raw}, tmp_path / "char", char_level=True)
    word = prepare({"train": txt}, tmp_path / "word")
    assert load_dictionary(char) == load_dictionary(word)
    assert load_split(char, "train").tolist() == load_split(word, "train").tolist()
    meta = read_data_meta(char)
    assert meta["level"] == "char"
    assert meta["splits"]["train"]["tokens"] == len(data) + (data[-1:] != b"\n")


def test_char_level_valid_with_unseen_bytes(tmp_path):
    tr = write(tmp_path, "train.bin", b"aab\nb")
    va = write(tmp_path, "valid.bin", b"abz\n\n")
    out = prepare({"train": tr, "valid": va}, tmp_path / "data", char_level=True)
    d = load_dictionary(out)
    assert d.symbols[4:6] == ["97", "98"]
    assert load_split(out, "valid").tolist() == [4, 5, d.unk, d.eos, d.eos]
    s = read_data_meta(out)["splits"]["valid"]
    assert s["unk"] == 1 and s["replaced"] == 1 and s["lines"] == 2


def test_reuse_an_existing_dictionary(tmp_path):
    tr = write(tmp_path, "train.txt", "a b c\na a\n")
    first = prepare({"train": tr}, tmp_path / "first")
    other = write(tmp_path, "other.txt", "d a b\nq\n")
    # a dict.txt file, or a data directory holding one; no train split needed
    for given in (first / "dict.txt", first):
        out = prepare({"test": other}, tmp_path / "reuse", dictionary=given, overwrite=True)
        assert (out / "dict.txt").read_bytes() == (first / "dict.txt").read_bytes()
        assert load_split(out, "test").tolist() == [3, 4, 5, 2, 3, 2]
        assert read_data_meta(out)["dictionary"]["source"].endswith("dict.txt")
    # train encoded with the given dictionary, not a new one
    out = prepare({"train": other}, tmp_path / "reuse2", dictionary=first)
    assert load_dictionary(out) == load_dictionary(first)


def test_non_utf8_word_input(tmp_path):
    p = write(tmp_path, "train.txt", b"ok line\n\xff bad\n")
    with pytest.raises(DataError, match=r"train.txt: not UTF-8 at byte offset 8"):
        prepare({"train": p}, tmp_path / "data")
    assert not (tmp_path / "data").exists()
    out = prepare({"train": p}, tmp_path / "bytes", char_level=True)  # bytes are fine at char level
    assert read_data_meta(out)["splits"]["train"]["tokens"] == 14  # 14 bytes, the last one a newline


def test_non_utf8_offset_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK", 4)
    data = "ab\ncdé\nxy".encode() + b"\xc3(\n"
    p = write(tmp_path, "train.txt", data)
    bad_at = data.index(b"\xc3(")  # 10: the file offset, not the offset inside a chunk
    with pytest.raises(DataError, match=rf"byte offset {bad_at} "):
        prepare({"train": p}, tmp_path / "data")


@pytest.mark.parametrize("char_level", [False, True])
def test_missing_and_empty_inputs(tmp_path, char_level):
    empty = write(tmp_path, "empty.txt", b"")
    ok = write(tmp_path, "ok.txt", "a\n")
    with pytest.raises(DataError, match="empty file"):
        prepare({"train": empty}, tmp_path / "d", char_level=char_level)
    with pytest.raises(DataError, match="no such file"):
        prepare({"train": ok, "valid": tmp_path / "nope.txt"}, tmp_path / "d", char_level=char_level)
    with pytest.raises(DataError, match="'train' split is needed"):
        prepare({"valid": ok}, tmp_path / "d", char_level=char_level)
    with pytest.raises(DataError, match="bad split name"):
        prepare({"train": ok, "../x": ok}, tmp_path / "d", char_level=char_level)
    assert not (tmp_path / "d").exists()


def test_failure_in_the_middle_leaves_nothing_complete(tmp_path):
    tr = write(tmp_path, "train.txt", "a b\n")
    bad = write(tmp_path, "valid.txt", b"a \xfe\n")  # fails while encoding, after train.npy is written
    out = tmp_path / "data"
    with pytest.raises(DataError, match="not UTF-8"):
        prepare({"train": tr, "valid": bad}, out)
    assert not out.exists()
    assert list(tmp_path.glob(".data*")) == []
    prepare({"train": tr}, out)
    before = (out / "meta.json").read_text()
    with pytest.raises(DataError, match="already exists"):
        prepare({"train": tr}, out)
    with pytest.raises(DataError, match="not UTF-8"):
        prepare({"train": tr, "valid": bad}, out, overwrite=True)
    assert (out / "meta.json").read_text() == before  # the old complete directory is untouched
    assert list(tmp_path.glob(".data*")) == []


def test_loading_errors_point_to_prepare(tmp_path):
    with pytest.raises(DataError, match="trime data prepare"):
        load_split(tmp_path / "nothing", "train")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "dict.txt").write_text("a 1\n")
    with pytest.raises(DataError, match="incomplete.*trime data prepare"):
        load_dictionary(tmp_path / "half")
    out = prepare({"train": write(tmp_path, "t.txt", "a\n")}, tmp_path / "data")
    with pytest.raises(DataError, match="no 'test' split .*has: train"):
        load_split(out, "test")
    np.save(out / "train.npy", np.zeros(5, dtype=np.int64))
    with pytest.raises(DataError, match="does not match meta.json"):
        load_split(out, "train")


def test_prepare_corpus_reads_the_level_and_allows_missing_splits(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus, "train.txt", b"ab\nc")
    write(corpus, "test.txt", b"ca\n")
    (corpus / "meta.json").write_text(json.dumps({"kind": "corpus", "name": "tiny", "level": "char"}))
    out = prepare_corpus(corpus, tmp_path / "data")
    meta = read_data_meta(out)
    assert meta["level"] == "char" and sorted(meta["splits"]) == ["test", "train"]
    assert meta["corpus"]["name"] == "tiny"
    assert load_split(out, "test").tolist() == [load_dictionary(out).index("99"), load_dictionary(out).index("97"), 2]
    words = prepare_corpus(corpus, tmp_path / "words", char_level=False)
    assert read_data_meta(words)["level"] == "word"
    (corpus / "train.txt").unlink()
    with pytest.raises(DataError, match="no train.txt"):
        prepare_corpus(corpus, tmp_path / "again")
    with pytest.raises(DataError, match="no such corpus directory"):
        prepare_corpus(tmp_path / "nope", tmp_path / "again")


def test_dictionary_helper_counts_match_a_plain_loop(tmp_path):
    p = write(tmp_path, "train.txt", TRAIN)
    counts = prep.count_words(p)
    ref = {}
    with open(p, encoding="utf-8") as f:
        for line in f:
            for w in line.split() + ["</s>"]:
                ref[w] = ref.get(w, 0) + 1
    assert dict(counts) == ref
    assert Dictionary.build(counts).index("the") == 4


def test_never_replaces_something_that_is_not_a_data_directory(tmp_path):
    tr = write(tmp_path, "train.txt", "a b\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus, "train.txt", "a b\n")
    (corpus / "meta.json").write_text(json.dumps({"kind": "corpus", "level": "word"}))
    with pytest.raises(DataError, match="holds a 'corpus' artifact"):
        prepare_corpus(corpus, corpus, overwrite=True)
    assert (corpus / "train.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a trime data directory"):
        prepare({"train": tr}, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert read_data_meta(prepare({"train": tr}, tmp_path / "empty"))["vocab_size"] == 8
