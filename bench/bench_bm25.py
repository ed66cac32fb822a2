"""Benchmark the BM25 batching pipeline (trime.data.bm25): speed and how much the chain groups.

    python bench/bench_bm25.py                       # synthetic Zipfian corpus, ~1M tokens, L = 3072
    python bench/bench_bm25.py DATA_DIR              # a prepared corpus (its train split)
    python bench/bench_bm25.py --wt103               # WikiText-103-sized synthetic corpus (103M tokens);
                                                     # search timed on --measure-shards of 16 shards

Prints the time of each step, segments/s, the share of consecutive pairs in the chained order
where the second is one of the first's BM25 hits (vs a random order of the same segments), and an
estimate for WikiText-103 at L = 3072 (33.6k segments). Search costs grow with S² (every query
meets every segment through frequent terms), so the estimate is honest only from a run at full
size (``--wt103``); from a small corpus it is extrapolated quadratically and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trime.data import bm25
from trime.io import read_meta, shard_range

WT103_TOKENS, WT103_VOCAB, WT103_ARTICLE = 103_227_021, 267_735, 3_600
STOP = ["the", "of", "and", "in", "to", "a", "was", "is", "for", "on", "as", "by", "with", "that", "at"]
PUNCT = [",", ".", "@-@", "(", ")", '"', "'s", ";", ":", "@,@"]


def synthetic_corpus(n_tokens: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Zipf(1) word stream with stop words and punctuation on top and topical articles.

    Each article (~3.6k tokens, as in WikiText-103) draws 20% of its tokens from its own 300
    words of rank > 1000, so that segments of one article share rare words, as in real text.
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(int(vocab * 1.2))}
    words = sorted(words - set(STOP))[: vocab - len(STOP) - len(PUNCT)]
    rng.shuffle(words)
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + PUNCT[:2] + STOP + PUNCT[2:] + words
    n_words = len(symbols) - 4
    cdf = np.cumsum(1.0 / np.arange(1, n_words + 1))
    tokens = np.searchsorted(cdf / cdf[-1], rng.random(n_tokens)).astype(np.int32) + 4  # (n,)
    n_art = -(-n_tokens // WT103_ARTICLE)
    topics = rng.integers(1000, n_words, size=(n_art, 300)) + 4  # (A, 300)
    topical = np.flatnonzero(rng.random(n_tokens) < 0.2)
    tokens[topical] = topics[topical // WT103_ARTICLE, rng.integers(0, 300, len(topical))]
    tokens[rng.random(n_tokens) < 1 / 60] = 2  # line ends
    tokens[rng.random(n_tokens) < 0.01] = 3  # <unk>
    return tokens, symbols


class Clock:
    """Wall and CPU (all threads of this process) seconds of each step."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def __call__(self, name: str, fn, *args, scale: float = 1.0, **kw):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        self.wall[name] = (time.perf_counter() - w) * scale
        self.cpu[name] = (time.process_time() - c) * scale
        return out


def run(tokens, symbols, L: int, work: Path, num_shards: int, measure: int, threads: int) -> dict:
    clock = Clock()
    seg, idx, res = work / "segments.jsonl", work / "index", work / "results"
    n_seg = clock("segments", bm25.write_segments, tokens, symbols, L, seg)
    clock("index", lambda: bm25.build_index(seg, idx, analysed=bm25.analyze_tokens(tokens, symbols, L)))
    ranges = [shard_range(n_seg, k, num_shards) for k in range(measure)]
    done = sum(hi - lo for lo, hi in ranges)
    out = {"n_seg": n_seg, "clock": clock, "searched": done}
    if measure < num_shards:  # the parts of bm25.search, so that the index is loaded once
        scorer = clock("search: load", bm25._Scorer, idx, read_meta(idx))

        def search_some():
            with ThreadPoolExecutor(threads or os.cpu_count()) as pool, tqdm(total=done, desc="bm25 search") as bar:
                for lo, hi in ranges:
                    bm25._search_shard(scorer, lo, hi, 20, pool, bar)

        clock("search", search_some, scale=n_seg / done)  # all shards, extrapolated linearly in queries
    else:
        clock("search", bm25.search, idx, seg, res, num_shards=num_shards, n_threads=threads)
        hits = bm25.load_results(res, n_seg)
        order = clock("chain", bm25.chain_order, hits, seed=1)
        rand = list(range(n_seg))
        random.Random(2).shuffle(rand)
        out["share_chain"], out["share_random"] = bm25.link_share(order, hits), bm25.link_share(rand, hits)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", help="prepared data directory (default: synthetic corpus)")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="synthetic corpus size")
    ap.add_argument("--vocab", type=int, default=WT103_VOCAB // 4, help="synthetic vocabulary size")
    ap.add_argument("--L", type=int, default=3072, help="tokens per segment")
    ap.add_argument("--wt103", action="store_true", help="WikiText-103-sized synthetic corpus")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--measure-shards", type=int, default=None, help="search only the first M shards")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows for bench/run as JSON")
    args = ap.parse_args()
    if args.wt103:
        args.tokens, args.vocab = WT103_TOKENS, WT103_VOCAB
        args.shards, args.measure_shards = 16, args.measure_shards or 1
    measure = args.measure_shards or args.shards
    load0, t0 = os.getloadavg()[0], time.time()
    if args.data_dir:
        from trime.data.prepare import load_dictionary, load_split

        tokens, symbols = np.asarray(load_split(args.data_dir, "train")), list(load_dictionary(args.data_dir).symbols)
        source = args.data_dir
    else:
        tokens, symbols = synthetic_corpus(args.tokens, args.vocab)
        source = f"synthetic Zipf, {len(tokens) / 1e6:.1f}M tokens, {len(symbols)} words"
    print(f"corpus: {source} (made in {time.time() - t0:.1f} s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_bm25_") as work:
        r = run(tokens, symbols, args.L, Path(work), args.shards, measure, args.threads)
    n_seg, clock = r["n_seg"], r["clock"]
    wall, cpu = clock.wall, clock.cpu
    if args.json:
        total = sum(wall.values())
        rows = [
            {
                "bench": "bm25",
                "measure": f"pipeline segments/s ({n_seg} segments of {args.L})",
                "value": n_seg / total,
                "baseline": None,
                "ratio": None,
                "goal": "WikiText-103 < 10 min",
                "unit": "seg/s",
            }
        ]
        if "share_chain" in r:
            rows.append(
                {
                    "bench": "bm25",
                    "measure": "consecutive pairs that are BM25 hits: chained vs random order",
                    "value": r["share_chain"],
                    "baseline": r["share_random"],
                    "ratio": r["share_chain"] / max(r["share_random"], 1e-9),
                    "goal": "",
                    "unit": "",
                }
            )
        print(json.dumps(rows))
        return
    wt_seg = -(-WT103_TOKENS // 3072)
    scale = (wt_seg / n_seg) ** 2 if args.L == 3072 else float("nan")
    lin = WT103_TOKENS / len(tokens)
    est = {
        k: sum(v * (scale if step == "search" else lin) for step, v in w.items())
        for k, w in (("wall", wall), ("cpu", cpu))
    }
    print(
        f"\nBM25 pipeline on {source}, L = {args.L}: {n_seg} segments, {args.threads or os.cpu_count()} threads, "
        f"load average before/after {load0:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print("| step | wall s | CPU s (all threads) |\n|---|---|---|")
    for k in wall:
        partial = k == "search" and r["searched"] < n_seg
        note = f" (measured on {r['searched']} of {n_seg} queries, scaled)" if partial else ""
        print(f"| {k}{note} | {wall[k]:.1f} | {cpu[k]:.1f} |")
    print(f"| total | {sum(wall.values()):.1f} | {sum(cpu.values()):.1f} |")
    print(f"| segments/s (wall) | {n_seg / sum(wall.values()):.1f} | |")
    if "share_chain" in r:
        print(f"| consecutive pairs (a, b) with b among a's top-20 hits: chained order | {r['share_chain']:.3f} | |")
        print(f"| same, random order | {r['share_random']:.4f} | |")
    how = (
        "measured at full size"
        if abs(scale - 1) < 0.05
        else f"crude: search scaled x{scale:.0f} (S^2) from {n_seg} segments, an upper bound; use --wt103"
    )
    if args.L == 3072:
        print(
            f"| WikiText-103 estimate, {wt_seg} segments of 3072 | {est['wall'] / 60:.1f} min "
            f"| {est['cpu'] / 60:.1f} CPU min |"
        )
        print(f"({how})")


if __name__ == "__main__":
    main()
