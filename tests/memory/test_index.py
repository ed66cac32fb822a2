"""faiss index: sizing, exact flat search, IVF-PQ recall, holes, stages, resume (spec §6.2, §6.3)."""

import numpy as np
import pytest
import torch

from trime.errors import ConfigError, DatastoreError
from trime.memory import index as index_mod
from trime.memory.datastore import Datastore, build_datastore
from trime.memory.index import Index, auto_code_size, auto_n_lists, build_index, plan_index


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """faiss's OpenMP threads spin; on a shared 2-core machine one thread is several times faster."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _datastore(path, keys: np.ndarray, vocab: int = 100):
    n, d = keys.shape
    vals = np.random.default_rng(1).integers(4, vocab, n)
    blocks = (
        (a, torch.from_numpy(keys[a : a + 1000]), torch.from_numpy(vals[a : a + 1000])) for a in range(0, n, 1000)
    )
    return build_datastore(blocks, path, d, n, {"key_type": "last_ffn_input", "vocab_size": vocab}, key_dtype="float32")


def _clustered(n, d, n_clusters=64, latent=4, seed=0):
    """Keys like a model's: 64 clusters, each a 4-d patch (random linear map) plus small noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32) * 3
    maps = rng.standard_normal((n_clusters, latent, d)).astype(np.float32)
    label, z = rng.integers(0, n_clusters, n), rng.standard_normal((n, latent)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((n, d)).astype(np.float32)
    return (centres[label] + np.einsum("nl,nld->nd", z, maps[label]) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """20k × 32-d clustered keys, a flat and an auto-sized IVF-PQ index over them."""
    root = tmp_path_factory.mktemp("big")
    keys = _clustered(20_000, 32)
    ds = _datastore(root / "ds", keys)
    flat = build_index(ds, root / "flat.index")
    ivf = build_index(ds, root / "ivf.index", flat_below=0, train_size=10_000)
    return keys, ds, flat, ivf


def test_sizing_rules():
    assert auto_n_lists(103_224_461) == 4096 and auto_n_lists(20_000) == 512 and auto_n_lists(300_000) == 2048
    assert all(n * 39 <= r for r in (1000, 20_000, 70_000, 10**6) for n in [auto_n_lists(r)])
    assert auto_n_lists(20_000, n_train=10_000) == 256
    assert auto_code_size(1024) == (64, True) and auto_code_size(512) == (64, True)
    assert auto_code_size(32) == (8, True) and auto_code_size(410) == (41, False) and auto_code_size(6) == (1, True)
    assert plan_index(10_000, 64)["kind"] == "flat" and plan_index(300_000, 1024)["n_lists"] == 2048
    with pytest.raises(ConfigError, match="too few"):
        plan_index(5000, 32, flat_below=0)
    with pytest.raises(ConfigError, match="too few"):
        plan_index(300_000, 32, n_lists=1024, train_size=20_000)
    with pytest.raises(ConfigError, match="must divide"):
        plan_index(300_000, 32, code_size=5)


def test_flat_index_is_exact_for_ip_and_l2(tmp_path):
    keys = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    ds = _datastore(tmp_path / "ds", keys)
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    for metric in ("ip", "l2"):
        idx = Index.open(build_index(ds, tmp_path / f"{metric}.index", metric=metric))
        scores, ids, valid = idx.search(q, 10)
        qn = q.numpy()
        ref = qn @ keys.T if metric == "ip" else -((qn[:, None, :] - keys[None]) ** 2).sum(-1)  # (40, 2000)
        ref_ids = np.argsort(-ref, axis=1)[:, :10]
        assert idx.info["kind"] == "flat" and valid.all() and scores.dtype == torch.float32 and ids.dtype == torch.int64
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(scores.numpy(), np.take_along_axis(ref, ref_ids, 1), rtol=1e-4, atol=1e-3)


def _recall(exact, approx, at):
    """Mean fraction of each query's exact top-``at`` found in its approximate top-k."""
    return float(np.mean([len(set(e[:at].tolist()) & set(a.tolist())) / at for e, a in zip(exact, approx)]))


def test_ivfpq_recall_against_flat(big):
    keys, ds, flat_path, ivf_path = big
    flat, ivf = Index.open(flat_path), Index.open(ivf_path, probe=8)
    # auto sizing: 4·sqrt(20k) = 565 → ≤ 10k training rows / 39 → 256 lists; d = 32 → 8 × 8-bit codes
    assert ivf.info["kind"] == "ivfpq" and ivf.info["n_lists"] == 256 and ivf.info["code_size"] == 8
    q = torch.from_numpy(keys[::40] + 0.3 * np.random.default_rng(7).standard_normal((500, 32)).astype(np.float32))
    _, exact, _ = flat.search(q, 10)
    _, approx, valid = ivf.search(q, 10)
    r10, r1 = _recall(exact, approx, 10), _recall(exact, approx, 1)
    print(f"\nIVF-PQ 256 lists, 8-byte codes, probe 8, 20k x 32-d: 10-recall@10 {r10:.3f}, 1-recall@10 {r1:.3f}")
    assert valid.all() and r10 >= 0.45 and r1 >= 0.65  # measured 0.56 / 0.74 (8 bytes for 32 dims: lossy)
    _, approx32, _ = Index.open(ivf_path, probe=32).search(q, 10)
    assert _recall(exact, approx32, 10) >= r10 - 0.01
    mapped = Index.open(ivf_path, probe=8, mmap=True)  # memory-mapped: same answers
    assert torch.equal(mapped.search(q, 10)[1], approx)


def test_holes_and_k_clamp(big, tmp_path):
    _, ds, _, ivf_path = big
    ivf = Index.open(ivf_path, probe=1)  # one list of ~39 rows: fewer hits than k
    q = torch.from_numpy(Datastore.open(ds).read_keys(0, 5))
    with pytest.warns(UserWarning, match="fewer than k"):
        scores, ids, valid = ivf.search(q, 200)
    assert not valid.all() and valid.any()
    assert torch.isneginf(scores[~valid]).all() and (ids[~valid] == 0).all() and torch.isfinite(scores[valid]).all()
    small = Index.open(build_index(_datastore(tmp_path / "s", np.eye(30, 8, dtype=np.float32)), tmp_path / "s.index"))
    with pytest.warns(UserWarning, match="larger than the index"):
        s, i, v = small.search(np.ones((3, 8), np.float32), 50)
    assert s.shape == (3, 30) and v.all() and sorted(i[0].tolist()) == list(range(30))


def test_trained_stage_is_reused_and_rebuild_is_identical(tmp_path, monkeypatch):
    import faiss

    ds = _datastore(tmp_path / "ds", _clustered(3000, 16))
    opts = dict(flat_below=0, n_lists=16, code_size=4, n_bits=4)
    out = build_index(ds, tmp_path / "a.index", **opts)
    first = out.read_bytes()
    assert (tmp_path / "a.index.trained").exists()
    calls = []
    train = faiss.IndexIVFPQ.train
    monkeypatch.setattr(faiss.IndexIVFPQ, "train", lambda self, x: calls.append(len(x)) or train(self, x))
    assert build_index(ds, out, **opts) == out and out.read_bytes() == first  # complete: nothing redone
    (tmp_path / "a.index.json").unlink()  # as killed before its sidecar: rebuilt from the .trained stage
    (tmp_path / "a.index.building").write_text("{}")  # (the claim such a kill leaves; without it: refused)
    build_index(ds, out, **opts)
    assert calls == [] and out.read_bytes() == first
    build_index(ds, tmp_path / "b.index", **opts, seed=2)  # another path: its own training
    assert calls == [3000]
    with pytest.raises(DatastoreError, match="other settings"):
        build_index(ds, out, **{**opts, "n_lists": 8})


def test_killed_add_resumes_from_partial(tmp_path, monkeypatch):
    ds = _datastore(tmp_path / "ds", _clustered(3000, 16))
    opts = dict(flat_below=0, n_lists=16, code_size=4, n_bits=4, chunk=500, save_every=1000)
    ref = build_index(ds, tmp_path / "ref.index", **opts).read_bytes()
    read, reads = Datastore.read_keys, []

    def failing(self, a, b):
        if a >= 2000 and self.rows == 3000 and len(reads) < 1:
            reads.append(a)
            raise RuntimeError("killed")
        return read(self, a, b)

    monkeypatch.setattr(Datastore, "read_keys", failing)
    with pytest.raises(RuntimeError):
        build_index(ds, tmp_path / "x.index", **opts)
    assert (tmp_path / "x.index.partial").exists() and not (tmp_path / "x.index.json").exists()
    with pytest.raises(DatastoreError, match="no complete index"):
        Index.open(tmp_path / "x.index")
    starts = []
    monkeypatch.setattr(Datastore, "read_keys", lambda self, a, b: starts.append(a) or read(self, a, b))
    out = build_index(ds, tmp_path / "x.index", **opts)
    assert starts == [2000, 2500] and out.read_bytes() == ref and not (tmp_path / "x.index.partial").exists()


def test_check_datastore(big, tmp_path):
    _, ds, flat_path, _ = big
    Index.open(flat_path).check_datastore(Datastore.open(ds))
    other = Datastore.open(_datastore(tmp_path / "o", np.ones((50, 32), np.float32)))
    with pytest.raises(DatastoreError, match="rebuild the index"):
        Index.open(flat_path).check_datastore(other)


def test_no_gpu_asked_without_gpu_faiss(big):
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="GPU"):
        Index.open(big[2], use_gpu=True)
    assert index_mod._gpu_wanted("auto") is False


def test_a_small_search_runs_on_one_thread_and_restores_the_count(tmp_path):
    """Fewer queries than ONE_THREAD_BELOW search on one OpenMP thread, and the count found is restored
    after (faiss's OpenMP setting is torch's too when torch loaded its libgomp first)."""
    import faiss

    keys = _clustered(3000, 16)
    index = Index.open(build_index(_datastore(tmp_path / "ds", keys), tmp_path / "ivf", flat_below=0, n_lists=16,
                                   code_size=4, n_bits=4))  # fmt: skip
    seen, search = [], index.index.search
    index.index = type("Spy", (), {"ntotal": index.index.ntotal, "search": lambda self, x, k: (
        seen.append(faiss.omp_get_max_threads()) or search(x, k))})()  # fmt: skip
    torch_threads = torch.get_num_threads()  # (after torch's own first-use setting of the count)
    faiss.omp_set_num_threads(2)
    try:
        index.search(torch.from_numpy(keys[:3]), 4)
        index.search(torch.from_numpy(keys[: index_mod.ONE_THREAD_BELOW]), 4)
        assert seen == [1, 2] and faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(1)  # this module's setting (_one_faiss_thread)
        torch.set_num_threads(torch_threads)
