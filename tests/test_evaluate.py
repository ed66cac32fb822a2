"""trime eval against brute force: windows, vanilla scoring, local memory, long-term FIFO."""

import math

import numpy as np
import pytest
import torch

from trime import config as C
from trime.checkpoint import load_model
from trime.data.blocks import eval_windows
from trime.data.prepare import load_split
from trime.evaluate import evaluate

from reference import window
from tests.fixtures import make_data, micro_checkpoint
from tests.reference import joint_log_prob as ref_joint
from tests.test_external import store  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_data(root, n_lines=120)
    return data, micro_checkpoint(root, data)


def eval_cfg(data, ckpt, **kw):
    return C.build(C.EvalConfig, {"data": str(data), "path": str(ckpt), "device": "cpu", "gen_subset": "valid"}, kw)


def reference(data, ckpt, L, Cw, mode="none", local=False, mem_size=0, temp=1.0):
    """Score every window with plain loops over positions and memory entries."""
    model, _, _ = load_model(ckpt)
    tokens = load_split(data, "valid")
    fifo_k, fifo_v, out = [], [], []
    for s, e, c in eval_windows(tokens, L, Cw, mode):
        inp, _ = window(tokens, int(s), int(e), int(c))
        labels = np.asarray(tokens[s - c : e], dtype=np.int64)
        with torch.no_grad():
            o = model(torch.from_numpy(inp)[None])
            w = model.head.output_weight()
            logits = (o.h[0] @ w.T).double()  # (T, V)
        q = o.q[0].double()
        d = q.shape[1]
        new_k, new_v = [], []
        for i in range(c, c + e - s):
            y = int(labels[i])
            log_z = torch.logsumexp(logits[i], 0).item()
            tlp = logits[i, y].item() - log_z
            if not local:
                out.append(tlp)
                continue
            scores = [(q[i] @ q[j]).item() / math.sqrt(d) / temp for j in range(i)]
            values = [int(labels[j]) for j in range(i)]
            scores += [(q[i] @ k).item() / math.sqrt(d) / temp for k in fifo_k]
            values += fifo_v
            out.append(ref_joint([tlp], [log_z], [scores], [values], [y])[0] if scores else tlp)
            new_k.append(q[i])
            new_v.append(y)
        if mem_size:
            fifo_k, fifo_v = (fifo_k + new_k)[-mem_size:], (fifo_v + new_v)[-mem_size:]
    return np.array(out)


@pytest.mark.parametrize("mode,Cw", [("none", 0), ("none", 16), ("complete", 20)])
def test_vanilla_matches_position_by_position(setup, mode, Cw):
    data, ckpt = setup
    res = evaluate(eval_cfg(data, ckpt, context_window=Cw, sample_break_mode=mode, batch_size=3))
    ref = reference(data, ckpt, 32, Cw, mode)
    assert res.n_tokens == len(load_split(data, "valid")) == len(ref)
    np.testing.assert_allclose(res.log_probs, ref, atol=2e-5)
    assert res.loss == pytest.approx(-ref.mean() / math.log(2), rel=1e-5)
    assert res.line().startswith(f"Loss (base 2): {res.loss:.4f}, Perplexity: {2**res.loss:.2f}")


def test_local_memory_matches_brute_force(setup):
    data, ckpt = setup
    res = evaluate(eval_cfg(data, ckpt, context_window=16, use_local=True, softmax_temp=0.7, batch_size=2))
    np.testing.assert_allclose(res.log_probs, reference(data, ckpt, 32, 16, local=True, temp=0.7), atol=2e-5)


def test_long_memory_fifo_matches_brute_force(setup):
    data, ckpt = setup
    res = evaluate(eval_cfg(data, ckpt, context_window=16, use_local=True, use_long=True, mem_size=40))
    ref = reference(data, ckpt, 32, 16, local=True, mem_size=40)
    np.testing.assert_allclose(res.log_probs, ref, atol=2e-5)
    plain = evaluate(eval_cfg(data, ckpt, context_window=16, use_local=True))
    assert not np.allclose(plain.log_probs, res.log_probs)


def test_word_probs_file_and_token_limit(setup, tmp_path):
    data, ckpt = setup
    out = tmp_path / "wp.npy"
    res = evaluate(eval_cfg(data, ckpt, max_eval_tokens=50, output_word_probs=str(out)))
    assert res.n_tokens == 50
    np.testing.assert_array_equal(np.load(out), res.log_probs)


def test_wrong_dictionary_is_a_clear_error(setup, tmp_path):
    from trime.data.prepare import prepare_corpus
    from trime.errors import DataError

    from tests.fixtures import make_corpus

    data, ckpt = setup
    corpus = make_corpus(tmp_path / "c", n_lines=30)
    (corpus / "train.txt").write_text("other words entirely\n" * 5)
    other = prepare_corpus(corpus, tmp_path / "other")
    with pytest.raises(DataError, match="dictionary"):
        evaluate(eval_cfg(other, ckpt))


@pytest.mark.parametrize("flags", [{"batch_size": 3}, {"use_local": True, "use_long": True, "mem_size": 40}])
def test_overlapped_search_gives_the_sequential_log_probs(store, flags):  # noqa: F811
    """The external search of batch i in a thread while batch i + 1's forward runs changes nothing."""
    from trime.data.batching import make_batch
    from trime.evaluate import Scorer, score_batches
    from trime.jobs import open_model

    data, ckpt, dstore, index, _ = store
    cfg = C.build(C.EvalConfig, {"data": str(data), "path": str(ckpt), "device": "cpu", "context_window": 16,
                                 "dstore": str(dstore), "indexfile": str(index), "k": 8, "use_external": True,
                                 "use_interp": True, "lmbda": 0.25}, flags)  # fmt: skip
    job = open_model(cfg, data=cfg.data)
    tokens = job.split(cfg.gen_subset, cfg.max_eval_tokens)
    windows = job.windows(tokens, cfg.sample_break_mode)
    size = 1 if cfg.use_long else cfg.batch_size
    pad, eos = job.pad_eos
    got = {}
    for overlap in (False, True):
        scorer = Scorer(job.model, cfg, dim=job.model_cfg.d_model, pad=pad, external=job.external())
        batches = (make_batch(tokens, windows[i : i + size], pad=pad, eos=eos) for i in range(0, len(windows), size))
        got[overlap] = torch.cat([lp for _, lp in score_batches(scorer, batches, overlap=overlap)])
    assert len(got[True]) == len(tokens) and torch.equal(got[True], got[False])
    assert torch.equal(got[True], torch.from_numpy(evaluate(cfg).log_probs))
