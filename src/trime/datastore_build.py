"""Build an external memory: run a checkpoint over a split and store (key, next token) for every
target position, through one resumable driver (:func:`stream_datastore`) fed by either task's rows:

- a language model (spec §6.1): the memory key of every scored position, with the same windows and
  batches as evaluation; row r = target r of the token stream;
- a translation model (MT spec §7): the teacher-forced decoder output h of every target position of
  the split; row r = the r-th target token in sentence order (eos included).

Fixes against the original (spec §6.1, §11 item 8), named: every scored position of the split is
a datastore row, in stream order: no skipped warm-up tokens, no zero rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trime.checkpoint import load_model, model_fingerprint, read_config, resolve
from trime.config import DatastoreConfig, ModelConfig, MTDatastoreConfig, build
from trime.data.batching import make_batch
from trime.data.dictionary import Dictionary
from trime.data.pair_batching import batch_by_size, collate
from trime.data.pairs import PairSplit, check_pair_vocabulary, chosen_langs, load_pair_split, read_pairs_meta
from trime.data.prepare import read_data_meta
from trime.device import autocast, autocast_dtype, pick_device
from trime.errors import DataError, DatastoreError
from trime.io import read_meta
from trime.jobs import PRECISIONS, open_model
from trime.memory.datastore import build_datastore as write_datastore
from trime.memory.datastore import build_mismatch, check_growable, grow, part_name, resume_from
from trime.model.base import select_keys

Block = tuple[int, torch.Tensor, torch.Tensor]  # (first row, keys (n, d), values (n,)) in row order
Rows = Callable[[int], Iterator[Block]]  # the blocks of every row from a (resumed) start row on


def stream_datastore(out: str | Path, rows: Rows, *, dim: int, n_rows: int, meta: dict, key_dtype: str,
                     add: bool = False) -> Path:  # fmt: skip
    """The datastore driver: refuse a build in ``out`` made with another ``meta``, resume where it
    stopped, write the blocks of ``rows(start)`` with a progress bar (trime.memory.datastore).
    ``add``: ``out`` holds a complete datastore; these rows are built in a part of it and appended
    (:func:`trime.memory.datastore.grow`), or nothing is done when it holds them already."""
    out = Path(out)
    if add:
        try:
            have = read_meta(out, "datastore")
        except DataError as e:
            raise DatastoreError(f"{e}; nothing to add to (build one with trime datastore build)") from None
        part = part_name(meta["split_fingerprint"])
        if part in (have.get("shards") or []):
            return out
        check_growable(have, out, {**meta, "dim": dim, "key_dtype": key_dtype})
        stream_datastore(out / part, rows, dim=dim, n_rows=n_rows, meta=meta, key_dtype=key_dtype)
        grow(out, part)
        return out
    diff = build_mismatch(out, meta)
    if diff:
        raise DatastoreError(
            f"{out}: holds a datastore (or an unfinished build) with another {', '.join(diff)}; "
            "remove it or choose another --out"
        )
    start = resume_from(out, n_rows)
    bar = tqdm(total=n_rows, initial=start, desc="datastore", unit="tok", dynamic_ncols=True, disable=None)

    def counted() -> Iterator[Block]:
        for block in rows(start):
            yield block
            bar.update(len(block[2]))

    try:
        return write_datastore(counted(), out, dim, n_rows, meta, key_dtype=key_dtype)
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Language model


def datastore_meta(cfg: DatastoreConfig, model_cfg, fingerprint: str, precision: str) -> dict:
    """What makes a datastore's rows (recorded in its meta.json and compared by a resume or a reuse):
    ``precision`` is the one its keys were computed in (trime.jobs.PRECISIONS), which the queries of
    every job that searches it must share (trime.jobs.Job.external)."""
    return {
        "key_type": cfg.knn_keytype,
        "vocab_size": model_cfg.vocab_size,
        "model_fingerprint": fingerprint,
        "precision": precision,
        "split_fingerprint": read_data_meta(cfg.data)["splits"][cfg.subset]["fingerprint"],
        "split": cfg.subset,
        "context_window": cfg.context_window,
        "tokens_per_sample": cfg.tokens_per_sample or model_cfg.max_positions,
    }


def datastore_key(cfg: DatastoreConfig) -> dict:
    """:func:`datastore_meta` of a trime checkpoint without loading its weights (for a pipeline's reuse check)."""
    ckpt_dir = resolve(cfg.path)
    model_cfg = build(ModelConfig, read_config(ckpt_dir)["model"], source=str(ckpt_dir))
    precision = PRECISIONS[autocast_dtype(cfg.amp, pick_device(cfg.device))]
    return datastore_meta(cfg, model_cfg, model_fingerprint(ckpt_dir), precision)


def build_datastore(cfg: DatastoreConfig, *, add: bool = False) -> Path:
    """Write the datastore of ``cfg.path``'s memory keys over ``cfg.subset`` to ``cfg.out``; resumable.
    ``add``: append them to the complete datastore in ``cfg.out`` instead (``trime datastore add``)."""
    job = open_model(cfg, data=cfg.data)  # the data's vocabulary must be the model's
    model, model_cfg, device, amp = job.model, job.model_cfg, job.device, job.amp
    tokens = job.split(cfg.subset)
    pad, eos = job.pad_eos
    windows = job.windows(tokens)

    def rows(start: int) -> Iterator[Block]:
        todo = windows[windows[:, 0] >= start]  # windows start on row boundaries of earlier blocks
        for i in range(0, len(todo), cfg.batch_size):
            batch = make_batch(tokens, todo[i : i + cfg.batch_size], pad=pad, eos=eos, device=device)
            with torch.no_grad(), autocast(device, amp):
                keys = select_keys(model(batch.inputs), cfg.knn_keytype)  # (b, T, d)
            spans = [slice(c, c + n) for c, n in zip(batch.n_ctx, batch.n_score)]
            yield (
                int(todo[i, 0]),
                torch.cat([keys[w, s] for w, s in enumerate(spans)]).float().cpu(),  # (n, d)
                torch.cat([batch.targets[w, s] for w, s in enumerate(spans)]).cpu(),  # (n,)
            )

    meta = datastore_meta(cfg, model_cfg, job.fingerprint, job.precision)
    return stream_datastore(cfg.out, rows, dim=model_cfg.d_model, n_rows=len(tokens), meta=meta,
                            key_dtype=cfg.key_dtype, add=add)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Translation


@torch.no_grad()
def target_states(
    model, split: PairSplit, ids, device: torch.device | str = "cpu", amp: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced decoder outputs h (M, d) and target tokens y (M,) of every target position
    (eos included) of the pairs ``ids``, in the order of ``ids`` then position, on ``device``."""
    b = collate(split, np.asarray(ids))
    order = torch.argsort(b.ids).to(device)  # collate sorts by source length: back to the order of ids
    with autocast(torch.device(device), amp):
        h = model(b.src_tokens.to(device), b.prev_output_tokens.to(device)).h  # (B, T, d)
    h, target = h[order], b.target.to(device)[order]
    keep = target != Dictionary.pad
    return h[keep], target[keep]


def build_mt_datastore(cfg: MTDatastoreConfig) -> Path:
    """Store (h, next target token) for every target position of ``cfg.subset`` (module docstring):
    exact row count, fp16 keys, resumable; consecutive sentences of at most ``cfg.max_tokens``
    (longest side × count) per forward pass."""
    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(cfg.path, device=device, task="mt")
    chosen = chosen_langs(cfg)
    check_pair_vocabulary(cfg.data, model_cfg.src_vocab_size, model_cfg.tgt_vocab_size, **chosen)  # rows in its ids
    split = load_pair_split(cfg.data, cfg.subset, **chosen)
    pairs_meta = read_pairs_meta(cfg.data, **chosen)
    langs = pairs_meta["langs"]
    amp = autocast_dtype(cfg.amp, device)
    width = np.maximum(split.src_sizes, split.tgt_sizes)

    def rows(start: int) -> Iterator[Block]:
        first = int(np.searchsorted(split.tgt_offsets, start, side="right")) - 1  # resumed at a sentence start
        ids = np.arange(first, len(split))
        for batch in batch_by_size(ids, width, cfg.max_tokens, required_batch_size_multiple=1, oversize_alone=True):
            h, y = target_states(model, split, batch, device, amp)
            yield int(split.tgt_offsets[batch[0]]), h.float().cpu(), y.cpu()

    meta = {
        "key_type": "final", "vocab_size": model_cfg.tgt_vocab_size, "model_fingerprint": model_fingerprint(ckpt_dir),
        "split_fingerprint": pairs_meta["splits"][cfg.subset][langs["target"]]["fingerprint"],
        "split": cfg.subset, "task": "translation", "precision": PRECISIONS[amp],
    }  # fmt: skip
    return stream_datastore(cfg.out, rows, dim=model_cfg.decoder_embed_dim, n_rows=int(split.tgt_offsets[-1]),
                            meta=meta, key_dtype=cfg.key_dtype, add=cfg.add)  # fmt: skip
