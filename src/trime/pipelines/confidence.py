"""Does a test set show that one system beats another? Paired bootstrap resampling (Koehn, 2004).

A table of two systems' scores always orders them; whether the test set *shows* the ordering is
another question. Both jobs answer it the same way: resample the test set's items with replacement
(the same items for both systems: the comparison is paired), recompute both corpus scores on each
resample, and look at the difference.

- translation: the items are sentences and the score corpus BLEU, through sacreBLEU's own paired
  bootstrap (``sacrebleu.significance.PairedTest``, what ``sacrebleu --paired-bs`` runs);
- language modelling: the items are blocks of consecutive tokens (neighbouring tokens are not
  independent, so single tokens would understate the noise) and the score is perplexity,
  exp(−mean log p) over the resampled tokens.

An ordering "a better than b" is then reported as

- **holds**: a is better and the two-sided p-value is below ``alpha`` (0.05);
- **does NOT hold**: b is better, p below ``alpha``;
- **not shown**: p at or above ``alpha`` (the difference is within the test set's noise), or either
  system is below the job's floor of usefulness (e.g. a translation model under 10 BLEU has not
  learned to translate, and an ordering of such models says nothing about the paper's claim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

ALPHA = 0.05
MIN_BLOCKS = 10  # fewer blocks of test tokens than this: the perplexity bootstrap is not run
N_SAMPLES = 1000
SEED = 12345  # the perplexity bootstrap's seed (sacreBLEU's own default for its paired tests)


@dataclass
class Ordering:
    """The verdict on "better beats worse" (module docstring) and the numbers behind it."""

    claim: str  # e.g. "TrimeLM < Transformer (CE)"
    verdict: str  # holds | does NOT hold | not shown
    better: float  # the claimed-better system's score
    worse: float
    p_value: float  # two-sided paired bootstrap p-value of "no difference"
    spread: str  # how noisy the scores are, in words (a 95% interval)
    why: str = ""  # for "not shown": the reason

    def line(self) -> str:
        tail = f"; {self.why}" if self.why else ""
        return f"- {self.verdict}: {self.claim} ({self.better:.2f} vs {self.worse:.2f}, {self.spread}, p = {self.p_value:.3f}{tail})"

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(
    claim: str,
    better: float,
    worse: float,
    p_value: float,
    spread: str,
    *,
    higher_is_better: bool,
    floor: float | None = None,
    alpha: float = ALPHA,
) -> Ordering:
    """The rule of the module docstring. ``floor``: the score a system must reach (higher_is_better:
    at least it; else at most it) for its orderings to count."""
    if floor is not None and any((s < floor if higher_is_better else s > floor) for s in (better, worse)):
        why = f"a system {'below' if higher_is_better else 'above'} the floor of {floor:g}"
        return Ordering(claim, "not shown", better, worse, p_value, spread, why)
    if math.isnan(p_value):
        return Ordering(claim, "not shown", better, worse, p_value, spread, "not tested")
    if better == worse:  # sacreBLEU's test calls two identical systems different (by design); a tie shows nothing
        return Ordering(claim, "not shown", better, worse, p_value, spread, "a tie")
    if p_value >= alpha:
        return Ordering(
            claim, "not shown", better, worse, p_value, spread, f"within the test set's noise: p ≥ {alpha:g}"
        )
    wins = better > worse if higher_is_better else better < worse
    return Ordering(claim, "holds" if wins else "does NOT hold", better, worse, p_value, spread)


def two_sided_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is zero": twice the smaller tail mass at 0."""
    diffs = np.asarray(diffs, dtype=np.float64)
    below, above = float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))
    return min(1.0, 2 * min(below, above))


def interval(diffs: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(diffs, dtype=np.float64), [2.5, 97.5])
    return float(lo), float(hi)


def block_sums(logp: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums (n_blocks,), counts (n_blocks,)) of per-token log-probabilities in blocks of ``block`` tokens."""
    logp = np.asarray(logp, dtype=np.float64)
    starts = np.arange(0, len(logp), block)
    return np.add.reduceat(logp, starts) if len(logp) else np.zeros(0), np.diff(np.append(starts, len(logp)))


def paired_perplexity(
    logp_a: np.ndarray, logp_b: np.ndarray, *, block: int = 256, n_samples: int = N_SAMPLES, seed: int = SEED
) -> tuple[float, str]:
    """(p-value, the 95% interval of ppl_a − ppl_b in words) for two systems' per-token natural-log
    probabilities of the same tokens, resampling blocks of ``block`` consecutive tokens. The perplexity
    is the tables' (2 ** bits per token = e ** nats per token)."""
    if len(logp_a) != len(logp_b):
        raise ValueError(f"the systems scored {len(logp_a)} and {len(logp_b)} tokens: not the same test set")
    sa, counts = block_sums(logp_a, block)
    sb, _ = block_sums(logp_b, block)
    if len(counts) < MIN_BLOCKS:  # a handful of blocks has a handful of distinct resamples: no test at all
        return math.nan, f"only {len(counts)} blocks of {block} test tokens, too few to resample"
    idx = np.random.default_rng(seed).integers(0, len(counts), size=(n_samples, len(counts)))  # (S, blocks)
    n = counts[idx].sum(1)  # (S,) tokens in each resample
    diffs = np.exp(-sa[idx].sum(1) / n) - np.exp(-sb[idx].sum(1) / n)  # (S,)
    lo, hi = interval(diffs)
    return two_sided_p(diffs), f"difference 95% CI [{lo:+.2f}, {hi:+.2f}]"


def paired_bleu(
    hyps_a: Sequence[str], hyps_b: Sequence[str], refs: Sequence[str], *, n_samples: int = N_SAMPLES
) -> tuple[float, str]:
    """(p-value, each system's 95% interval in words) of sacreBLEU's paired bootstrap test of system a
    against b (``sacrebleu --paired-bs``: detokenised text, 13a tokenisation, as the tables' BLEU;
    its seed, 12345 unless SACREBLEU_SEED says otherwise)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if not (len(hyps_a) == len(hyps_b) == len(refs)):
        raise ValueError(f"{len(hyps_a)} and {len(hyps_b)} hypotheses for {len(refs)} references")
    test = PairedTest([("b", list(hyps_b)), ("a", list(hyps_a))], {"BLEU": BLEU()}, [list(refs)], test_type="bs",
                      n_samples=n_samples)  # fmt: skip
    _, scores = test()
    b, a = scores["BLEU"]
    return float(a.p_value), f"95% CI ±{a.ci:.2f} / ±{b.ci:.2f}"
