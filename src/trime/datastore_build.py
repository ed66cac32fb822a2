"""Build an external memory: run a checkpoint over a split and store (key, next token) for every
scored position (spec §6.1), with the same windows and batches as evaluation.

Fixes against the original (spec §6.1, §11 item 8), named: every scored position of the split is
a datastore row, in stream order (row r = target r): no skipped warm-up tokens, no zero rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from trime.checkpoint import checkpoint_dictionary, load_model, model_fingerprint, read_config, resolve
from trime.config import DatastoreConfig, ModelConfig, build
from trime.data.batching import make_batch
from trime.data.blocks import eval_windows
from trime.data.prepare import check_vocabulary, load_split, read_data_meta, special_ids
from trime.device import autocast, autocast_dtype, pick_device
from trime.errors import DatastoreError
from trime.memory.datastore import build_datastore as write_datastore
from trime.memory.datastore import build_mismatch, resume_from
from trime.model.base import select_keys


def datastore_meta(cfg: DatastoreConfig, model_cfg, ckpt_dir) -> dict:
    """What makes a datastore's rows (recorded in its meta.json and compared by a resume or a reuse)."""
    return {
        "key_type": cfg.knn_keytype,
        "vocab_size": model_cfg.vocab_size,
        "model_fingerprint": model_fingerprint(ckpt_dir),
        "split_fingerprint": read_data_meta(cfg.data)["splits"][cfg.subset]["fingerprint"],
        "split": cfg.subset,
        "context_window": cfg.context_window,
        "tokens_per_sample": cfg.tokens_per_sample or model_cfg.max_positions,
    }


def datastore_key(cfg: DatastoreConfig) -> dict:
    """:func:`datastore_meta` of a trime checkpoint without loading its weights (for a pipeline's reuse check)."""
    ckpt_dir = resolve(cfg.path)
    model_cfg = build(ModelConfig, read_config(ckpt_dir)["model"], source=str(ckpt_dir))
    return datastore_meta(cfg, model_cfg, ckpt_dir)


def build_datastore(cfg: DatastoreConfig) -> Path:
    """Write the datastore of ``cfg.path``'s memory keys over ``cfg.subset`` to ``cfg.out``; resumable."""
    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(
        cfg.path,
        device=device,
        trust=cfg.trust_checkpoint,
        hf_model=cfg.hf_model,
        gguf_file=cfg.gguf_file,
        keytype=cfg.knn_keytype,
    )
    check_vocabulary(cfg.data, model_cfg.vocab_size, checkpoint_dictionary(ckpt_dir))  # rows labelled in its ids
    tokens = load_split(cfg.data, cfg.subset)
    pad, eos = special_ids(cfg.data)
    L = cfg.tokens_per_sample or model_cfg.max_positions
    windows = eval_windows(tokens, L, cfg.context_window, "none", eos)
    n_rows = len(tokens)
    out = Path(cfg.out)
    meta = datastore_meta(cfg, model_cfg, ckpt_dir)
    diff = build_mismatch(out, meta)
    if diff:
        raise DatastoreError(
            f"{out}: holds a datastore (or an unfinished build) with another {', '.join(diff)}; "
            "remove it or choose another --out"
        )
    start = resume_from(out, n_rows)
    windows = windows[windows[:, 0] >= start]  # windows start on row boundaries of earlier blocks
    amp = autocast_dtype(cfg.amp, device)
    bar = tqdm(total=n_rows, initial=start, desc="datastore", unit="tok", dynamic_ncols=True, disable=None)

    def blocks():
        for i in range(0, len(windows), cfg.batch_size):
            batch = make_batch(tokens, windows[i : i + cfg.batch_size], pad=pad, eos=eos, device=device)
            with torch.no_grad(), autocast(device, amp):
                keys = select_keys(model(batch.inputs), cfg.knn_keytype)  # (b, T, d)
            spans = [slice(c, c + n) for c, n in zip(batch.n_ctx, batch.n_score)]
            yield (
                int(windows[i, 0]),
                torch.cat([keys[w, s] for w, s in enumerate(spans)]).float().cpu(),  # (n, d)
                torch.cat([batch.targets[w, s] for w, s in enumerate(spans)]).cpu(),  # (n,)
            )
            bar.update(sum(batch.n_score))

    try:
        return write_datastore(blocks(), out, model_cfg.d_model, n_rows, meta, key_dtype=cfg.key_dtype)
    finally:
        bar.close()
