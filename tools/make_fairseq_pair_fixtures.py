"""Helper of tools/make_fairseq_pair_fixtures.sh (read that file first): the steps that need Python.

Subcommands (each deterministic):

- ``corpus BIBLE_DIR OUT`` (any Python 3): a tiny parallel text from a ``trime data fetch bible-es-en``
  directory, with edge cases added (module docstring of the .sh).
- ``dump BIN_DIR KEY OUT_NPZ`` (fairseq venv): every split's ids as fairseq-preprocess binarised them, added to
  OUT_NPZ as ``KEY.SPLIT.LANG.tokens`` (int32, sentences concatenated) and ``KEY.SPLIT.LANG.sizes`` (int64).
- ``batches BIN_DIR OUT_JSON`` (fairseq venv): fairseq's own batch iterator over the train split
  (TranslationTask.get_batch_iterator, seed 1, max tokens 300, max positions 60/70, two shards, epochs 1-2)
  and the collated tensors of one batch.

fairseq is never imported by trime; this file runs inside a separate virtual environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

N_TRAIN, N_HELD = 240, 40
MAX_TOKENS, MAX_SRC, MAX_TGT, SEED = 600, 60, 70, 1


def corpus(bible_dir: str, out: str) -> None:
    src, out_dir = Path(bible_dir), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("valid", N_HELD), ("test", N_HELD)):
        for lang in ("es", "en"):
            lines = (src / f"{split}.{lang}").read_text(encoding="utf-8").split("\n")[:n]
            if split == "valid":
                lines[2] = lines[2].replace(" ", "\t", 2) + " <unk> zzzunseen"  # tabs, a literal <unk>, an OOV word
                lines[3] = lines[3].replace(" ", "\u00a0", 1)  # a non-breaking space inside a token? fairseq splits it
                lines[5] = ""  # an empty pair
                if lang == "en":
                    lines[7] = "   "  # an empty target only
            if split == "test" and lang == "es":
                lines[1] = "  " + lines[1] + "  "  # leading / trailing blanks
            (out_dir / f"{split}.{lang}").write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")


def dump(bin_dir: str, key: str, out_npz: str) -> None:
    import numpy as np
    from fairseq.data import data_utils

    arrays = dict(np.load(out_npz)) if Path(out_npz).exists() else {}
    for split in ("train", "valid", "test"):
        for lang in ("es", "en"):
            ds = data_utils.load_indexed_dataset(f"{bin_dir}/{split}.es-en.{lang}", None)
            arrays[f"{key}.{split}.{lang}.tokens"] = np.concatenate([ds[i].numpy() for i in range(len(ds))]).astype(
                np.int32
            )
            arrays[f"{key}.{split}.{lang}.sizes"] = np.asarray(ds.sizes, dtype=np.int64)
    np.savez_compressed(out_npz, **arrays)


def batches(bin_dir: str, out_json: str) -> None:
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    cfg = TranslationConfig(
        data=bin_dir, source_lang="es", target_lang="en", dataset_impl="mmap", required_seq_len_multiple=1
    )
    task = TranslationTask.setup_task(cfg)
    task.load_dataset("train")
    ds = task.dataset("train")
    out = {"max_tokens": MAX_TOKENS, "max_source_positions": MAX_SRC, "max_target_positions": MAX_TGT, "seed": SEED}
    for shards in (1, 2):
        for shard in range(shards):
            itr = task.get_batch_iterator(
                dataset=ds, max_tokens=MAX_TOKENS, max_positions=(MAX_SRC, MAX_TGT), ignore_invalid_inputs=True,
                required_batch_size_multiple=8, seed=SEED, num_shards=shards, shard_id=shard, disable_iterator_cache=True,
            )  # fmt: skip
            if shards == 1:
                out["frozen"] = [b.tolist() for b in itr.frozen_batches]
            for epoch in (1, 2):
                got = [b["id"].tolist() if b else [] for b in itr.next_epoch_itr(shuffle=True)]
                out[f"epoch{epoch}.shards{shards}.shard{shard}"] = got
    one = ds.collater([ds[i] for i in out["frozen"][3]])
    out["collated"] = {
        "ids": one["id"].tolist(),
        "src_tokens": one["net_input"]["src_tokens"].tolist(),
        "src_lengths": one["net_input"]["src_lengths"].tolist(),
        "prev_output_tokens": one["net_input"]["prev_output_tokens"].tolist(),
        "target": one["target"].tolist(),
        "ntokens": int(one["ntokens"]),
    }
    Path(out_json).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    {"corpus": corpus, "dump": dump, "batches": batches}[sys.argv[1]](*sys.argv[2:])
