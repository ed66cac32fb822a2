"""Memory backends: the merged top-k of 1, 2 and 4 shards (in process and on Ray) is the top-k of one
index with the same trained quantizers and nprobe, apart from exact ties; shard sets are artifacts."""

import shutil

import numpy as np
import pytest
import torch

from trime import config as C
from trime.errors import ConfigError, DatastoreError
from trime.evaluate import evaluate
from trime.memory.backends import BACKENDS
from trime.memory.datastore import Datastore
from trime.memory.external import ExternalMemory
from trime.memory.index import build_index
from trime.memory.shard import merge_topk

from tests.memory.test_index import _clustered, _datastore, _one_faiss_thread  # noqa: F401  (autouse)
from tests.test_external import ecfg, store  # noqa: F401  (the micro model and its datastore)

K, PROBE, VOCAB = 32, 4, 100
IVF = {
    "flat_below": 0,
    "n_lists": 64,
    "code_size": 4,
    "train_size": 12_000,
    "probe": PROBE,
}  # one trained index for all


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """12k × 16-d clustered keys; one IVF-PQ index, and shard sets of 2 and 4 from its trained quantizers."""
    root = tmp_path_factory.mktemp("backends")
    ds = _datastore(root / "ds", _clustered(12_000, 16), vocab=VOCAB)
    one = build_index(ds, root / "one.index", **IVF)
    trained = str(root / "one.index.trained")
    sharded = {n: build_index(ds, root / f"s{n}.index", shards=n, trained=trained, **IVF) for n in (2, 4)}
    queries = torch.from_numpy(_clustered(60, 16, seed=5))  # (60, 16)
    return ds, one, {1: one, **sharded}, queries


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'trime[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _open(ds, indexfile, backend, k=K):
    return ExternalMemory.open(ds, indexfile, k=k, probe=PROBE, dim=16, vocab_size=VOCAB, keytype="last_ffn_input",
                               backend=backend)  # fmt: skip


def _assert_same_topk(ref, got, values):
    """Scores equal; rows equal except among exact ties (the same score at the cut or inside the list)."""
    (s_ref, _, r_ref), (s, v, r) = ref, got
    np.testing.assert_array_equal(s.numpy(), s_ref.numpy())
    for i in range(s.shape[0]):
        for score in np.unique(s_ref[i].numpy()):
            at = s_ref[i].numpy() == score
            if score == s_ref[i, -1].item():  # at the cut, which of the tied rows made it is arbitrary
                continue
            assert set(r[i].numpy()[at]) == set(r_ref[i].numpy()[at])
    np.testing.assert_array_equal(v.numpy(), values[r.clamp(min=0)].numpy())


def _search(ds, path, backend, queries):
    ext = _open(ds, path, backend)
    try:
        return ext.search_rows(queries)
    finally:
        getattr(ext.backend, "close", lambda: None)()


@pytest.mark.parametrize("n", [1, 2, 4])
def test_shards_in_process_equal_one_index(sets, n):
    ds, one, paths, q = sets
    ref = _search(ds, one, "local", q)
    assert (ref[2] >= 0).all() and ref[0].shape == (60, K)
    _assert_same_topk(ref, _search(ds, paths[n], "shards", q), Datastore.open(ds).values)


@pytest.mark.slow
def test_ray_shards_equal_one_index(sets, ray_local):
    ds, one, paths, q = sets
    ref = _search(ds, one, "local", q)
    values = Datastore.open(ds).values
    for n in (1, 2, 4):
        _assert_same_topk(ref, _search(ds, paths[n], "ray", q), values)
    with pytest.raises(ConfigError, match="4 shards × 1 CPUs do not fit the 2 CPUs free in the Ray cluster"):
        ExternalMemory.open(ds, paths[4], k=K, probe=PROBE, dim=16, vocab_size=VOCAB, keytype="last_ffn_input",
                            backend="ray", ray_cpus=1)  # fmt: skip


def test_merge_keeps_the_best_and_holes_last():
    a = (np.array([[3.0, 1.0]], np.float32), np.array([[7, 8]]), np.array([[0, 1]]))
    b = (np.array([[2.0, -np.inf]], np.float32), np.array([[9, 0]]), np.array([[5, -1]]))
    s, v, r = merge_topk([a, b], 3)
    assert s.tolist() == [[3.0, 2.0, 1.0]] and v.tolist() == [[7, 9, 8]] and r.tolist() == [[0, 5, 1]]


def test_flat_shards_are_exact(tmp_path):
    keys = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    ds = _datastore(tmp_path / "ds", keys, vocab=VOCAB)
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32))
    for metric in ("ip", "l2"):
        one = build_index(ds, tmp_path / f"{metric}.index", metric=metric)
        three = build_index(ds, tmp_path / f"{metric}3.index", metric=metric, shards=3)
        ext = ExternalMemory.open(ds, three, k=10, probe=1, dim=8, vocab_size=VOCAB, keytype="last_ffn_input",
                                  backend="shards")  # fmt: skip
        got = ext.search_rows(q)
        ref = ExternalMemory.open(ds, one, k=10, probe=1, dim=8, vocab_size=VOCAB, keytype="last_ffn_input")
        np.testing.assert_allclose(got[0].numpy(), ref.search_rows(q)[0].numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(got[2].numpy(), ref.search_rows(q)[2].numpy())


def test_shard_sets_are_artifacts(sets, tmp_path):
    ds, one, paths, q = sets
    with pytest.raises(ConfigError, match="is a set of 2 shards; search it with --memory-backend shards or ray"):
        _open(ds, paths[2], "local")
    assert (
        build_index(ds, paths[2], shards=2, trained=str(one) + ".trained", **IVF) == paths[2]
    )  # fmt: skip  (complete: returned as is)
    # a shard replaced by another set's is refused in one line
    root = tmp_path / "mixed"
    root.mkdir()
    for p in paths[2].parent.glob(paths[2].name + "*"):
        shutil.copy(p, root / p.name)
    shutil.copy(paths[4].with_name(paths[4].name + ".shard-0-of-4"), root / (paths[2].name + ".shard-0-of-2"))
    with pytest.raises(DatastoreError, match="stale or mixed shards"):
        _open(ds, root / paths[2].name, "shards")
    # building again replaces the foreign shard (only it) and the set opens
    kept = (root / (paths[2].name + ".shard-1-of-2")).stat().st_mtime_ns
    build_index(ds, root / paths[2].name, shards=2, trained=str(one) + ".trained", **IVF)
    assert (root / (paths[2].name + ".shard-1-of-2")).stat().st_mtime_ns == kept
    _assert_same_topk(
        _search(ds, one, "local", q), _search(ds, root / paths[2].name, "shards", q), Datastore.open(ds).values
    )
    with pytest.raises(ConfigError, match="needs --trained|trained for"):
        build_index(ds, tmp_path / "bad.index", flat_below=0, n_lists=32, code_size=4, train_size=12_000,
                    trained=str(one) + ".trained")  # fmt: skip


def test_config_choices_are_the_backends():
    field = {f.name: f for f in C.dataclasses.fields(C.EvalConfig)}["memory_backend"]
    assert field.metadata["choices"] == BACKENDS == C.MEMORY_BACKENDS
    with pytest.raises(ConfigError):
        C.build(C.TranslateConfig, {"memory_backend": "http"})


@pytest.mark.slow
def test_evaluation_gives_the_same_perplexity_through_every_backend(ray_local, store, tmp_path):  # noqa: F811
    st = store
    two = build_index(st[2], tmp_path / "knn.index.ip", metric="ip", shards=2)
    base = evaluate(ecfg(st, use_external=True, use_interp=True, lmbda=0.25))
    for backend in ("shards", "ray"):
        res = evaluate(
            ecfg(st, use_external=True, use_interp=True, lmbda=0.25, memory_backend=backend, indexfile=str(two))
        )
        np.testing.assert_allclose(res.log_probs, base.log_probs, rtol=0, atol=2e-5)
        assert res.ppl == pytest.approx(base.ppl, rel=1e-5)


@pytest.mark.parametrize("command", ["reproduce", "mt reproduce"])
def test_both_jobs_take_the_backend_flags_over_their_preset(command, monkeypatch, tmp_path):
    """``trime reproduce`` / ``trime mt reproduce --memory-backend ray ...`` reach the job's [reproduce]
    table (which every evaluation and translation of the job is built from); flags not given leave it."""
    from trime import cli
    from trime.pipelines import mt_reproduce, reproduce

    seen = {}
    pipeline = reproduce.Pipeline if command == "reproduce" else mt_reproduce.MTPipeline

    def stop(self, *a, **kw):
        seen["rc"] = self.rc
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "prepare_data", stop)
    preset = "micro" if command == "reproduce" else "mt_micro"
    argv = [*command.split(), "--preset", preset, "--out", str(tmp_path)]
    assert cli.main([*argv, "--memory-backend", "ray", "--ray-address", "auto", "--ray-shard-cpus", "1"]) == 130
    assert (seen["rc"].memory_backend, seen["rc"].ray_address, seen["rc"].ray_shard_cpus) == ("ray", "auto", 1.0)
    assert cli.main(argv) == 130 and seen["rc"].memory_backend == "local"


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_shards_added_by_two_torchrun_ranks_or_machines_equal_one_process(sets, tmp_path):
    """`trime index build --shards 4` under torchrun (2 gloo ranks: rank r adds shards r, r + 2), or as
    `--only-shards` runs on several machines then one run that writes the manifest, writes the shard
    files one process writes, byte for byte."""
    import subprocess
    import sys

    from trime.cli import main

    ds, one, paths, _ = sets  # paths[4]: the shard set one process built with these settings (IVF)
    flags = ["--shards", "4", "--ncentroids", "64", "--code-size", "4", "--train-size", "12000", "--probe", "4",
             "--trained", str(one) + ".trained", "--use-gpu", "no"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trime"]
    run = subprocess.run([*torchrun, "index", "build", str(ds), "--out", str(tmp_path / "two.index"), *flags],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert main(["index", "build", str(ds), "--out", str(tmp_path / "m.index"), *flags, "--only-shards", "1,3"]) == 0
    assert not (tmp_path / "m.index.json").exists()  # no manifest until every shard is there
    assert main(["index", "build", str(ds), "--out", str(tmp_path / "m.index"), *flags, "--only-shards", "0,2"]) == 0
    assert main(["index", "build", str(ds), "--out", str(tmp_path / "m.index"), *flags]) == 0  # (the last one did)
    for name in ("two", "m"):
        for s in range(4):
            a, b = paths[4].with_name(f"s4.index.shard-{s}-of-4"), tmp_path / f"{name}.index.shard-{s}-of-4"
            assert a.read_bytes() == b.read_bytes(), (name, s)
    assert main(["index", "build", str(ds), "--out", str(tmp_path / "x.index"), *flags, "--only-shards", "4"]) == 2
