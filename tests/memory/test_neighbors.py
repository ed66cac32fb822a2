"""Cached neighbours: re-scoring without the model equals a direct computation (spec §5.4, §5.5)."""

import math

import pytest
import torch

from trime.errors import DataError
from trime.memory.neighbors import NeighborCache, NeighborCacheWriter, rescore, rescore_tokens, select_entries, sweep

D, V = 16, 12


def _windows(seed=0, n_win=4, n=9, k=7):
    """Random evaluation windows: each scored row sees some of M local/long entries."""
    g = torch.Generator().manual_seed(seed)
    for w in range(n_win):
        m = 5 + 3 * w  # the memory grows window by window
        scores = torch.randn(n, m, generator=g) * 2  # raw q·k/√d
        scores[torch.rand(n, m, generator=g) < 0.3] = float("-inf")  # invisible entries
        scores[0] = float("-inf")  # a row with no visible memory
        yield dict(
            tok_logp=-torch.rand(n, generator=g) * 5,
            tok_log_z=torch.randn(n, generator=g),
            targets=torch.randint(0, V, (n,), generator=g),
            mem_scores=scores,
            mem_values=torch.randint(0, V, (m,), generator=g),
            ext_scores=torch.randn(n, k, generator=g) * 30,
            ext_values=torch.randint(0, V, (n, k), generator=g),
        )


def _reference(windows, tau, lam, temp, k, ext_in_joint):
    """Plain loops in float64: the joint softmax, then the kNN-LM mixture."""
    total = 0.0
    for w in windows:
        for i in range(w["targets"].shape[0]):
            y = int(w["targets"][i])
            z_tok, p_tok = math.exp(float(w["tok_log_z"][i])), math.exp(float(w["tok_logp"][i]))
            num, den = z_tok * p_tok, z_tok
            vals = w["mem_values"] if w["mem_values"].dim() == 1 else w["mem_values"][i]  # (M,) or per row
            entries = [(float(s), int(v)) for s, v in zip(w["mem_scores"][i] / tau, vals)]
            top = sorted(range(w["ext_scores"].shape[1]), key=lambda j: -float(w["ext_scores"][i, j]))[:k]
            if ext_in_joint:
                entries += [
                    (float(w["ext_scores"][i, j]) / math.sqrt(D) / tau, int(w["ext_values"][i, j])) for j in top
                ]
            for s, v in entries:
                e = math.exp(s) if s != float("-inf") else 0.0
                den += e
                num += e if v == y else 0.0
            p = num / den
            if lam > 0:
                ws = [math.exp(float(w["ext_scores"][i, j]) / temp) for j in top]
                p_knn = sum(e for e, j in zip(ws, top) if int(w["ext_values"][i, j]) == y) / sum(ws)
                p = (1 - lam) * p + lam * p_knn
            total += math.log(p)
    return total


def _write(path, windows, mem_top=None, ext_in_joint=True, chunk_rows=10):
    with NeighborCacheWriter(path, dim=D, mem_top=mem_top, ext_in_joint=ext_in_joint, chunk_rows=chunk_rows) as w:
        for win in windows:
            w.add(**win)
        w.finalize()
    return NeighborCache.load(path)


def test_rescore_with_all_entries_equals_direct_computation(tmp_path):
    wins = list(_windows())
    cache = _write(tmp_path / "c", wins)
    assert len(cache) == 36 and cache.meta["mem_width"] == 14 and len(cache.meta["chunks"]) == 2
    for tau, lam, temp, k, ext in [
        (1.0, 0.0, 1.0, 7, False),
        (1.3, 0.0, 1.0, 7, True),
        (0.8, 0.3, 10.5, 7, True),
        (1.1, 0.5, 3.0, 3, True),
        (1.2, 0.25, 2.0, 4, False),
    ]:
        got = rescore(cache, tau, lam, temp, k, ext_in_joint=ext)
        assert got == pytest.approx(_reference(wins, tau, lam, temp, k, ext), rel=1e-5, abs=1e-5)


def test_matches_joint_log_prob_and_lambda_zero(tmp_path):
    from trime.memory.joint import joint_log_prob

    wins = list(_windows(seed=3))
    cache = _write(tmp_path / "c", wins, ext_in_joint=False)
    direct = torch.cat(
        [
            joint_log_prob(w["tok_logp"], w["tok_log_z"], w["mem_scores"] / 1.17, w["mem_values"], w["targets"])
            for w in wins
        ]
    )
    torch.testing.assert_close(rescore_tokens(cache, 1.17), direct, atol=1e-5, rtol=1e-5)
    assert torch.equal(rescore_tokens(cache, 1.17, lmbda=0.0, interp_temp=5.0), rescore_tokens(cache, 1.17))


def _select_ref(scores, positive, m, m_pos):
    """Per row: the m_pos best positives, then the best other entries up to m in all."""
    rows = []
    for s, p in zip(scores.tolist(), positive.tolist()):
        visible = sorted(((x, f) for x, f in zip(s, p) if x > float("-inf")), key=lambda e: -e[0])
        pos = [e for e in visible if e[1]][:m_pos]
        others = [e for e in visible if e not in pos][: m - len(pos)]
        rows.append(sorted(pos + others, key=lambda e: -e[0]))
    return rows


def test_select_entries_against_loops():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(20, 30, generator=g)
    scores[torch.rand(20, 30, generator=g) < 0.4] = float("-inf")
    positive = torch.rand(20, 30, generator=g) < 0.3
    for m, m_pos in [(8, 2), (8, 0), (8, 8), (40, 5)]:
        out, flags = select_entries(scores, positive, m, m_pos)
        assert out.shape == flags.shape == (20, min(m, 30))
        for row, (s, f) in zip(_select_ref(scores, positive, m, m_pos), zip(out.tolist(), flags.tolist())):
            got = sorted(((x, b) for x, b in zip(s, f) if x > float("-inf")), key=lambda e: -e[0])
            assert got == row


def test_truncated_cache_scores_the_kept_entries(tmp_path):
    wins = list(_windows(seed=1))
    full = _write(tmp_path / "full", wins)
    top = _write(tmp_path / "top", wins, mem_top=4, ext_in_joint=False)
    assert top.mem_scores.shape[1] == 4 and (top.mem_count == full.mem_count).all()
    assert top.meta["mem_top_pos"] == 1
    kept = [
        {**w, "mem_scores": torch.full((9, 4), float("-inf")), "mem_values": torch.zeros(9, 4, dtype=torch.long)}
        for w in wins
    ]
    for w, rows in zip(
        kept, [_select_ref(w["mem_scores"], w["mem_values"][None] == w["targets"][:, None], 4, 1) for w in wins]
    ):
        for i, row in enumerate(rows):
            for j, (x, f) in enumerate(row):
                w["mem_scores"][i, j] = x
                w["mem_values"][i, j] = w["targets"][i] if f else -1
    assert rescore(top, 1.1, ext_in_joint=False) == pytest.approx(_reference(kept, 1.1, 0.0, 1.0, 7, False), rel=1e-5)
    small = full.mem_count <= 4  # rows that lost nothing score exactly as with the full cache
    torch.testing.assert_close(
        rescore_tokens(top, 1.1, ext_in_joint=False)[small], rescore_tokens(full, 1.1, ext_in_joint=False)[small]
    )


def test_sweep_equals_single_rescores(tmp_path):
    cache = _write(tmp_path / "c", list(_windows(seed=2)))
    grid = {"softmax_temp": [0.9, 1.2], "lmbda": [0.0, 0.3], "interp_temp": [1.0, 10.0], "k": [3, 7, 100]}
    rows = sweep(cache, grid)
    assert len(rows) == 24 and rows[0]["n_tokens"] == 36
    for r in rows:
        ref = rescore(cache, r["softmax_temp"], r["lmbda"], r["interp_temp"], r["k"])
        assert -r["nll_sum"] == pytest.approx(ref, rel=1e-6)
        assert r["ppl"] == pytest.approx(math.exp(r["nll_sum"] / 36), rel=1e-9) and r["k"] <= 7
    assert sweep(cache, [{"softmax_temp": 1.0}])[0]["lmbda"] == 0.0


def test_no_external_neighbours(tmp_path):
    wins = [{f: v for f, v in w.items() if not f.startswith("ext")} for w in _windows(seed=4)]
    cache = _write(tmp_path / "c", wins, ext_in_joint=False)
    assert cache.meta["ext_k"] == 0
    assert rescore(cache, 1.0) == pytest.approx(
        _reference(
            [dict(w, ext_scores=torch.empty(9, 0), ext_values=torch.empty(9, 0)) for w in wins], 1.0, 0.0, 1.0, 0, False
        ),
        rel=1e-5,
    )
    with pytest.raises(DataError, match="needs external"):
        rescore(cache, 1.0, lmbda=0.3)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), NeighborCacheWriter(tmp_path / "c", dim=D) as w:
        w.add(**next(_windows()))
        raise RuntimeError("eval crashed")
    assert not (tmp_path / "c").exists() and not any(tmp_path.iterdir())


def test_interpolation_only_equals_knn_log_prob(tmp_path):
    from trime.memory.knn import knn_log_prob

    wins = list(_windows(seed=6))
    wins[0]["ext_scores"][1] = float("-inf")  # a row whose search found nothing
    cache = _write(tmp_path / "c", wins)
    for temp, k in [(1.0, 7), (10.5, 3)]:
        ref = []
        for w in wins:
            top = w["ext_scores"].sort(dim=1, descending=True, stable=True)
            ref.append(
                knn_log_prob(top.values[:, :k], w["ext_values"].gather(1, top.indices)[:, :k], w["targets"], temp)
            )
        got = rescore_tokens(cache, 1.0, lmbda=1.0, interp_temp=temp, k=k)
        torch.testing.assert_close(got, torch.cat(ref))
        assert torch.isneginf(got[1])
