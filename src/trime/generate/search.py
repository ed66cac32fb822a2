"""One decoding core: the decoder protocol, one hypothesis type and one batched search.

A decoder (:class:`Decoder`) is the model side: the translation model (generate.beam.MTDecoder) and the
language model with its memories (generate.lm.LMDecoder, any backbone) both are one. The search side is
:func:`search` (greedy = beam 1, sampling, beam search) over N = B·K rows, K per sentence.

Legend: B sentences still decoding, K rows per sentence (the beam), C candidates per sentence (2K for
beam search, K when sampling), V vocabulary, N = B·K rows, T = ``spec.last`` (the last step).

The rules, as fairseq 0.12's ``SequenceGenerator`` applies them (restated; no fairseq code is used):

- Step t = 0..T: every live row's log-probabilities get NaN → −inf, pad (if any) → −inf, unk −= unk_penalty;
  at t = T with ``force_eos`` every token but eos → −inf; at t < min_len eos → −inf.
- Candidates: at t = 0 only row 0 of each sentence (all rows are equal), later cumulative score +
  log-prob; the top C = min(2K, n − 1) per sentence (torch.topk; n = V at t = 0, K·V later). Sampling
  instead draws one token per row from the tempered, top-k / top-p filtered distribution (seeded), and
  its candidate's score is the unfiltered cumulative log-probability (C = K, in row order).
- A candidate *ends* its hypothesis when its token is eos (with ``stop_at_eos``) or t = T. Among the
  first K candidates, ending ones with a finite score are finalised in rank order (score = cumulative /
  (t + 1)^lenpen, t + 1 = length incl. the last token) unless their slot is marked "ignored"; a
  sentence keeps at most K finished hypotheses and is done when it has K, or at t = T.
- The K best-ranked candidates that neither end nor sit in an ignored slot continue; if fewer than K
  exist, the missing slots are filled with ending candidates and marked ignored for the next step
  (fairseq's ``cands_to_ignore``).
- Each sentence's finished hypotheses are sorted by score, best first; ``nbest`` are returned.

Translation sets T = max_len with ``force_eos`` (at most max_len tokens, then eos); the language model
sets T = max_new_tokens − 1 without it (the last step's token ends a hypothesis whatever it is).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class Decoder(Protocol):
    """The model side of a search. A state holds N rows (hypotheses); the search never looks inside it."""

    vocab_size: int

    def start(self, inputs: Any, group: int) -> Any:
        """The state of ``group`` equal rows per input sentence (rows b·group .. b·group + group − 1)."""

    def log_probs(self, state: Any) -> Tensor:
        """(N, V) float32 log-scores of each row's next token (memories and combiners applied)."""

    def reorder(self, state: Any, index: Tensor) -> Any:
        """The state of rows ``index`` (N',) of ``state``, in that order (rows may repeat or go)."""

    def advance(self, state: Any, tokens: Tensor) -> Any:
        """The state after appending ``tokens`` (N,), one per row."""


@dataclass
class Hypothesis:
    tokens: Tensor  # (T,) int64 generated tokens (no prompt / bos), the last one included (eos when it ended so)
    score: float  # natural log: cumulative / len ** lenpen (search), mean log-prob (generate.beam.score_reference)
    positional_scores: Tensor  # (T,) float32 natural-log score of each token


@dataclass(frozen=True)
class SearchSpec:
    """How to search (module docstring). ``last`` is the last step T: a hypothesis has at most T + 1 tokens."""

    last: int
    pad: int | None  # None: the vocabulary has no padding token (a Hugging Face model's)
    eos: int
    beam: int = 1
    nbest: int = 1
    lenpen: float = 1.0
    normalize_scores: bool = True
    min_len: int = 0
    force_eos: bool = True
    stop_at_eos: bool = True
    unk: int = 3
    unk_penalty: float = 0.0
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1


@dataclass
class Best:
    """What one step chose first for each live sentence (rank-0 candidate): what greedy search streams."""

    sentences: Tensor  # (B,) original index of each live sentence
    tokens: Tensor  # (B,) int64
    log_probs: Tensor  # (B,) float32 the token's log-probability at this step


def search(decoder: Decoder, inputs: Any, spec: SearchSpec) -> list[list[Hypothesis]]:
    """Per input sentence its ``spec.nbest`` best finished hypotheses, best first."""
    finished: list[list[Hypothesis]] = []
    for _ in search_steps(decoder, inputs, spec, finished):
        pass
    out = []
    for hyps in finished:
        order = torch.sort(torch.tensor([h.score for h in hyps]), descending=True).indices.tolist()
        out.append([hyps[i] for i in order][: spec.nbest])
    return out


def _mask(lprobs: Tensor, step: int, spec: SearchSpec) -> None:
    lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN -> -inf in one pass
    if spec.pad is not None:
        lprobs[:, spec.pad] = -math.inf
    if spec.unk_penalty:
        lprobs[:, spec.unk] -= spec.unk_penalty
    if step >= spec.last and spec.force_eos:
        eos_col = lprobs[:, spec.eos].clone()
        lprobs.fill_(-math.inf)
        lprobs[:, spec.eos] = eos_col
    if step < spec.min_len:
        lprobs[:, spec.eos] = -math.inf


def filter_top(lp: Tensor, top_k: int, top_p: float) -> Tensor:
    """Log-probabilities (N, V) with tokens outside the top-k / top-p set at −inf."""
    if top_k and top_k < lp.shape[1]:
        kth = lp.topk(top_k, dim=1).values[:, -1:]
        lp = lp.masked_fill(lp < kth, -math.inf)
    if top_p < 1.0:
        sorted_lp, order = lp.sort(dim=1, descending=True)
        p = sorted_lp.softmax(1)
        drop = p.cumsum(1) - p >= top_p  # tokens after the set that first reaches top_p
        lp = lp.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
    return lp


def _candidates(lprobs: Tensor, scores: Tensor, step: int, K: int, spec: SearchSpec, gen) -> tuple[Tensor, Tensor]:
    """(candidate scores (B, C), flat candidate indices beam·V + token (B, C)) from lprobs (B, K, V)."""
    B, _, V = lprobs.shape
    prev = scores.view(B, K, -1)[:, :, step - 1 : step] if step > 0 else 0.0  # (B, K, 1) cumulative
    if spec.sampling:
        scaled = filter_top(lprobs.view(B * K, V) / spec.temperature, spec.top_k, spec.top_p)
        tok = torch.multinomial(scaled.softmax(1), 1, generator=gen).view(B, K)  # one draw per row
        cand = (lprobs + prev).gather(2, tok.unsqueeze(2)).squeeze(2)  # (B, K)
        return cand, torch.arange(K, device=tok.device) * V + tok
    if step == 0:
        lprobs = lprobs[:, :1]  # (B, 1, V)
    else:
        lprobs = lprobs + prev
    flat = lprobs.reshape(B, -1)
    return flat.topk(min(2 * K, flat.shape[1] - 1), dim=1)  # (B, C)


@torch.no_grad()
def search_steps(decoder: Decoder, inputs: Any, spec: SearchSpec, finished: list[list[Hypothesis]]) -> Iterator[Best]:
    """Run the search, yielding each step's :class:`Best`; ``finished`` gets one list of finished
    hypotheses per input sentence (unsorted, at most K each)."""
    V = decoder.vocab_size
    K = min(spec.beam, V - 1)
    T = spec.last
    state = decoder.start(inputs, K)
    gen = None
    lprobs = decoder.log_probs(state).float()  # (N, V)
    dev = lprobs.device
    if spec.sampling:
        gen = torch.Generator(device=dev)
        gen.manual_seed(spec.seed)
    B0 = lprobs.shape[0] // K
    finished.extend([] for _ in range(B0))
    tokens = torch.full((B0 * K, T + 2), spec.eos, dtype=torch.long, device=dev)  # (N, T+2) start, y_0 .. y_T
    tokens[:, 0] = spec.eos
    scores = torch.zeros(B0 * K, T + 1, device=dev)  # (N, T+1) cumulative log-score after each token
    ignored = torch.zeros(B0, K, dtype=torch.bool, device=dev)  # (B, K) candidate slots not to finalise
    sent_ids = torch.arange(B0, device=dev)  # (B,) original index of each live sentence
    for step in range(T + 1):
        if step > 0:
            lprobs = decoder.log_probs(state).float()  # (N, V)
        B = sent_ids.numel()
        _mask(lprobs, step, spec)
        lprobs = lprobs.view(B, K, V)
        cand_scores, cand_idx = _candidates(lprobs, scores, step, K, spec, gen)  # (B, C)
        cand_beams, cand_tokens = cand_idx // V, cand_idx % V
        ar = torch.arange(B, device=dev)
        yield Best(sent_ids, cand_tokens[:, 0], lprobs[ar, cand_beams[:, 0], cand_tokens[:, 0]])
        cand_rows = cand_beams + (ar * K).unsqueeze(1)  # (B, C) rows of this step

        ends = cand_tokens.eq(spec.eos) if spec.stop_at_eos else torch.zeros_like(cand_tokens, dtype=torch.bool)
        if step == T:
            ends = torch.ones_like(ends)
        eos_mask = ends & cand_scores.ne(-math.inf)  # (B, C)
        eos_mask[:, :K] &= ~ignored
        done = _finalize(step, spec, K, tokens, scores, cand_rows[:, :K], cand_tokens[:, :K], cand_scores[:, :K],
                         eos_mask[:, :K], sent_ids, finished)  # fmt: skip
        if done.all() or step == T:
            break
        keep = (~done).nonzero().squeeze(1)  # (B',)
        if keep.numel() < B:
            cand_beams, cand_scores, cand_tokens = cand_beams[keep], cand_scores[keep], cand_tokens[keep]
            eos_mask, ignored, sent_ids = eos_mask[keep], ignored[keep], sent_ids[keep]
            rows = (keep.unsqueeze(1) * K + torch.arange(K, device=dev)).view(-1)  # (B'·K,)
            tokens, scores = tokens[rows], scores[rows]
        B = keep.numel()

        # The K best candidates that neither end nor sit in an ignored slot continue (rank order).
        stop = eos_mask.clone()
        stop[:, :K] |= ignored
        rank = stop.long() * stop.shape[1] + torch.arange(stop.shape[1], device=dev)  # (B, C)
        chosen_rank, chosen = rank.topk(K, dim=1, largest=False)  # (B, K)
        ignored = chosen_rank.ge(stop.shape[1])
        beams = cand_beams.gather(1, chosen)  # (B, K)
        new_rows = (beams + (torch.arange(B, device=dev) * K).unsqueeze(1)).view(-1)  # (N,) rows after pruning
        tokens[:, : step + 1] = tokens[new_rows, : step + 1]
        tokens.view(B, K, -1)[:, :, step + 1] = cand_tokens.gather(1, chosen)
        if step > 0:
            scores[:, :step] = scores[new_rows, :step]
        scores.view(B, K, -1)[:, :, step] = cand_scores.gather(1, chosen)
        order = (beams + (keep * K).unsqueeze(1)).view(-1)  # the same rows, numbered before pruning
        if order.numel() != lprobs.shape[0] * K or not torch.equal(order, torch.arange(order.numel(), device=dev)):
            state = decoder.reorder(state, order)  # (greedy search never reorders)
        state = decoder.advance(state, tokens[:, step + 1])


def _finalize(
    step: int,
    spec: SearchSpec,
    K: int,
    tokens: Tensor,
    scores: Tensor,
    rows: Tensor,
    cand_tokens: Tensor,
    cand_scores: Tensor,
    eos_mask: Tensor,
    sent_ids: Tensor,
    finished: list[list[Hypothesis]],
) -> Tensor:
    """Store the hypotheses of ``rows[eos_mask]`` (B, K) ending now; return which sentences are done (B,)."""
    done = torch.zeros(eos_mask.shape[0], dtype=torch.bool)
    if not eos_mask.any():
        return done.to(eos_mask.device)
    idx = rows[eos_mask]  # (E,) rank order within each sentence, sentences in order
    eos_scores = cand_scores[eos_mask]  # (E,) cumulative
    toks = tokens[idx, 1 : step + 2].clone()  # (E, step+1)
    toks[:, step] = cand_tokens[eos_mask]
    pos = scores[idx, : step + 1].clone()  # (E, step+1)
    pos[:, step] = eos_scores
    pos[:, 1:] = pos[:, 1:] - pos[:, :-1]
    if spec.normalize_scores:
        eos_scores = eos_scores / (step + 1) ** spec.lenpen
    groups = (idx // K).tolist()
    for i, g in enumerate(groups):
        hyps = finished[int(sent_ids[g])]
        if len(hyps) < K:
            hyps.append(Hypothesis(tokens=toks[i], score=float(eos_scores[i]), positional_scores=pos[i]))
    for g in set(groups):
        done[g] = len(finished[int(sent_ids[g])]) == K or step == spec.last
    return done.to(eos_mask.device)
