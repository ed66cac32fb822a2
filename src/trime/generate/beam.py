"""Batched beam search and reference scoring with fairseq ``SequenceGenerator`` semantics (MT spec §9 "Common").

Legend: B sentences still decoding, K beam size, C = 2K candidates per sentence, V vocabulary,
N = B·K hypothesis rows, L = max_len.

The rules, as fairseq 0.12 applies them (restated; no fairseq code is used):

- max_len = min(int(max_len_a · S + max_len_b), max_target_positions − 1), S the *padded* source
  width of the batch (eos included), so results may depend on the batch; at most L tokens then eos.
- Step t: every live row's log-probabilities (after the combiner) get NaN → −inf, pad → −inf,
  unk −= unk_penalty; at t ≥ L every token but eos → −inf; at t < min_len eos → −inf.
- Candidates: at t = 0 only row 0 of each sentence (all rows are equal), later cumulative score +
  log-prob; the top C = min(2K, n − 1) per sentence (torch.topk; n = V at t = 0, K·V later).
- Among the first K candidates, those ending in eos with a finite score are finalised in rank order
  (score = cumulative / (t + 1)^lenpen, t + 1 = length incl. eos) unless their slot is marked
  "ignored"; a sentence keeps at most K finished hypotheses and is done when it has K, or at t = L.
- The K best-ranked candidates that neither end in eos nor sit in an ignored slot continue; if
  fewer than K exist, the missing slots are filled with eos candidates and marked ignored for the
  next step (fairseq's ``cands_to_ignore``).
- Each sentence's finished hypotheses are sorted by score, best first; ``nbest`` are returned.
Greedy search is beam 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trime.config import Config, opt
from trime.errors import ConfigError
from trime.generate.combiners import Combiner, vanilla


@dataclass
class BeamConfig(Config):
    """fairseq-generate's search options (MT spec §9 "Common"; fairseq defaults)."""

    beam: int = opt(5, "beam size K (1 = greedy)", "--beam", ge=1)
    lenpen: float = opt(1.0, "length penalty: final score = sum of log-probs / length^lenpen", "--lenpen", ge=0)
    max_len_a: float = opt(0.0, "max length = a · padded source length + b", "--max-len-a", ge=0)
    max_len_b: int = opt(200, "max length = a · padded source length + b", "--max-len-b")
    min_len: int = opt(1, "minimum length (eos excluded)", "--min-len", ge=0)
    nbest: int = opt(1, "hypotheses returned per sentence", "--nbest", ge=1)
    unk_penalty: float = opt(0.0, "subtracted from the unk log-probability", "--unkpen")
    normalize_scores: bool = opt(True, "divide by length^lenpen (off = --unnormalized)")

    def check(self) -> None:
        if self.nbest > self.beam:
            raise ConfigError(f"--nbest {self.nbest} must be at most --beam {self.beam}")


@dataclass
class Hypothesis:
    tokens: Tensor  # (T,) int64 target ids, eos last
    score: float  # natural log; length-normalised for beam search, mean log-prob for score_reference
    positional_scores: Tensor  # (T,) float32 natural-log score of each token


def max_length(cfg: BeamConfig, src_width: int, max_target_positions: int) -> int:
    """fairseq's max_len for a batch whose padded source width (eos included) is ``src_width``."""
    return min(int(cfg.max_len_a * src_width + cfg.max_len_b), max_target_positions - 1)


def _mask(lprobs: Tensor, step: int, max_len: int, cfg: BeamConfig, pad: int, eos: int, unk: int) -> None:
    lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN -> -inf in one pass
    lprobs[:, pad] = -math.inf
    lprobs[:, unk] -= cfg.unk_penalty
    if step >= max_len:
        eos_col = lprobs[:, eos].clone()
        lprobs.fill_(-math.inf)
        lprobs[:, eos] = eos_col
    if step < cfg.min_len:
        lprobs[:, eos] = -math.inf


@torch.no_grad()
def beam_search(
    model,
    src_tokens: Tensor,
    cfg: BeamConfig | None = None,
    combiner: Combiner = vanilla,
    *,
    pad: int = 1,
    eos: int = 2,
    unk: int = 3,
) -> list[list[Hypothesis]]:
    """Translate a batch: src_tokens (B, S) (left padding as fairseq, eos last) -> per sentence the
    ``cfg.nbest`` best finished hypotheses, best first.

    ``model`` is a :class:`trime.model.encoder_decoder.TransformerMT` (anything with ``encode``,
    ``start_cache``, ``decode_step``, ``head.log_probs``, ``max_decoder_positions`` and
    ``cfg.tgt_vocab_size``); it is put in eval mode.
    """
    cfg = cfg or BeamConfig()
    model.eval()
    B0, S = src_tokens.shape
    V = model.cfg.tgt_vocab_size
    K = min(cfg.beam, V - 1)
    C = 2 * K
    L = max_length(cfg, S, model.max_decoder_positions())
    if cfg.min_len > L:
        raise ConfigError(f"min length {cfg.min_len} exceeds the max length {L} of this batch")
    dev = src_tokens.device
    cache = model.start_cache(model.encode(src_tokens), group=K, capacity=L + 1)
    tokens = torch.full((B0 * K, L + 2), pad, dtype=torch.long, device=dev)  # (N, L+2) eos, y_1 .. y_L, eos
    tokens[:, 0] = eos
    scores = torch.zeros(B0 * K, L + 1, device=dev)  # (N, L+1) cumulative log-score after each token
    ignored = torch.zeros(B0, K, dtype=torch.bool, device=dev)  # (B, K) candidate slots not to finalise
    sent_ids = torch.arange(B0, device=dev)  # (B,) original index of each live sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(B0)]
    for step in range(L + 1):
        B = sent_ids.numel()
        h = model.decode_step(tokens[:, step], cache)  # (N, d)
        lprobs = combiner(step, h, model.head.log_probs(h)).float()  # (N, V)
        _mask(lprobs, step, L, cfg, pad, eos, unk)
        lprobs = lprobs.view(B, K, V)
        if step == 0:
            lprobs = lprobs[:, :1]  # (B, 1, V)
        else:
            lprobs = lprobs + scores.view(B, K, -1)[:, :, step - 1 : step]
        flat = lprobs.reshape(B, -1)
        cand_scores, cand_idx = flat.topk(min(C, flat.shape[1] - 1), dim=1)  # (B, C)
        cand_beams, cand_tokens = cand_idx // V, cand_idx % V
        cand_rows = cand_beams + (torch.arange(B, device=dev) * K).unsqueeze(1)  # (B, C) rows of this step

        eos_mask = cand_tokens.eq(eos) & cand_scores.ne(-math.inf)  # (B, C)
        eos_mask[:, :K] &= ~ignored
        done = _finalize(
            step,
            L,
            cfg,
            K,
            eos,
            tokens,
            scores,
            cand_rows[:, :K],
            cand_scores[:, :K],
            eos_mask[:, :K],
            sent_ids,
            finished,
        )
        if done.all():
            break
        keep = (~done).nonzero().squeeze(1)  # (B',)
        if keep.numel() < B:
            cand_beams, cand_scores, cand_tokens = cand_beams[keep], cand_scores[keep], cand_tokens[keep]
            eos_mask, ignored, sent_ids = eos_mask[keep], ignored[keep], sent_ids[keep]
            rows = (keep.unsqueeze(1) * K + torch.arange(K, device=dev)).view(-1)  # (B'·K,)
            tokens, scores = tokens[rows], scores[rows]
        B = keep.numel()

        # The K best candidates that neither end in eos nor sit in an ignored slot continue (rank order).
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
        cache.reorder((beams + (keep * K).unsqueeze(1)).view(-1))  # the same rows, numbered before pruning
    out = []
    for hyps in finished:
        order = torch.sort(torch.tensor([h.score for h in hyps]), descending=True).indices.tolist()
        out.append([hyps[i] for i in order][: cfg.nbest])
    return out


def _finalize(
    step: int,
    L: int,
    cfg: BeamConfig,
    K: int,
    eos: int,
    tokens: Tensor,
    scores: Tensor,
    rows: Tensor,
    cand_scores: Tensor,
    eos_mask: Tensor,
    sent_ids: Tensor,
    finished: list[list[Hypothesis]],
) -> Tensor:
    """Store the hypotheses of ``rows[eos_mask]`` (B, K) ending in eos now; return which sentences are done (B,)."""
    done = torch.zeros(eos_mask.shape[0], dtype=torch.bool)
    if not eos_mask.any():
        return done.to(eos_mask.device)
    idx = rows[eos_mask]  # (E,) rank order within each sentence, sentences in order
    eos_scores = cand_scores[eos_mask]  # (E,) cumulative
    toks = tokens[idx, 1 : step + 2].clone()  # (E, step+1)
    toks[:, step] = eos
    pos = scores[idx, : step + 1].clone()  # (E, step+1)
    pos[:, step] = eos_scores
    pos[:, 1:] = pos[:, 1:] - pos[:, :-1]
    if cfg.normalize_scores:
        eos_scores = eos_scores / (step + 1) ** cfg.lenpen
    groups = (idx // K).tolist()
    for i, g in enumerate(groups):
        hyps = finished[int(sent_ids[g])]
        if len(hyps) < K:
            hyps.append(Hypothesis(tokens=toks[i], score=float(eos_scores[i]), positional_scores=pos[i]))
    for g in set(groups):
        done[g] = len(finished[int(sent_ids[g])]) == K or step == L
    return done.to(eos_mask.device)


@torch.no_grad()
def score_reference(
    model, src_tokens: Tensor, target: Tensor, combiner: Combiner = vanilla, *, pad: int = 1, eos: int = 2
) -> list[Hypothesis]:
    """fairseq-generate --score-reference: teacher-forced log-probabilities of each reference.

    target (B, T) right-padded, eos last; the decoder reads eos + target[:-1] (fairseq's
    prev_output_tokens). score = mean positional log-prob (no length penalty), as fairseq prints it.
    """
    model.eval()
    lengths = target.ne(pad).sum(1)  # (B,)
    prev = torch.full_like(target, pad)  # (B, T)
    prev[:, 0] = eos
    prev[:, 1:] = target[:, :-1]
    prev = prev.masked_fill(target.eq(pad), pad)
    h = model(src_tokens, prev).h  # (B, T, d)
    real = target.ne(pad)
    rows = h[real]  # (M, d)
    lp = combiner(-1, rows, model.head.log_probs(rows)).float()  # (M, V)
    lp = lp.gather(1, target[real].unsqueeze(1)).squeeze(1)  # (M,)
    out, start = [], 0
    for b, n in enumerate(lengths.tolist()):
        pos = lp[start : start + n]
        out.append(Hypothesis(tokens=target[b, :n].clone(), score=float(pos.sum() / n), positional_scores=pos))
        start += n
    return out
