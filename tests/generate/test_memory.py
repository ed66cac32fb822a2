"""kNN-MT and TrimeMT decoding combiners against brute force (MT spec §9.2, §9.3)."""

import math

import pytest
import torch

from trime.generate.memory import MemoryCombiner

N, V, K, D = 3, 7, 4, 16


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 2
    logp = logits.log_softmax(-1)
    scores = torch.randn(N, K, generator=g) * 8
    values = torch.randint(0, V, (N, K), generator=g)
    scores[1, 2] = float("-inf")  # an index hole
    h = torch.randn(N, D, generator=g)
    return logits, logp, scores, values, h


def _combiner(mode, scores, values, logits, lmbda=0.3, temp=2.0):
    return MemoryCombiner(lambda h: (scores, values), lambda h: torch.logsumexp(logits, -1), mode=mode,
                          lmbda=lmbda, temp=temp, dim=D)  # fmt: skip


def _brute(mode, logits, scores, values, lmbda, temp):
    out = torch.empty(N, V, dtype=torch.float64)
    for i in range(N):
        zt = sum(math.exp(float(x)) for x in logits[i])
        pv = [math.exp(float(x)) / zt for x in logits[i]]
        knn = [(float(a), int(v)) for a, v in zip(scores[i], values[i]) if a != float("-inf")]
        if mode == "knn":
            w = [math.exp(a / temp) for a, _ in knn]
            pk = [sum(wj for wj, (_, v) in zip(w, knn) if v == y) / sum(w) for y in range(V)]
            p = [(1 - lmbda) * pv[y] + lmbda * pk[y] for y in range(V)]
        else:
            e = [math.exp(a / math.sqrt(D) / temp) for a, _ in knn]
            zc = sum(e)
            pos = [sum(ej for ej, (_, v) in zip(e, knn) if v == y) for y in range(V)]
            if mode == "trime":
                p = [(zt * pv[y] + pos[y]) / (zt + zc) for y in range(V)]
            else:  # released: (1 − λ) p_vocab + p_knn, λ = Z_c / (Z_t + Z_c)
                lam = zc / (zt + zc)
                p = [(1 - lam) * pv[y] + pos[y] / zc for y in range(V)]
        out[i] = torch.tensor([math.log(x) if x > 0 else float("-inf") for x in p])
    return out


@pytest.mark.parametrize("mode", ["knn", "trime", "trime_released"])
def test_combiners_equal_brute_force(mode):
    logits, logp, scores, values, h = _setup()
    got = _combiner(mode, scores, values, logits)(0, h, logp)
    torch.testing.assert_close(got.double(), _brute(mode, logits, scores, values, 0.3, 2.0), atol=1e-4, rtol=1e-4)


def test_sums_paper_consistent_one_released_two_minus_lambda():
    logits, logp, scores, values, h = _setup(1)
    paper = _combiner("trime", scores, values, logits)(0, h, logp).exp().sum(1)
    torch.testing.assert_close(paper, torch.ones(N))
    released = _combiner("trime_released", scores, values, logits)(0, h, logp).exp().sum(1)
    zc = torch.logsumexp(scores / math.sqrt(D) / 2.0, 1).exp()
    lam = zc / (torch.logsumexp(logits, -1).exp() + zc)
    torch.testing.assert_close(released, 2 - lam)


def test_no_neighbour_or_zero_lambda_is_vanilla():
    logits, logp, scores, values, h = _setup(2)
    for mode in ("knn", "trime", "trime_released"):
        none = _combiner(mode, scores[:, :0], values[:, :0], logits)(0, h, logp)  # k = 0
        assert torch.equal(none, logp)
    assert torch.equal(_combiner("knn", scores, values, logits, lmbda=0.0)(0, h, logp), logp)
    holes = torch.full_like(scores, float("-inf"))  # every neighbour a hole: the model alone
    assert torch.equal(_combiner("trime", holes, values, logits)(0, h, logp), logp)
