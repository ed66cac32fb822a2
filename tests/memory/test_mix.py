"""memory.mix against plain loops: the joint softmax per token and per vocabulary, its breakdown, the kNN
distribution and its interpolation over the vocabulary, and the released TrimeMT form (MT spec §9.3)."""

import math

import pytest
import torch

from trime.memory.knn import interpolate
from trime.memory.mix import (
    joint_breakdown,
    joint_token_log_probs,
    joint_vocab_log_probs,
    knn_vocab_log_probs,
    knn_weights,
    scatter_logsumexp,
    trime_released_log_probs,
)

from tests.reference import joint_log_prob as ref_joint

N, V, M = 4, 9, 6
INF = float("inf")


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    tok_logp = (torch.randn(N, V, generator=g) * 2).log_softmax(1)  # (N, V)
    tok_log_z = torch.randn(N, generator=g) * 3
    scores = torch.randn(N, M, generator=g) * 3
    scores[0, 1] = scores[2, :3] = -INF  # invisible entries / index holes
    scores[3] = -INF  # a row with no entry at all
    values = torch.randint(0, V, (N, M), generator=g)
    values[1, :3] = 4  # duplicates
    return tok_logp, tok_log_z, scores, values


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -INF


def _knn_ref(scores, values):
    """p_knn(y) = Σ_{v_j = y} e^{s_j} / Σ_j e^{s_j} by loops, (N, V); 0 in a row with no neighbour."""
    out = torch.zeros(N, V, dtype=torch.float64)
    for i in range(N):
        e = [(math.exp(float(s)), int(v)) for s, v in zip(scores[i], values[i]) if s != -INF]
        z = math.fsum(w for w, _ in e)
        for y in range(V):
            out[i, y] = math.fsum(w for w, v in e if v == y) / z if z > 0 else 0.0
    return out


def test_scatter_logsumexp_matches_loops():
    _, _, scores, values = _rows()
    got = scatter_logsumexp(scores, values, V)
    for i in range(N):
        for y in range(V):
            want = _log(math.fsum(math.exp(float(s)) for s, v in zip(scores[i], values[i]) if v == y and s != -INF))
            assert got[i, y].item() == pytest.approx(want, abs=1e-5) if want != -INF else got[i, y] == -INF
    assert torch.equal(scatter_logsumexp(scores[:, :0], values[:, :0], V), torch.full((N, V), -INF))


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_joint_vocab_is_the_joint_softmax_of_every_token(tau):
    tok_logp, tok_log_z, scores, values = _rows(1)
    got = joint_vocab_log_probs(tok_logp, tok_log_z, scores, values, tau)  # (N, V)
    for i in range(N):
        y = torch.arange(V)
        want = ref_joint(tok_logp[i], tok_log_z[i].expand(V), (scores[i] / tau).expand(V, M), values[i], y)
        torch.testing.assert_close(got[i], torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(N))
    none = joint_vocab_log_probs(tok_logp, tok_log_z, scores[:, :0], values[:, :0])
    torch.testing.assert_close(none, tok_logp)  # no entry: the output layer alone


def test_joint_token_is_the_joint_softmax_of_each_target_at_every_tau():
    tok_logp, tok_log_z, scores, values = _rows(2)
    targets = torch.tensor([values[0, 0], 4, 7, 0])
    taus = [0.5, 1.0, 2.5]
    got = joint_token_log_probs(tok_logp.gather(1, targets[:, None])[:, 0], tok_log_z, scores,
                                values == targets[:, None], taus)  # fmt: skip
    for t, lp in zip(taus, got):
        want = ref_joint(tok_logp.gather(1, targets[:, None])[:, 0], tok_log_z, scores / t, values, targets)
        torch.testing.assert_close(lp, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)
        vocab = joint_vocab_log_probs(tok_logp, tok_log_z, scores, values, t)  # the same numbers per vocabulary
        torch.testing.assert_close(lp, vocab.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5)


def test_breakdown_parts_add_up_to_the_joint_probability():
    tok_logp, tok_log_z, scores, values = _rows(3)
    targets = torch.tensor([values[0, 2], 4, 1, 5])
    tlp = tok_logp.gather(1, targets[:, None])[:, 0]
    tok_part, parts, share = joint_breakdown(tlp, tok_log_z, scores)
    for i in range(N):
        e = [math.exp(float(s)) for s in scores[i] if s != -INF]
        den = math.exp(float(tok_log_z[i])) + math.fsum(e)
        assert tok_part[i].exp().item() == pytest.approx(math.exp(float(tok_log_z[i] + tlp[i])) / den, rel=1e-5)
        assert share[i].exp().item() == pytest.approx(math.fsum(e) / den, rel=1e-5, abs=1e-12)
        for j in range(M):
            assert parts[i, j].exp().item() == pytest.approx(math.exp(float(scores[i, j])) / den, rel=1e-5, abs=1e-12)
    p = tok_part.exp() + torch.where(values == targets[:, None], parts.exp(), 0.0).sum(1)
    want = ref_joint(tlp, tok_log_z, scores, values, targets)
    torch.testing.assert_close(p.log(), torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_knn_over_the_vocabulary_and_its_interpolation():
    tok_logp, _, scores, values = _rows(4)
    ref = _knn_ref(scores, values)
    got = knn_vocab_log_probs(scores, values, V)
    torch.testing.assert_close(got.exp().double(), ref, atol=1e-6, rtol=1e-5)
    assert torch.isneginf(got[3]).all()  # no neighbour: −inf, not NaN
    w = knn_weights(scores)
    assert torch.equal(w[3], torch.zeros(M)) and w[2, :3].eq(0).all()
    torch.testing.assert_close(torch.zeros(N, V).scatter_add_(1, values, w).double(), ref, atol=1e-6, rtol=1e-5)
    for lam in (0.0, 0.3, 1.0):
        mixed = interpolate(tok_logp, got, lam)
        want = (1 - lam) * tok_logp.exp().double() + lam * ref
        torch.testing.assert_close(mixed.exp().double(), want, atol=1e-6, rtol=1e-5)


def test_trime_released_is_one_minus_lambda_p_vocab_plus_p_knn():
    tok_logp, tok_log_z, scores, values = _rows(5)
    got = trime_released_log_probs(tok_logp, tok_log_z, scores, values)
    ref = _knn_ref(scores, values)
    for i in range(N):
        zc = math.fsum(math.exp(float(s)) for s in scores[i] if s != -INF)
        lam = zc / (math.exp(float(tok_log_z[i])) + zc)
        want = (1 - lam) * tok_logp[i].exp().double() + ref[i]
        torch.testing.assert_close(got[i].exp().double(), want, atol=1e-6, rtol=1e-5)
        assert got[i].exp().sum().item() == pytest.approx(2 - lam if zc else 1.0, rel=1e-5)


@pytest.mark.parametrize(("mode", "lmbda"), [("knn", 0.3), ("knn", 1.0), ("trime", 0.3)])
def test_the_decoding_combiner_mixes_only_at_the_neighbours_tokens_as_the_vocabulary_forms_do(mode, lmbda):
    """generate.memory's combiner computes (N, k) terms and keeps the model's term elsewhere: the same
    numbers as memory.mix's (N, V) forms (holes and repeated tokens included)."""
    from trime.generate.memory import MemoryCombiner
    from trime.memory.joint import memory_logits

    g = torch.Generator().manual_seed(3)
    n, v, k, d = 6, 500, 16, 4
    logp = torch.randn(n, v, generator=g).log_softmax(1)
    log_z = torch.randn(n, generator=g)
    scores = torch.randn(n, k, generator=g) * 4
    scores[1, 10:] = -INF  # holes (token 0)
    values = torch.randint(0, 20, (n, k), generator=g)  # repeats within a row
    values[1, 10:] = 0
    comb = MemoryCombiner(lambda h: (scores, values), lambda h: log_z, mode=mode, lmbda=lmbda, temp=2.0, dim=d)
    got = comb(0, torch.zeros(n, d), logp)
    if mode == "knn":  # λ = 1: p_knn alone (the model's term is gone)
        want = interpolate(logp, knn_vocab_log_probs(memory_logits(scores, None, 2.0), values, v), lmbda)
    else:
        want = joint_vocab_log_probs(logp, log_z, memory_logits(scores, d, 2.0), values)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # bitwise equal on the dev machine
