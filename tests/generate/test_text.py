"""Output text for BLEU: ids -> symbols, BPE removal, Moses detokenisation, corpus sacreBLEU (MT spec §10)."""

from __future__ import annotations

import pytest

from trime.errors import DataError
from trime.generate.text import corpus_bleu, detokenize, ids_to_string, remove_bpe

SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "new@@", "s", "it", "&apos;s", "good"]


def test_ids_to_string_drops_eos_and_pad_and_escapes_reference_unk():
    ids = [6, 7, 3, 4, 5, 2, 1, 1]
    assert ids_to_string(ids, SYMBOLS) == "it &apos;s <unk> new@@ s"
    assert ids_to_string(ids, SYMBOLS, escape_unk=True) == "it &apos;s <<unk>> new@@ s"


def test_remove_bpe():
    assert remove_bpe("new@@ s are good@@ ") == "news are good"
    assert remove_bpe("no markers here") == "no markers here"


def test_detokenize_unescapes_and_joins():
    assert detokenize(["it &apos;s good , isn &apos;t it ?"]) == ["it's good, isn't it?"]


def test_corpus_bleu_matches_a_hand_computed_score():
    # 1-4-gram precisions 5/6, 3/5, 1/4, 0/3 (smoothed "exp": 1/(2·3)); no brevity penalty
    want = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    got = corpus_bleu(["the cat is on the mat"], ["the cat sat on the mat"])
    assert abs(got.score - want) < 0.01
    assert str(got).startswith("BLEU = ")
    assert corpus_bleu(["a b c d e"], ["a b c d e"]).score == pytest.approx(100.0)
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
