"""From token ids to scored text, as fairseq-generate does for BLEU (MT spec §10).

ids -> symbols (eos dropped; a reference's ``<unk>`` shown as ``<<unk>>`` so it never matches a
hypothesis' ``<unk>``) -> BPE removed (subword-nmt's ``@@ `` continuation marker) -> Moses
detokenisation (sacremoses; also unescapes ``&apos;`` etc.) -> corpus sacreBLEU (13a tokenisation,
exp smoothing), printed as ``BLEU = ...``. sacremoses and sacrebleu are imported when used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from trime.errors import DataError


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


def remove_bpe(line: str, marker: str = "@@ ") -> str:
    """subword-nmt post-processing (fairseq ``--remove-bpe``): ``"new@@ s"`` -> ``"news"``."""
    return (line + " ").replace(marker, "").rstrip()


def detokenize(lines: Iterable[str], lang: str = "en") -> list[str]:
    """Moses detokenisation (fairseq ``--tokenizer moses``'s decode), one string per line."""
    from sacremoses import MosesDetokenizer

    md = MosesDetokenizer(lang=lang)
    return [md.detokenize(line.split()) for line in lines]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]):
    """sacreBLEU corpus score (default 13a tokenisation, exp smoothing); ``str()`` gives ``BLEU = ...``."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
