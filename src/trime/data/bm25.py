"""BM25 batch order for external-memory training (spec §4, §7; MT spec §5), without Java.

    segments (JSON lines) ──analyse──► BM25 index (bm25s) ──search──► top-k hits per segment
        ──chain──► a permutation of segment ids (JSON list) ──► ``--predefined-batches``

Each training segment (``data.blocks.segment_bounds``) is a document; its whole text is also its
query. Analysis follows Anserini's default English analyzer: lowercase, split on word characters,
drop Lucene's 33 English stop words, Porter-stem. Scores are Lucene's BM25 (k1 0.9, b 0.4; bm25s
``method="lucene"``), a query term counted once per occurrence, as a bag-of-words Lucene query
does. Known differences from Lucene: document lengths are exact (Lucene stores them in one lossy
byte), so scores differ slightly and near-ties may order differently.

Hits are the top-k segments with a positive score, best first, ties by smaller id; they include
the segment itself (normally first) and are empty for a segment without indexable words.

Search computes scores for a block of queries at once as a sparse-times-sparse product
(rare terms) plus a dense matmul (terms in more than ``DENSE_DF`` of the segments), instead of
one posting walk per query token: that is what makes 33.6k queries of 3,072 tokens take minutes.
Notation: S segments, V terms, F frequent ("dense") terms, b queries in a block.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from trime.data.blocks import input_tokens, segment_bounds
from trime.data.dictionary import Dictionary
from trime.data.prepare import load_dictionary, load_split, read_data_meta
from trime.errors import ConfigError, DataError
from trime.io import (
    BATCH_ORDER,
    SEGMENTS,
    atomic_dir,
    atomic_file,
    check_output_file,
    is_complete,
    load_npy,
    output_file,
    read_json,
    read_meta,
    save_npy,
    sha256_file,
    shard_range,
    write_json,
    write_meta,
)

N_SPECIALS = Dictionary.unk  # ids below unk are <s> <pad> </s> (dropped); <unk> stays as "<unk>"
TOKEN_PATTERN = r"(?u)\b\w+\b"  # like Lucene's tokenizer, single characters are kept
BLOCK = 256  # queries per block; fixed, so a sharded run computes each row exactly like an unsharded one
DENSE_DF = 0.08  # a term in more than this share of the segments is scored with a dense matmul

__all__ = [
    "analyze",
    "analyze_tokens",
    "bm25_batches",
    "bm25_weights",
    "build_index",
    "chain",
    "chain_order",
    "link_share",
    "load_results",
    "read_segments",
    "search",
    "segment_texts",
    "top_hits",
    "write_segments",
]


# --- segments (spec §7.1) -------------------------------------------------------------------


def _joined(tokens: np.ndarray, words: np.ndarray, L: int) -> Iterator[tuple[int, str]]:
    if len(tokens) and (int(np.max(tokens)) >= len(words) or int(np.min(tokens)) < 0):
        raise DataError(f"token ids reach {int(np.max(tokens))} but the dictionary has {len(words)} symbols")
    for s, (start, end) in enumerate(segment_bounds(len(tokens), L).tolist()):
        inp = input_tokens(tokens, start, end)
        yield s, " ".join(words[inp[inp >= N_SPECIALS]].tolist())


def segment_texts(tokens: np.ndarray, symbols: Sequence[str], L: int) -> Iterator[tuple[int, str]]:
    """Yield (segment id, text) in id order: the segment's *input* tokens as dictionary strings,
    space-joined, with ``<s> <pad> </s>`` removed and unknown words kept as ``<unk>`` (spec §7.1)."""
    return _joined(tokens, np.asarray(list(symbols), dtype=object), L)


def write_segments(tokens: np.ndarray, symbols: Sequence[str], L: int, out_path: str | os.PathLike) -> int:
    """Write one JSON line ``{"id", "contents"}`` per training segment, atomically; return S."""
    from tqdm import tqdm

    n_seg = len(segment_bounds(len(tokens), L))
    escaped = np.asarray([json.dumps(w, ensure_ascii=False)[1:-1] for w in symbols], dtype=object)
    with output_file(out_path, SEGMENTS) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s, text in tqdm(_joined(tokens, escaped, L), total=n_seg, desc="bm25 segments", unit="seg"):
            f.write(f'{{"id": {s}, "contents": "{text}"}}\n')  # = json.dumps, symbols escaped once
    return n_seg


def read_segments(path: str | os.PathLike) -> list[str]:
    """Texts of a segments file, checking that ids are 0..S-1 in order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such segments file (make it with `trime bm25 segments`)")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            try:
                rec = json.loads(line)
                sid, text = rec["id"], rec["contents"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f'{path}:{line_no + 1}: not a {{"id", "contents"}} JSON line') from None
            if sid != line_no:
                raise DataError(
                    f"{path}:{line_no + 1}: segment id {sid}, expected {line_no} (ids must be 0..S-1 in order)"
                )
            texts.append(text)
    return texts


# --- analysis and index ----------------------------------------------------------------------


def _stop_set(stopwords: str | Sequence[str] | None) -> frozenset[str]:
    if stopwords in (None, "none", ""):
        return frozenset()
    if stopwords in ("en", "english"):
        from bm25s.stopwords import STOPWORDS_EN  # Lucene's EnglishAnalyzer list (33 words)

        return frozenset(STOPWORDS_EN)
    if isinstance(stopwords, str):
        raise ConfigError(f"unknown stop word list {stopwords!r} (en, none, or a list of words)")
    return frozenset(w.lower() for w in stopwords)


def _stem_fn(stemmer: str | None):
    if stemmer in (None, "none", ""):
        return lambda words: list(words)
    import Stemmer

    if stemmer not in Stemmer.algorithms():
        raise ConfigError(f"unknown stemmer {stemmer!r} (one of PyStemmer's: {', '.join(Stemmer.algorithms())})")
    return Stemmer.Stemmer(stemmer).stemWords


def _word_table(words: Sequence[str], stopwords, stemmer) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Analyse each distinct word once: (starts (W+1,), term ids, vocabulary); word i has terms
    ``flat[starts[i]:starts[i+1]]``. Lowercase, ``\\w+`` tokens, stop words out, then stemmed."""
    stop, stem, split = _stop_set(stopwords), _stem_fn(stemmer), re.compile(TOKEN_PATTERN).findall
    vocab: dict[str, int] = {}
    starts, flat = [0], []
    for word in words:
        flat += [vocab.setdefault(t, len(vocab)) for t in stem([t for t in split(word.lower()) if t not in stop])]
        starts.append(len(flat))
    return np.asarray(starts, dtype=np.int64), np.asarray(flat, dtype=np.int32), list(vocab)


Analysed = tuple[np.ndarray, np.ndarray, list[str]]  # (terms (T,) int32, offsets (S+1,) int64, vocabulary)


def _expand(word_ids: np.ndarray, doc_off: np.ndarray, table, chunk: int = 1 << 22) -> Analysed:
    """Terms of documents given as word ids (doc i = ``word_ids[doc_off[i]:doc_off[i+1]]``).

    Returns (terms (T,) int32, offsets (S+1,) int64, vocabulary), the vocabulary reduced to the
    terms that occur and sorted, so that the ids do not depend on how the words were numbered.
    """
    starts, flat, vocab = table
    count = np.diff(starts)  # (W,) terms per word
    n_terms = np.concatenate([[0], np.cumsum(count[word_ids], dtype=np.int64)])  # (N+1,)
    parts = []
    for lo in range(0, len(word_ids), chunk):  # bounded memory for 100M words
        w = word_ids[lo : lo + chunk]
        c = count[w]
        first = np.repeat(starts[w] - n_terms[lo : lo + len(w)] + n_terms[lo], c)
        parts.append(flat[first + np.arange(int(c.sum()))])
    terms = np.concatenate(parts) if parts else np.zeros(0, np.int32)  # (T,)
    used = np.flatnonzero(np.bincount(terms, minlength=len(vocab)))
    order = sorted(used.tolist(), key=vocab.__getitem__)
    remap = np.full(len(vocab), -1, dtype=np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32)
    return remap[terms], n_terms[doc_off], [vocab[i] for i in order]


def analyze(texts: Sequence[str], stopwords="en", stemmer: str | None = "porter") -> Analysed:
    """Analysed terms of each text: (term ids (T,) int32, offsets (S+1,) int64, sorted vocabulary).

    Text i's terms are ``terms[offsets[i]:offsets[i+1]]``. Anserini's default English analyzer:
    lowercase, tokens ``\\w+``, stop words removed, stemmed. A token never spans a space, so each
    distinct space-separated word is analysed once and the corpus is expanded with numpy.
    """
    word_ids: dict[str, int] = {}
    doc_words = []
    for text in texts:
        words = text.split()
        for w in dict.fromkeys(words):  # distinct words in order, at C speed
            if w not in word_ids:
                word_ids[w] = len(word_ids)
        doc_words.append(np.array(list(map(word_ids.__getitem__, words)), dtype=np.int32))
    doc_off = np.concatenate([[0], np.cumsum([len(d) for d in doc_words], dtype=np.int64)])
    all_words = np.concatenate(doc_words) if doc_words else np.zeros(0, np.int32)  # (N,)
    return _expand(all_words, doc_off, _word_table(list(word_ids), stopwords, stemmer))


def analyze_tokens(
    tokens: np.ndarray, symbols: Sequence[str], L: int, stopwords="en", stemmer: str | None = "porter"
) -> Analysed:
    """:func:`analyze` of the segment texts, computed from the token ids (identical result, ~50x faster).

    The segments' inputs laid end to end are ``[eos] + tokens[:-1]``; each dictionary symbol is
    analysed once, the specials ``<s> <pad> </s>`` to nothing.
    """
    if len(tokens) and int(np.max(tokens)) >= len(symbols):
        raise DataError(f"token ids reach {int(np.max(tokens))} but the dictionary has {len(symbols)} symbols")
    inputs = np.concatenate([np.array([2], dtype=np.int32), np.asarray(tokens[:-1], dtype=np.int32)])  # (n,)
    bounds = segment_bounds(len(tokens), L)
    doc_off = np.append(bounds[:, 0], len(tokens)).astype(np.int64)  # (S+1,)
    words = [""] * N_SPECIALS + list(symbols)[N_SPECIALS:]
    return _expand(inputs, doc_off, _word_table(words, stopwords, stemmer))


def bm25_weights(tf, k1: float = 0.9, b: float = 0.4):
    """(S, V) CSR of Lucene BM25 term weights from (S, V) CSR term counts (spec §7.2).

    w(d, t) = idf(t) · tf / (tf + k1 · (1 − b + b · |d| / avg|d|)),
    idf(t) = ln(1 + (S − df + 0.5) / (df + 0.5)),  |d| = number of analysed terms of d. A query q scores d with Σ_t qtf(q, t) · w(d, t). This is
    bm25s ``method="lucene"`` (Lucene ≥ 8 without the constant (k1 + 1) factor).
    """
    import scipy.sparse as sp

    n, v = tf.shape
    dl = np.asarray(tf.sum(axis=1), np.float64).ravel()  # (S,) |d|
    df = np.bincount(tf.indices, minlength=v).astype(np.float64)  # (V,)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))  # (V,)
    norm = k1 * (1 - b + b * dl / max(dl.mean(), 1e-12))  # (S,)
    rows = np.repeat(np.arange(n), np.diff(tf.indptr))
    data = idf[tf.indices] * tf.data / (tf.data + norm[rows])
    return sp.csr_matrix((data.astype(np.float32), tf.indices, tf.indptr), shape=(n, v))


def _term_counts(terms: np.ndarray, offsets: np.ndarray, n_terms: int):
    """(S, V) CSR of term counts: the queries (each segment's whole text)."""
    import scipy.sparse as sp

    shape = (len(offsets) - 1, n_terms)
    tf = sp.csr_matrix((np.ones(len(terms), np.float32), terms.copy(), offsets.copy()), shape=shape)
    tf.sum_duplicates()  # (S, V), sorted indices; in place, hence the copies above
    return tf


def _write_index(analysed, index_dir, segments_path, k1: float, b: float, **settings) -> Path:
    import bm25s

    terms, offsets, vocab = analysed
    if not vocab:
        raise DataError(f"{segments_path}: the segments contain no indexable words")
    n = len(offsets) - 1
    tf = _term_counts(terms, offsets, len(vocab))
    w = bm25_weights(tf, k1, b).tocsc()  # (S, V): column t = postings of term t
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.scores = {"data": w.data, "indices": w.indices, "indptr": w.indptr, "num_docs": n}
    retriever.vocab_dict = {t: i for i, t in enumerate(vocab)}
    retriever.nonoccurrence_array = None
    with atomic_dir(index_dir, overwrite=True, kind="bm25_index") as tmp:
        retriever.save(tmp, show_progress=False)
        for name in ("data", "indices", "indptr"):
            save_npy(tmp / f"query_tf.{name}.npy", getattr(tf, name))
        write_meta(
            tmp,
            "bm25_index",
            n_segments=n,
            n_terms=len(vocab),
            k1=k1,
            b=b,
            token_pattern=TOKEN_PATTERN,
            **settings,
            segments_sha256=sha256_file(segments_path),
            bm25s_version=bm25s.__version__,
        )
    return Path(index_dir)


def build_index(
    segments_path,
    index_dir,
    *,
    analysed: Analysed | None = None,
    k1: float = 0.9,
    b: float = 0.4,
    stopwords="en",
    stemmer: str | None = "porter",
) -> Path:
    """Index every segment as a bm25s index (Lucene BM25, spec §7.2) in ``index_dir`` (meta.json last).

    The segments are analysed from ``segments_path`` unless ``analysed`` is given: the pipeline
    passes :func:`analyze_tokens` of the token ids the file was written from (the same terms,
    much faster; the line count is checked). The weights come from :func:`bm25_weights`
    (vectorised; equal to bm25s's own ``index()``, which is too slow for 100M tokens) and are saved
    with bm25s, so ``bm25s.BM25.load`` reads the directory. The segments' term counts
    (``query_tf.*.npy``) are kept as the queries, so search never re-tokenises.
    """
    if analysed is None:
        analysed = analyze(read_segments(segments_path), stopwords, stemmer)
    else:
        with open(segments_path, "rb") as f:
            n_lines = sum(1 for _ in f)
        if len(analysed[1]) - 1 != n_lines:
            raise DataError(f"{segments_path} holds {n_lines} segments, the analysed tokens {len(analysed[1]) - 1}")
    return _write_index(analysed, index_dir, segments_path, k1, b, stopwords=stopwords, stemmer=stemmer)


# --- search (spec §7.3) ----------------------------------------------------------------------


class _Scorer:
    """BM25 scores of query blocks against all segments: sparse part + dense part, float32."""

    def __init__(self, index_dir: Path, meta: dict, dense_df: float | None = None):
        import scipy.sparse as sp

        dense_df = DENSE_DF if dense_df is None else dense_df
        n, v = meta["n_segments"], meta["n_terms"]
        w = sp.csc_matrix(
            tuple(load_npy(index_dir / f"{k}.csc.index.npy", mmap=False) for k in ("data", "indices", "indptr")),
            shape=(n, v),
        )  # (S, V) weights
        tf = sp.csr_matrix(
            tuple(load_npy(index_dir / f"query_tf.{k}.npy", mmap=False) for k in ("data", "indices", "indptr")),
            shape=(n, v),
        )  # (S, V) counts
        dense = np.diff(w.indptr) > dense_df * n  # (V,) frequent terms
        self.n = n
        self.q_sparse, self.q_dense = tf[:, ~dense].tocsr(), tf[:, dense].tocsr()
        self.w_sparse_t = w[:, ~dense].T.tocsr()  # (V-F, S)
        self.w_dense_t = np.ascontiguousarray(w[:, dense].T.toarray(), dtype=np.float32)  # (F, S)

    def scores(self, lo: int, hi: int) -> np.ndarray:
        """(b, S) scores of queries lo..hi-1: Σ_t qtf(q,t)·w(d,t)."""
        out = (self.q_sparse[lo:hi] @ self.w_sparse_t).toarray()  # (b, S)
        if self.w_dense_t.shape[0]:
            out += self.q_dense[lo:hi].toarray() @ self.w_dense_t  # (b, F) @ (F, S)
        return out


def top_hits(scores: np.ndarray, k: int) -> list[list[int]]:
    """Per row, the ids of the ``k`` highest positive scores, best first, ties by smaller id."""
    k = min(k, scores.shape[1])
    if k <= 0:
        return [[] for _ in scores]
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # (b,) k-th largest score
    hits = []
    for row, thr in zip(scores, kth.tolist()):
        cand = np.flatnonzero(row >= thr) if thr > 0 else np.flatnonzero(row > 0)
        best = np.lexsort((cand, -row[cand]))[:k]
        hits.append(cand[best].tolist())
    return hits


def _search_shard(scorer: _Scorer, lo: int, hi: int, top_k: int, pool, bar) -> list[list[int]]:
    def block(j: int) -> list[list[int]]:
        b_lo, b_hi = j * BLOCK, min((j + 1) * BLOCK, scorer.n)  # whole, globally aligned blocks
        hits = top_hits(scorer.scores(b_lo, b_hi), top_k)[max(lo - b_lo, 0) : hi - b_lo]
        bar.update(len(hits))
        return hits

    blocks = range(lo // BLOCK, -(-hi // BLOCK)) if hi > lo else range(0)
    return [h for hits in pool.map(block, blocks) for h in hits]


def search(
    index_dir,
    segments_path,
    out_dir,
    *,
    top_k: int = 20,
    num_shards: int = 1,
    shard_id: int | None = None,
    n_threads: int = 0,
) -> Path:
    """Top-``top_k`` hits of every segment's whole text, written as ``out_dir/shard{k}.jsonl``.

    ``shard_id=None`` does every shard; a shard whose file exists is skipped (each is written
    atomically), so a killed run resumes. ``n_threads=0`` uses all cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    index_dir, out_dir = Path(index_dir), Path(out_dir)
    meta = read_meta(index_dir, "bm25_index")
    if sha256_file(segments_path) != meta["segments_sha256"]:
        raise DataError(f"{index_dir} was built from other segments than {segments_path}: rebuild the index")
    n = meta["n_segments"]
    if num_shards < 1 or (shard_id is not None and not 0 <= shard_id < num_shards):
        raise ConfigError(f"--shard-id {shard_id} must be in [0, --num-shards {num_shards})")
    check_work_setup(
        out_dir / "search.json",
        {
            "segments_sha256": meta["segments_sha256"],
            "top_k": top_k,
            "num_shards": num_shards,
            "block": BLOCK,
            "dense_df": DENSE_DF,
        },
    )
    todo = [
        k for k in (range(num_shards) if shard_id is None else [shard_id]) if not (out_dir / f"shard{k}.jsonl").exists()
    ]
    if todo:
        scorer = _Scorer(index_dir, meta)
        total = sum(hi - lo for lo, hi in (shard_range(n, k, num_shards) for k in todo))
        with (
            ThreadPoolExecutor(n_threads or _n_cores()) as pool,
            tqdm(total=total, desc="bm25 search", unit="seg") as bar,
        ):
            for k in todo:
                lo, hi = shard_range(n, k, num_shards)
                hits = _search_shard(scorer, lo, hi, top_k, pool, bar)
                with atomic_file(out_dir / f"shard{k}.jsonl") as tmp, open(tmp, "w") as f:
                    f.writelines(json.dumps({"id": lo + i, "retrieval": h}) + "\n" for i, h in enumerate(hits))
    if not is_complete(out_dir) and all((out_dir / f"shard{k}.jsonl").exists() for k in range(num_shards)):
        write_meta(out_dir, "bm25_results", n_segments=n, top_k=top_k, num_shards=num_shards)
    return out_dir


def _n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_work_setup(path: Path, setup: dict) -> None:
    """Record what a resumable work directory was made from; refuse to mix in another setup, and a directory
    that holds files but no record (a user's: nothing is written into it)."""
    if not path.exists() and path.parent.is_dir() and any(path.parent.iterdir()):
        raise DataError(f"{path.parent}: holds files but no {path.name}: not a trime work directory; choose another")
    if path.exists():
        old = read_json(path)
        if old != json.loads(json.dumps(setup)):
            diff = sorted(k for k in set(old) | set(setup) if old.get(k) != setup.get(k))
            raise DataError(
                f"{path.parent} holds work from another setup ({', '.join(diff)} differ): "
                "remove it or pick another directory"
            )
    else:
        write_json(path, setup)


# --- chain (spec §7.4, MT spec §5.4) ---------------------------------------------------------


def load_results(results_dir, n_segments: int) -> list[list[int]]:
    """All shards' hit lists indexed by segment id; every id 0..S-1 must appear exactly once."""
    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("shard*.jsonl"))
    if not files:
        raise DataError(f"{results_dir}: no shard*.jsonl search results (run `trime bm25 search`)")
    hits: list[list[int] | None] = [None] * n_segments
    for path in files:
        with open(path) as f:
            for line_no, line in enumerate(f):
                where = f"{path}:{line_no + 1}"
                try:
                    rec = json.loads(line)
                    sid, ret = rec.get("id"), rec.get("retrieval")
                except (json.JSONDecodeError, AttributeError):
                    raise DataError(f'{where}: not an {{"id", "retrieval"}} JSON line') from None
                if type(sid) is not int or not 0 <= sid < n_segments:
                    raise DataError(
                        f"{where}: segment id {sid!r} is not in [0, {n_segments}) (results from other data?)"
                    )
                if hits[sid] is not None:
                    raise DataError(f"{where}: segment {sid} appears twice in the search results")
                if not isinstance(ret, list) or any(type(h) is not int or not 0 <= h < n_segments for h in ret):
                    raise DataError(f"{where}: 'retrieval' must be a list of segment ids in [0, {n_segments})")
                hits[sid] = ret
    missing = [i for i, h in enumerate(hits) if h is None]
    if missing:
        raise DataError(
            f"{results_dir}: {len(missing)} of {n_segments} segments have no search results "
            f"(first: {missing[0]}); run `trime bm25 search` for the missing shards"
        )
    return hits  # type: ignore[return-value]


def chain_order(hits: Sequence[Sequence[int]], seed: int = 1) -> list[int]:
    """Chain segments through their BM25 hits into a permutation (MT spec §5.4 semantics).

    ``random.Random(seed).shuffle(list(range(S)))`` gives the fallback order (the same sequence as
    the original's ``random.seed(1); random.shuffle``). Start at its first id; from the current
    segment go to its first not-yet-used hit other than itself, in rank order; when there is none,
    jump to the next unused id of the fallback order (a pointer that only moves forward).
    Robustness fix, named: the original skips the first hit assuming it is the segment itself;
    here hits equal to the current id are skipped wherever they rank (duplicates can outrank it).
    """
    n = len(hits)
    fallback = list(range(n))
    random.Random(seed).shuffle(fallback)
    used = bytearray(n)
    order: list[int] = []
    ptr = 0
    cur = fallback[0] if n else -1
    while cur >= 0:
        used[cur] = 1
        order.append(cur)
        nxt = next((h for h in hits[cur] if h != cur and not used[h]), -1)
        if nxt < 0:
            while ptr < n and used[fallback[ptr]]:
                ptr += 1
            nxt = fallback[ptr] if ptr < n else -1
        cur = nxt
    return order


def chain(results_dir, n_segments: int, *, seed: int = 1) -> list[int]:
    """Load all shards (every id exactly once, else DataError) and chain them: :func:`chain_order`."""
    return chain_order(load_results(results_dir, n_segments), seed)


def link_share(order: Sequence[int], hits: Sequence[Sequence[int]]) -> float:
    """Share of consecutive pairs (a, b) of ``order`` where b is one of a's hits."""
    pairs = list(zip(order[:-1], order[1:]))
    return sum(b in set(hits[a]) for a, b in pairs) / max(len(pairs), 1)


# --- the pipeline and its product ------------------------------------------------------------


def batches_setup(data_dir, tokens_per_sample: int) -> dict:
    """What a BM25 order is made from (recorded in its work directory's setup.json): the training
    tokens' fingerprint (from the data's meta.json, the same hash as of the array), the vocabulary
    and the segment length."""
    split = read_data_meta(data_dir)["splits"]["train"]
    symbols = list(load_dictionary(data_dir).symbols)
    return {
        "tokens": split["fingerprint"],
        "n_tokens": split["tokens"],
        "symbols": hashlib.sha256("\n".join(symbols).encode()).hexdigest()[:16],
        "tokens_per_sample": tokens_per_sample,
    }


def bm25_batches(
    data_dir,
    tokens_per_sample: int,
    out_path,
    *,
    work_dir=None,
    seed: int = 1,
    top_k: int = 20,
    num_shards: int = 1,
    n_threads: int = 0,
) -> Path:
    """Segments → index → search → chain for the training split of ``data_dir``; resumable.

    Intermediate files live in ``work_dir`` (default ``<out_path without suffix>.work/``); each
    finished step is reused. Writes the order as a JSON list of segment ids, prints a summary.
    """
    t0, out_path = time.time(), Path(out_path)
    check_output_file(out_path, BATCH_ORDER)  # before the work: a user's file there is refused at once
    work = Path(work_dir) if work_dir else out_path.with_suffix(".work")
    tokens, symbols = load_split(data_dir, "train"), list(load_dictionary(data_dir).symbols)
    n_seg = len(segment_bounds(len(tokens), tokens_per_sample))
    check_work_setup(work / "setup.json", batches_setup(data_dir, tokens_per_sample))
    segments, index, results = work / "segments.jsonl", work / "index", work / "results"
    if not segments.exists():
        write_segments(tokens, symbols, tokens_per_sample, segments)
    if not is_complete(index):
        build_index(segments, index, analysed=analyze_tokens(tokens, symbols, tokens_per_sample))
    search(index, segments, results, top_k=top_k, num_shards=num_shards, n_threads=n_threads)
    hits = load_results(results, n_seg)
    order = chain_order(hits, seed)
    with output_file(out_path, BATCH_ORDER) as tmp:
        tmp.write_text(json.dumps(order) + "\n")
    print(
        f"bm25 batches: {n_seg} segments of {tokens_per_sample} tokens, {link_share(order, hits):.1%} of steps "
        f"are BM25 hops, {time.time() - t0:.0f} s -> {out_path}"
    )
    return out_path
