"""Translate with a trained model: beam search over a split, fairseq-generate's output lines and
corpus BLEU (MT spec §9, §10), optionally with a datastore as memory (kNN-MT, TrimeMT).

The search itself is trime.generate's (fairseq's semantics); this module batches a split for it, turns
ids into text for the target language (generate.text: fairseq's --post-process, Moses with the
language's rules, sacreBLEU's tokeniser for the language or fairseq's BLEU4) and scores it, and is what
``trime mt generate`` and the validation BLEU of a translation run (trime.translation) call. Scores in
the lines are base 2, as fairseq-generate prints them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trime import io
from trime.checkpoint import load_model, model_fingerprint
from trime.config import TranslateConfig
from trime.data.dictionary import Dictionary
from trime.data.pair_batching import batch_by_size, collate
from trime.data.pairs import (
    PairSplit,
    check_pair_vocabulary,
    chosen_langs,
    load_pair_dictionaries,
    load_pair_split,
    read_pairs_meta,
)
from trime.datastore_build import target_states
from trime.device import pick_device
from trime.errors import ConfigError
from trime.generate import BeamConfig, Hypothesis, beam_search, score_reference
from trime.generate.memory import MemoryCombiner
from trime.generate.text import (
    corpus_bleu,
    detok_scheme,
    detokenize,
    fairseq_bleu4,
    ids_to_string,
    post_process,
    sacrebleu_scorer,
)
from trime.memory.external import ExternalMemory, backend_options
from trime.memory.neighbors import NeighborCacheWriter
from trime.model.encoder_decoder import MTModelConfig, TransformerMT
from trime.train import LN2

VALID_BEAM = BeamConfig(beam=5, max_len_a=1.2, max_len_b=10)  # the original's validation BLEU (MT spec §6)
SPECIALS = {"pad": Dictionary.pad, "eos": Dictionary.eos}


def decode(
    model: TransformerMT,
    split: PairSplit,
    ids: np.ndarray,
    beam: BeamConfig,
    *,
    max_tokens: int = 4096,
    max_sentences: int = 0,
    device: torch.device | str = "cpu",
    combiner=None,
    progress: bool = False,
) -> dict[int, list[Hypothesis]]:
    """{pair id: its ``beam.nbest`` hypotheses, best first} for the pairs ``ids`` of ``split``: sorted by
    source length, greedy batches of at most ``max_tokens`` source tokens (padded) and ``max_sentences``
    sentences."""
    ids = np.asarray(ids, dtype=np.int64)
    order = ids[np.argsort(split.src_sizes[ids], kind="stable")]
    batches = batch_by_size(order, split.src_sizes, max_tokens, max_sentences or None, required_batch_size_multiple=1,
                            oversize_alone=True)  # fmt: skip
    out: dict[int, list[Hypothesis]] = {}
    kw = {} if combiner is None else {"combiner": combiner}
    bar = tqdm(total=len(ids), desc="translate", unit="sent", disable=not (progress and sys.stderr.isatty()))
    for batch in batches:
        b = collate(split, batch)
        hyps = beam_search(model, b.src_tokens.to(device), beam, **kw, **SPECIALS, unk=Dictionary.unk)
        out.update(zip(b.ids.tolist(), hyps))
        bar.update(len(batch))
    bar.close()
    return out


def to_text(ids, d: Dictionary, *, escape_unk: bool = False, post: str = "subword_nmt") -> str:
    """Token ids as words: fairseq's ``Dictionary.string``, then its ``--post-process post`` (generate.text)."""
    return post_process(ids_to_string(ids, d.symbols, eos=d.eos, pad=d.pad, unk=d.unk, escape_unk=escape_unk), post)


SPM = "sentencepiece"  # the --post-process of data prepared with sentencepiece (its meta.json says so)


@dataclass(frozen=True)
class OutputText:
    """How a target language's ids become H-/T- words, D- lines and a BLEU score: ``post`` (fairseq's
    --post-process), ``detok`` (``moses`` with ``lang``'s rules, or ``none``), and ``scoring``: sacreBLEU
    on D- lines against the references detokenised alike, with ``sacrebleu_tokenize`` (``auto``: sacreBLEU's
    choice for ``lang``), or fairseq-generate's BLEU4 on H- against T- words (``bleu``). The defaults are
    the original's (MT spec §10): subword-nmt BPE, Moses en, sacreBLEU 13a."""

    lang: str = "en"
    post: str = "subword_nmt"
    detok: str = "moses"
    scoring: str = "sacrebleu"
    sacrebleu_tokenize: str = "13a"

    @classmethod
    def of(cls, cfg: TranslateConfig) -> OutputText:
        """``cfg``'s choices for its target language (``--moses-target-lang``, else the data's), checked before
        decoding: a sacreBLEU tokeniser whose package is missing is refused here, in one line."""
        meta = read_pairs_meta(cfg.data, **chosen_langs(cfg))
        lang = cfg.moses_target_lang or meta["langs"]["target"]
        post = (
            cfg.post_process
            if cfg.post_process != "auto"
            else SPM
            if (meta.get("text") or {}).get(SPM)
            else "subword_nmt"
        )
        out = cls(lang, post, detok_scheme(cfg.detok, lang), cfg.scoring, cfg.sacrebleu_tokenize)
        if out.scoring == "sacrebleu" and not cfg.score_reference:
            out.sacrebleu()
        return out

    def words(self, ids, d: Dictionary, *, escape_unk: bool = False) -> str:
        return to_text(ids, d, escape_unk=escape_unk, post=self.post)

    def detokenize(self, lines: list[str]) -> list[str]:
        return detokenize(lines, self.lang) if self.detok == "moses" else list(lines)

    def sacrebleu(self):
        return sacrebleu_scorer(self.sacrebleu_tokenize, self.lang)

    def bleu(self, hyps: list[str], refs: list[str], detoks: list[str] | None = None) -> tuple[object, str]:
        """The score of H- words ``hyps`` against T- words ``refs`` (``detoks``: the D- lines, if made) and
        how fairseq-generate prints it: sacreBLEU's BLEUScore, printed with its signature (the tokeniser
        included), or a :class:`trime.generate.text.Bleu4`; both have ``.score``."""
        if self.scoring == "bleu":
            score = fairseq_bleu4(hyps, refs)
            return score, str(score)
        scorer = self.sacrebleu()
        score = corpus_bleu(self.detokenize(hyps) if detoks is None else detoks, self.detokenize(refs), scorer)
        return score, score.format(signature=str(scorer.get_signature()))

    def describe(self) -> str:
        detok = f"Moses-detokenised with {self.lang} rules" if self.detok == "moses" else "not detokenised"
        scored = "fairseq's BLEU4 on H- against T- words" if self.scoring == "bleu" else "sacreBLEU on D- lines"
        return f"target {self.lang}: pieces joined by {self.post}, D- lines {detok}; {scored}"


def valid_bleu(split: PairSplit, d: Dictionary, n: int, device) -> Callable[[TransformerMT], tuple[str, float]]:
    """A run's checkpoint_best metric: BLEU of the first ``n`` pairs of ``split`` (0: all) with the
    original's validation beam (:data:`VALID_BEAM`), scored as the original (:class:`OutputText`'s
    defaults). Named fix: the model is left in the mode it was in (beam search puts it in eval mode;
    training went on without dropout after each validation)."""
    n = len(split) if not n else min(n, len(split))
    text = OutputText()
    refs = [text.words(split.target(i), d, escape_unk=True) for i in range(n)]

    def bleu(model: TransformerMT) -> tuple[str, float]:
        was_training = model.training
        hyps = decode(model, split, np.arange(n), VALID_BEAM, max_tokens=4096, device=device)
        score = text.bleu([text.words(hyps[i][0].tokens, d) for i in range(n)], refs)[0].score
        model.train(was_training)
        return "bleu", float(score)

    return bleu


def open_external(cfg: TranslateConfig, model_cfg: MTModelConfig, fingerprint: str) -> ExternalMemory:
    """The datastore and index ``cfg`` names, checked against the translation model (its decoder outputs h)."""
    return ExternalMemory.open(cfg.dstore, cfg.indexfile, k=cfg.k, probe=cfg.probe, dim=model_cfg.decoder_embed_dim,
                               vocab_size=model_cfg.tgt_vocab_size, keytype="final", fingerprint=fingerprint,
                               **backend_options(cfg))  # fmt: skip


def memory_combiner(cfg: TranslateConfig, model: TransformerMT, model_cfg: MTModelConfig, fingerprint: str,
                    search=None):  # fmt: skip
    """The kNN-MT / TrimeMT combiner of ``cfg`` over its datastore and index (trime.generate.memory);
    ``search``: the datastore search to use instead of opening one (``trime explain`` records its rows)."""
    if not cfg.indexfile:
        raise ConfigError("--dstore-filename needs --indexfile (build it with `trime index build`)")
    search = search or open_external(cfg, model_cfg, fingerprint).search
    zeros = torch.zeros(1, dtype=torch.long)

    def log_z(h: torch.Tensor) -> torch.Tensor:
        return model.head.target_logp(h, zeros.expand(h.shape[0]).to(h.device))[1]

    return MemoryCombiner(search, log_z, mode=cfg.knn_mode, lmbda=cfg.lmbda, temp=cfg.knn_temp,
                          dim=model_cfg.decoder_embed_dim)  # fmt: skip


def save_mt_neighbors(cfg: TranslateConfig, model: TransformerMT, model_cfg: MTModelConfig, split: PairSplit,
                      n: int, fingerprint: str, device) -> Path:  # fmt: skip
    """Teacher-force the references of the first ``n`` pairs and cache, per target token, the model's
    log p_vocab(y), log Z and the k datastore neighbours of h (memory.neighbors): ``trime sweep`` then
    scores TrimeMT (``--softmax-temp`` = T, the paper-consistent form) and kNN-MT (``--lmbda``,
    ``--interp-temp`` = T) at any k without the model, exactly, since references need no beam."""
    if not (cfg.dstore and cfg.indexfile):
        raise ConfigError("--save-neighbors needs --dstore-filename and --indexfile")
    ext = open_external(cfg, model_cfg, fingerprint)
    meta = {"translate_config": dataclasses.asdict(cfg), "task": "translation"}
    with NeighborCacheWriter(cfg.save_neighbors, dim=model_cfg.decoder_embed_dim, ext_in_joint=True, mem_top=None,
                             meta=meta, overwrite=True) as writer:  # fmt: skip
        for a in range(0, n, 64):
            h, y = target_states(model, split, np.arange(a, min(a + 64, n)), device)  # (M, d), (M,)
            with torch.no_grad():
                tlp, log_z = model.head.target_logp(h, y)
                scores, values = ext.search(h)
            writer.add(tlp, log_z, y, ext_scores=scores, ext_values=values)
        writer.finalize()
    return Path(cfg.save_neighbors)


@dataclass
class TranslateResult:
    n_sentences: int
    bleu: object | None  # sacreBLEU's BLEUScore or fairseq's Bleu4 (.score, str()); None with score_reference
    seconds: float
    lines: list[str]
    n_tokens: int = 0  # tokens of the best hypotheses (or the references), eos included
    loss: float = math.nan  # −Σ log2 p / n_tokens over those tokens (token-weighted, base 2)
    mean_score: float = math.nan  # mean of the H- scores (base 2): one sentence, one vote
    bleu_line: str = ""  # fairseq-generate's last line: "Generate SPLIT with beam=K: BLEU..."
    about: str = ""  # how the text was made and scored (OutputText.describe)
    message: str = ""  # instead of the summary (e.g. where neighbours were cached)

    def line(self) -> str:
        """The summary: every number says its base and what it averages."""
        if self.message:
            return self.message
        if self.bleu is None:  # fairseq-generate prints no summary here: eval_lm's, for the references
            return (
                f"Loss (base 2): {self.loss:.4f}, Perplexity: {2**self.loss:.2f} | {self.n_sentences} references "
                f"teacher-forced, {self.n_tokens} tokens with eos: −log2 p averaged over tokens; mean H- score "
                f"(a sentence's mean log2 p, averaged over sentences) {self.mean_score:.4f}"
            )
        rate = self.n_sentences / max(self.seconds, 1e-9)
        return (
            f"| translated {self.n_sentences} sentences ({self.n_tokens} tokens with eos) in {self.seconds:.1f} s "
            f"({rate:.2f} sentences/s); mean H- score {self.mean_score:.4f} (base 2: a hypothesis' Σ log2 p "
            f"/ length^lenpen, averaged over sentences; P-: log2 p per token); {self.about}\n{self.bleu_line}"
        )


def _score_references(model: TransformerMT, split: PairSplit, n: int, device) -> dict[int, list[Hypothesis]]:
    hyps: dict[int, list[Hypothesis]] = {}
    for a in range(0, n, 64):
        b = collate(split, np.arange(a, min(a + 64, n)))
        with torch.no_grad():
            scored = score_reference(model, b.src_tokens.to(device), b.target.to(device), **SPECIALS)
        hyps.update((i, [h]) for i, h in zip(b.ids.tolist(), scored))
    return hyps


def hypothesis_lines(i: int, h: Hypothesis, words: str, detok: str) -> list[str]:
    """fairseq-generate's H-, D- and P- lines of hypothesis ``h`` of sentence ``i``: its score and its
    positional scores (eos included, 4 decimals) in base 2."""
    score = h.score / LN2
    pos = " ".join(f"{x:.4f}" for x in (h.positional_scores.float() / LN2).tolist())  # float32, as fairseq
    return [f"H-{i}\t{score}\t{words}", f"D-{i}\t{score}\t{detok}", f"P-{i}\t{pos}"]


def translate(cfg: TranslateConfig, beam: BeamConfig | None = None) -> TranslateResult:
    """Translate ``cfg.gen_subset`` of ``cfg.data`` with the translation checkpoint ``cfg.path`` (a trime
    run or checkpoint directory or a fairseq ``.pt``): fairseq-generate's S-/T-/H-/D-/P- lines (every
    one of the ``nbest`` hypotheses) and BLEU of the best, or with ``score_reference`` the teacher-forced
    scores of the references, or with ``save_neighbors`` the references' neighbours for ``trime sweep``."""
    beam = beam or BeamConfig()
    if cfg.results_path:
        io.check_output_file(cfg.results_path, io.HYPOTHESES)  # before decoding, and again when written
    device = pick_device(cfg.device)
    langs = chosen_langs(cfg)
    load_pair_dictionaries(cfg.data, **langs)  # a pairs directory, before the model loads
    text = OutputText.of(cfg)
    model, model_cfg, ckpt_dir = load_model(cfg.path, task="mt", device=device, trust=cfg.trust_checkpoint)
    fingerprint = model_fingerprint(ckpt_dir)
    src_dict, tgt_dict = check_pair_vocabulary(cfg.data, model_cfg.src_vocab_size, model_cfg.tgt_vocab_size, **langs)
    split = load_pair_split(cfg.data, cfg.gen_subset, **langs)
    n = len(split) if not cfg.max_sentences_total else min(cfg.max_sentences_total, len(split))
    t0 = time.perf_counter()
    if cfg.save_neighbors:
        cache = save_mt_neighbors(cfg, model, model_cfg, split, n, fingerprint, device)
        done = f"| neighbours of {n} references cached in {cache}: tune k, λ, T with `trime sweep {cache}`"
        return TranslateResult(n, None, time.perf_counter() - t0, [], message=done)
    if cfg.score_reference:
        hyps = _score_references(model, split, n, device)
    else:
        combiner = memory_combiner(cfg, model, model_cfg, fingerprint) if cfg.dstore else None
        hyps = decode(model, split, np.arange(n), beam, max_tokens=cfg.max_tokens, max_sentences=cfg.max_sentences,
                      device=device, combiner=combiner, progress=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    refs = [text.words(split.target(i), tgt_dict, escape_unk=True) for i in range(n)]
    words = {i: [text.words(h.tokens, tgt_dict) for h in hyps[i]] for i in range(n)}
    detoks = {i: text.detokenize(words[i]) for i in range(n)}
    lines: list[str] = []
    for i in range(n):  # as fairseq-generate prints them: H with pieces joined, D detokenised too
        lines += [f"S-{i}\t{text.words(split.source(i), src_dict)}", f"T-{i}\t{refs[i]}"]
        for h, w, dt in zip(hyps[i], words[i], detoks[i]):
            lines += hypothesis_lines(i, h, w, dt)
    best = [hyps[i][0] for i in range(n)]
    n_tokens = sum(len(h.tokens) for h in best)
    loss = -sum(float(h.positional_scores.double().sum()) for h in best) / max(n_tokens, 1) / LN2
    result = TranslateResult(n, None, seconds, lines, n_tokens, loss, sum(h.score for h in best) / max(n, 1) / LN2,
                             about=text.describe())  # fmt: skip
    if not cfg.score_reference:
        result.bleu, printed = text.bleu([words[i][0] for i in range(n)], refs, [detoks[i][0] for i in range(n)])
        result.bleu_line = f"Generate {cfg.gen_subset} with beam={beam.beam}: {printed}"
    if cfg.results_path:
        with io.output_file(cfg.results_path, io.HYPOTHESES) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    return result
