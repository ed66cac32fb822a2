"""kNN-LM distribution, interpolation and external scores against plain loops (spec §5.4, §5.5)."""

import math

import torch

from trime.memory.joint import memory_logits, score_scale
from trime.memory.knn import interpolate, knn_log_prob, knn_log_probs


def _knn_ref(scores, values, targets, temp, valid=None):
    out = []
    for i in range(scores.shape[0]):
        keep = [n for n in range(scores.shape[1]) if valid is None or valid[i, n]]
        z = sum(math.exp(float(scores[i, n]) / temp) for n in keep)
        pos = sum(math.exp(float(scores[i, n]) / temp) for n in keep if int(values[i, n]) == int(targets[i]))
        out.append(math.log(pos / z) if pos > 0 else float("-inf"))
    return torch.tensor(out)


def test_knn_log_prob_matches_loops():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 12, generator=g) * 20
    values = torch.randint(0, 5, (7, 12), generator=g)
    targets = torch.randint(0, 5, (7,), generator=g)
    targets[0] = 9  # no neighbour has it
    valid = torch.rand(7, 12, generator=g) > 0.3
    valid[1] = False  # no neighbour at all
    for temp in (1.0, 10.5):
        torch.testing.assert_close(knn_log_prob(scores, values, targets, temp), _knn_ref(scores, values, targets, temp))
        got = knn_log_prob(scores, values, targets, temp, valid)
        torch.testing.assert_close(got, _knn_ref(scores, values, targets, temp, valid))
        assert got[0] == float("-inf") and got[1] == float("-inf") and not got.isnan().any()


def test_knn_half_input_is_computed_in_float32():
    scores = torch.tensor([[300.0, 290.0]]).half()
    out = knn_log_prob(scores, torch.tensor([[1, 2]]), torch.tensor([2]), 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-10.0 - math.log1p(math.exp(-10.0))]))


def test_interpolate_matches_mixture_and_endpoints():
    lm = torch.log(torch.tensor([0.2, 0.5, 1e-30, 0.9]))
    kn = torch.log(torch.tensor([0.7, 0.0, 0.4, 0.01]))  # one −inf kNN term
    for lam in (0.0, 0.3, 1.0):
        ref = torch.tensor(
            [
                math.log((1 - lam) * math.exp(a) + lam * math.exp(b))
                if (1 - lam) * math.exp(a) + lam * math.exp(b) > 0
                else float("-inf")
                for a, b in zip(lm.double().tolist(), kn.double().tolist())
            ]
        )
        torch.testing.assert_close(interpolate(lm, kn, lam), ref.float())
    assert torch.equal(interpolate(lm, kn, 0.0), lm)  # λ = 0 reproduces the plain score exactly
    assert torch.equal(interpolate(lm, kn, 1.0), kn)
    assert torch.isfinite(interpolate(lm, kn, 0.3)).all()


def test_memory_logits_scale():
    s = torch.tensor([[64.0, float("-inf")]])
    out = memory_logits(s, dim=16, temp=2.0)  # joint softmax: q·k / √d / τ
    assert out[0, 0] == 64.0 / 4.0 / 2.0 and out[0, 1] == float("-inf")
    assert score_scale(None, 4.0) == 0.25  # kNN-LM: q·k / T, no √d


def test_knn_log_probs_many_temperatures_equal_one_at_a_time():
    g = torch.Generator().manual_seed(3)
    scores, values = torch.randn(6, 5, generator=g) * 20, torch.randint(0, 3, (6, 5), generator=g)
    targets = torch.randint(0, 3, (6,), generator=g)
    scores[0, 1] = float("-inf")  # an index hole
    temps = [0.5, 1.0, 7.0]
    many = knn_log_probs(scores, values == targets[:, None], temps)
    for t, got in zip(temps, many):
        torch.testing.assert_close(got, _knn_ref(scores, values, targets, t))
