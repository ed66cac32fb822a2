"""Translation with an external memory: datastore build and decoding, each against its memory-free baseline.

    python bench/bench_mt_memory.py [--preset mt_cpu] [--pairs 3000] [--sentences 64] [--lists 64,512]
                                    [--modes knn,trime] [--repeats 3] [--json]

Datastore. ``build_mt_datastore`` (teacher-forced decoder outputs of every training target, fp16
keys, written through the resumable datastore writer) against one bare teacher-forced pass over the
same batches that keeps nothing: the ratio is what storing costs (goal ≤ 1.1).

Decoding. Beam-5 decoding of the same sentences with and without the datastore (kNN-MT and TrimeMT,
k 16, probe 8, an IVF-PQ index of ``--lists`` lists over the datastore, one per value): sentences/s of
each, the median of ``--repeats`` rounds that decode vanilla and every memory setting in turn, each
memory setting's ratio to vanilla (goal ≥ 0.85), the same as hypothesis steps/s (rows the output
layer scores: random weights end the memory settings' hypotheses sooner or later than vanilla's, so
sentences/s alone flatters or wrongs them), and the index queries per decoding step and live
hypothesis, counted at the index (goal: exactly 1).

Random weights of the preset's shape, a synthetic Zipf corpus of short sentences (no BPE); numbers
measure the machinery, not translation quality.
"""

from __future__ import annotations

import argparse
import statistics
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


def hypothesis_steps(model, valid, ids, beam, combiner=None) -> int:
    """Rows the output layer scores while decoding ``ids``: one per live hypothesis and step (the work
    a step does; random weights make the memory settings end sooner or later than vanilla)."""
    seen = [0]
    logits = model.head.logits

    def counted(h):
        seen[0] += h.shape[0]
        return logits(h)

    model.head.logits = counted
    try:
        decode(model, valid, ids, beam, **({} if combiner is None else {"combiner": combiner}))
    finally:
        del model.head.logits
    return seen[0]


def decode_seconds(model, valid, ids, beam, combiners: dict, repeats: int) -> dict[str, float]:
    """Median seconds to decode ``ids`` vanilla and with each combiner, over ``repeats`` rounds that
    decode each in turn (a shared machine's load then weighs on all of them alike)."""
    times: dict[str, list[float]] = {"vanilla": []} | {name: [] for name in combiners}
    for _ in range(repeats):
        for name in times:
            kw = {} if name == "vanilla" else {"combiner": combiners[name]}
            t = time.perf_counter()
            decode(model, valid, ids, beam, **kw)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mt_cpu")
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--lists", default="64,512", help="IVF lists of the index, comma-separated (one index each)")
    ap.add_argument("--modes", default="knn,trime", help="memory decoding modes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
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

        valid = load_pair_split(data, "valid")
        ids = np.arange(a.sentences)
        beam = BeamConfig(beam=5, max_len_a=1.2, max_len_b=10)
        combiners = {}
        for lists in map(int, a.lists.split(",")):
            index = build_index(ds, root / "ds" / f"knn{lists}.index.l2", metric="l2", n_lists=lists, train_size=n_rows)
            for mode in a.modes.split(","):
                cfg = C.TranslateConfig(data=str(data), path=str(ckpt), dstore=str(ds), indexfile=str(index),
                                        knn_mode=mode, k=16, lmbda=0.3, knn_temp=10.0, probe=8)  # fmt: skip
                combiners[f"{mode}, IVF {lists} lists"] = memory_combiner(cfg, model, mcfg, model_fingerprint(ckpt))
        decode(model, valid, ids[:8], beam)  # warm-up
        steps = {"vanilla": hypothesis_steps(model, valid, ids, beam)}
        first = next(iter(combiners.values()))
        searches = first.searches
        for name, comb in combiners.items():  # also each setting's warm-up
            steps[name] = hypothesis_steps(model, valid, ids, beam, comb)
        searches = first.searches - searches
        secs = decode_seconds(model, valid, ids, beam, combiners, a.repeats)
        n, v = a.sentences, secs.pop("vanilla")
        rows.append(row("mt decode", f"vanilla, beam 5 (sentences/s, median of {a.repeats})", n / v, unit="sent/s"))
        rows.append(row("mt decode", "vanilla (hypothesis steps/s)", steps["vanilla"] / v, unit="steps/s"))
        for name, t in secs.items():
            rows.append(row("mt decode", f"{name}, k 16, probe 8 (sentences/s)", n / t, n / v, "≥ 0.85", "sent/s"))
            rows.append(row("mt decode", f"{name} (hypothesis steps/s: {steps[name]} against {steps['vanilla']})",
                            steps[name] / t, steps["vanilla"] / v, unit="steps/s"))  # fmt: skip
        name = next(iter(combiners))
        rows.append(row("mt decode", f"index queries per step and hypothesis ({name})", searches / steps[name],
                        goal="exactly 1", ratio=searches / steps[name]))  # fmt: skip
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
