"""The one batched search (generate.search) on a toy decoder, against exhaustive search with the language
model's rules (the translation rules are checked against fairseq-generate in test_beam.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trime.generate.search import SearchSpec, search, search_steps

PAD, EOS = 1, 2
WORDS = (3, 4)  # with eos, the only tokens of finite probability


class Markov:
    """A decoder whose next-token distribution depends on the last token only: the state is (N,) last tokens."""

    def __init__(self, V: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        table = torch.full((V, V), -math.inf)
        allowed = [EOS, *WORDS]
        table[:, allowed] = (torch.randn(V, len(allowed), generator=g) * 2).log_softmax(1)
        self.table, self.vocab_size, self.reorders = table, V, 0

    def start(self, n: int, group: int) -> torch.Tensor:
        return torch.full((n * group,), EOS)

    def log_probs(self, state: torch.Tensor) -> torch.Tensor:
        return self.table[state].clone()

    def reorder(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.reorders += 1
        return state[index]

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.clone()


def _score(dec: Markov, seq: list[int]) -> float:
    prev, total = EOS, 0.0
    for y in seq:
        total += float(dec.table[prev, y])
        prev = y
    return total


def _exhaustive(dec: Markov, n_max: int, stop_at_eos: bool, lenpen: float) -> list[tuple[float, list[int]]]:
    """Every hypothesis the LM rules allow: with stop_at_eos, y_1 .. y_n eos (n + 1 ≤ n_max) or n_max tokens
    without eos; without it, exactly n_max tokens. (normalised score, tokens), best first."""
    seqs = []
    if stop_at_eos:
        seqs += [list(p) + [EOS] for n in range(n_max) for p in itertools.product(WORDS, repeat=n)]
        seqs += [list(p) for p in itertools.product(WORDS, repeat=n_max)]
    else:
        seqs += [list(p) for p in itertools.product((EOS, *WORDS), repeat=n_max)]
    return sorted(((_score(dec, s) / len(s) ** lenpen, s) for s in seqs), key=lambda x: -x[0])


@pytest.mark.parametrize("stop_at_eos,lenpen,seed", [(True, 1.0, 0), (True, 0.5, 1), (False, 1.0, 2), (True, 2.0, 3)])
def test_wide_beam_with_lm_rules_equals_exhaustive_search(stop_at_eos, lenpen, seed):
    """V = 30 with 2 words and eos possible, at most 3 tokens: the beam (11) holds every live prefix and
    enough finished hypotheses that its 5 best are the exhaustive 5 best, with their exact scores. (V − 1
    ≥ 2K: with fewer than K candidates that do not end, fairseq's rule would continue ending ones.)"""
    dec = Markov(V=30, seed=seed)
    spec = SearchSpec(last=2, pad=PAD, eos=EOS, beam=11, nbest=5, lenpen=lenpen, min_len=0, force_eos=False,
                      stop_at_eos=stop_at_eos)  # fmt: skip
    (got,) = search(dec, 1, spec)
    want = _exhaustive(dec, 3, stop_at_eos, lenpen)[:5]
    assert [h.tokens.tolist() for h in got] == [w[1] for w in want]
    for h, (score, seq) in zip(got, want):
        assert abs(h.score - score) < 1e-5
        assert abs(float(h.positional_scores.sum()) - _score(dec, seq)) < 1e-5


def test_greedy_is_repeated_argmax_and_never_reorders():
    dec = Markov(seed=4)
    spec = SearchSpec(last=5, pad=PAD, eos=EOS, force_eos=False, stop_at_eos=False)
    steps = list(search_steps(dec, 2, spec, finished := []))
    prev, want = EOS, []
    for _ in range(6):
        prev = int(dec.table[prev].argmax())
        want.append(prev)
    assert [int(s.tokens[0]) for s in steps] == want == finished[0][0].tokens.tolist() == finished[1][0].tokens.tolist()
    streamed = torch.stack([s.log_probs[0] for s in steps])  # exact; positional scores are cumulative differences
    torch.testing.assert_close(streamed, finished[0][0].positional_scores)
    assert dec.reorders == 0


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    dec = Markov(seed=5)

    def run(**kw):
        spec = SearchSpec(last=30, pad=PAD, eos=EOS, force_eos=False, stop_at_eos=False, sampling=True, **kw)
        return search(dec, 1, spec)[0][0].tokens.tolist()

    assert run(seed=1) == run(seed=1) != run(seed=2)
    greedy = search(dec, 1, SearchSpec(last=30, pad=PAD, eos=EOS, force_eos=False, stop_at_eos=False))[0][0]
    assert run(seed=3, top_k=1) == run(seed=4, top_p=1e-6) == greedy.tokens.tolist()


def test_at_most_k_finished_in_rank_order():
    """fairseq's rule, which the language model's beam search follows since it runs on generate.search:
    of the ending candidates among a step's first K, only as many as the free finished slots join, in
    rank order. (The LM's earlier loop kept them all and cut the sorted list to K: the best hypothesis is
    the same either way; a lower one of the n-best list can differ, as here.) K = 2: step 0 finishes
    [eos] (p .35) and keeps [4] (.4) and [3] (.25); at step 1 both beams' eos are the two best candidates:
    [4 eos] joins and the sentence is done, so [3 eos] (score log .225 / 2 > log .35) does not."""
    dec = Markov(V=6)
    t = torch.full((6, 6), -math.inf)
    t[EOS, [EOS, 3, 4]] = torch.tensor([0.35, 0.25, 0.40]).log()
    t[3, [EOS, 3, 4]] = torch.tensor([0.90, 0.05, 0.05]).log()
    t[4, [EOS, 3, 4]] = torch.tensor([0.90, 0.05, 0.05]).log()
    dec.table = t
    (got,) = search(dec, 1, SearchSpec(last=5, pad=PAD, eos=EOS, beam=2, nbest=2, force_eos=False))
    assert [h.tokens.tolist() for h in got] == [[4, EOS], [EOS]]
    assert got[0].score == pytest.approx(math.log(0.36) / 2) and got[1].score == pytest.approx(math.log(0.35))
    assert math.log(0.225) / 2 > got[1].score  # the earlier loop would have listed [3 eos] second
