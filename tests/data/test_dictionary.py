"""fairseq-compatible Dictionary (spec §0, §8): order, padding, specials, dict.txt, encoding."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from trime.data.dictionary import Dictionary
from trime.errors import DataError

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def reference_symbols(counts: dict[str, int], padding_factor: int = 8) -> list[str]:
    """fairseq's order by brute force: specials, then by count (desc) then code point, then padding."""
    types = [w for w in counts if w not in SPECIALS]
    order = []
    while types:  # selection sort with an explicit comparison, no key tricks
        best = types[0]
        for w in types[1:]:
            if counts[w] > counts[best] or (counts[w] == counts[best] and w < best):
                best = w
        order.append(best)
        types.remove(best)
    symbols = SPECIALS + order
    i = 0
    while len(symbols) % padding_factor:
        name = f"madeupword{i:04d}"
        if name not in symbols:
            symbols.append(name)
        i += 1
    return symbols


def test_specials_and_order_with_ties_and_padding():
    d = Dictionary.build(Counter({"b": 2, "a": 2, "c": 5, "d": 1, "B": 2}))
    assert (d.bos, d.pad, d.eos, d.unk) == (0, 1, 2, 3)
    assert d.symbols == SPECIALS + ["c", "B", "a", "b", "d"] + [f"madeupword{i:04d}" for i in range(7)]
    assert len(d) == 16 and d.counts[9:] == [0] * 7
    assert d.index("B") == 5 and d[5] == "B"


def test_order_matches_brute_force_on_random_counts():
    rng = random.Random(0)
    alphabet = "abcAB_é1"
    for _ in range(30):
        counts = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))): rng.randint(1, 4) for _ in range(40)}
        d = Dictionary.build(Counter(counts))
        assert d.symbols == reference_symbols(counts)
        assert len(d) % 8 == 0
        for w, n in counts.items():
            assert d.counts[d.index(w)] == n


def test_no_padding_when_already_a_multiple():
    d = Dictionary.build(Counter({"a": 1, "b": 1, "c": 1, "d": 1}))
    assert len(d) == 8 and "madeupword0000" not in d


def test_padding_factor_one_and_sixteen():
    counts = Counter({"a": 3, "b": 1})
    assert len(Dictionary.build(counts, padding_factor=1)) == 6
    assert len(Dictionary.build(counts, padding_factor=16)) == 16


def test_madeupword_in_the_text_is_skipped_when_padding():
    counts = {"madeupword0000": 1, "x": 3, "y": 2, "z": 2, "w": 1}
    d = Dictionary.build(Counter(counts))
    assert d.symbols == reference_symbols(counts)
    assert d.symbols[-7:] == [f"madeupword{i:04d}" for i in range(1, 8)]
    assert d.symbols.count("madeupword0000") == 1


def test_literal_unk_and_eos_merge_into_the_specials():
    d = Dictionary.build(Counter(["a", "<unk>", "b", "<unk>", "a"]) + Counter({"</s>": 3}))
    assert d.symbols[:6] == SPECIALS + ["a", "b"]
    assert d.symbols.count("<unk>") == 1
    assert d.counts[d.unk] == 1 + 2 and d.counts[d.eos] == 1 + 3
    assert d.encode_line("<unk> a zzz").tolist() == [d.unk, 4, d.unk, d.eos]


def test_encode_line_whitespace_and_empty():
    d = Dictionary.build(Counter({"a": 3, "b": 2, "c": 1}))
    ids = d.encode_line("  a\tb \u3000c\u00a0 zz \n")
    assert ids.dtype == np.int32
    assert ids.tolist() == [4, 5, 6, d.unk, d.eos]
    assert d.encode_line("").tolist() == [d.eos]
    assert d.encode_line(" \t \n").tolist() == [d.eos]


def test_string_round_trip_and_specials():
    d = Dictionary.build(Counter(["the", "cat", "sat", "on", "the", "mat"]))
    line = "  the   cat sat\ton the dog "
    assert d.string(d.encode_line(line)) == "the cat sat on the <unk>"
    assert d.string([d.bos, 4, d.pad, d.eos]) == "the"
    assert d.string([4, d.eos], skip_specials=False) == "the </s>"
    known = "the mat on the cat"
    assert d.string(d.encode_line(known)) == known


def test_getitem_out_of_range():
    d = Dictionary.build(Counter({"a": 1}))
    with pytest.raises(IndexError):
        d[len(d)]


def test_save_load_round_trip(tmp_path):
    d = Dictionary.build(Counter({"b": 2, "a": 2, "ü": 7, "<unk>": 4}))
    d.save(tmp_path / "dict.txt")
    text = (tmp_path / "dict.txt").read_text(encoding="utf-8")
    assert text.splitlines()[:3] == ["ü 7", "a 2", "b 2"]
    assert "<unk>" not in text and "</s>" not in text
    assert text.splitlines()[-1] == "madeupword0000 0"
    e = Dictionary.load(tmp_path / "dict.txt")
    assert e.symbols == d.symbols and e.counts[4:] == d.counts[4:]
    assert e != Dictionary.build(Counter({"b": 2, "a": 2, "ü": 6}))


def test_load_overwrite_flag_like_fairseq(tmp_path):
    p = tmp_path / "dict.txt"
    p.write_text("a 5\nb 3\na 2 #fairseq:overwrite\n<unk> 9 #fairseq:overwrite\n")
    d = Dictionary.load(p)
    assert d.symbols == SPECIALS + ["a", "b", "a", "<unk>"]
    assert d.index("a") == 6 and d.index("<unk>") == 7
    d.save(tmp_path / "again.txt")
    assert Dictionary.load(tmp_path / "again.txt") == d


@pytest.mark.parametrize(
    "content, lineno, what",
    [
        ("a 1\nb\n", 2, "expected"),
        ("a 1\nb x\n", 2, "expected"),
        ("a 1\n\n", 2, "expected"),
        ("a 1\nb 2\na 3\n", 3, "duplicate"),
        ("<unk> 3\n", 1, "duplicate"),
    ],
)
def test_bad_dict_file(tmp_path, content, lineno, what):
    p = tmp_path / "dict.txt"
    p.write_text(content)
    with pytest.raises(DataError, match=rf"dict.txt:{lineno}: .*{what}"):
        Dictionary.load(p)


def test_missing_dict_file(tmp_path):
    with pytest.raises(DataError, match="no such"):
        Dictionary.load(tmp_path / "nope.txt")
