"""Translation training (MT spec §5, §6): ``trime mt train`` and the BM25 order of ``trime mt bm25``.

Training reuses the language model's trainer (trime.train.run_training: optimisers, schedules,
checkpoints, kill-and-resume, torchrun); only the data and the criterion differ: the sentence pairs
are trime.data.pair_batching.PairData (fairseq's length-bucketed token-budget batches), the criterion
trime.losses.MTObjective (label-smoothed cross-entropy or TrimeMT), and checkpoint_best is chosen by
validation BLEU (beam 5, max length 1.2·S + 10, BPE removed, Moses-detokenised, sacreBLEU), as the
original's recipe does (MT spec §6; trime.mt_generate.valid_bleu), or by validation loss.
Decoding, BLEU and datastores: trime.mt_generate and trime.datastore_build.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from trime import distributed as dist
from trime import io
from trime.config import MTTrainConfig
from trime.data import bm25
from trime.data.bm25 import check_work_setup
from trime.data.pair_batching import PairData
from trime.data.pairs import chosen_langs, load_pair_dictionaries, load_pair_split, read_pairs_meta
from trime.device import pick_device
from trime.errors import DataError
from trime.generate.text import detokenize
from trime.io import atomic_file
from trime.losses import MTLossSettings, MTObjective
from trime.model.encoder_decoder import MTModelConfig, build_mt_model
from trime.mt_generate import to_text, valid_bleu
from trime.train import run_training


def fit_translation(model_cfg: MTModelConfig, cfg: MTTrainConfig, *, on_step=None) -> Path:
    """Train (or resume) a translation model in ``cfg.save_dir``; returns the run directory."""
    dist.init()
    device = pick_device(cfg.device)
    src_dict, tgt_dict = load_pair_dictionaries(cfg.data, **chosen_langs(cfg))
    sizes = {"src_vocab_size": len(src_dict), "tgt_vocab_size": len(tgt_dict)}
    for name, n in sizes.items():
        if getattr(model_cfg, name) not in (0, n):
            raise DataError(
                f"{cfg.data}: the {name[:3]} dictionary has {n} types but the model expects {getattr(model_cfg, name)}"
            )
    model_cfg = dataclasses.replace(model_cfg, **sizes)
    max_positions = (model_cfg.max_source_positions, model_cfg.max_target_positions)
    data = PairData.load(cfg, max_positions, device, rank=dist.rank(), world_size=dist.world_size())
    if cfg.eval_bleu:
        data.selection_metric = valid_bleu(data.valid, tgt_dict, cfg.eval_bleu_sentences, device)
    torch.manual_seed(cfg.seed)
    model = build_mt_model(model_cfg).to(device)
    gather = None
    if cfg.criterion == "trime_mt":
        if cfg.label_smoothing and dist.is_main():
            print(f"| note: trime_mt does not use --label-smoothing {cfg.label_smoothing} (nor did the original)")
        if cfg.ce_warmup_released and cfg.ce_warmup_epoch:
            cfg = dataclasses.replace(cfg, ce_warmup_epoch=0)  # the released code's cancelled warm-up (MT spec §4.6)
        if dist.world_size() > 1:
            gather = dist.make_group_gather(dist.world_size())
    objective = MTObjective(model, MTLossSettings.of(cfg), cfg.seed, gather, rank=dist.rank())
    return run_training(cfg, model_cfg, model, objective, data, on_step=on_step)


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
