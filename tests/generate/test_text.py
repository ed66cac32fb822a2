"""Output text for BLEU: ids -> symbols, fairseq's post-processing, Moses detokenisation with the target
language's rules, sacreBLEU's tokeniser for the language, fairseq's BLEU4 (MT spec §10)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from sacremoses import MosesDetokenizer

from trime.data.dictionary import Dictionary
from trime.errors import ConfigError, DataError
from trime.generate import text as T
from trime.generate.search import Hypothesis
from trime.mt_generate import OutputText, hypothesis_lines

SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "new@@", "s", "it", "&apos;s", "good"]


def test_ids_to_string_drops_eos_and_pad_and_escapes_reference_unk():
    ids = [6, 7, 3, 4, 5, 2, 1, 1]
    assert T.ids_to_string(ids, SYMBOLS) == "it &apos;s <unk> new@@ s"
    assert T.ids_to_string(ids, SYMBOLS, escape_unk=True) == "it &apos;s <<unk>> new@@ s"


@pytest.mark.parametrize(
    "scheme,line,want",
    [
        ("subword_nmt", "new@@ s are good@@ ", "news are good"),
        ("subword_nmt", "no markers here", "no markers here"),
        ("@@", "new@@ s are", "new s are"),  # the marker goes, the space stays
        ("sentencepiece", "▁new s ▁are ▁good", "news are good"),
        ("sentencepiece", "▁私 は ▁学生 です 。", "私は 学生です。"),
        ("wordpiece", "_new s _are", "news are"),
        ("letter", "n e w | s o", "new so"),
        ("_EOW", "new s_EOW are_EOW", "news are"),
        ("silence", "<SIL> a  <SIL> b <SIL>", "a b"),
        ("none", "▁new s@@ x", "▁new s@@ x"),
    ],
)
def test_post_process_is_fairseqs(scheme, line, want):
    assert T.post_process(line, scheme) == want


def test_detok_scheme_follows_the_target_language():
    assert [T.detok_scheme("auto", x) for x in ("en", "de", "fr", "de-DE", "en_XX")] == ["moses"] * 5
    # no-space scripts and codes Moses has no rules for: left as post-processing made them
    assert [T.detok_scheme("auto", x) for x in ("ja", "zh", "zh_CN", "ko", "th", "tgt", "xx")] == ["none"] * 7
    assert T.detok_scheme("moses", "ja") == "moses" and T.detok_scheme("none", "en") == "none"
    assert T.base_lang(" EN_xx ") == "en"


def test_detokenize_unescapes_and_joins():
    assert T.detokenize(["it &apos;s good , isn &apos;t it ?"]) == ["it's good, isn't it?"]


def _pieces_dict(pieces: list[str]) -> Dictionary:
    d = Dictionary()
    for p in pieces:
        d.add_symbol(p)
    return d


def _hyp(d: Dictionary, pieces: list[str]) -> Hypothesis:
    ids = [d.index(p) for p in pieces] + [d.eos]
    return Hypothesis(tokens=torch.tensor(ids), score=-0.5, positional_scores=torch.full((len(ids),), -0.5))


@pytest.mark.parametrize("post", ["sentencepiece", "none"])
def test_japanese_d_lines_are_not_mangled(post):
    """A Japanese hypothesis (sentencepiece pieces) goes to its D- line as post-processing made it: Moses
    (whose CJK rule would join ``▁ く`` into ``▁く`` and words across spaces) is not applied to ja."""
    pieces = ["▁私", "は", "▁学生", "です", "。", "▁く", "れ"]
    d = _pieces_dict(pieces)
    text = OutputText(lang="ja", post=post, detok=T.detok_scheme("auto", "ja"))
    words = text.words(_hyp(d, pieces).tokens, d)
    assert words == ("私は 学生です。 くれ" if post == "sentencepiece" else " ".join(pieces))
    h, dline, p = hypothesis_lines(7, _hyp(d, pieces), words, text.detokenize([words])[0])
    assert dline == f"D-7\t{-0.5 / math.log(2)}\t{words}" and h.split("\t")[2] == words
    assert p == "P-7\t" + " ".join(["-0.7213"] * 8)
    assert MosesDetokenizer(lang="en").detokenize(words.split()) != words  # what English rules would have done


def test_german_and_french_d_lines_use_their_own_moses_rules():
    """The same detokenisation as sacremoses' for the target language, which differs from English's."""
    for lang, line in (("de", "Wie geht &apos;s dir ? Gut , danke ( sehr ) ."), ("fr", "C&apos; est l&apos; homme !")):
        pieces = line.split()
        d = _pieces_dict(pieces)
        text = OutputText(lang=lang, post="subword_nmt", detok=T.detok_scheme("auto", lang))
        words = text.words(_hyp(d, pieces).tokens, d)
        dline = hypothesis_lines(0, _hyp(d, pieces), words, text.detokenize([words])[0])[1]
        want = MosesDetokenizer(lang=lang).detokenize(pieces)
        assert dline.split("\t")[2] == want != MosesDetokenizer(lang="en").detokenize(pieces)
    assert T.detokenize(["Wie geht &apos;s ?"], "de") == ["Wie geht 's?"]


def test_corpus_bleu_matches_a_hand_computed_score():
    # 1-4-gram precisions 5/6, 3/5, 1/4, 0/3 (smoothed "exp": 1/(2·3)); no brevity penalty
    want = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    got = T.corpus_bleu(["the cat is on the mat"], ["the cat sat on the mat"])
    assert abs(got.score - want) < 0.01
    assert str(got).startswith("BLEU = ")
    assert T.corpus_bleu(["a b c d e"], ["a b c d e"]).score == pytest.approx(100.0)
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        T.corpus_bleu(["a", "b"], ["a"])


def test_sacrebleu_tokeniser_follows_the_target_language():
    def tok(*args):
        scorer = T.sacrebleu_scorer(*args)
        T.corpus_bleu(["a"], ["a"], scorer)  # sacreBLEU signs a scorer once it has scored
        return str(scorer.get_signature())

    assert "tok:13a" in tok("auto", "de") and "tok:13a" in tok("auto", "tgt") and "tok:zh" in tok("auto", "zh_CN")
    assert "tok:intl" in tok("intl", "zh") and "tok:none" in tok("none", "en")
    # Chinese is scored on characters: a hypothesis one character off is not a zero
    assert T.corpus_bleu(["我是学生。"], ["我是老师。"], T.sacrebleu_scorer("auto", "zh")).score > 0
    assert T.corpus_bleu(["我是学生。"], ["我是老师。"], T.sacrebleu_scorer("13a", "zh")).score == 0


def test_japanese_without_mecab_is_one_line_naming_the_extra():
    try:
        T.sacrebleu_scorer("ja-mecab")
    except ConfigError:
        pass
    else:
        pytest.skip("MeCab is installed here: ja-mecab works")
    for args in (("auto", "ja"), ("ja-mecab", "en")):
        with pytest.raises(ConfigError) as e:
            T.sacrebleu_scorer(*args)
        assert "\n" not in str(e.value) and 'pip install "sacrebleu[ja]"' in str(e.value)
        assert "ja-mecab" in str(e.value) and "--sacrebleu-tokenize" in str(e.value)


# ---- fairseq's BLEU4 against a brute-force reading of fairseq/scoring/bleu.py + libbleu ----------------------


def _brute_bleu4(hyps: list[str], refs: list[str]) -> tuple[float, list[int], list[int], int, int]:
    """As libbleu: ids = words + eos, pads trimmed left, eos/pad right (never the first token); for each
    reference n-gram, take one equal n-gram from what is left of the hypothesis' multiset."""

    def trim(words):
        w = words + ["</s>"]
        while w and w[0] == "<pad>":
            w = w[1:]
        while len(w) > 1 and w[-1] in ("</s>", "<pad>"):
            w = w[:-1]
        return w

    match, count, reflen, syslen = [0] * 4, [0] * 4, 0, 0
    for h, r in zip(hyps, refs):
        hw, rw = trim(h.split()), trim(r.split())
        rw = [("UNK", k) if x == "<unk>" else x for k, x in enumerate(rw)]  # matches nothing in hw
        reflen, syslen = reflen + len(rw), syslen + len(hw)
        for n in range(1, 5):
            if len(hw) < n:
                continue
            pool = [hw[i : i + n] for i in range(len(hw) - n + 1)]
            count[n - 1] += len(pool)
            for i in range(len(rw) - n + 1):
                if rw[i : i + n] in pool:
                    pool.remove(rw[i : i + n])
                    match[n - 1] += 1
    p = [m / c if c else 0 for m, c in zip(match, count)]
    logs = sum(math.log(x) if x > 0 else -math.inf for x in p)
    bp = min(1, math.exp(1 - reflen / syslen))
    return bp * math.exp(logs / 4) * 100, match, count, reflen, syslen


def test_fairseq_bleu4_equals_brute_force():
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "<unk>"]
    for trial in range(30):
        refs, hyps = [], []
        for _ in range(rng.randint(1, 6)):
            refs.append(" ".join(rng.choices(vocab, k=rng.randint(0, 9))))
            hyps.append(" ".join(rng.choices(vocab, k=rng.randint(0, 9))))
        got = T.fairseq_bleu4(hyps, refs)
        score, match, count, reflen, syslen = _brute_bleu4(hyps, refs)
        assert (got.match, got.count, got.reflen, got.syslen) == (match, count, reflen, syslen), trial
        assert got.score == pytest.approx(score, abs=1e-9), trial


def test_fairseq_bleu4_prints_as_fairseq_and_keeps_its_quirks():
    got = T.fairseq_bleu4(["the cat is on the mat"], ["the cat sat on the mat"])
    p = [5 / 6, 3 / 5, 1 / 4, 0]  # no smoothing: a zero 4-gram precision gives 0
    assert got.score == 0.0 and got.precisions() == pytest.approx(p)
    assert str(got) == "BLEU4 = 0.00, 83.3/60.0/25.0/0.0 (BP=1.000, ratio=1.000, syslen=6, reflen=6)"
    short = T.fairseq_bleu4(["a b c d"], ["a b c d e f"])
    assert short.brevity() == pytest.approx(math.exp(1 - 6 / 4))
    assert str(short) == f"BLEU4 = {100 * math.exp(1 - 1.5):2.2f}, 100.0/100.0/100.0/100.0 (BP=0.607, ratio=0.667, " \
        "syslen=4, reflen=6)"  # fmt: skip
    assert T.fairseq_bleu4(["a <unk> b"], ["a <unk> b"]).match[:2] == [2, 0]  # a reference's <unk> matches nothing
    empty = T.fairseq_bleu4([""], [""])  # read back as one eos, which fairseq's trim keeps
    assert (empty.syslen, empty.reflen, empty.match[0]) == (1, 1, 1)
    with pytest.raises(DataError):
        T.fairseq_bleu4(["a"], [])
    assert T.Bleu4.words("x </s> </s>", False) == ["x"] and T.Bleu4.words("<pad> </s>", False) == ["</s>"]
