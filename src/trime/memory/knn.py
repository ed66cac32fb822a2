"""kNN-LM distribution and interpolation; external scores for the joint softmax (spec §5.4, §5.5).

Letters: N scored rows, k neighbours, d key width.

Pure functions over tensors; the math runs in float32 whatever the input dtype (the original
cast both terms to half before mixing under fp16; we do not).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def knn_log_prob(scores: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, temp: float,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """log p_knn(y_i) = log Σ_{n: value_n = y_i} softmax_n(score_n / T) over the k neighbours (spec §5.5).

    scores (N, k): raw faiss similarities (inner products, no sqrt(d), no τ); values (N, k) the
    neighbours' tokens; targets (N,); temp T = ``--interp-temp``; valid (N, k) bool marks real
    neighbours (index holes are left out of the softmax). Returns (N,) float32; −inf where no
    valid neighbour has the target. The original used −10000 there; with 0 < λ the mixture
    stays finite either way, and the two differ by at most λ·e^−10000 in probability.
    """
    logits = scores.float() / temp  # (N, k)
    if valid is not None:
        logits = logits.masked_fill(~valid, NEG_INF)
    log_norm = torch.logsumexp(logits, dim=-1)  # (N,)
    positive = values == targets.unsqueeze(-1)  # (N, k)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, NEG_INF), dim=-1)  # (N,)
    out = log_pos - log_norm
    return out.masked_fill(torch.isneginf(log_pos) | torch.isneginf(log_norm), NEG_INF)


def interpolate(lm_log_prob: torch.Tensor, knn_log_prob: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log((1 − λ)·p_lm + λ·p_knn), computed in log space (spec §5.5). λ = 0 returns the LM
    log-probability itself (float32) and λ = 1 the kNN one, exactly."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return lm_log_prob.float()
    if lmbda == 1.0:
        return knn_log_prob.float()
    return torch.logaddexp(lm_log_prob.float() + math.log1p(-lmbda), knn_log_prob.float() + math.log(lmbda))


def external_scores(scores: torch.Tensor, dim: int, softmax_temp: float) -> torch.Tensor:
    """Logits of external-memory entries in the joint softmax: faiss score / sqrt(d) / τ (spec §5.4).
    −inf (an index hole) stays −inf."""
    return scores.float() / math.sqrt(dim) / softmax_temp
