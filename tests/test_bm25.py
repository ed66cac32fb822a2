"""BM25 batching (trime.data.bm25): segments, analysis, Lucene BM25 weights, search, chain, batch file.

References are plain loops written from spec §7 (segments, BM25 formula, chain semantics of the
MT copy) and bm25s's own ``index()`` / ``retrieve()``.
"""

from __future__ import annotations

import json
import math
import random
import types

import numpy as np
import pytest

from trime.data import bm25
from trime.data.batching import load_batch_order
from trime.data.blocks import input_tokens, segment_bounds
from trime.errors import DataError
from trime.io import shard_range

SYMBOLS = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    "The",
    "cats",
    "were",
    "running",
    ",",
    "don't",
    "a",
    "of",
    "Paris",
    "x",
    "3",
    '"',
    "élan",
    "runs",
    "cat",
    "a\\b",
] + [f"w{i}" for i in range(60)]


def corpus(n_tokens: int = 1500, seed: int = 0) -> np.ndarray:
    """Zipf-ish token stream over SYMBOLS with line ends and unknowns; topical stretches."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(SYMBOLS) - 3)
    toks = rng.choice(np.arange(4, len(SYMBOLS)), size=n_tokens, p=p / p.sum()).astype(np.int32)
    for start in range(0, n_tokens, 200):  # each stretch of 200 tokens favours 5 rare words
        topic = rng.integers(20, len(SYMBOLS), 5)
        idx = start + np.flatnonzero(rng.random(min(200, n_tokens - start)) < 0.3)
        toks[idx] = rng.choice(topic, len(idx))
    toks[rng.random(n_tokens) < 0.05] = 2
    toks[rng.random(n_tokens) < 0.02] = 3
    return toks


def build(tmp_path, tokens, L, name="w"):
    d = tmp_path / name
    bm25.write_segments(tokens, SYMBOLS, L, d / "seg.jsonl")
    bm25.build_index(d / "seg.jsonl", d / "idx")
    return d


def read_hits(results_dir, n):
    return bm25.load_results(results_dir, n)


# --- segments and analysis -------------------------------------------------------------------


def test_segments_match_blocks(tmp_path):
    tokens, L = corpus(700), 64
    n = bm25.write_segments(tokens, SYMBOLS, L, tmp_path / "s.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()]
    bounds = segment_bounds(len(tokens), L)
    assert n == len(bounds) == len(lines) == 11
    for s, ((start, end), rec) in enumerate(zip(bounds.tolist(), lines)):
        words = [SYMBOLS[i] for i in input_tokens(tokens, start, end) if SYMBOLS[i] not in ("<s>", "<pad>", "</s>")]
        assert rec == {"id": s, "contents": " ".join(words)}
    assert "<unk>" in " ".join(r["contents"] for r in lines) and "</s>" not in lines[0]["contents"]
    assert bm25.read_segments(tmp_path / "s.jsonl") == [r["contents"] for r in lines]


def test_analyze_lucene_like():
    terms, off, vocab = bm25.analyze(['The cats were running , <unk> 3 x "', "don't Paris runs a of cat élan"])
    docs = [[vocab[t] for t in terms[off[i] : off[i + 1]]] for i in range(2)]
    assert docs == [["cat", "were", "run", "unk", "3", "x"], ["don", "t", "pari", "run", "cat", "élan"]]
    assert vocab == sorted(vocab)


def test_analyze_tokens_equals_text_path():
    tokens, L = corpus(900, seed=3), 50
    texts = [t for _, t in bm25.segment_texts(tokens, SYMBOLS, L)]
    a, b = bm25.analyze(texts), bm25.analyze_tokens(tokens, SYMBOLS, L)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def lucene_scores(docs: list[list[str]], k1=0.9, b=0.4) -> np.ndarray:
    """Brute force: score(q, d) = Σ over q's terms (with repeats) of idf·tf/(tf + k1(1-b+b|d|/avg))."""
    n = len(docs)
    avg = sum(map(len, docs)) / n
    out = np.zeros((n, n))
    for q in range(n):
        for d in range(n):
            for t in docs[q]:
                tf = docs[d].count(t)
                df = sum(t in doc for doc in docs)
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                out[q, d] += idf * tf / (tf + k1 * (1 - b + b * len(docs[d]) / avg))
    return out


def test_bm25_weights_match_bm25s_and_brute_force():
    import bm25s
    import scipy.sparse as sp

    terms, off, vocab = bm25.analyze_tokens(corpus(600, seed=1), SYMBOLS, 40)
    ids = [terms[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]
    w = bm25.bm25_weights(bm25._term_counts(terms, off, len(vocab)))
    ref = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    ref.index((ids, {t: i for i, t in enumerate(vocab)}), create_empty_token=False, show_progress=False)
    r = ref.scores
    dense_ref = sp.csc_matrix((r["data"], r["indices"], r["indptr"]), shape=w.shape).toarray()
    np.testing.assert_allclose(w.toarray(), dense_ref, rtol=1e-6, atol=1e-7)
    tf = bm25._term_counts(terms, off, len(vocab)).toarray()
    np.testing.assert_allclose(tf @ w.toarray().T, lucene_scores(ids), rtol=1e-5)


# --- search ----------------------------------------------------------------------------------


def expected_hits(scores: np.ndarray, k: int) -> list[list[int]]:
    """Brute force: positive scores, best first, ties by smaller id, at most k."""
    return [sorted((d for d in range(len(row)) if row[d] > 0), key=lambda d: (-row[d], d))[:k] for row in scores]


def test_top_hits_ties_and_zeros():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0], [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]], dtype=np.float32)
    for k in range(8):
        assert bm25.top_hits(scores, k) == expected_hits(scores, k)
    assert bm25.top_hits(scores, 4) == [[1, 2, 3, 5], [2]]


@pytest.mark.parametrize("dense_df", [0.0, 0.3, 1.0])  # all terms dense, mixed, all sparse
def test_search_matches_brute_force(tmp_path, monkeypatch, dense_df):
    monkeypatch.setattr(bm25, "DENSE_DF", dense_df)
    monkeypatch.setattr(bm25, "BLOCK", 16)
    tokens, L = corpus(1500, seed=2), 30
    d = build(tmp_path, tokens, L)
    bm25.search(d / "idx", d / "seg.jsonl", d / "res", top_k=7, n_threads=2)
    terms, off, _ = bm25.analyze_tokens(tokens, SYMBOLS, L)
    docs = [terms[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]
    ref = lucene_scores(docs)
    got = read_hits(d / "res", len(docs))
    want = expected_hits(ref, 7)
    for q, (g, w) in enumerate(zip(got, want)):  # tie-aware: equal up to float rounding of near-ties
        assert len(g) == len(w), q
        np.testing.assert_allclose(ref[q, g], ref[q, w], rtol=1e-5)
    assert sum(g == w for g, w in zip(got, want)) >= len(docs) - 2
    assert all(g[0] == q for q, g in enumerate(got) if len(docs[q]))  # a segment finds itself first


def test_saved_index_is_a_bm25s_index(tmp_path):
    import bm25s

    tokens, L = corpus(800, seed=4), 40
    d = build(tmp_path, tokens, L)
    bm25.search(d / "idx", d / "seg.jsonl", d / "res", top_k=5)
    terms, off, vocab = bm25.analyze_tokens(tokens, SYMBOLS, L)
    queries = [[vocab[t] for t in terms[off[i] : off[i + 1]]] for i in range(len(off) - 1)]
    res = bm25s.BM25.load(d / "idx").retrieve(queries, k=5, show_progress=False)
    ours = read_hits(d / "res", len(queries))
    assert sum(list(a) == b for a, b in zip(res.documents.tolist(), ours)) >= len(queries) - 1


def test_sharded_search_equals_unsharded(tmp_path, monkeypatch):
    monkeypatch.setattr(bm25, "BLOCK", 8)  # blocks straddle shard boundaries
    d = build(tmp_path, corpus(1800, seed=5), 32)
    n = len(bm25.read_segments(d / "seg.jsonl"))
    bm25.search(d / "idx", d / "seg.jsonl", d / "one", top_k=6)
    for k in (2, 0, 1):
        bm25.search(d / "idx", d / "seg.jsonl", d / "three", top_k=6, num_shards=3, shard_id=k)
    assert sorted(p.name for p in (d / "three").glob("shard*.jsonl")) == [f"shard{k}.jsonl" for k in range(3)]
    assert [json.loads(x)["id"] for x in (d / "three/shard1.jsonl").read_text().splitlines()] == list(range(19, 38))
    assert read_hits(d / "one", n) == read_hits(d / "three", n)
    assert (d / "three/meta.json").exists()


def test_search_resumes_by_shard(tmp_path, monkeypatch):
    d = build(tmp_path, corpus(1200, seed=6), 30)
    n = len(bm25.read_segments(d / "seg.jsonl"))
    bm25.search(d / "idx", d / "seg.jsonl", d / "ref", num_shards=4)
    calls, real = [], bm25._search_shard

    def crash_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while shard 2 is being searched
        return real(*args)

    monkeypatch.setattr(bm25, "_search_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        bm25.search(d / "idx", d / "seg.jsonl", d / "res", num_shards=4)
    assert sorted(p.name for p in (d / "res").iterdir()) == ["search.json", "shard0.jsonl", "shard1.jsonl"]
    done = {p.name: p.stat().st_mtime_ns for p in (d / "res").glob("shard*.jsonl")}
    calls.clear()
    bm25.search(d / "idx", d / "seg.jsonl", d / "res", num_shards=4)
    assert len(calls) == 2  # only shards 2 and 3 were searched
    assert {p: (d / "res" / p).stat().st_mtime_ns for p in done} == done
    assert read_hits(d / "res", n) == read_hits(d / "ref", n)
    with pytest.raises(DataError, match="another setup"):
        bm25.search(d / "idx", d / "seg.jsonl", d / "res", num_shards=5)


# --- chain -----------------------------------------------------------------------------------


def write_results(path, hits, shards=2):
    path.mkdir()
    for k in range(shards):
        lo, hi = shard_range(len(hits), k, shards)
        lines = [json.dumps({"id": i, "retrieval": hits[i]}) + "\n" for i in range(lo, hi)]
        (path / f"shard{k}.jsonl").write_text("".join(lines))


def test_chain_follows_first_unused_non_self_hit(tmp_path):
    # Fallback order for seed 1 and 6 ids: random.Random(1).shuffle -> [2, 3, 5, 0, 4, 1].
    hits = [[0, 4, 1], [1, 0], [5, 2, 3], [3], [4, 0, 1], [2, 5, 0]]
    write_results(tmp_path / "r", hits)
    # 2 -> 5 (its top hit, a duplicate outranking itself) -> 0 (2 used, 5 self) -> 4 -> 1 (0 used)
    # -> dead end: next unused of the fallback order is 3 -> dead end, all used.
    assert bm25.chain(tmp_path / "r", 6, seed=1) == [2, 5, 0, 4, 1, 3]


def reference_chain(hits, seed):
    """The MT script's loop, with the self-skip fix, written as directly as possible."""
    ids = list(range(len(hits)))
    random.seed(seed)
    random.shuffle(ids)
    visited, out, cur, ptr = set(), [], ids[0], 0
    while True:
        visited.add(cur)
        out.append(cur)
        if len(out) == len(ids):
            return out
        cands = [h for h in hits[cur] if h != cur and h not in visited]
        if cands:
            cur = cands[0]
        else:
            while ids[ptr] in visited:
                ptr += 1
            cur = ids[ptr]


def test_chain_is_a_seeded_permutation():
    rng = np.random.default_rng(0)
    hits = [[i] + rng.integers(0, 300, 5).tolist() for i in range(300)]
    order = bm25.chain_order(hits, seed=1)
    assert sorted(order) == list(range(300))
    assert order == bm25.chain_order(hits, seed=1) == reference_chain(hits, 1)
    assert order != bm25.chain_order(hits, seed=2)
    assert bm25.chain_order([], seed=1) == []


def test_results_must_cover_every_id_once(tmp_path):
    write_results(tmp_path / "a", [[0], [1], [2]])
    with pytest.raises(DataError, match="1 of 4 segments have no search results"):
        bm25.chain(tmp_path / "a", 4)
    (tmp_path / "a/shard9.jsonl").write_text('{"id": 1, "retrieval": [1]}\n')
    with pytest.raises(DataError, match="segment 1 appears twice"):
        bm25.chain(tmp_path / "a", 3)
    write_results(tmp_path / "b", [[0], [1, 7]])
    with pytest.raises(DataError, match="'retrieval' must be a list"):
        bm25.chain(tmp_path / "b", 2)


def test_duplicate_segments_are_chained_together(tmp_path):
    tokens, L = corpus(2000, seed=7), 40
    tokens[7 * L - 1 : 8 * L - 1] = tokens[2 * L - 1 : 3 * L - 1]  # segment 7's inputs = segment 2's
    tokens[30 * L - 1 : 31 * L - 1] = tokens[11 * L - 1 : 12 * L - 1]
    d = build(tmp_path, tokens, L)
    n = len(bm25.read_segments(d / "seg.jsonl"))
    bm25.search(d / "idx", d / "seg.jsonl", d / "res")
    hits = read_hits(d / "res", n)
    assert hits[7][:2] == hits[2][:2] == [2, 7]  # equal scores, ties by id: 7's own hit is second
    for seed in (1, 2, 3):
        order = bm25.chain(d / "res", n, seed=seed)
        assert abs(order.index(2) - order.index(7)) == 1 and abs(order.index(11) - order.index(30)) == 1
        assert bm25.link_share(order, hits) > 0.8


# --- pipeline and batch file -----------------------------------------------------------------


@pytest.fixture
def fake_prepare(monkeypatch):
    """load_split / load_dictionary over an in-memory corpus, as bm25 sees them."""
    tokens = corpus(1600, seed=8)
    monkeypatch.setattr(bm25, "load_split", lambda data_dir, split: tokens)
    monkeypatch.setattr(bm25, "load_dictionary", lambda data_dir: types.SimpleNamespace(symbols=list(SYMBOLS)))
    return tokens


def test_bm25_batches_pipeline(tmp_path, fake_prepare, capsys):
    out = bm25.bm25_batches("data", 50, tmp_path / "a/bm25_batches.json", num_shards=3)
    order = load_batch_order(out, 32)
    assert sorted(order.tolist()) == list(range(32))
    assert "bm25 batches: 32 segments of 50 tokens" in capsys.readouterr().out
    seg = tmp_path / "a/bm25_batches.work/segments.jsonl"
    mtime = seg.stat().st_mtime_ns
    bm25.bm25_batches("data", 50, tmp_path / "a/bm25_batches.json", num_shards=3)  # resumes: reuses work
    assert seg.stat().st_mtime_ns == mtime
    bm25.bm25_batches("data", 50, tmp_path / "b.json", work_dir=tmp_path / "wb", num_shards=3)
    assert (tmp_path / "b.json").read_bytes() == out.read_bytes()  # same seed, same file
    with pytest.raises(DataError, match="another setup"):
        bm25.bm25_batches("data", 64, tmp_path / "a/bm25_batches.json")


def test_load_batch_order_rejects_bad_files(tmp_path):
    p = tmp_path / "order.json"
    p.write_text(json.dumps([2, 0, 1]))
    assert load_batch_order(p, 3).tolist() == [2, 0, 1]
    for content, match in [
        ([2, 0, 1, 3], "lists 4 segment ids but the training data has 3"),
        ([2, 0, 0], "not a permutation"),
        ([2, 0, 3], "not a segment id"),
        ({"order": [0]}, "not a JSON list"),
        ([0, 1.0, 2], "not a JSON list"),
    ]:
        p.write_text(json.dumps(content))
        with pytest.raises(DataError, match=match):
            load_batch_order(p, 3)
    with pytest.raises(DataError, match="no such file"):
        load_batch_order(tmp_path / "missing.json", 3)


def test_bm25_batches_on_a_prepared_data_dir(tmp_path):
    from trime.data.prepare import load_dictionary, load_split, prepare

    rng = random.Random(0)
    topics = [[f"{t}word{i}" for i in range(8)] for t in "abcd"]
    lines = [" ".join(rng.choice(topics[k // 10]) for _ in range(12)) + " , the end ." for k in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    data = prepare({"train": tmp_path / "train.txt"}, tmp_path / "data")
    out = bm25.bm25_batches(data, 32, tmp_path / "order.json")
    n = len(segment_bounds(len(load_split(data, "train")), 32))
    order = load_batch_order(out, n).tolist()
    texts = bm25.read_segments(tmp_path / "order.work/segments.jsonl")
    assert texts[0].split()[0] == load_dictionary(data).symbols[load_split(data, "train")[0]]
    # segments of one topic follow each other far more often than by chance
    topic = [max("abcd", key=lambda c: t.count(c + "word")) for t in texts]
    same = sum(topic[a] == topic[b] for a, b in zip(order[:-1], order[1:])) / (n - 1)
    assert same > 0.6, same
