"""Parallel corpora (spec §2, §5.6-5.7): fairseq-preprocess parity, fairseq batching, bad input.

The fixtures in tests/assets/fairseq_pairs/ were made by tools/make_fairseq_pair_fixtures.sh with subword-nmt
and fairseq-fixed 0.12.3.1 (read its header for what each file is).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trime.data.pair_batching import (
    batch_by_size,
    collate,
    epoch_batches,
    filter_by_size,
    ordered_indices,
    pair_batches,
)
from trime.data.pair_corpora import fetch_pairs
from trime.data.pairs import (
    corpus_files,
    load_pair_dictionaries,
    load_pair_split,
    prepare_pairs,
    read_pairs_meta,
)
from trime.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fairseq_pairs"
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def fairseq_ids():
    with np.load(ASSETS / "ids.npz", allow_pickle=False) as z:
        return dict(z)


@pytest.fixture(scope="module")
def fairseq_batches():
    return json.loads((ASSETS / "batches.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """trime's own run on the raw fixture text: BPE learned with the same merges, both dictionary kinds."""
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for kind in ("sep", "joined"):
        out[kind] = prepare_pairs(
            ASSETS / "raw", root / kind, source_lang="es", target_lang="en", bpe_merges=500,
            joined_dictionary=kind == "joined", allow_empty=True,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# fairseq-preprocess parity


@pytest.mark.parametrize("kind", ["sep", "joined"])
def test_prepare_equals_subword_nmt_and_fairseq_preprocess(prepared, fairseq_ids, kind):
    out = prepared[kind]
    assert (out / "bpe.codes").read_bytes() == (ASSETS / "bpe.codes").read_bytes()  # subword-nmt learn-bpe CLI
    for lang in ("es", "en"):
        assert (out / f"dict.{lang}.txt").read_bytes() == (ASSETS / kind / f"dict.{lang}.txt").read_bytes()
    for split in SPLITS:
        s = load_pair_split(out, split)
        for lang, tokens, offsets in (("es", s.src, s.src_offsets), ("en", s.tgt, s.tgt_offsets)):
            np.testing.assert_array_equal(tokens, fairseq_ids[f"{kind}.{split}.{lang}.tokens"])
            np.testing.assert_array_equal(np.diff(offsets), fairseq_ids[f"{kind}.{split}.{lang}.sizes"])
    meta = read_pairs_meta(out)
    assert meta["langs"] == {"source": "es", "target": "en"} and meta["joined_dictionary"] == (kind == "joined")
    sd, td = load_pair_dictionaries(out)
    assert meta["vocab_size"] == {"es": len(sd), "en": len(td)} and len(sd) % 8 == 0 and len(td) % 8 == 0
    assert (sd == td) == (kind == "joined")
    valid = meta["splits"]["valid"]
    assert valid["pairs"] == 40 and valid["en"]["unk"] >= 2 and valid["en"]["replaced"] >= 1  # <unk> + zzzunseen


def test_given_codes_and_dictionaries_reproduce_the_ids(tmp_path, fairseq_ids):
    """A released model's codes and dict files: applied, not relearned; the ids are fairseq's."""
    out = prepare_pairs(
        ASSETS / "raw", tmp_path / "d", source_lang="es", target_lang="en", bpe_codes=ASSETS / "bpe.codes",
        src_dict=ASSETS / "sep" / "dict.es.txt", tgt_dict=ASSETS / "sep" / "dict.en.txt", allow_empty=True,
    )  # fmt: skip
    s = load_pair_split(out, "test")
    np.testing.assert_array_equal(s.src, fairseq_ids["sep.test.es.tokens"])
    np.testing.assert_array_equal(s.tgt, fairseq_ids["sep.test.en.tokens"])
    meta = read_pairs_meta(out)
    assert meta["text"]["bpe"]["codes"].endswith("bpe.codes") and meta["dictionaries"]["es"]["source"] != "train"


def test_moses_and_lowercase_steps(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "train.de").write_text('Er sagte: "Das ist\'s!"\nGut & schön.\n')
    (corpus / "train.en").write_text('He said: "That\'s it!"\nGood & nice.\n')
    out = prepare_pairs(corpus, tmp_path / "d", source_lang="de", target_lang="en", moses=True, lower=True)
    sd, td = load_pair_dictionaries(out)
    s = load_pair_split(out, "train")
    assert (
        sd.string(s.source(0)) == "er sagte : &quot; das ist &apos; s ! &quot;"
    )  # tokenizer.perl splits both sides of an apostrophe in German
    assert td.string(s.target(0)) == "he said : &quot; that &apos;s it ! &quot;"
    assert td.string(s.target(1)) == "good &amp; nice ."
    assert read_pairs_meta(out)["text"] == {
        "moses": True,
        "lowercase": True,
        "bpe": None,
        "sentencepiece": None,
        "allow_empty": False,
    }


# ---------------------------------------------------------------------------------------------
# Batching parity with fairseq's TranslationTask.get_batch_iterator


def test_batches_equal_fairseqs(fairseq_ids, fairseq_batches):
    fb = fairseq_batches
    src, tgt = fairseq_ids["sep.train.es.sizes"], fairseq_ids["sep.train.en.sizes"]
    # fairseq 0.12 seeds the length-sort shuffle with seed + epoch (1); the original's 0.10 fork with seed
    ours = pair_batches(
        src, tgt, max_tokens=fb["max_tokens"], seed=fb["seed"] + 1,
        max_source_positions=fb["max_source_positions"], max_target_positions=fb["max_target_positions"],
    )  # fmt: skip
    frozen = [np.asarray(b) for b in fb["frozen"]]
    # fairseq 0.12 drops a final batch whose size is not a multiple of 8; trime keeps it (as fairseq 0.10 does)
    assert len(ours) == len(frozen) + 1 and len(ours[-1]) % 8 != 0
    assert [b.tolist() for b in ours[:-1]] == [b.tolist() for b in frozen]
    kept = np.concatenate(ours)
    assert len(kept) == len(set(kept.tolist())) == int(np.sum((src <= 60) & (tgt <= 70)))
    for epoch in (1, 2):
        mine = epoch_batches(frozen, epoch, seed=fb["seed"])
        theirs = fb[f"epoch{epoch}.shards1.shard0"]
        assert [sorted(b.tolist()) for b in mine] == [sorted(b) for b in theirs]
        for rank in (0, 1):
            mine = epoch_batches(frozen, epoch, seed=fb["seed"], rank=rank, world_size=2)
            theirs = [b for b in fb[f"epoch{epoch}.shards2.shard{rank}"] if b]  # fairseq pads a rank with []
            assert [sorted(b.tolist()) for b in mine] == [sorted(b) for b in theirs[: len(mine)]]
            assert len(theirs) - len(mine) <= 1


def test_collate_equals_fairseqs_collater(prepared, fairseq_batches):
    fb = fairseq_batches
    split = load_pair_split(prepared["sep"], "train")
    batch = collate(split, fb["frozen"][3])
    ref = fb["collated"]
    assert batch.ntokens == ref["ntokens"] and sorted(batch.ids.tolist()) == sorted(ref["ids"])
    row = {i: r for r, i in enumerate(ref["ids"])}  # fairseq's row order among equal source lengths may differ
    order = [row[i] for i in batch.ids.tolist()]
    for name in ("src_tokens", "src_lengths", "prev_output_tokens", "target"):
        assert torch.equal(getattr(batch, name), torch.tensor(ref[name])[order]), name
    assert batch.src_lengths.tolist() == sorted(batch.src_lengths.tolist(), reverse=True)


def test_collate_layout_by_hand():
    class Split:  # two pairs: sources (5, 6, eos) and (7, eos); targets (8, eos) and (9, 10, 11, eos)
        src, tgt = [[5, 6, 2], [7, 2]], [[8, 2], [9, 10, 11, 2]]

        def source(self, i):
            return np.asarray(self.src[i])

        def target(self, i):
            return np.asarray(self.tgt[i])

    b = collate(Split(), [1, 0])
    assert b.ids.tolist() == [0, 1] and b.src_lengths.tolist() == [3, 2]
    assert b.src_tokens.tolist() == [[5, 6, 2], [1, 7, 2]]  # left-padded
    assert b.target.tolist() == [[8, 2, 1, 1], [9, 10, 11, 2]]  # right-padded
    assert b.prev_output_tokens.tolist() == [[2, 8, 1, 1], [2, 9, 10, 11]]  # eos first, shifted right
    assert b.ntokens == 6


# ---------------------------------------------------------------------------------------------
# Batching properties


def _sizes(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 40, size=n), rng.integers(1, 40, size=n)


def test_token_budget_and_multiple_of_8():
    src, tgt = _sizes(3000)
    batches = pair_batches(src, tgt, max_tokens=512, seed=3)
    width = np.maximum(src, tgt)
    for b in batches:
        assert len(b) * width[b].max() <= 512
        assert len(b) % 8 == 0 or len(b) < 8
    assert sum(len(b) % 8 != 0 for b in batches) <= 1  # 8 pairs always fit here: only the last batch may be short
    assert sorted(np.concatenate(batches).tolist()) == list(range(3000))


@pytest.mark.parametrize("max_tokens,max_sentences", [(64, 0), (100, 5), (30, 0), (1000, 3)])
def test_multiple_1_is_the_greedy_packer_of_decoding_and_datastores(max_tokens, max_sentences):
    """The one packer at multiple 1: a batch closes before the pair that would overflow it (what decoding
    and datastore builds did by hand); with oversize_alone a pair over the budget is a batch of its own."""
    sizes = np.random.default_rng(max_tokens).integers(1, 40, 300)
    ids = np.random.default_rng(1).permutation(300)
    want, cur, width = [], [], 0
    for i in ids.tolist():  # the hand-written loop, as a reference
        w = max(width, int(sizes[i]))
        if cur and (w * (len(cur) + 1) > max_tokens or (max_sentences and len(cur) >= max_sentences)):
            want.append(cur)
            cur, w = [], int(sizes[i])
        cur.append(i)
        width = w
    want.append(cur)
    got = batch_by_size(ids, sizes, max_tokens, max_sentences or None, 1, oversize_alone=True)
    assert [b.tolist() for b in got] == want
    if sizes.max() > max_tokens:
        with pytest.raises(ConfigError, match="more than --max-tokens"):
            batch_by_size(ids, sizes, max_tokens, max_sentences or None, 1)


def test_every_pair_once_per_epoch_and_deterministic():
    src, tgt = _sizes(1000, 1)
    batches = pair_batches(src, tgt, max_tokens=300, seed=7)
    assert [b.tolist() for b in batches] == [b.tolist() for b in pair_batches(src, tgt, max_tokens=300, seed=7)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in pair_batches(src, tgt, max_tokens=300, seed=8)]
    e1, e2 = epoch_batches(batches, 1, seed=7), epoch_batches(batches, 2, seed=7)
    for epoch in (e1, e2):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(1000))
    assert [b.tolist() for b in e1] != [b.tolist() for b in e2]
    assert [b.tolist() for b in e1] == [b.tolist() for b in epoch_batches(batches, 1, seed=7)]
    ranks = [epoch_batches(batches, 1, seed=7, rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and sum(map(len, ranks)) == len(batches) // 3 * 3
    seen = np.concatenate([b for r in ranks for b in r])
    assert len(seen) == len(set(seen.tolist()))
    assert [b.tolist() for b in epoch_batches(batches, 5, shuffle=False)] == [b.tolist() for b in batches]


def test_length_bucketing_order():
    src, tgt = np.array([5, 3, 5, 3, 1]), np.array([2, 9, 1, 4, 7])
    order = ordered_indices(src, tgt, shuffle=False)
    assert order.tolist() == [4, 3, 1, 2, 0]  # by source length, then target length
    assert sorted(ordered_indices(src, tgt, seed=4).tolist()) == list(range(5))


def test_size_filter_and_limits():
    src, tgt = np.array([3, 50, 4, 10]), np.array([3, 4, 80, 10])
    kept, dropped = filter_by_size(np.arange(4), src, tgt, 20, 20)
    assert kept.tolist() == [0, 3] and dropped.tolist() == [1, 2]
    with pytest.raises(DataError, match=r"2 sentence pair\(s\) are longer .* pair 1 \(50, 4 tokens\)"):
        filter_by_size(np.arange(4), src, tgt, 20, 20, skip_invalid=False)
    with pytest.raises(ConfigError, match="pair 3 has 10 tokens, more than --max-tokens 8"):
        batch_by_size(np.array([0, 3]), np.maximum(src, tgt), 8)
    with pytest.raises(ConfigError, match="--max-tokens or --batch-size"):
        batch_by_size(np.arange(2), np.ones(2), None)
    sizes = [len(b) for b in batch_by_size(np.arange(40), np.ones(40, dtype=int), None, max_sentences=12)]
    assert sizes == [8, 8, 8, 8, 8]  # at most 12 sentences, cut back to multiples of 8


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing left behind


def _corpus(root: Path, src: str, tgt: str, suffixes=("src", "tgt")) -> Path:
    root.mkdir()
    (root / f"train.{suffixes[0]}").write_text(src)
    (root / f"train.{suffixes[1]}").write_text(tgt)
    return root


def _bad(fn, match, *leftovers: Path):
    with pytest.raises(DataError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    for p in leftovers:
        assert not p.exists()
        assert not list(p.parent.glob(f".{p.name}*"))


def test_bad_inputs(tmp_path):
    out = tmp_path / "out"
    c = _corpus(tmp_path / "c1", "a\nb\nc\n", "x\ny\n")
    _bad(lambda: prepare_pairs(c, out), r"train.src has 3 lines but .*train.tgt has 2: not a parallel corpus", out)
    c = _corpus(tmp_path / "c2", "a\n\nc\n", "x\ny\nz\n")
    _bad(lambda: prepare_pairs(c, out), r"train.src:2: empty line .*--allow-empty-lines", out)
    assert prepare_pairs(c, out, allow_empty=True) == out  # kept as fairseq keeps them: just eos
    assert load_pair_split(out, "train").source(1).tolist() == [2]
    shutil.rmtree(out)
    c = _corpus(tmp_path / "c3", "a\n", "x\n", ("de", "en"))
    _bad(
        lambda: prepare_pairs(c, out),
        r"no \{train,valid,test\}.src / .tgt files \(has: train.de, train.en\); pass --source-lang",
        out,
    )
    assert prepare_pairs(c, out, source_lang="de", target_lang="en").is_dir()
    _bad(lambda: prepare_pairs(c, out, source_lang="de", target_lang="en"), "already exists")
    (c / "valid.de").write_text("a\n")
    _bad(lambda: corpus_files(c, "de", "en"), "valid.de has no parallel valid.en")
    (c / "valid.de").unlink()
    bad_codes = tmp_path / "codes"
    bad_codes.write_text("#version: 0.2\nonly-one-symbol\n")
    _bad(lambda: prepare_pairs(c, tmp_path / "o2", source_lang="de", target_lang="en", bpe_codes=bad_codes),
         "not a subword-nmt BPE codes file", tmp_path / "o2")  # fmt: skip
    _bad(lambda: prepare_pairs(c, tmp_path / "o2", bpe_merges=5, bpe_codes=bad_codes), "not both", tmp_path / "o2")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "train.src").write_bytes(b"caf\xe9\n")
    (tmp_path / "latin1" / "train.tgt").write_text("x\n")
    _bad(lambda: prepare_pairs(tmp_path / "latin1", tmp_path / "o3"), "not UTF-8", tmp_path / "o3")
    _bad(lambda: fetch_pairs("wmt14", tmp_path / "o4"), r"unknown translation corpus 'wmt14' \(known: iwslt14, bible-es-en\)",
         tmp_path / "o4")  # fmt: skip
    _bad(lambda: load_pair_split(tmp_path / "nowhere", "train"), "no such directory")
