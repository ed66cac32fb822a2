"""Translate with a trained model: beam search over a split, fairseq-generate's output lines and
corpus BLEU (MT spec §9, §10), optionally with a datastore as memory (kNN-MT, TrimeMT).

The search itself is trime.generate's (fairseq's semantics); this module batches a split for it, turns
ids into text and scores it, and is what ``trime mt generate`` and the validation BLEU of a
translation run (trime.translation) call.
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
from trime.data.pairs import PairSplit, check_pair_vocabulary, chosen_langs, load_pair_dictionaries, load_pair_split
from trime.datastore_build import target_states
from trime.device import pick_device
from trime.errors import ConfigError
from trime.generate import BeamConfig, Hypothesis, beam_search, score_reference
from trime.generate.memory import MemoryCombiner
from trime.generate.text import corpus_bleu, detokenize, ids_to_string, remove_bpe
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
) -> dict[int, Hypothesis]:
    """{pair id: best hypothesis} for the pairs ``ids`` of ``split``: sorted by source length, greedy
    batches of at most ``max_tokens`` source tokens (padded) and ``max_sentences`` sentences."""
    ids = np.asarray(ids, dtype=np.int64)
    order = ids[np.argsort(split.src_sizes[ids], kind="stable")]
    batches = batch_by_size(order, split.src_sizes, max_tokens, max_sentences or None, required_batch_size_multiple=1,
                            oversize_alone=True)  # fmt: skip
    out: dict[int, Hypothesis] = {}
    kw = {} if combiner is None else {"combiner": combiner}
    bar = tqdm(total=len(ids), desc="translate", unit="sent", disable=not (progress and sys.stderr.isatty()))
    for batch in batches:
        b = collate(split, batch)
        hyps = beam_search(model, b.src_tokens.to(device), beam, **kw, **SPECIALS, unk=Dictionary.unk)
        for pid, nbest in zip(b.ids.tolist(), hyps):
            out[pid] = nbest[0]
        bar.update(len(batch))
    bar.close()
    return out


def to_text(ids, d: Dictionary, *, escape_unk: bool = False, bpe: bool = True) -> str:
    """Token ids as text, BPE joined (``@@ ``) when ``bpe``."""
    text = ids_to_string(ids, d.symbols, eos=d.eos, pad=d.pad, unk=d.unk, escape_unk=escape_unk)
    return remove_bpe(text) if bpe else text


def bleu_of(hyps: dict[int, Hypothesis], refs: list[np.ndarray], d: Dictionary, *, bpe=True, detok="moses"):
    """sacreBLEU of hypotheses ``hyps[i]`` against reference ids ``refs[i]`` (i = 0..n−1), as fairseq scores
    them: BPE removed, a reference's ``<unk>`` never matching, Moses-detokenised (MT spec §10)."""
    h = [to_text(hyps[i].tokens, d, bpe=bpe) for i in range(len(refs))]
    return bleu_of_texts(detokenize(h) if detok == "moses" else h, refs, d, bpe=bpe, detok=detok)


def bleu_of_texts(hyps: list[str], refs: list[np.ndarray], d: Dictionary, *, bpe=True, detok="moses"):
    """:func:`bleu_of` for hypotheses already made text (and detokenised when ``detok`` is moses)."""
    r = [to_text(ref, d, escape_unk=True, bpe=bpe) for ref in refs]
    return corpus_bleu(hyps, detokenize(r) if detok == "moses" else r)


def valid_bleu(split: PairSplit, d: Dictionary, n: int, device) -> Callable[[TransformerMT], tuple[str, float]]:
    """A run's checkpoint_best metric: BLEU of the first ``n`` pairs of ``split`` (0: all) with the
    original's validation beam (:data:`VALID_BEAM`). Named fix: the model is left in the mode it was
    in (beam search puts it in eval mode; training went on without dropout after each validation)."""
    n = len(split) if not n else min(n, len(split))
    refs = [split.target(i) for i in range(n)]

    def bleu(model: TransformerMT) -> tuple[str, float]:
        was_training = model.training
        hyps = decode(model, split, np.arange(n), VALID_BEAM, max_tokens=4096, device=device)
        score = bleu_of(hyps, refs, d).score
        model.train(was_training)
        return "bleu", float(score)

    return bleu


def _external(cfg: TranslateConfig, model_cfg: MTModelConfig, fingerprint: str) -> ExternalMemory:
    return ExternalMemory.open(cfg.dstore, cfg.indexfile, k=cfg.k, probe=cfg.probe, dim=model_cfg.decoder_embed_dim,
                               vocab_size=model_cfg.tgt_vocab_size, keytype="final", fingerprint=fingerprint,
                               **backend_options(cfg))  # fmt: skip


def memory_combiner(cfg: TranslateConfig, model: TransformerMT, model_cfg: MTModelConfig, fingerprint: str):
    """The kNN-MT / TrimeMT combiner of ``cfg`` over its datastore and index (trime.generate.memory)."""
    if not cfg.indexfile:
        raise ConfigError("--dstore-filename needs --indexfile (build it with `trime index build`)")
    ext = _external(cfg, model_cfg, fingerprint)
    zeros = torch.zeros(1, dtype=torch.long)

    def log_z(h: torch.Tensor) -> torch.Tensor:
        return model.head.target_logp(h, zeros.expand(h.shape[0]).to(h.device))[1]

    return MemoryCombiner(ext.search, log_z, mode=cfg.knn_mode, lmbda=cfg.lmbda, temp=cfg.knn_temp,
                          dim=model_cfg.decoder_embed_dim)  # fmt: skip


def save_mt_neighbors(cfg: TranslateConfig, model: TransformerMT, model_cfg: MTModelConfig, split: PairSplit,
                      n: int, fingerprint: str, device) -> Path:  # fmt: skip
    """Teacher-force the references of the first ``n`` pairs and cache, per target token, the model's
    log p_vocab(y), log Z and the k datastore neighbours of h (memory.neighbors): ``trime sweep`` then
    scores TrimeMT (``--softmax-temp`` = T, the paper-consistent form) and kNN-MT (``--lmbda``,
    ``--interp-temp`` = T) at any k without the model, exactly, since references need no beam."""
    if not (cfg.dstore and cfg.indexfile):
        raise ConfigError("--save-neighbors needs --dstore-filename and --indexfile")
    ext = _external(cfg, model_cfg, fingerprint)
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
    bleu: object | None  # sacrebleu's BLEUScore (str() gives "BLEU = ..."), None with score_reference
    avg_score: float  # mean per-sentence score (natural log): normalised beam score or reference log-prob
    seconds: float
    lines: list[str]

    message: str = ""  # instead of the summary line (e.g. where neighbours were cached)

    def line(self) -> str:
        if self.message:
            return self.message
        if self.bleu is None:
            return f"| {self.n_sentences} references scored: average log-prob per token {self.avg_score:.4f}"
        return f"| {self.n_sentences} sentences in {self.seconds:.1f} s; {self.bleu}"


def _score_references(model: TransformerMT, split: PairSplit, n: int, device) -> dict[int, Hypothesis]:
    hyps: dict[int, Hypothesis] = {}
    for a in range(0, n, 64):
        b = collate(split, np.arange(a, min(a + 64, n)))
        with torch.no_grad():
            scored = score_reference(model, b.src_tokens.to(device), b.target.to(device), **SPECIALS)
        hyps.update(zip(b.ids.tolist(), scored))
    return hyps


def translate(cfg: TranslateConfig, beam: BeamConfig | None = None) -> TranslateResult:
    """Translate ``cfg.gen_subset`` of ``cfg.data`` with the translation checkpoint ``cfg.path`` (a trime
    run or checkpoint directory or a fairseq ``.pt``): fairseq-generate's S-/T-/H-/D- lines and corpus
    BLEU, or with ``score_reference`` the teacher-forced scores of the references, or with
    ``save_neighbors`` the references' neighbours for ``trime sweep``."""
    beam = beam or BeamConfig()
    if cfg.results_path:
        io.check_output_file(cfg.results_path, io.HYPOTHESES)  # before decoding, and again when written
    device = pick_device(cfg.device)
    langs = chosen_langs(cfg)
    load_pair_dictionaries(cfg.data, **langs)  # a pairs directory, before the model loads
    model, model_cfg, ckpt_dir = load_model(cfg.path, task="mt", device=device, trust=cfg.trust_checkpoint)
    fingerprint = model_fingerprint(ckpt_dir)
    src_dict, tgt_dict = check_pair_vocabulary(cfg.data, model_cfg.src_vocab_size, model_cfg.tgt_vocab_size, **langs)
    split = load_pair_split(cfg.data, cfg.gen_subset, **langs)
    n = len(split) if not cfg.max_sentences_total else min(cfg.max_sentences_total, len(split))
    t0 = time.perf_counter()
    if cfg.save_neighbors:
        cache = save_mt_neighbors(cfg, model, model_cfg, split, n, fingerprint, device)
        done = f"| neighbours of {n} references cached in {cache}: tune k, λ, T with `trime sweep {cache}`"
        return TranslateResult(n, None, float("nan"), time.perf_counter() - t0, [], message=done)
    if cfg.score_reference:
        hyps = _score_references(model, split, n, device)
    else:
        combiner = memory_combiner(cfg, model, model_cfg, fingerprint) if cfg.dstore else None
        hyps = decode(model, split, np.arange(n), beam, max_tokens=cfg.max_tokens, max_sentences=cfg.max_sentences,
                      device=device, combiner=combiner, progress=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    texts = [to_text(hyps[i].tokens, tgt_dict, bpe=cfg.remove_bpe) for i in range(n)]
    detoks = detokenize(texts) if cfg.detok == "moses" else texts
    lines: list[str] = []
    for i in range(n):  # as fairseq-generate prints them: H with BPE removed, D detokenised too; base-2 scores
        score = hyps[i].score / LN2
        lines += [
            f"S-{i}\t{to_text(split.source(i), src_dict, bpe=cfg.remove_bpe)}",
            f"T-{i}\t{to_text(split.target(i), tgt_dict, escape_unk=True, bpe=cfg.remove_bpe)}",
            f"H-{i}\t{score}\t{texts[i]}",
            f"D-{i}\t{score}\t{detoks[i]}",
        ]
    avg = sum(hyps[i].score for i in range(n)) / max(n, 1)
    bleu = None
    if not cfg.score_reference:
        refs = [split.target(i) for i in range(n)]
        bleu = bleu_of_texts(detoks, refs, tgt_dict, bpe=cfg.remove_bpe, detok=cfg.detok)  # D- lines' text
    if cfg.results_path:
        with io.output_file(cfg.results_path, io.HYPOTHESES) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    return TranslateResult(n, bleu, avg if math.isfinite(avg) else float("nan"), seconds, lines)
