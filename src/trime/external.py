"""External memory end to end: build a datastore with a model, index it, search it while scoring.

Fixes against the original (spec §6, §11 items 8–10), each named:
- every scored position of the split is a datastore row, in stream order (row r = target r):
  no skipped warm-up tokens, no zero rows;
- only the scored positions of a window are searched (the original searched the context too);
- one search serves both the joint softmax and the kNN-LM interpolation (the original ran two);
- one GPU is enough for faiss (the original needed two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from trime.checkpoint import load_model, model_fingerprint
from trime.config import DatastoreConfig, EvalConfig, ModelConfig
from trime.data.blocks import eval_windows
from trime.memory import knn
from trime.memory.datastore import Datastore, build_datastore as write_datastore, resume_from
from trime.memory.index import Index


@dataclass
class Neighbors:
    scores: torch.Tensor  # (n, k) raw similarities (inner product, or −squared distance for l2)
    values: torch.Tensor  # (n, k) the neighbours' tokens
    valid: torch.Tensor  # (n, k) False for index holes


class ExternalMemory:
    """A datastore and its index, checked against the model, searched once per scored token."""

    def __init__(self, datastore: Datastore, index: Index, k: int, interp_temp: float, lmbda: float):
        self.datastore, self.index = datastore, index
        self.k, self.interp_temp, self.lmbda = k, interp_temp, lmbda

    @classmethod
    def open(cls, cfg: EvalConfig, model_cfg: ModelConfig, fingerprint: str | None = None) -> "ExternalMemory":
        ds = Datastore.open(cfg.dstore)
        ds.check_compatible(model_cfg.d_model, model_cfg.vocab_size, cfg.knn_keytype, fingerprint)
        index = Index.open(cfg.indexfile, probe=cfg.probe)
        index.check_datastore(ds)
        return cls(ds, index, cfg.k, cfg.interp_temp, cfg.lmbda)

    def search(self, queries: torch.Tensor) -> Neighbors:
        scores, ids, valid = self.index.search(queries, self.k)
        return Neighbors(scores.float(), self.datastore.lookup(ids), valid)

    def interpolate(self, logp: torch.Tensor, nb: Neighbors, targets: torch.Tensor) -> torch.Tensor:
        """kNN-LM mixture log((1−λ)·p + λ·p_knn), p_knn = softmax(score / T) over the k neighbours."""
        return knn.interpolate(logp, knn.knn_log_prob(nb.scores, nb.values, targets, self.interp_temp, nb.valid), self.lmbda)


def joint_scores(nb: Neighbors, dim: int, softmax_temp: float) -> torch.Tensor:
    """External entries' logits in the joint softmax: score / sqrt(d) / τ (−inf for holes)."""
    return (nb.scores / math.sqrt(dim) / softmax_temp).masked_fill(~nb.valid, float("-inf"))


def build_datastore(cfg: DatastoreConfig) -> Path:
    """Run a checkpoint over a split and store (key, next token) for every scored position."""
    from trime.data.prepare import load_split, read_data_meta
    from trime.evaluate import batches
    from trime.train import autocast, autocast_dtype, pick_device

    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(cfg.path, device=device, trust=cfg.trust_checkpoint)
    tokens = load_split(cfg.data, cfg.subset)
    L = cfg.tokens_per_sample or model_cfg.max_positions
    windows = eval_windows(tokens, L, cfg.context_window, "none")
    n_rows = len(tokens)
    out = Path(cfg.out)
    start = resume_from(out, n_rows)
    windows = windows[windows[:, 0] >= start]  # windows start on row boundaries of earlier blocks
    meta = {
        "key_type": cfg.knn_keytype, "vocab_size": model_cfg.vocab_size,
        "model_fingerprint": model_fingerprint(ckpt_dir), "split_fingerprint": read_data_meta(cfg.data)["splits"][cfg.subset]["fingerprint"],
        "split": cfg.subset, "context_window": cfg.context_window, "tokens_per_sample": L,
    }
    amp = autocast_dtype(cfg.amp, device)
    bar = tqdm(total=n_rows, initial=start, desc="datastore", unit="tok", dynamic_ncols=True, disable=None)

    def blocks():
        for i, (inputs, labels, n_ctx, n_score) in enumerate(batches(tokens, windows, cfg.batch_size, device)):
            with torch.no_grad(), autocast(device, amp):
                keys = select_keys(model(inputs), cfg.knn_keytype)  # (b, T, d)
            spans = [slice(c, c + n) for c, n in zip(n_ctx, n_score)]
            yield (
                int(windows[i * cfg.batch_size, 0]),
                torch.cat([keys[w, s] for w, s in enumerate(spans)]).float().cpu(),  # (n, d)
                torch.cat([labels[w, s] for w, s in enumerate(spans)]).cpu(),  # (n,)
            )
            bar.update(sum(n_score))

    try:
        return write_datastore(blocks(), out, model_cfg.d_model, n_rows, meta, key_dtype=cfg.key_dtype)
    finally:
        bar.close()


def select_keys(out, keytype: str) -> torch.Tensor:
    """The memory keys of a model output: ``last_ffn_input`` (q) or ``final`` (h)."""
    return out.q if keytype == "last_ffn_input" else out.h
