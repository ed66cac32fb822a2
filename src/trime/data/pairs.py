"""Parallel corpora (spec §2): Moses tokenisation, joint BPE, source/target dictionaries, binarised pairs.

A *pair corpus* is a directory of plain-text files, one sentence per line, line i of the source file
translating line i of the target file::

    corpus_dir/{train,valid,test}.{L1,L2}     e.g. train.de / train.en, or train.src / train.tgt
    corpus_dir/meta.json                      optional (written by ``trime data fetch``): kind "pair_corpus",
                                              "langs": {"source": L1, "target": L2}, where the text came from

:func:`prepare_pairs` turns it into a *pairs data directory*, what ``fairseq-preprocess --source-lang L1
--target-lang L2`` makes (same dictionaries, same ids), stored as numpy instead of .bin/.idx::

    out_dir/dict.{L1}.txt, dict.{L2}.txt    fairseq dict.txt files built from train (identical with --joined-dictionary)
    out_dir/bpe.codes                       subword-nmt codes (learned or copied), when BPE was asked for
    out_dir/{split}.{L}.npy                 int32 (n_tokens,): every sentence's ids then eos, concatenated
    out_dir/{split}.{L}.offsets.npy         int64 (n_sentences + 1,): sentence i is tokens[offsets[i]:offsets[i+1]]
    out_dir/meta.json                       written last: kind "pairs", langs, vocab sizes, text pipeline, per split
                                            {"pairs", L: {"tokens", "unk", "replaced", "fingerprint", "source_sha256"}}

Text pipeline, in the order of prepare-iwslt14.sh (each step optional): Moses tokenisation with sacremoses
(``escape=True``: ``'`` -> ``&apos;``, as tokenizer.perl), lowercasing, joint BPE (one subword-nmt model learned
with ``bpe_merges`` merges on train.L1 followed by train.L2, min frequency 2 as ``learn_bpe.py -s N``; or codes
given with ``bpe_codes``, so a released model's codes apply), then binarisation exactly as fairseq: whitespace
tokens, unknown ones -> ``<unk>``, eos appended.

A fairseq data-bin (fairseq-preprocess's own .bin/.idx output) is read wherever a pairs data directory is
(:func:`read_pairs_meta`, :func:`load_pair_split`; trime.data.fairseq_bin), its languages chosen with
``source_lang``/``target_lang`` when it holds several pairs. sentencepiece (``sentencepiece_model`` /
``sentencepiece_vocab``, trime.data.spm) takes BPE's place in the text pipeline.

Empty lines: fairseq-preprocess keeps them (an empty sentence is just ``</s>``). Here an empty or whitespace-only
line on either side (after tokenisation) is a DataError naming the file and line, unless ``allow_empty=True``,
which keeps them as fairseq does. Files are read as fairseq reads them: UTF-8, universal newlines.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trime.data.dictionary import Dictionary
from trime.data.fairseq_bin import FORMAT as FAIRSEQ_BIN
from trime.data.fairseq_bin import databin_kind, pair_split_files, pairs_meta, refuse_as_input
from trime.data.prepare import check_out_dir
from trime.data.spm import Pieces
from trime.errors import DataError
from trime.io import atomic_dir, fingerprint_array, load_npy, read_json, read_meta, save_npy, sha256_file, write_meta

SPLITS = ("train", "valid", "test")
KIND = "pairs"
CORPUS_KIND = "pair_corpus"
CODES = "bpe.codes"
_HINT = "run `trime data prepare` on the parallel corpus first"


# ---------------------------------------------------------------------------------------------
# Reading a pair corpus


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file, as fairseq reads them (universal newlines, no line-end characters)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def corpus_files(
    corpus_dir: str | os.PathLike, source_lang: str | None = None, target_lang: str | None = None, need_train=True
) -> tuple[str, str, dict[str, tuple[Path, Path]]]:
    """(source lang, target lang, {split: (source file, target file)}) of a pair corpus directory.

    The languages come from the arguments, else from the corpus meta.json, else ``src``/``tgt``.
    A split is present when its source file is; its target file must then exist too. ``train`` is required
    when ``need_train`` (to build a dictionary or learn subwords), else any one split.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"{corpus_dir}: no such corpus directory (run `trime data fetch` first)")
    refuse_as_input(corpus_dir)
    meta = read_json(corpus_dir / "meta.json") if (corpus_dir / "meta.json").is_file() else {}
    langs = meta.get("langs", {})
    src = source_lang or langs.get("source") or "src"
    tgt = target_lang or langs.get("target") or "tgt"
    if src == tgt:
        raise DataError(f"source and target language are both {src!r}")
    files = {}
    for split in SPLITS:
        s, t = corpus_dir / f"{split}.{src}", corpus_dir / f"{split}.{tgt}"
        if s.is_file() or t.is_file():
            if not (s.is_file() and t.is_file()):
                raise DataError(
                    f"{corpus_dir}: {s.name if s.is_file() else t.name} has no parallel "
                    f"{t.name if s.is_file() else s.name}"
                )
            files[split] = (s, t)
    if files and ("train" in files or not need_train):
        return src, tgt, files
    have = ", ".join(sorted(p.name for p in corpus_dir.iterdir() if p.is_file())) or "nothing"
    if not files:
        named = "" if source_lang and target_lang else "; pass --source-lang/--target-lang to name the file suffixes"
        raise DataError(f"{corpus_dir}: no {{train,valid,test}}.{src} / .{tgt} files (has: {have}){named}")
    raise DataError(
        f"{corpus_dir}: no train.{src} / train.{tgt} (has: {have}); the dictionaries are built from train: "
        "add it, or give --src-dict and --tgt-dict (and --bpe-codes or --sentencepiece-model, not a number of merges "
        "or pieces to learn)"
    )


# ---------------------------------------------------------------------------------------------
# Text steps


def moses_tokenize(lines: list[str], lang: str) -> list[str]:
    """tokenizer.perl -l LANG with its defaults, via sacremoses (escaping on, no aggressive hyphen splits).

    As tokenizer.perl, a blank line passes through untouched (here: becomes ""). Known differences from the
    Perl script are sacremoses's own (spec §13.1: "small differences possible").
    """
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(ln, escape=True, return_str=True) if ln.strip() else "" for ln in lines]


def lowercase(lines: list[str]) -> list[str]:
    """lowercase.perl: Perl ``lc`` on every line (Python ``str.lower``, the same full Unicode mapping)."""
    return [ln.lower() for ln in lines]


def learn_bpe_codes(lines: list[str], merges: int, min_frequency: int = 2) -> str:
    """subword-nmt's ``learn_bpe.py -s MERGES`` on these lines; returns the codes file's text."""
    from subword_nmt.learn_bpe import learn_bpe

    if merges < 1:
        raise DataError(f"--bpe-merges must be positive, got {merges}")
    out = io.StringIO()
    learn_bpe(io.StringIO("".join(ln + "\n" for ln in lines)), out, merges, min_frequency=min_frequency)
    return out.getvalue()


def apply_bpe(lines: list[str], codes: str, origin: str = "the BPE codes") -> list[str]:
    """subword-nmt's ``apply_bpe.py -c CODES`` (separator ``@@``) on every line."""
    from subword_nmt.apply_bpe import BPE

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            bpe = BPE(io.StringIO(codes))
    except (SystemExit, ValueError, IndexError):  # subword-nmt exits on a malformed line
        raise DataError(f"{origin}: not a subword-nmt BPE codes file (every line after the header is 'a b')") from None
    return [bpe.process_line(ln) for ln in lines]


def check_parallel(src: list[str], tgt: list[str], src_path: Path, tgt_path: Path, allow_empty: bool) -> None:
    """Same number of lines on both sides; no empty line unless ``allow_empty``."""
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: not a parallel corpus")
    if allow_empty:
        return
    for path, lines in ((src_path, src), (tgt_path, tgt)):
        for i, ln in enumerate(lines):
            if not ln.split():
                raise DataError(
                    f"{path}:{i + 1}: empty line (fairseq would keep it as a bare </s>; "
                    "remove it, or pass --allow-empty-lines)"
                )


# ---------------------------------------------------------------------------------------------
# Dictionaries and binarisation


def count_tokens(lines: list[str]) -> Counter:
    """Whitespace-token counts plus one ``</s>`` per line, as fairseq's dictionary builder counts."""
    counts: Counter = Counter()
    for ln in lines:
        counts.update(ln.split())
    counts["</s>"] += len(lines)
    return counts


def encode_lines(lines: list[str], d: Dictionary) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens (n_tokens,) int32, offsets (n + 1,) int64, replaced): each line's ids then eos, concatenated.

    ``replaced`` counts out-of-dictionary tokens (fairseq's "replaced by <unk>", not literal ``<unk>``).
    """
    index, unk, eos = d.indices, d.unk, d.eos
    ids: list[int] = []
    offsets = np.zeros(len(lines) + 1, dtype=np.int64)  # (n + 1,)
    replaced = 0
    for i, ln in enumerate(lines):
        for w in ln.split():
            j = index.get(w)
            if j is None:
                replaced += 1
                j = unk
            ids.append(j)
        ids.append(eos)
        offsets[i + 1] = len(ids)
    return np.asarray(ids, dtype=np.int32), offsets, replaced


def _dicts_given(joined: bool, src_dict, tgt_dict) -> bool:
    """Whether the dictionaries are all given (nothing to count on a train split)."""
    return src_dict is not None or tgt_dict is not None if joined else src_dict is not None and tgt_dict is not None


def _resolve_dicts(
    train: tuple[list[str], list[str]] | None, joined: bool, src_dict, tgt_dict
) -> tuple[Dictionary, Dictionary]:
    """(source, target) dictionaries: the given ones, the rest built from ``train`` (None when all are given)."""
    if joined:
        if src_dict is not None or tgt_dict is not None:
            given = Dictionary.load(src_dict if src_dict is not None else tgt_dict)
            return given, given
        d = Dictionary.build(count_tokens(train[0]) + count_tokens(train[1]))
        return d, d
    s = Dictionary.load(src_dict) if src_dict is not None else Dictionary.build(count_tokens(train[0]))
    t = Dictionary.load(tgt_dict) if tgt_dict is not None else Dictionary.build(count_tokens(train[1]))
    return s, t


# ---------------------------------------------------------------------------------------------
# Entry point


def _text_pipeline(lines: list[str], lang: str, moses: bool, lower: bool) -> list[str]:
    if moses:
        lines = moses_tokenize(lines, lang)
    if lower:
        lines = lowercase(lines)
    return lines


def _progress(msg: str) -> None:
    print(f"trime data prepare: {msg}", file=sys.stderr, flush=True)


def prepare_pairs(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    source_lang: str | None = None,
    target_lang: str | None = None,
    moses: bool = False,
    lower: bool = False,
    bpe_merges: int | None = None,
    bpe_codes: str | os.PathLike | None = None,
    joined_dictionary: bool = False,
    src_dict: str | os.PathLike | None = None,
    tgt_dict: str | os.PathLike | None = None,
    sentencepiece_model: str | os.PathLike | None = None,
    sentencepiece_vocab: int | None = None,
    allow_empty: bool = False,
    overwrite: bool = False,
) -> Path:
    """Binarise the pair corpus ``corpus_dir`` into the pairs data directory ``out_dir`` (module docstring).

    ``bpe_merges`` learns a joint BPE on the (tokenised) train split; ``bpe_codes`` applies given codes
    instead (at most one of them). ``sentencepiece_model`` encodes both sides with a given sentencepiece model
    instead of BPE, ``sentencepiece_vocab`` trains one of that many pieces on train (trime.data.spm; saved with
    the data). ``src_dict`` / ``tgt_dict`` (dict.txt files, e.g. a released model's) replace the dictionaries
    built from train; with both (or one and ``joined_dictionary``) and nothing to learn, no train split is needed.
    Moses tokenisation takes the file suffixes as its language codes
    (de, en, es, ...; ``src``/``tgt`` get its language-neutral rules). Any bad input is a one-line DataError and
    leaves nothing behind.
    """
    t0 = time.perf_counter()
    if bpe_merges is not None and bpe_codes is not None:
        raise DataError("give either --bpe-merges (learn BPE) or --bpe-codes (apply given codes), not both")
    spm_given = sentencepiece_model is not None or sentencepiece_vocab is not None
    if spm_given and (bpe_merges is not None or bpe_codes is not None):
        raise DataError("give BPE (--bpe-merges/--bpe-codes) or sentencepiece (--sentencepiece-*), not both")
    if sentencepiece_model is not None and sentencepiece_vocab is not None:
        raise DataError("give --sentencepiece-model (apply one) or --sentencepiece-vocab (train one), not both")
    learns = bpe_merges is not None or sentencepiece_vocab is not None
    need_train = learns or not _dicts_given(joined_dictionary, src_dict, tgt_dict)
    src, tgt, files = corpus_files(corpus_dir, source_lang, target_lang, need_train)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, KIND, overwrite)
    codes = None
    if bpe_codes is not None:
        path = Path(bpe_codes)
        if not path.is_file():
            raise DataError(f"{path}: no such BPE codes file")
        codes = path.read_text(encoding="utf-8")
        apply_bpe([], codes, str(path))  # validate before the long steps
    pieces = Pieces.load(sentencepiece_model) if sentencepiece_model is not None else None

    texts: dict[str, tuple[list[str], list[str]]] = {}
    for split, (sp, tp) in files.items():
        s_lines, t_lines = read_lines(sp), read_lines(tp)
        check_parallel(s_lines, t_lines, sp, tp, allow_empty=True)
        _progress(f"{split}: {len(s_lines)} pairs" + (", Moses tokenisation" if moses else ""))
        s_lines, t_lines = _text_pipeline(s_lines, src, moses, lower), _text_pipeline(t_lines, tgt, moses, lower)
        check_parallel(s_lines, t_lines, sp, tp, allow_empty)
        texts[split] = (s_lines, t_lines)
    if bpe_merges is not None:
        _progress(f"learning {bpe_merges} BPE merges on train.{src} + train.{tgt}")
        codes = learn_bpe_codes(texts["train"][0] + texts["train"][1], bpe_merges)
    if codes is not None:
        _progress("applying BPE")
        texts = {k: (apply_bpe(s, codes), apply_bpe(t, codes)) for k, (s, t) in texts.items()}
    if sentencepiece_vocab is not None:
        _progress(f"training a sentencepiece model of {sentencepiece_vocab} pieces on train.{src} + train.{tgt}")
        pieces = Pieces.train(texts["train"][0] + texts["train"][1], sentencepiece_vocab)
    if pieces is not None:
        _progress("applying sentencepiece")
        texts = {k: (pieces.encode(s), pieces.encode(t)) for k, (s, t) in texts.items()}
    sd, td = _resolve_dicts(texts.get("train"), joined_dictionary, src_dict, tgt_dict)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        sd.save(tmp / f"dict.{src}.txt")
        td.save(tmp / f"dict.{tgt}.txt")
        if codes is not None:
            (tmp / CODES).write_text(codes, encoding="utf-8")
        spm_meta = pieces.save(tmp) if pieces is not None else None
        splits = {}
        for split, (s_lines, t_lines) in texts.items():
            entry = {"pairs": len(s_lines)}
            for lang, lines, d, path in ((src, s_lines, sd, files[split][0]), (tgt, t_lines, td, files[split][1])):
                ids, offsets, replaced = encode_lines(lines, d)
                save_npy(tmp / f"{split}.{lang}.npy", ids)
                save_npy(tmp / f"{split}.{lang}.offsets.npy", offsets)
                entry[lang] = {
                    "tokens": len(ids),
                    "unk": int(np.count_nonzero(ids == d.unk)),
                    "replaced": int(replaced),
                    "fingerprint": fingerprint_array(ids),
                    "source": str(path.resolve()),
                    "source_sha256": sha256_file(path),
                }
            splits[split] = entry
        corpus_meta = Path(corpus_dir) / "meta.json"
        write_meta(
            tmp,
            KIND,
            langs={"source": src, "target": tgt},
            vocab_size={src: len(sd), tgt: len(td)},
            joined_dictionary=bool(joined_dictionary),
            dictionaries={
                lang: {
                    "source": str(Path(p).resolve()) if p is not None else "train",
                    "sha256": sha256_file(tmp / f"dict.{lang}.txt"),
                }
                for lang, p in ((src, src_dict), (tgt, tgt_dict))
            },
            text={
                "moses": bool(moses),
                "lowercase": bool(lower),
                "bpe": None
                if codes is None
                else {
                    "merges": bpe_merges,
                    "codes": "learned" if bpe_merges is not None else str(Path(bpe_codes).resolve()),
                    "sha256": sha256_file(tmp / CODES),
                },
                "sentencepiece": spm_meta,
                "allow_empty": bool(allow_empty),
            },
            corpus=read_json(corpus_meta) if corpus_meta.is_file() else None,
            splits=splits,
            seconds=round(time.perf_counter() - t0, 2),
        )
    return out_dir


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class PairSplit:
    """One binarised split: token streams and sentence offsets of both sides (memory-mapped)."""

    src: np.ndarray  # (n_src_tokens,) int32 (a fairseq data-bin's: its own integer dtype, e.g. uint16)
    src_offsets: np.ndarray  # (n + 1,) int64
    tgt: np.ndarray  # (n_tgt_tokens,) int32 (or the data-bin's dtype)
    tgt_offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_sizes(self) -> np.ndarray:
        """(n,) int64 source lengths, eos included."""
        return np.diff(self.src_offsets)

    @property
    def tgt_sizes(self) -> np.ndarray:
        """(n,) int64 target lengths, eos included."""
        return np.diff(self.tgt_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.src[self.src_offsets[i] : self.src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i] : self.tgt_offsets[i + 1]]


def chosen_langs(cfg) -> dict:
    """{"source_lang", "target_lang"} a command's config chose with --source-lang/--target-lang (None: the data's)."""
    return {k: getattr(cfg, k, "") or None for k in ("source_lang", "target_lang")}


def read_pairs_meta(
    data_dir: str | os.PathLike, source_lang: str | None = None, target_lang: str | None = None
) -> dict:
    """The meta.json of a complete pairs data directory, or the same made from a fairseq data-bin's files
    (trime.data.fairseq_bin; ``source_lang``/``target_lang`` choose among its pairs); DataError with a hint otherwise."""
    kind = databin_kind(data_dir)
    if kind == "pairs":
        return pairs_meta(data_dir, source_lang, target_lang)
    if kind == "lm":
        raise DataError(
            f"{data_dir}: a fairseq language-model data-bin (dict.txt, no dict.SRC.txt), not translation pairs"
        )
    try:
        meta = read_meta(data_dir, kind=KIND)
    except DataError as e:
        raise DataError(f"{e}; {_HINT}") from None
    langs = meta["langs"]
    if (source_lang or langs["source"], target_lang or langs["target"]) != (langs["source"], langs["target"]):
        raise DataError(
            f"{data_dir}: prepared for {langs['source']}->{langs['target']}, not "
            f"{source_lang or langs['source']}->{target_lang or langs['target']}"
        )
    return meta


def pair_dictionary_files(data_dir: str | os.PathLike, **langs) -> dict[str, Path]:
    """{dict.SRC.txt: path, dict.TGT.txt: path} of a pairs directory (what a checkpoint copies)."""
    langs = read_pairs_meta(data_dir, **langs)["langs"]
    return {f"dict.{lang}.txt": Path(data_dir) / f"dict.{lang}.txt" for lang in (langs["source"], langs["target"])}


def load_pair_dictionaries(data_dir: str | os.PathLike, **langs) -> tuple[Dictionary, Dictionary]:
    """(source, target) dictionaries of a pairs data directory (``langs``: :func:`read_pairs_meta`'s)."""
    return tuple(Dictionary.load(p) for p in pair_dictionary_files(data_dir, **langs).values())


def check_pair_vocabulary(
    data_dir: str | os.PathLike, src_size: int, tgt_size: int, **langs
) -> tuple[Dictionary, Dictionary]:
    """The (source, target) dictionaries of a pairs directory, refused (one DataError line) when their
    sizes are not a translation model's: data prepared with other dictionaries labels rows in other ids."""
    src, tgt = load_pair_dictionaries(data_dir, **langs)
    if (len(src), len(tgt)) != (src_size, tgt_size):
        raise DataError(
            f"{data_dir}: dictionaries of {len(src)}/{len(tgt)} types, the model expects {src_size}/{tgt_size}: "
            "prepare the data with its --src-dict/--tgt-dict"
        )
    return src, tgt


def load_pair_split(data_dir: str | os.PathLike, split: str, **langs) -> PairSplit:
    """The binarised ``split`` of a pairs data directory (or data-bin), memory-mapped read-only and checked
    against its meta.json (``langs``: :func:`read_pairs_meta`'s)."""
    meta = read_pairs_meta(data_dir, **langs)
    splits = meta["splits"]
    if split not in splits:
        raise DataError(f"{data_dir}: no {split!r} split (has: {', '.join(sorted(splits)) or 'none'})")
    if meta.get("format") == FAIRSEQ_BIN:
        src, tgt = pair_split_files(data_dir, meta, split)
        return PairSplit(src.tokens, src.offsets, tgt.tokens, tgt.offsets)
    arrays = []
    for lang in (meta["langs"]["source"], meta["langs"]["target"]):
        ids = load_npy(Path(data_dir) / f"{split}.{lang}.npy")
        offsets = load_npy(Path(data_dir) / f"{split}.{lang}.offsets.npy")
        ok = ids.dtype == np.int32 and len(ids) == splits[split][lang]["tokens"]
        ok = ok and offsets.dtype == np.int64 and len(offsets) == splits[split]["pairs"] + 1
        if not ok or (len(offsets) and int(offsets[-1]) != len(ids)):
            raise DataError(
                f"{data_dir}/{split}.{lang}.npy: does not match meta.json; rerun `trime data prepare --overwrite`"
            )
        arrays += [ids, offsets]
    return PairSplit(*arrays)
