"""Translation: train a fairseq-style encoder-decoder and decode it with beam search (MT spec §3, §6, §9, §10).

Training reuses the language model's trainer (trime.train.run_training: optimisers, schedules,
checkpoints, kill-and-resume, torchrun); only the data and the criterion differ:

- :class:`PairData` serves fairseq's length-bucketed token-budget batches of sentence pairs
  (trime.data.pair_batching), reshuffled each epoch;
- :class:`MTObjective` is fairseq's ``label_smoothed_cross_entropy``: for a target y with
  log-probabilities lp (V,), loss = (1 − ε − ε/(V−1))·(−lp[y]) + ε/(V−1)·(−Σ_v lp[v]), summed over
  non-pad targets (ε = ``--label-smoothing``); the logged ``ce`` is the plain NLL;
- checkpoint_best is chosen by validation BLEU (beam 5, max length 1.2·S + 10, BPE removed,
  Moses-detokenised, sacreBLEU), as the original's recipe does (MT spec §6), or by validation loss.

:func:`translate` decodes a split (``trime mt generate``): hypotheses, fairseq-generate's S-/T-/H-/D-
lines and corpus BLEU, or with ``score_reference`` the teacher-forced scores of the references.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trime import distributed as dist
from trime import io
from trime.checkpoint import load_model, model_fingerprint
from trime.config import MTDatastoreConfig, MTTrainConfig, TranslateConfig
from trime.data import bm25
from trime.data.batching import load_batch_order
from trime.data.bm25 import check_work_setup
from trime.data.dictionary import Dictionary
from trime.data.pair_batching import batch_by_size, collate, epoch_batches, filter_by_size, pair_batches
from trime.data.pairs import PairSplit, load_pair_dictionaries, load_pair_split, read_pairs_meta
from trime.device import autocast, autocast_dtype, pick_device
from trime.errors import CheckpointError, ConfigError, DataError
from trime.generate.beam import BeamConfig, Hypothesis, beam_search, score_reference
from trime.generate.memory import MemoryCombiner
from trime.generate.text import corpus_bleu, detokenize, ids_to_string, remove_bpe
from trime.io import atomic_file
from trime.losses import MTLossSettings, compute_mt_loss
from trime.memory.datastore import build_datastore as write_datastore
from trime.memory.datastore import resume_from
from trime.memory.external import ExternalMemory, backend_options
from trime.memory.neighbors import NeighborCacheWriter
from trime.model.encoder_decoder import MTModelConfig, TransformerMT, build_mt_model
from trime.model.fairseq_mt_import import load_fairseq_mt
from trime.train import LN2, run_training

VALID_BEAM = BeamConfig(beam=5, max_len_a=1.2, max_len_b=10)  # the original's validation BLEU (MT spec §6)


def pair_dictionary_files(data_dir: str | Path) -> dict[str, Path]:
    """{dict.SRC.txt: path, dict.TGT.txt: path} of a pairs directory (what a checkpoint copies)."""
    langs = read_pairs_meta(data_dir)["langs"]
    return {f"dict.{lang}.txt": Path(data_dir) / f"dict.{lang}.txt" for lang in (langs["source"], langs["target"])}


@dataclass
class PairData:
    """The sentence pairs of a translation run as the trainer's TrainData."""

    train: PairSplit
    valid: PairSplit
    batches: list[np.ndarray]  # the fixed batches of train (reshuffled per epoch)
    valid_fixed: list[np.ndarray]
    seed: int
    tgt_dict: Dictionary
    bleu_sentences: int = 0  # 0: validation BLEU on every valid sentence
    eval_bleu: bool = True
    dictionaries: dict[str, Path] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pad: int = Dictionary.pad
    eos: int = Dictionary.eos
    predefined: bool = False  # batches follow a BM25 order (--predefined-batches)

    @classmethod
    def load(cls, cfg: MTTrainConfig, model_cfg: MTModelConfig, device: torch.device) -> PairData:
        train, valid = load_pair_split(cfg.data, "train"), load_pair_split(cfg.data, cfg.valid_subset)
        limits = {
            "max_tokens": cfg.max_tokens,
            "max_sentences": cfg.max_sentences or None,
            "max_source_positions": model_cfg.max_source_positions,
            "max_target_positions": model_cfg.max_target_positions,
        }
        if cfg.predefined_batches:  # BM25 order (MT spec §5.6): packed in its order, the same every epoch
            order = load_batch_order(
                cfg.predefined_batches, len(train), "rebuild it with `trime mt bm25` for this data"
            )
            order, _ = filter_by_size(order, train.src_sizes, train.tgt_sizes, model_cfg.max_source_positions,
                                      model_cfg.max_target_positions)  # fmt: skip
            sizes = np.maximum(train.src_sizes, train.tgt_sizes)
            batches = batch_by_size(order, sizes, cfg.max_tokens, cfg.max_sentences or None)
        else:
            batches = pair_batches(train.src_sizes, train.tgt_sizes, seed=cfg.seed, **limits)
        valid_fixed = pair_batches(valid.src_sizes, valid.tgt_sizes, shuffle=False, skip_invalid=False, **limits)
        _, tgt_dict = load_pair_dictionaries(cfg.data)
        return cls(
            train, valid, batches, valid_fixed, cfg.seed, tgt_dict, cfg.eval_bleu_sentences, cfg.eval_bleu,
            pair_dictionary_files(cfg.data), device, predefined=bool(cfg.predefined_batches),
        )  # fmt: skip

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        W = dist.world_size()
        if self.predefined:  # groups of W consecutive batches shuffled; batch k of a group to rank k (MT spec §5.7)
            groups = [self.batches[i : i + W] for i in range(0, len(self.batches) // W * W, W)]
            perm = np.random.RandomState(self.seed + epoch).permutation(len(groups))
            mine = [groups[g][dist.rank()] for g in perm]
        else:
            mine = epoch_batches(self.batches, epoch, seed=self.seed, rank=dist.rank(), world_size=W)
        if not mine:
            raise DataError(f"the training split gives no batch for each of {dist.world_size()} processes")
        return mine

    def valid_batches(self) -> list[np.ndarray]:
        return self.valid_fixed[dist.rank() :: dist.world_size()]

    def tensors(self, split: str, ids: np.ndarray) -> dict[str, torch.Tensor]:
        b = collate(self.train if split == "train" else self.valid, ids, pad=self.pad, eos=self.eos)
        return {
            "src_tokens": b.src_tokens.to(self.device, non_blocking=True),  # (B, S) left-padded
            "prev_output_tokens": b.prev_output_tokens.to(self.device, non_blocking=True),  # (B, T)
            "target": b.target.to(self.device, non_blocking=True),  # (B, T) right-padded
        }

    @property
    def selection_metric(self):
        """("bleu", validation BLEU) for checkpoint_best, or None to keep the lowest validation loss."""
        if not self.eval_bleu:
            return None

        def bleu(model: TransformerMT) -> tuple[str, float]:
            n = len(self.valid) if not self.bleu_sentences else min(self.bleu_sentences, len(self.valid))
            hyps = decode(model, self.valid, np.arange(n), VALID_BEAM, max_tokens=4096, device=self.device)
            refs = [self.valid.target(i) for i in range(n)]
            was_training = model.training
            score = bleu_of(hyps, refs, self.tgt_dict).score
            model.train(was_training)
            return "bleu", float(score)

        return bleu


class MTObjective(torch.nn.Module):
    """Translation model + its criterion in one forward: label-smoothed cross-entropy (module
    docstring), or with ``trime`` the TrimeMT loss (trime.losses.compute_mt_loss; memory gathered
    over all ranks)."""

    def __init__(self, model: TransformerMT, label_smoothing: float, seed: int, pad: int = Dictionary.pad,
                 trime: MTLossSettings | None = None):  # fmt: skip
        super().__init__()
        self.model, self.eps, self.pad, self.trime = model, float(label_smoothing), pad, trime
        self.gather = dist.make_group_gather(dist.world_size()) if trime is not None and dist.world_size() > 1 else None
        self.generator = torch.Generator().manual_seed(seed + 7919 * dist.rank())  # saved and restored with the run

    def forward(self, src_tokens, prev_output_tokens, target, use_ce: bool = False, diagnose: bool = False):
        # diagnose: asked by the shared training loop on logged updates; translation logs no memory diagnostics
        if self.trime is not None:
            out = self.model(src_tokens, prev_output_tokens)
            res = compute_mt_loss(self.trime, out, target, self.model.head, use_ce=use_ce, gather=self.gather)
            return res.loss, res.n_targets.to(res.loss.dtype), res.ce_sum
        keep = target != self.pad  # (B, T)
        h = self.model(src_tokens, prev_output_tokens).h[keep]  # (M, d) non-pad target positions only
        y = target[keep]  # (M,)
        lp = self.model.head.log_probs(h).float()  # (M, V)
        nll = -lp.gather(1, y[:, None]).squeeze(1)  # (M,)
        loss = nll
        if self.eps > 0 and not use_ce:
            eps_i = self.eps / (lp.shape[1] - 1)
            loss = (1.0 - self.eps - eps_i) * nll + eps_i * -lp.sum(1)
        return loss.sum(), keep.sum().to(loss.dtype), nll.sum().detach()


def bm25_pair_order(data_dir, out_path, *, work_dir=None, seed: int = 1, top_k: int = 20, num_shards: int = 1,
                    n_threads: int = 0) -> Path:  # fmt: skip
    """The BM25 order of the training pairs for TrimeMT (MT spec §5): every English target, BPE removed,
    ``<unk>`` as UNKNOWNTOKENINREF and Moses-detokenised, is a document and its own query; hits are
    chained into one permutation of the pair ids (trime.data.bm25), written as a JSON list.
    Resumable through ``work_dir`` (default: OUT without suffix + .work)."""
    out_path = io.check_output_file(out_path, io.BATCH_ORDER)  # before the work: a user's file is refused at once
    work = Path(work_dir) if work_dir else out_path.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    meta = read_pairs_meta(data_dir)
    target = meta["langs"]["target"]
    check_work_setup(work / "setup.json", {"targets": meta["splits"]["train"][target]["fingerprint"]})
    split = load_pair_split(data_dir, "train")
    segments, index, results = work / "segments.jsonl", work / "index", work / "results"
    if not segments.exists():
        _, tgt_dict = load_pair_dictionaries(data_dir)
        texts = [to_text(split.target(i), tgt_dict).replace("<unk>", "UNKNOWNTOKENINREF") for i in range(len(split))]
        with atomic_file(segments) as tmp:
            tmp.write_text(
                "".join(json.dumps({"id": i, "contents": t}) + "\n" for i, t in enumerate(detokenize(texts)))
            )
    if not io.is_complete(index):
        bm25.build_index(segments, index)
    bm25.search(index, segments, results, top_k=top_k, num_shards=num_shards, n_threads=n_threads)
    hits = bm25.load_results(results, len(split))
    order = bm25.chain_order(hits, seed)
    with io.output_file(out_path, io.BATCH_ORDER) as tmp:
        tmp.write_text(json.dumps(order) + "\n")
    print(f"bm25 pairs: {len(split)} targets, {bm25.link_share(order, hits):.1%} of steps are BM25 hops -> {out_path}")
    return out_path


def fit_translation(model_cfg: MTModelConfig, cfg: MTTrainConfig, *, on_step=None) -> Path:
    """Train (or resume) a translation model in ``cfg.save_dir``; returns the run directory."""
    dist.init()
    device = pick_device(cfg.device)
    src_dict, tgt_dict = load_pair_dictionaries(cfg.data)
    sizes = {"src_vocab_size": len(src_dict), "tgt_vocab_size": len(tgt_dict)}
    for name, n in sizes.items():
        if getattr(model_cfg, name) not in (0, n):
            raise DataError(
                f"{cfg.data}: the {name[:3]} dictionary has {n} types but the model expects {getattr(model_cfg, name)}"
            )
    model_cfg = dataclasses.replace(model_cfg, **sizes)
    data = PairData.load(cfg, model_cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_mt_model(model_cfg).to(device)
    trime = None
    if cfg.criterion == "trime_mt":
        trime = MTLossSettings(temp=cfg.temp, topk=cfg.topk_mem, dist=cfg.dist_func)
        if cfg.label_smoothing and dist.is_main():
            print(f"| note: trime_mt does not use --label-smoothing {cfg.label_smoothing} (nor did the original)")
        if cfg.ce_warmup_released and cfg.ce_warmup_epoch:
            cfg = dataclasses.replace(cfg, ce_warmup_epoch=0)  # the released code's cancelled warm-up (MT spec §4.6)
    objective = MTObjective(model, cfg.label_smoothing, cfg.seed, trime=trime)
    return run_training(cfg, model_cfg, model, objective, data, on_step=on_step)


def build_mt_datastore(cfg: MTDatastoreConfig) -> Path:
    """Store (h, next target token) for every target position of ``cfg.subset``, teacher-forced (MT spec §7).

    Row r is the r-th target token of the split in sentence order (eos included): exact row count,
    fp16 keys, resumable, written by the LM's datastore writer (memory.datastore)."""
    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(cfg.path, device=device)
    if not isinstance(model_cfg, MTModelConfig):
        raise CheckpointError(f"{cfg.path}: a language model, not a translation model")
    split = load_pair_split(cfg.data, cfg.subset)
    langs = read_pairs_meta(cfg.data)["langs"]
    n_rows = int(split.tgt_offsets[-1])
    out = Path(cfg.out)
    start = resume_from(out, n_rows)
    first = int(np.searchsorted(split.tgt_offsets, start, side="right")) - 1  # a build resumes at a sentence start
    meta = {
        "key_type": "final", "vocab_size": model_cfg.tgt_vocab_size, "model_fingerprint": model_fingerprint(ckpt_dir),
        "split_fingerprint": read_pairs_meta(cfg.data)["splits"][cfg.subset][langs["target"]]["fingerprint"],
        "split": cfg.subset, "task": "translation",
    }  # fmt: skip
    amp = autocast_dtype(cfg.amp, device)
    bar = tqdm(total=n_rows, initial=start, desc="datastore", unit="tok", dynamic_ncols=True, disable=None)

    def blocks():
        ids, i = [], first
        while i < len(split):  # consecutive sentences, at most max_tokens (longest side × count) per batch
            ids = [i]
            width = max(split.src_sizes[i], split.tgt_sizes[i])
            while i + len(ids) < len(split):
                nxt = i + len(ids)
                w = max(width, split.src_sizes[nxt], split.tgt_sizes[nxt])
                if w * (len(ids) + 1) > cfg.max_tokens:
                    break
                ids.append(nxt)
                width = w
            b = collate(split, np.asarray(ids))
            order = torch.argsort(b.ids)  # collate sorts by source length: back to sentence order
            with torch.no_grad(), autocast(device, amp):
                h = model(b.src_tokens.to(device), b.prev_output_tokens.to(device)).h  # (B, T, d)
            h, target = h[order], b.target[order].to(device)
            keep = target != Dictionary.pad
            yield int(split.tgt_offsets[i]), h[keep].float().cpu(), target[keep].cpu()  # rows in stream order
            bar.update(int(keep.sum()))
            i += len(ids)

    try:
        return write_datastore(blocks(), out, model_cfg.decoder_embed_dim, n_rows, meta, key_dtype=cfg.key_dtype)
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Decoding


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
    """{pair id: best hypothesis} for the pairs ``ids`` of ``split``, batched by source length."""
    ids = np.asarray(ids, dtype=np.int64)
    src_sizes = split.src_sizes[ids]
    order = ids[np.argsort(src_sizes, kind="stable")]
    batches, cur, longest = [], [], 0
    for i in order.tolist():  # sorted by length: a batch's width is its last sentence's
        n = int(split.src_sizes[i])
        if cur and (max(longest, n) * (len(cur) + 1) > max_tokens or (max_sentences and len(cur) >= max_sentences)):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    out: dict[int, Hypothesis] = {}
    kw = {} if combiner is None else {"combiner": combiner}
    bar = tqdm(total=len(ids), desc="translate", unit="sent", disable=not (progress and sys.stderr.isatty()))
    for batch in batches:
        b = collate(split, np.asarray(batch))
        hyps = beam_search(model, b.src_tokens.to(device), beam, **kw)
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


def memory_combiner(cfg: TranslateConfig, model: TransformerMT, model_cfg: MTModelConfig, fingerprint: str):
    """The kNN-MT / TrimeMT combiner of ``cfg`` over its datastore and index (trime.generate.memory)."""
    if not cfg.indexfile:
        raise ConfigError("--dstore-filename needs --indexfile (build it with `trime index build`)")
    ext = ExternalMemory.open(cfg.dstore, cfg.indexfile, k=cfg.k, probe=cfg.probe, dim=model_cfg.decoder_embed_dim,
                              vocab_size=model_cfg.tgt_vocab_size, keytype="final", fingerprint=fingerprint,
                              **backend_options(cfg))  # fmt: skip
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
    dim = model_cfg.decoder_embed_dim
    ext = ExternalMemory.open(cfg.dstore, cfg.indexfile, k=cfg.k, probe=cfg.probe, dim=dim,
                              vocab_size=model_cfg.tgt_vocab_size, keytype="final", fingerprint=fingerprint,
                              **backend_options(cfg))  # fmt: skip
    meta = {"translate_config": dataclasses.asdict(cfg), "task": "translation"}
    with NeighborCacheWriter(cfg.save_neighbors, dim=dim, ext_in_joint=True, mem_top=None, meta=meta,
                             overwrite=True) as writer:  # fmt: skip
        for a in range(0, n, 64):
            b = collate(split, np.arange(a, min(a + 64, n)))
            order = torch.argsort(b.ids).to(device)  # collate sorts by source length: back to sentence order
            target = b.target.to(device)[order]
            with torch.no_grad():
                h = model(b.src_tokens.to(device), b.prev_output_tokens.to(device)).h[order]  # (B, T, d)
                keep = target != Dictionary.pad
                h, y = h[keep], target[keep]  # (M, d), (M,)
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


def translate(cfg: TranslateConfig, beam: BeamConfig | None = None) -> TranslateResult:
    """Translate ``cfg.gen_subset`` of ``cfg.data`` with checkpoint ``cfg.path`` (module docstring)."""
    beam = beam or BeamConfig()
    if cfg.results_path:
        io.check_output_file(cfg.results_path, io.HYPOTHESES)  # before decoding, and again when written
    device = pick_device(cfg.device)
    src_dict, tgt_dict = load_pair_dictionaries(cfg.data)
    if Path(cfg.path).is_file() and cfg.path.endswith(".pt"):  # a fairseq translation checkpoint
        model, _ = load_fairseq_mt(cfg.path, src_dict_size=len(src_dict), tgt_dict_size=len(tgt_dict),
                                   trust=cfg.trust_checkpoint)  # fmt: skip
        model, model_cfg = model.to(device), model.cfg
    else:
        model, model_cfg, ckpt_dir = load_model(cfg.path, device=device, trust=cfg.trust_checkpoint)
    fingerprint = model_fingerprint(cfg.path if Path(cfg.path).is_file() else ckpt_dir)
    if not isinstance(model_cfg, MTModelConfig):
        raise CheckpointError(f"{cfg.path}: a language model, not a translation model")
    if (len(src_dict), len(tgt_dict)) != (model_cfg.src_vocab_size, model_cfg.tgt_vocab_size):
        raise DataError(
            f"{cfg.data}: dictionaries of {len(src_dict)}/{len(tgt_dict)} types, the model expects "
            f"{model_cfg.src_vocab_size}/{model_cfg.tgt_vocab_size}: prepare the data with its --src-dict/--tgt-dict"
        )
    split = load_pair_split(cfg.data, cfg.gen_subset)
    n = len(split) if not cfg.max_sentences_total else min(cfg.max_sentences_total, len(split))
    ids = np.arange(n)
    t0 = time.perf_counter()
    lines: list[str] = []
    if cfg.save_neighbors:
        cache = save_mt_neighbors(cfg, model, model_cfg, split, n, fingerprint, device)
        done = f"| neighbours of {n} references cached in {cache}: tune k, λ, T with `trime sweep {cache}`"
        return TranslateResult(n, None, float("nan"), time.perf_counter() - t0, [], message=done)
    if cfg.score_reference:
        hyps: dict[int, Hypothesis] = {}
        for a in range(0, n, 64):
            b = collate(split, ids[a : a + 64])
            for pid, hyp in zip(b.ids.tolist(), score_reference(model, b.src_tokens.to(device), b.target.to(device))):
                hyps[pid] = hyp
    else:
        combiner = memory_combiner(cfg, model, model_cfg, fingerprint) if cfg.dstore else None
        hyps = decode(model, split, ids, beam, max_tokens=cfg.max_tokens, max_sentences=cfg.max_sentences,
                      device=device, combiner=combiner, progress=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    texts = [to_text(hyps[i].tokens, tgt_dict, bpe=cfg.remove_bpe) for i in range(n)]
    detoks = detokenize(texts) if cfg.detok == "moses" else texts
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
