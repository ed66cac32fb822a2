"""Orderings with their confidence (trime.pipelines.confidence) against brute-force resampling."""

import math

import numpy as np
import pytest

from trime.pipelines.confidence import (
    SEED,
    block_sums,
    interval,
    paired_bleu,
    paired_perplexity,
    two_sided_p,
    verdict,
)
from trime.pipelines.mt_reproduce import read_results


def brute_paired_perplexity(a, b, block, n_samples, seed):
    """Resample whole blocks of tokens with Python loops and recompute each perplexity from its tokens."""
    starts = list(range(0, len(a), block))
    blocks = [(s, min(s + block, len(a))) for s in starts]
    idx = np.random.default_rng(seed).integers(0, len(blocks), size=(n_samples, len(blocks)))
    diffs = []
    for row in idx:
        ta = [x for j in row for x in a[blocks[j][0] : blocks[j][1]]]
        tb = [x for j in row for x in b[blocks[j][0] : blocks[j][1]]]
        diffs.append(math.exp(-sum(ta) / len(ta)) - math.exp(-sum(tb) / len(tb)))
    diffs = np.array(diffs)
    below, above = np.mean(diffs <= 0), np.mean(diffs >= 0)
    return min(1.0, 2 * min(below, above)), np.percentile(diffs, [2.5, 97.5])


@pytest.mark.parametrize("block", [1, 7, 64])
def test_paired_perplexity_matches_brute_force(block):
    rng = np.random.default_rng(0)
    a = -rng.exponential(3.0, size=701)
    b = a - rng.normal(0.05, 0.5, size=701)  # 11 blocks of 64  # b a little worse, noisily
    p, spread = paired_perplexity(a, b, block=block, n_samples=200, seed=SEED)
    p_ref, (lo, hi) = brute_paired_perplexity(a.tolist(), b.tolist(), block, 200, SEED)
    assert p == pytest.approx(p_ref)
    assert spread == f"difference 95% CI [{lo:+.2f}, {hi:+.2f}]"


def test_block_sums_cover_every_token_once():
    x = np.arange(10, dtype=np.float64)
    sums, counts = block_sums(x, 4)
    assert sums.tolist() == [6.0, 22.0, 17.0] and counts.tolist() == [4, 4, 2]


def test_two_sided_p_and_interval():
    assert two_sided_p(np.array([1.0, 2.0, 3.0])) == 0.0  # every resample on one side
    assert two_sided_p(np.array([-1.0, 1.0])) == 1.0
    assert two_sided_p(np.zeros(5)) == 1.0  # no difference at all
    assert interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_paired_perplexity_clear_and_null_differences():
    rng = np.random.default_rng(1)
    a = -rng.exponential(2.0, size=4096)
    p_same, _ = paired_perplexity(a, a.copy())
    assert p_same == 1.0
    p_clear, spread = paired_perplexity(a, a - 0.3)  # b's every token 0.3 nats less likely: a clearly better
    assert p_clear < 0.01 and spread.startswith("difference 95% CI [-")
    with pytest.raises(ValueError, match="not the same test set"):
        paired_perplexity(a, a[:-1])
    p_few, why = paired_perplexity(a[:2000], a[:2000] - 1.0)  # 8 blocks: not tested, however clear
    assert math.isnan(p_few) and why == "only 8 blocks of 256 test tokens, too few to resample"


def test_verdict_rules():
    kw = {"spread": "s", "higher_is_better": False}
    assert verdict("a < b", 10.0, 12.0, 0.001, **kw).verdict == "holds"
    assert verdict("a < b", 12.0, 10.0, 0.001, **kw).verdict == "does NOT hold"
    noisy = verdict("a < b", 10.0, 12.0, 0.2, **kw)
    assert noisy.verdict == "not shown" and "noise" in noisy.why
    assert verdict("a < b", 10.0, 12.0, 0.05, **kw).verdict == "not shown"  # p must be below alpha
    assert verdict("a < b", 10.0, 12.0, math.nan, **kw).why == "not tested"
    weak = verdict("a > b", 3.9, 1.2, 0.001, spread="s", higher_is_better=True, floor=10.0)
    assert weak.verdict == "not shown" and "floor of 10" in weak.why
    assert verdict("a > b", 23.0, 20.0, 0.001, spread="s", higher_is_better=True, floor=10.0).verdict == "holds"
    line = verdict("a < b", 10.0, 12.0, 0.2, **kw).line()
    assert line.startswith("- not shown: a < b (10.00 vs 12.00, s, p = 0.200;")


def test_paired_bleu():
    refs = [f"the cat number {i} sat on the mat today" for i in range(60)]
    good = list(refs)
    bad = [f"a dog {i} ran" for i in range(60)]
    p, spread = paired_bleu(good, bad, refs, n_samples=200)
    assert p < 0.01 and spread.startswith("95% CI ±")
    # sacreBLEU's test gives two identical systems its smallest p (by design): the verdict calls it a tie
    p_same, spread = paired_bleu(bad, list(bad), refs, n_samples=200)
    tie = verdict("a > b", 1.5, 1.5, p_same, spread, higher_is_better=True)
    assert tie.verdict == "not shown" and tie.why == "a tie"


def test_read_results(tmp_path):
    f = tmp_path / "x.out"
    f.write_text(
        "S-0\tsrc zero\nT-0\tthe cat &apos;s\nH-0\t-0.5\tthe cat &apos;s\nD-0\t-0.5\tthe cat's\n"
        "S-1\tsrc one\nT-1\tno\nH-1\t-1.0\t\nD-1\t-1.0\t\n"
    )
    hyps, refs = read_results(f)
    assert hyps == ["the cat's", ""] and refs == ["the cat's", "no"]
