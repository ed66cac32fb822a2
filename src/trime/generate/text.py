"""From token ids to scored text, as fairseq-generate does for BLEU (MT spec §10), for any target language.

ids -> symbols (eos dropped; a reference's ``<unk>`` shown as ``<<unk>>`` so it never matches a
hypothesis' ``<unk>``) -> pieces joined into words (:func:`post_process`, fairseq's ``--post-process``)
-> Moses detokenisation with the target language's rules, where Moses has them (:func:`detok_scheme`)
-> corpus sacreBLEU with the tokeniser sacreBLEU picks for the target language (:func:`sacrebleu_scorer`),
or fairseq's own BLEU4 over the words (:class:`Bleu4`). sacremoses and sacrebleu are imported when used.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from trime.config import POST_PROCESS
from trime.errors import ConfigError, DataError

# fairseq's --post-process schemes (fairseq.data.data_utils.post_process) turn pieces into words: each
# joins the pieces of a line (spaces dropped) and turns its word-boundary marker into a space, except
# subword_nmt / "@@" (a continuation marker at the end of a piece is dropped), silence and none.
_BOUNDARY = {"sentencepiece": "\u2581", "wordpiece": "_", "letter": "|", "_EOW": "_EOW"}

# Scripts written without spaces between words: Moses' detokeniser would join their pieces by its
# CJK rule, which is not how their text was segmented, so they are left as the post-processing makes them.
_NO_SPACE_LANGS = frozenset({"zh", "yue", "ja", "ko", "th", "lo", "km", "my"})

# what `pip install` brings sacreBLEU's optional tokenisers
_SACREBLEU_EXTRAS = {"ja-mecab": "ja", "ko-mecab": "ko"}


def ids_to_string(
    ids: Iterable[int], symbols: Sequence[str], *, eos: int = 2, pad: int = 1, unk: int = 3, escape_unk: bool = False
) -> str:
    """fairseq ``Dictionary.string`` without post-processing: symbols joined by spaces, eos and pad dropped."""
    out = []
    for i in ids:
        i = int(i)
        if i in (eos, pad):
            continue
        out.append("<<unk>>" if escape_unk and i == unk else symbols[i])
    return " ".join(out)


def post_process(line: str, scheme: str = "subword_nmt") -> str:
    """Pieces to words as fairseq's ``--post-process SCHEME`` (``--remove-bpe``) does, for one line:
    subword_nmt ``"new@@ s"`` -> ``"news"``; ``@@`` drops the marker but keeps the space; sentencepiece
    ``"▁new s ▁are"`` -> ``"news are"``; wordpiece (``_``), letter (``|``) and _EOW likewise with their
    marker; silence drops ``<SIL>``; none leaves the line as it is."""
    if scheme in _BOUNDARY:
        return line.replace(" ", "").replace(_BOUNDARY[scheme], " ").strip()
    if scheme in ("subword_nmt", "@@"):
        marker = "@@ " if scheme == "subword_nmt" else "@@"
        return (line + " ").replace(marker, "").rstrip()
    if scheme == "silence":
        return re.sub(" +", " ", line.replace("<SIL>", "")).strip()
    if scheme == "none":
        return line
    raise ConfigError(f"unknown post-processing {scheme!r} (known: {', '.join(POST_PROCESS)})")


def base_lang(lang: str) -> str:
    """The language of a code such as ``de``, ``de-DE``, ``en_XX`` or ``zh_CN``: ``de``, ``de``, ``en``, ``zh``."""
    return re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0]


def detok_scheme(detok: str, lang: str) -> str:
    """How D- lines are made from H- lines for target language ``lang``: ``moses`` (sacremoses'
    MosesDetokenizer with ``lang``'s rules) or ``none``. ``auto`` is moses for the languages sacremoses
    has rules for (its non-breaking-prefix languages), except those written without spaces between
    words (zh, yue; ja, ko, th ... have no rules anyway), and none for every other code (``src``, ``xx``)."""
    if detok != "auto":
        return detok
    from sacremoses.corpus import NonbreakingPrefixes

    known = set(NonbreakingPrefixes().available_langs.values()) - _NO_SPACE_LANGS
    return "moses" if base_lang(lang) in known else "none"


def detokenize(lines: Iterable[str], lang: str = "en") -> list[str]:
    """Moses detokenisation with ``lang``'s rules (fairseq ``--tokenizer moses``'s decode), one string per line."""
    from sacremoses import MosesDetokenizer

    md = MosesDetokenizer(lang=base_lang(lang))
    return [md.detokenize(line.split()) for line in lines]


def sacrebleu_scorer(tokenize: str = "auto", lang: str = ""):
    """sacreBLEU's corpus BLEU (exp smoothing) with tokeniser ``tokenize``; ``auto`` is sacreBLEU's own
    choice for target language ``lang`` (ja-mecab for ja, ko-mecab for ko, zh for zh, 13a otherwise).
    A tokeniser whose package is missing is one ConfigError line naming what to install."""
    from sacrebleu.metrics import BLEU

    kw = {"tokenize": None, "trg_lang": base_lang(lang)} if tokenize == "auto" else {"tokenize": tokenize}
    try:
        return BLEU(**kw)
    except (ImportError, RuntimeError):  # sacreBLEU's mecab tokenisers raise RuntimeError without MeCab
        name = BLEU._TOKENIZER_MAP.get(base_lang(lang), "13a") if tokenize == "auto" else tokenize
        extra = _SACREBLEU_EXTRAS.get(name, "")
        why = f" (chosen for target language {lang})" if tokenize == "auto" else ""
        raise ConfigError(
            f"sacreBLEU's {name} tokeniser{why} needs packages that are not installed: "
            f'pip install "sacrebleu[{extra}]", or choose another with --sacrebleu-tokenize'
        ) from None


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], scorer=None):
    """sacreBLEU corpus score (``scorer`` from :func:`sacrebleu_scorer`, default 13a); ``str()`` gives
    ``BLEU = ...``; ``scorer.get_signature()`` says how it was computed."""
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = scorer or sacrebleu_scorer("13a")
    return scorer.corpus_score(list(hypotheses), [list(references)])


# ---- fairseq-generate's own BLEU4 (--scoring bleu) -----------------------------------------------------------


@dataclass
class Bleu4:
    """fairseq's corpus BLEU4 (fairseq.scoring.bleu, the default ``--scoring bleu`` of fairseq-generate)
    over whitespace-separated words, as the numbers published with fairseq's recipes are computed.

    Each line is read as fairseq reads it back into ids (``Dictionary.encode_line``: split on whitespace,
    ``</s>`` appended), then trimmed (leading ``<pad>``; trailing ``</s>``/``<pad>``, but never the first
    word: an empty line counts as one word, ``</s>``). A reference's ``<unk>`` never matches. n-gram
    matches are clipped by the hypothesis' counts; the score is BP · exp(mean log p_n) · 100 with no
    smoothing (a zero precision gives 0), BP = min(1, exp(1 − reflen/syslen)). ``str()`` prints it as
    fairseq does: ``BLEU4 = x, p1/p2/p3/p4 (BP=..., ratio=..., syslen=..., reflen=...)``."""

    reflen: int = 0
    syslen: int = 0
    match: list[int] = field(default_factory=lambda: [0] * 4)
    count: list[int] = field(default_factory=lambda: [0] * 4)

    @staticmethod
    def words(line: str, ref: bool) -> list:
        w = [*line.split(), "</s>"]
        start = next((i for i, x in enumerate(w) if x != "<pad>"), len(w))
        w = w[start:]
        end = len(w) - 1
        while end > 0 and w[end] in ("</s>", "<pad>"):
            end -= 1
        w = w[: end + 1]
        return [object() if ref and x == "<unk>" else x for x in w]  # a reference's unk: equal to nothing

    def add(self, reference: str, hypothesis: str) -> None:
        ref, hyp = self.words(reference, True), self.words(hypothesis, False)
        self.reflen += len(ref)
        self.syslen += len(hyp)
        for n in range(1, 5):
            if len(hyp) < n:
                continue
            self.count[n - 1] += len(hyp) - n + 1
            have = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            want = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            self.match[n - 1] += sum(min(c, have[g]) for g, c in want.items())

    def precisions(self) -> list[float]:
        return [m / c if c > 0 else 0.0 for m, c in zip(self.match, self.count)]

    def brevity(self) -> float:
        return min(1.0, math.exp(1 - self.reflen / self.syslen)) if self.syslen else 0.0

    @property
    def score(self) -> float:
        p = self.precisions()
        if min(p) <= 0:
            return 0.0
        return self.brevity() * math.exp(sum(map(math.log, p)) / 4) * 100

    def __str__(self) -> str:
        p = "/".join(f"{100 * x:2.1f}" for x in self.precisions())
        ratio = self.syslen / self.reflen if self.reflen else 0.0
        return (
            f"BLEU4 = {self.score:2.2f}, {p} (BP={self.brevity():.3f}, ratio={ratio:.3f}, "
            f"syslen={self.syslen}, reflen={self.reflen})"
        )


def fairseq_bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> Bleu4:
    """:class:`Bleu4` of word strings (fairseq-generate --scoring bleu over H- against T- lines)."""
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    out = Bleu4()
    for h, r in zip(hypotheses, references):
        out.add(r, h)
    return out
