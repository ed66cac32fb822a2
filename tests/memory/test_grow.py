"""Growing an external memory without rebuilding it (trime datastore add, trime index add): the grown
datastore reads as the concatenation of its parts, and the grown index or shard set answers exactly as
an index built over the grown datastore from the same trained quantizers."""

import shutil

import numpy as np
import pytest
import torch

from trime import config as C
from trime.cli import main
from trime.errors import DatastoreError
from trime.evaluate import evaluate
from trime.memory import datastore as dsm
from trime.memory.backends import ShardsMemory, shard_specs
from trime.memory.datastore import Datastore, build_datastore, grow
from trime.memory.external import ExternalMemory
from trime.memory.index import Index, build_index, grow_index

from tests.memory.test_index import _clustered, _one_faiss_thread  # noqa: F401  (autouse)
from tests.test_external import ecfg, store  # noqa: F401  (the micro model and its datastore)

D, VOCAB, K = 16, 100, 16
IVF = {"flat_below": 0, "n_lists": 32, "code_size": 4, "n_bits": 6, "train_size": 6_000, "probe": 4}


def _rows(keys: np.ndarray, seed: int):
    vals = np.random.default_rng(seed).integers(4, VOCAB, len(keys))
    return keys, vals


def _build(path, keys, vals, text: str):
    blocks = ((a, torch.from_numpy(keys[a : a + 1000]), torch.from_numpy(vals[a : a + 1000]))
              for a in range(0, len(keys), 1000))  # fmt: skip
    meta = {"key_type": "last_ffn_input", "vocab_size": VOCAB, "split": text, "split_fingerprint": f"fp-{text}"}
    return build_datastore(blocks, path, D, len(keys), meta, key_dtype="float32")


@pytest.fixture()
def grown(tmp_path):
    """A datastore of 6k rows, its IVF-PQ index and 2-shard set, then 3k more rows added to it."""
    old, new = _rows(_clustered(6_000, D), 1), _rows(_clustered(3_000, D, seed=7), 2)
    ds = _build(tmp_path / "ds", *old, "train")
    plain = build_index(ds, tmp_path / "plain.index", **IVF)
    shards = build_index(ds, tmp_path / "s2.index", shards=2, trained=str(tmp_path / "plain.index.trained"), **IVF)
    shutil.copy(tmp_path / "plain.index.trained", tmp_path / "s2.index.trained")
    flat = build_index(ds, tmp_path / "flat.index")
    before = Datastore.open(ds).meta
    _build(ds / dsm.part_name("fp-more"), *new, "more")
    grow(ds, dsm.part_name("fp-more"))
    keys, vals = (np.concatenate([a, b]) for a, b in zip(old, new, strict=True))
    return ds, keys, vals, before, {"plain": plain, "shards": shards, "flat": flat}


def test_grown_datastore_reads_as_the_concatenation(grown):
    ds_dir, keys, vals, before, _ = grown
    ds = Datastore.open(ds_dir)
    assert ds.rows == 9_000 and ds.meta["shards"] == ["part0", "add-fp-more"]
    np.testing.assert_array_equal(ds.read_keys(0, ds.rows), keys)
    np.testing.assert_array_equal(ds.values.numpy(), vals)
    assert [s["split"] for s in ds.meta["sources"]] == ["train", "more"]
    assert ds.meta["grown_from"] == [{"fingerprint": before["fingerprint"], "rows": 6_000}]
    assert not (ds_dir / "keys.npy").exists()  # moved into part0 by a hard link, not copied
    assert grow(ds_dir, "add-fp-more") == ds.meta  # idempotent


def test_growth_refuses_other_models_and_text_it_holds(grown, tmp_path):
    ds_dir, *_ = grown
    keys, vals = _rows(_clustered(100, D, seed=9), 3)
    other = _build(ds_dir / "add-x", keys, vals, "train")  # the text part0 holds
    with pytest.raises(DatastoreError, match="already holds this text"):
        grow(ds_dir, other.name)
    meta = dsm.read_meta(ds_dir, "datastore")
    with pytest.raises(DatastoreError, match="another vocab_size 50"):
        dsm.check_growable(meta, ds_dir, {"vocab_size": 50, "split_fingerprint": "new"})
    with pytest.raises(DatastoreError, match="another precision bf16"):  # keys of one precision only
        dsm.check_growable({**meta, "precision": "fp32"}, ds_dir, {"precision": "bf16", "split_fingerprint": "new"})
    dsm.check_growable(meta, ds_dir, {"precision": "bf16", "split_fingerprint": "new"})  # made before it was recorded


def test_killed_growth_leaves_the_old_datastore_readable(tmp_path, monkeypatch):
    old, new = _rows(_clustered(2_000, D), 1), _rows(_clustered(500, D, seed=3), 2)
    ds_dir = _build(tmp_path / "ds", *old, "train")
    _build(ds_dir / "add-fp-new", *new, "new")
    real = dsm.write_meta

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsm, "write_meta", killed)
    with pytest.raises(KeyboardInterrupt):
        grow(ds_dir, "add-fp-new")
    ds = Datastore.open(ds_dir)  # part0 was made, the meta still says one directory of 2k rows
    assert ds.rows == 2_000 and (ds_dir / "part0").is_dir()
    np.testing.assert_array_equal(ds.read_keys(0, 2_000), old[0])
    monkeypatch.setattr(dsm, "write_meta", real)
    assert grow(ds_dir, "add-fp-new")["rows"] == 2_500


def _same_search(a, b, q):
    (sa, ia, _), (sb, ib, _) = a.search(q, K), b.search(q, K)
    np.testing.assert_array_equal(sa.numpy(), sb.numpy())
    np.testing.assert_array_equal(ia.numpy(), ib.numpy())


@pytest.mark.parametrize("kind", ["plain", "flat"])
def test_grown_index_equals_one_built_with_its_quantizers(grown, tmp_path, kind):
    ds_dir, *_, paths = grown
    path, added = grow_index(ds_dir, paths[kind])
    assert added == 3_000 and grow_index(ds_dir, path) == (path, 0)
    trained = {"trained": str(tmp_path / "plain.index.trained"), **IVF} if kind == "plain" else {}
    fresh = build_index(ds_dir, tmp_path / f"fresh-{kind}.index", **trained)
    q = torch.from_numpy(_clustered(40, D, seed=11))
    _same_search(Index.open(path, probe=4), Index.open(fresh, probe=4), q)


def test_grown_shard_set_gains_a_shard_and_equals_one_index(grown, tmp_path):
    ds_dir, _, vals, _, paths = grown
    path, added = grow_index(ds_dir, paths["shards"])
    info, specs = shard_specs(path, ds_dir)
    assert added == 3_000 and [(s["start"], s["stop"]) for s in specs] == [(0, 3_000), (3_000, 6_000), (6_000, 9_000)]
    fresh = build_index(ds_dir, tmp_path / "fresh.index", trained=str(tmp_path / "plain.index.trained"), **IVF)
    q = torch.from_numpy(_clustered(40, D, seed=11))
    scores, values, rows = ShardsMemory(specs, probe=4).search(q, K)
    s_ref, r_ref, _ = Index.open(fresh, probe=4).search(q, K)
    np.testing.assert_array_equal(scores.numpy(), s_ref.numpy())
    np.testing.assert_array_equal(values.numpy(), vals[rows.numpy()])
    assert (rows.numpy() == r_ref.numpy()).mean() > 0.99  # equal apart from exact ties


def test_index_of_another_datastore_is_refused(grown, tmp_path):
    ds_dir, *_, paths = grown
    for backend in ("local", "shards"):  # an index of the datastore before it grew: catch it up
        with pytest.raises(DatastoreError, match="grew since this index was built; run `trime index add"):
            ExternalMemory.open(ds_dir, paths["flat" if backend == "local" else "shards"], k=K, probe=4, dim=D,
                                vocab_size=VOCAB, keytype="last_ffn_input", backend=backend)  # fmt: skip
    other = _build(tmp_path / "other", *_rows(_clustered(500, D, seed=4), 5), "other")
    index = build_index(other, tmp_path / "other.index")
    with pytest.raises(DatastoreError, match="did not grow from"):
        grow_index(ds_dir, index)


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_cli_add_then_evaluate_equals_a_rebuilt_memory(store, tmp_path, capsys):  # noqa: F811
    """trime datastore add (the valid split) + trime index add: evaluation with the grown memory equals
    evaluation with an index built over the grown datastore from scratch."""
    data, ckpt, dstore, _, ds_cfg = store
    ds = shutil.copytree(dstore, tmp_path / "ds")
    flags = ["--path", str(ckpt), "--out", str(ds), "--context-window", "8", "--max-sentences", "3",
             "--key-dtype", "float32", "--device", "cpu", "--amp", "none"]  # fmt: skip
    assert main(["datastore", "add", str(data), "--gen-subset", "valid", *flags]) == 0
    assert main(["datastore", "add", str(data), "--gen-subset", "valid", *flags]) == 0  # holds it: nothing done
    assert main(["index", "add", str(ds)]) == 0
    out = capsys.readouterr().out
    valid = np.load(data / "valid.npy").size
    assert f"{Datastore.open(dstore).rows + valid} rows" in out and f"{valid} rows added" in out
    assert main(["datastore", "add", str(data), "--gen-subset", "train", *flags]) == 2
    assert "already holds this text" in capsys.readouterr().err
    fresh = build_index(ds, tmp_path / "fresh.index")
    grown = evaluate(ecfg(store, dstore=str(ds), indexfile=str(ds / "knn.index.ip"), use_external=True))
    rebuilt = evaluate(ecfg(store, dstore=str(ds), indexfile=str(fresh), use_external=True))
    np.testing.assert_array_equal(grown.log_probs, rebuilt.log_probs)
    base = evaluate(ecfg(store, use_external=True))
    assert not np.array_equal(grown.log_probs, base.log_probs)  # the added rows are found
    # trime explain shows an added row's text from the split it came from
    from trime.explain.report import explain_tokens

    rows = Datastore.open(dstore).rows
    report = explain_tokens(C.build(C.ExplainConfig, {"data": str(data), "path": str(ckpt), "device": "cpu",
                                                      "gen_subset": "valid", "max_eval_tokens": 64, "k": 8,
                                                      "use_external": True, "dstore": str(ds), "snippet": 2,
                                                      "indexfile": str(ds / "knn.index.ip"),
                                                      "dstore_data": str(data)}))  # fmt: skip
    added = {int(r): sn for r, sn in report["snippets"].items() if int(r) >= rows + 2}
    assert added, "no neighbour among the added rows"
    for row, (start, toks) in added.items():
        assert start == row - 2 and toks == np.load(data / "valid.npy")[row - rows - 2 : row - rows + 3].tolist()


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_mt_datastore_add_appends_the_split(tmp_path):
    """trime mt datastore --add: the valid split's target states follow the training rows, equal to a
    datastore of the valid split alone."""
    from trime.data.pairs import prepare_pairs
    from trime.model.encoder_decoder import MTModelConfig
    from trime.translation import fit_translation

    from tests.test_translation import RAW, TINY, _cfg

    pairs = prepare_pairs(RAW, tmp_path / "data", source_lang="es", target_lang="en", bpe_merges=100,
                          allow_empty=True)  # fmt: skip
    run = fit_translation(MTModelConfig(**TINY), _cfg(pairs, tmp_path / "run", max_update=2, eval_bleu=False))
    flags = [str(pairs), "--path", str(run / "checkpoint_last"), "--key-dtype", "float32"]
    assert main(["mt", "datastore", *flags, "--out", str(tmp_path / "ds")]) == 0
    assert main(["mt", "datastore", *flags, "--out", str(tmp_path / "ds"), "--gen-subset", "valid", "--add"]) == 0
    assert main(["mt", "datastore", *flags, "--out", str(tmp_path / "valid"), "--gen-subset", "valid"]) == 0
    train, grown, valid = (Datastore.open(tmp_path / n) for n in ("ds/part0", "ds", "valid"))
    assert grown.rows == train.rows + valid.rows
    np.testing.assert_array_equal(grown.read_keys(train.rows, grown.rows), valid.read_keys(0, valid.rows))
    np.testing.assert_array_equal(grown.values[train.rows :].numpy(), valid.values.numpy())
