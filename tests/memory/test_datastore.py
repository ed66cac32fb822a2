"""Datastore writer / reader: resumable, exact row count, shards, compatibility (spec §6.1)."""

import json

import numpy as np
import pytest
import torch

from trime.errors import DatastoreError
from trime.io import shard_range
from trime.memory.datastore import Datastore, DatastoreWriter, build_datastore, merge_shards, resume_from

D, ROWS, BLOCK, VOCAB = 8, 103, 10, 50
META = {"key_type": "last_ffn_input", "vocab_size": VOCAB, "model_fingerprint": "m1", "split_fingerprint": "s1"}


def _blocks(fail_at=None, seen=None):
    """Deterministic (row_start, keys, values) blocks; the last one is partial (3 rows)."""
    g = torch.Generator().manual_seed(0)
    for start in range(0, ROWS, BLOCK):
        n = min(BLOCK, ROWS - start)
        keys, vals = torch.randn(n, D, generator=g), torch.randint(4, VOCAB, (n,), generator=g)
        if start == fail_at:
            raise RuntimeError("killed")
        if seen is not None:
            seen.append(start)
        yield start, keys, vals


def _all():
    ks, vs = zip(*[(k, v) for _, k, v in _blocks()])
    return torch.cat(ks), torch.cat(vs)


def test_resume_after_interruption_is_byte_identical(tmp_path, monkeypatch):
    ref = build_datastore(_blocks(), tmp_path / "ref", D, ROWS, META, flush_rows=20)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        build_datastore(_blocks(fail_at=60), out, D, ROWS, META, flush_rows=20)
    assert not (out / "meta.json").exists()
    with pytest.raises(DatastoreError, match="incomplete"):
        Datastore.open(out)
    assert resume_from(out, ROWS) == 60  # blocks before the failure were flushed on the way out
    written, write = [], DatastoreWriter.write
    monkeypatch.setattr(DatastoreWriter, "write", lambda self, r, k, v: written.append(r) or write(self, r, k, v))
    build_datastore(_blocks(), out, D, ROWS, META, flush_rows=20)
    assert written == [60, 70, 80, 90, 100]  # only the missing blocks are written again
    for name in ("keys.npy", "vals.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert not (out / "progress.json").exists()
    ds = Datastore.open(out)
    keys, vals = _all()
    assert len(ds) == ROWS and ds.values.dtype == torch.int64
    assert torch.equal(ds.values, vals)
    np.testing.assert_array_equal(ds.read_keys(0, ROWS), keys.half().float().numpy())
    assert np.load(out / "vals.npy").dtype == np.int32 and np.load(out / "keys.npy").dtype == np.float16


def test_hard_kill_only_trusts_recorded_progress(tmp_path):
    out = tmp_path / "ds"
    w = DatastoreWriter(out, D, expected_rows=ROWS, meta=META, flush_rows=25)
    for start, k, v in _blocks():
        if start == 50:
            break  # killed: no close(); 30 rows flushed and recorded, rows 30..49 only in memory
        w.write(start, k, v)
    del w
    assert json.loads((out / "progress.json").read_text())["ranges"] == [[0, 30]]
    assert resume_from(out, ROWS) == 30
    build_datastore(_blocks(), out, D, ROWS, META)
    ref = build_datastore(_blocks(), tmp_path / "ref", D, ROWS, META)
    assert (out / "keys.npy").read_bytes() == (ref / "keys.npy").read_bytes()


def test_finalize_refuses_missing_rows_and_checks_blocks(tmp_path):
    w = DatastoreWriter(tmp_path / "ds", D, expected_rows=20, meta=META, key_dtype="float32")
    w.write(0, torch.randn(10, D), torch.arange(10))
    with pytest.raises(DatastoreError, match="10 of 20 rows were never written"):
        w.finalize()
    with pytest.raises(DatastoreError, match="outside"):
        w.write(15, torch.randn(10, D), torch.arange(10))
    with pytest.raises(DatastoreError, match="does not fit dim"):
        w.write(10, torch.randn(10, D + 1), torch.arange(10))
    w.write(10, np.ones((10, D)), np.arange(10))  # numpy blocks work too
    assert w.finalize()["rows"] == 20
    w2 = DatastoreWriter(tmp_path / "fp16", D, expected_rows=2)
    with pytest.raises(DatastoreError, match="float32"):
        w2.write(0, torch.full((2, D), 1e6), torch.arange(2))


def test_rerun_of_complete_build_and_mismatch(tmp_path):
    out = build_datastore(_blocks(), tmp_path / "ds", D, ROWS, META)
    seen = []
    assert build_datastore(_blocks(seen=seen), out, D, ROWS, META) == out and seen == []
    assert resume_from(out, ROWS) == ROWS
    with pytest.raises(DatastoreError, match="model_fingerprint"):
        build_datastore(_blocks(), out, D, ROWS, {**META, "model_fingerprint": "other"})
    with pytest.raises(DatastoreError, match="already there"):
        DatastoreWriter(out, D, expected_rows=ROWS)
    with pytest.raises(DatastoreError, match="other settings"):
        w = DatastoreWriter(tmp_path / "p", D, expected_rows=ROWS, flush_rows=1)
        w.write(0, torch.randn(2, D), torch.arange(2))
        DatastoreWriter(tmp_path / "p", D + 1, expected_rows=ROWS)


def test_shard_range_partitions():
    for n, world in [(103, 3), (5, 4), (0, 2), (7, 1)]:
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_shards_read_as_one(tmp_path):
    out, world = tmp_path / "ds", 3
    for rank in range(world):  # each rank sees every block and keeps its rows (34 / 34 / 35)
        build_datastore(_blocks(), out, D, ROWS, META, rank=rank, world=world)
    with pytest.raises(DatastoreError, match="shard 3 of 4"):
        merge_shards(out, 4)
    meta = merge_shards(out, world)
    assert meta["rows"] == ROWS and meta["shards"] == ["shard0", "shard1", "shard2"]
    ds, single = Datastore.open(out), Datastore.open(build_datastore(_blocks(), tmp_path / "one", D, ROWS, META))
    assert torch.equal(ds.values, single.values)
    np.testing.assert_array_equal(ds.read_keys(20, 90), single.read_keys(20, 90))
    rows = np.array([0, 33, 34, 35, 68, 69, 102])
    np.testing.assert_array_equal(ds.take_keys(rows), single.read_keys(0, ROWS)[rows])
    ids = torch.tensor([[0, 102], [34, 69]])
    assert torch.equal(ds.lookup(ids), single.values[ids])


def test_check_compatible_names_the_difference(tmp_path):
    ds = Datastore.open(build_datastore(_blocks(), tmp_path / "ds", D, ROWS, META))
    ds.check_compatible(D, VOCAB, "last_ffn_input", "m1")
    ds.check_compatible(D, VOCAB, "last_ffn_input")  # fingerprint unknown: not checked
    for args, what in [
        ((D + 1, VOCAB, "last_ffn_input"), "dimension"),
        ((D, VOCAB, "final"), "key type"),
        ((D, VOCAB + 1, "last_ffn_input"), "vocabulary"),
        ((D, VOCAB, "last_ffn_input", "m2"), "not this model"),
    ]:
        with pytest.raises(DatastoreError, match=what):
            ds.check_compatible(*args)
    small = Datastore.open(build_datastore(_blocks(), tmp_path / "nometa", D, ROWS, {}))
    with pytest.raises(DatastoreError, match="outside the model's vocabulary"):
        small.check_compatible(D, 10, "last_ffn_input")
