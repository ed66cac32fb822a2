"""Translation with an external memory: datastore build and decoding, each against its memory-free baseline.

    python bench/bench_mt_memory.py [--preset mt_cpu] [--pairs 3000] [--sentences 64] [--json]

Datastore. ``build_mt_datastore`` (teacher-forced decoder outputs of every training target, fp16
keys, written through the resumable datastore writer) against one bare teacher-forced pass over the
same batches that keeps nothing: the ratio is what storing costs (goal ≤ 1.1).

Decoding. Beam-5 decoding of the same sentences with and without the datastore (kNN-MT, k 16, an
IVF index over the datastore): sentences/s of each and their ratio, and the index queries per
decoding step and live hypothesis, counted at the index (goal: exactly 1).

Random weights of the preset's shape, a synthetic Zipf corpus of short sentences (no BPE); numbers
measure the machinery, not translation quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row

from trime import config as C
from trime.checkpoint import model_fingerprint, save_checkpoint
from trime.data.pair_batching import collate
from trime.data.pairs import load_pair_dictionaries, load_pair_split, pair_dictionary_files, prepare_pairs
from trime.datastore_build import build_mt_datastore
from trime.generate.beam import BeamConfig
from trime.memory.index import build_index
from trime.model.encoder_decoder import build_mt_model, mt_preset
from trime.mt_generate import decode, memory_combiner


def corpus(root: Path, n_pairs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vocab = 4000
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    raw = root / "raw"
    raw.mkdir()
    for split, n in (("train", n_pairs), ("valid", 256), ("test", 8)):
        for lang, prefix in (("src", "s"), ("tgt", "t")):
            lines = [
                " ".join(f"{prefix}{w}" for w in rng.choice(vocab, size=rng.integers(8, 24), p=p)) for _ in range(n)
            ]
            (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return prepare_pairs(raw, root / "data", source_lang="src", target_lang="tgt")


def checkpoint(root: Path, data: Path, preset: str) -> Path:
    src, tgt = load_pair_dictionaries(data)
    cfg = mt_preset(preset, src_vocab_size=len(src), tgt_vocab_size=len(tgt), dropout=0.0)
    torch.manual_seed(0)
    model = build_mt_model(cfg).eval()
    return save_checkpoint(root / "ckpt", model, cfg, pair_dictionary_files(data))


def bare_pass(model, split, max_tokens: int) -> int:
    """Teacher-forced forward over the training targets in build_mt_datastore's batches, keeping nothing."""
    i, rows = 0, 0
    while i < len(split):
        ids, width = [i], max(split.src_sizes[i], split.tgt_sizes[i])
        while i + len(ids) < len(split):
            nxt = i + len(ids)
            w = max(width, split.src_sizes[nxt], split.tgt_sizes[nxt])
            if w * (len(ids) + 1) > max_tokens:
                break
            ids.append(nxt)
            width = w
        b = collate(split, np.asarray(ids))
        with torch.no_grad():
            h = model(b.src_tokens, b.prev_output_tokens).h
        rows += int((b.target != 1).sum())
        _ = h[b.target != 1].float()
        i += len(ids)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mt_cpu")
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from trime.checkpoint import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = corpus(root, a.pairs)
        ckpt = checkpoint(root, data, a.preset)
        model, mcfg, _ = load_model(ckpt, task="mt")
        split = load_pair_split(data, "train")
        bare_pass(model, load_pair_split(data, "valid"), 4096)  # warm-up
        t = time.perf_counter()
        n_rows = bare_pass(model, split, 4096)
        t_bare = time.perf_counter() - t
        t = time.perf_counter()
        ds = build_mt_datastore(C.MTDatastoreConfig(data=str(data), path=str(ckpt), out=str(root / "ds")))
        t_build = time.perf_counter() - t
        rows.append(row("mt datastore", f"build, {n_rows} rows (s)", t_build, t_bare, "≤ 1.1× a bare pass", "s"))

        index = build_index(ds, root / "ds" / "knn.index.l2", metric="l2", n_lists=64, train_size=n_rows)
        valid = load_pair_split(data, "valid")
        ids = np.arange(a.sentences)
        beam = BeamConfig(beam=5, max_len_a=1.2, max_len_b=10)
        cfg = C.TranslateConfig(data=str(data), path=str(ckpt), dstore=str(ds), indexfile=str(index), knn_mode="knn",
                                k=16, lmbda=0.3, knn_temp=10.0, probe=8)  # fmt: skip
        combiner = memory_combiner(cfg, model, mcfg, model_fingerprint(ckpt))
        heads = {"rows": 0}
        log_probs = model.head.log_probs

        def counted(h):
            heads["rows"] += h.shape[0]
            return log_probs(h)

        decode(model, valid, ids[:8], beam)  # warm-up
        t = time.perf_counter()
        decode(model, valid, ids, beam)
        t_vanilla = time.perf_counter() - t
        model.head.log_probs = counted
        t = time.perf_counter()
        decode(model, valid, ids, beam, combiner=combiner)
        t_memory = time.perf_counter() - t
        del model.head.log_probs
        rows.append(row("mt decode", "vanilla (sentences/s)", a.sentences / t_vanilla, unit="sent/s"))
        rows.append(
            row(
                "mt decode",
                "with kNN-MT memory, k 16 (sentences/s)",
                a.sentences / t_memory,
                a.sentences / t_vanilla,
                "as close to 1 as an index search per step allows",
                "sent/s",
            )
        )
        rows.append(
            row(
                "mt decode",
                "index queries per step and hypothesis",
                combiner.searches / heads["rows"],
                goal="exactly 1",
                ratio=combiner.searches / heads["rows"],
            )
        )
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
