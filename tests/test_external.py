"""External memory end to end: datastore from a model, flat index, joint softmax and kNN-LM."""

import math

import numpy as np
import pytest
import torch

from trime import config as C
from trime.checkpoint import load_model
from trime.data.blocks import eval_windows
from trime.data.prepare import load_split
from trime.datastore_build import build_datastore
from trime.errors import DatastoreError
from trime.evaluate import evaluate
from trime.memory.datastore import Datastore
from trime.memory.index import build_index

from reference import window
from tests.fixtures import make_data, micro_checkpoint
from tests.reference import joint_log_prob as ref_joint


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    data = make_data(root, n_lines=120)
    ckpt = micro_checkpoint(root, data)
    ds_cfg = C.DatastoreConfig(
        data=str(data),
        path=str(ckpt),
        out=str(root / "dstore"),
        context_window=8,
        batch_size=3,
        key_dtype="float32",
        device="cpu",
        amp="none",
    )
    dstore = build_datastore(ds_cfg)
    index = build_index(dstore, root / "dstore" / "knn.index.ip", metric="ip")
    return data, ckpt, dstore, index, ds_cfg


def test_datastore_rows_are_every_training_token(store):
    data, ckpt, dstore, _, _ = store
    tokens = load_split(data, "train")
    ds = Datastore.open(dstore)
    assert len(ds) == len(tokens)
    assert ds.values.numpy().tolist() == np.asarray(tokens).tolist()
    model, _, _ = load_model(ckpt)
    s, e, c = eval_windows(tokens, 32, 8)[5]
    inp, _ = window(tokens, int(s), int(e), int(c))
    with torch.no_grad():
        q = model(torch.from_numpy(inp)[None]).q[0, c:]
    np.testing.assert_allclose(ds.read_keys(int(s), int(e)), q.numpy(), atol=1e-5)


def test_datastore_resume_gives_identical_files(store, tmp_path):
    data, ckpt, dstore, _, ds_cfg = store
    import trime.memory.datastore as mds

    real = mds.DatastoreWriter.write
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    cfg = C.build(C.DatastoreConfig, C.to_dict(ds_cfg), {"out": str(tmp_path / "d")})
    mds.DatastoreWriter.write = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            build_datastore(cfg)
    finally:
        mds.DatastoreWriter.write = real
    build_datastore(cfg)
    for name in ("keys.npy", "vals.npy"):
        assert (tmp_path / "d" / name).read_bytes() == (dstore / name).read_bytes()


def ext_reference(data, ckpt, dstore, k, temp, lmbda=0.0, interp_temp=1.0, use_external=True):
    """Exact neighbours by brute force, then the joint softmax and the kNN mixture by loops."""
    model, _, _ = load_model(ckpt)
    keys = torch.from_numpy(Datastore.open(dstore).read_keys(0, len(Datastore.open(dstore)))).double()
    vals = Datastore.open(dstore).values
    tokens = load_split(data, "valid")
    out = []
    for s, e, c in eval_windows(tokens, 32, 16):
        inp, _ = window(tokens, int(s), int(e), int(c))
        with torch.no_grad():
            o = model(torch.from_numpy(inp)[None])
        logits = (o.h[0] @ model.head.output_weight().T).double()
        q = o.q[0].double()
        for i in range(c, c + e - s):
            y = int(tokens[s - c + i])
            log_z = torch.logsumexp(logits[i], 0).item()
            tlp = logits[i, y].item() - log_z
            sims = keys @ q[i]
            top = torch.topk(sims, k).indices
            raw = [sims[j].item() for j in top]
            nv = [int(vals[j]) for j in top]
            lp = (
                ref_joint([tlp], [log_z], [[r / math.sqrt(q.shape[1]) / temp for r in raw]], [nv], [y])[0]
                if use_external
                else tlp
            )
            if lmbda:
                pk = sum(math.exp(r / interp_temp) for r, v in zip(raw, nv) if v == y) / sum(
                    math.exp(r / interp_temp) for r in raw
                )
                lp = math.log((1 - lmbda) * math.exp(lp) + lmbda * pk)
            out.append(lp)
    return np.array(out)


def ecfg(store, **kw):
    data, ckpt, dstore, index, _ = store
    base = {
        "data": str(data),
        "path": str(ckpt),
        "device": "cpu",
        "context_window": 16,
        "dstore": str(dstore),
        "indexfile": str(index),
        "k": 8,
    }
    return C.build(C.EvalConfig, base, kw)


def test_external_joint_softmax_matches_brute_force(store):
    data, ckpt, dstore, _, _ = store
    res = evaluate(ecfg(store, use_external=True, softmax_temp=1.3))
    np.testing.assert_allclose(res.log_probs, ext_reference(data, ckpt, dstore, 8, 1.3), atol=5e-5)


def test_interpolation_matches_brute_force_and_lambda_zero_is_identity(store):
    data, ckpt, dstore, _, _ = store
    res = evaluate(ecfg(store, use_external=True, use_interp=True, lmbda=0.25, interp_temp=2.0))
    ref = ext_reference(data, ckpt, dstore, 8, 1.0, lmbda=0.25, interp_temp=2.0)
    np.testing.assert_allclose(res.log_probs, ref, atol=5e-5)
    knn_only = evaluate(ecfg(store, use_interp=True, lmbda=0.25, interp_temp=2.0))  # kNN-LM on the plain model
    np.testing.assert_allclose(
        knn_only.log_probs, ext_reference(data, ckpt, dstore, 8, 1.0, 0.25, 2.0, False), atol=5e-5
    )
    zero = evaluate(ecfg(store, use_external=True, use_interp=True, lmbda=0.0))
    plain = evaluate(ecfg(store, use_external=True))
    np.testing.assert_array_equal(zero.log_probs, plain.log_probs)


def test_mismatched_datastore_is_refused(store, tmp_path):
    data, ckpt, dstore, index, _ = store
    other = micro_checkpoint(tmp_path, data, d_model=16)
    with pytest.raises(DatastoreError, match="dimension"):
        evaluate(C.build(C.EvalConfig, C.to_dict(ecfg(store, use_external=True)), {"path": str(other)}))


def test_sweep_from_cached_neighbors_equals_a_full_rerun(store, tmp_path):
    from trime.memory.neighbors import NeighborCache, sweep

    flags = dict(use_local=True, use_long=True, mem_size=40, use_external=True, use_interp=True)
    cache = tmp_path / "nb"
    evaluate(ecfg(store, **flags, lmbda=0.2, save_neighbors=str(cache), neighbors_top=0))
    grid = [
        {"softmax_temp": 0.8, "lmbda": 0.3, "interp_temp": 2.0},
        {"softmax_temp": 1.4, "lmbda": 0.1, "interp_temp": 1.0},
    ]
    rows = sweep(NeighborCache.load(cache), grid)
    for row, setting in zip(rows, grid):
        full = evaluate(ecfg(store, **flags, **setting))
        assert row["n_tokens"] == full.n_tokens
        assert row["nll_sum"] / row["n_tokens"] == pytest.approx(-full.log_probs.astype(np.float64).mean(), abs=1e-5)
