"""Mixing the output layer with memory entries: every form the library scores, decodes or explains with.

Pure functions over tensors, in float32 (float64 stays float64 in the joint softmax). Memory scores are
logits already scaled (memory.joint.memory_logits), −inf for invisible entries or index holes.

- joint softmax (DESIGN.md, spec §2 step 3), p(y) = [Z_tok·p_tok(y) + Σ_{v_j = y} e^{s_j}] / [Z_tok + Σ_j e^{s_j}]:
  :func:`joint_token_log_probs` for each row's own target (evaluation, ``trime sweep``; several τ at once),
  :func:`joint_vocab_log_probs` for every token of the vocabulary (generation, TrimeMT), and
  :func:`joint_breakdown`, the parts of the same sum (``trime explain``);
- kNN distribution over the vocabulary, p_knn(y) = Σ_{v_j = y} softmax_j(s_j) (spec §5.5, MT spec §9.2):
  :func:`knn_vocab_log_probs` (its per-target form is memory.knn.knn_log_probs); mix it in with
  memory.knn.interpolate, which works on any shape;
- the released TrimeMT decoding (MT spec §9.3), :func:`trime_released_log_probs`:
  (1 − λ)·p_vocab + p_knn with λ = Z_c / (Z_tok + Z_c); it sums to 2 − λ.

Letters: N rows, V vocabulary, m entries (neighbours) per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trime.memory.joint import combine, joint_denominator, score_scale
from trime.memory.knn import NEG_INF, scaled_logsumexp, shifted


def _token_sums(scores: Tensor, values: Tensor, V: int) -> tuple[Tensor, Tensor]:
    """(sums (N, V), mx (N, 1)): Σ_{j: values_j = y} exp(scores_j − mx) per token y, mx each row's finite max."""
    mx = scores.amax(1, keepdim=True) if scores.shape[1] else scores.new_zeros(scores.shape[0], 1)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    sums = torch.zeros(scores.shape[0], V, dtype=scores.dtype, device=scores.device)
    sums.scatter_add_(1, values, (scores - mx).exp())  # holes (−inf) add exactly 0
    return sums, mx


def scatter_logsumexp(scores: Tensor, values: Tensor, V: int) -> Tensor:
    """(N, V): log Σ_{j: values_j = y} exp(scores_j) for every token y (−inf where no entry has y).

    scores (N, m), values (N, m) int64."""
    sums, mx = _token_sums(scores, values, V)
    return sums.log() + mx


def entry_logsumexp(scores: Tensor, values: Tensor, V: int) -> Tensor:
    """(N, m): :func:`scatter_logsumexp` read at each entry's own token (the same sums), with the log
    taken over (N, m) instead of (N, V)."""
    sums, mx = _token_sums(scores, values, V)
    return sums.gather(1, values).log() + mx


def _positive_part(scores: Tensor, positive: Tensor, compact: bool) -> Tensor:
    """Scores with non-positive entries at −inf; ``compact`` squeezes them to the largest number of
    positives in a row first (worth its sort when many temperatures reuse it)."""
    if not compact:
        return scores.masked_fill(~positive, NEG_INF)
    width = int(positive.sum(1).max()) if positive.numel() else 0
    order = positive.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :width]  # (n, p)
    return scores.gather(1, order).masked_fill(~positive.gather(1, order), NEG_INF)


def joint_token_log_probs(
    tok_logp: Tensor, tok_log_z: Tensor, scores: Tensor, positive: Tensor, taus: Sequence[float] = (1.0,)
) -> list[Tensor]:
    """[log p(y_i) (N,) for each τ in ``taus``]: the joint softmax of each row's target y_i over entries
    with logits scores / τ. tok_logp (N,) log p_tok(y_i), tok_log_z (N,) log Z_tok, scores (N, m),
    positive (N, m) bool (the entry's token is y_i). The row max is taken once, then one exp pass per τ."""
    norm = shifted(scores)
    pos = shifted(_positive_part(scores, positive, compact=len(taus) > 1))
    out = []
    for t in taus:
        c = score_scale(None, t)
        out.append(combine(tok_logp, tok_log_z, scaled_logsumexp(norm, c), scaled_logsumexp(pos, c)))
    return out


def joint_vocab_log_probs(
    tok_logp: Tensor, tok_log_z: Tensor, scores: Tensor, values: Tensor, tau: float = 1.0
) -> Tensor:
    """log p(y) (N, V) for every token y: the joint softmax with entry logits scores / τ.
    tok_logp (N, V) log p_tok, tok_log_z (N,) log Z_tok, scores (N, m), values (N, m) int64.
    O(V + m) per row: the two memory statistics become per-token by a scatter."""
    N, V = tok_logp.shape
    scaled = scores.float() * score_scale(None, tau)
    lzc = scaled_logsumexp(shifted(scaled), 1.0)  # (N,)
    lzpos = scatter_logsumexp(scaled, values, V) if scaled.shape[1] else scaled.new_full((N, V), NEG_INF)
    return combine(tok_logp, tok_log_z[:, None].expand(N, V), lzc[:, None].expand(N, V), lzpos)


def joint_breakdown(tok_logp: Tensor, tok_log_z: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The parts of the joint softmax's sum for targets with log p_tok(y_i) = tok_logp (N,):
    (log Z_tok·p_tok(y_i) / (Z_tok + Z_c) (N,), log e^{s_j} / (Z_tok + Z_c) (N, m), log Z_c / (Z_tok + Z_c) (N,)).
    p(y_i) is the first plus the second summed over the entries labelled y_i (memory.joint.combine's terms)."""
    lzc = scaled_logsumexp(shifted(scores.float()), 1.0)  # (N,)
    token_share, log_den = joint_denominator(tok_log_z.float(), lzc)
    return tok_logp.float() + token_share, scores.float() - log_den[:, None], lzc - log_den


def knn_weights(scores: Tensor) -> Tensor:
    """(N, m) softmax of the neighbours' logits; 0 for holes and for rows with no neighbour at all."""
    return torch.softmax(scores.float(), 1).nan_to_num(0.0)


def knn_vocab_log_probs(scores: Tensor, values: Tensor, V: int) -> Tensor:
    """log p_knn(y) (N, V), p_knn(y) = Σ_{j: v_j = y} softmax_j(scores_j) (logits: raw similarity / T);
    −inf everywhere in a row with no neighbour."""
    s = scores.float()
    norm = scaled_logsumexp(shifted(s), 1.0)  # (N,)
    return (scatter_logsumexp(s, values, V) - norm[:, None]).masked_fill(torch.isneginf(norm)[:, None], NEG_INF)


def trime_released_log_probs(tok_logp: Tensor, tok_log_z: Tensor, scores: Tensor, values: Tensor) -> Tensor:
    """log[(1 − λ)·p_vocab(y) + p_knn(y)] (N, V), λ = Z_c / (Z_tok + Z_c), p_knn ∝ exp(scores): the TRIME
    release's decoding (MT spec §9.3, "trime_released"), which sums to 2 − λ. scores (N, k) logits a/(√d·T)."""
    V = tok_logp.shape[1]
    lzc = scaled_logsumexp(shifted(scores.float()), 1.0)  # (N,)
    token_share = joint_denominator(tok_log_z.float(), lzc)[0]  # log (1 − λ)
    return torch.logaddexp(tok_logp.float() + token_share[:, None], knn_vocab_log_probs(scores, values, V))
