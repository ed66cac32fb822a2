"""kNN-LM distribution and interpolation (spec §5.5).

Letters: N scored rows, k neighbours.

Pure functions over tensors; the math runs in float32 whatever the input dtype (the original
cast both terms to half before mixing under fp16; we do not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trime.memory.joint import score_scale

NEG_INF = float("-inf")


def shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − row max (N, w), row max (N,)); rows with nothing finite keep a max of 0 (and stay −inf)."""
    mx = x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), NEG_INF)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return x - mx[:, None], mx


def scaled_logsumexp(shift: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """logsumexp(x · scale) per row (N,) from :func:`shifted` x, with one exp pass; −inf for empty rows."""
    d, mx = shift
    return torch.mul(d, scale).exp_().sum(1).log_() + mx * scale


def knn_log_probs(scores: torch.Tensor, positive: torch.Tensor, temps: Sequence[float]) -> list[torch.Tensor]:
    """[log p_knn(y_i) (N,) for each T in ``temps``], p_knn = Σ_{n positive} softmax_n(score_n / T).

    scores (N, k): raw similarities (no √d, no τ), −inf for index holes; positive (N, k): the
    neighbour's token is the target. −inf where no neighbour has the target. The row max is taken
    once for every temperature.
    """
    scores = scores.float()
    norm, pos = shifted(scores), shifted(scores.masked_fill(~positive, NEG_INF))
    out = []
    for t in temps:
        c = score_scale(None, t)
        log_pos, log_norm = scaled_logsumexp(pos, c), scaled_logsumexp(norm, c)
        out.append((log_pos - log_norm).masked_fill(torch.isneginf(log_pos) | torch.isneginf(log_norm), NEG_INF))
    return out


def knn_log_prob(
    scores: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, temp: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """log p_knn(y_i) = log Σ_{n: value_n = y_i} softmax_n(score_n / T) over the k neighbours (spec §5.5).

    scores (N, k): raw faiss similarities (inner products, no sqrt(d), no τ); values (N, k) the
    neighbours' tokens; targets (N,); temp T = ``--interp-temp``; valid (N, k) bool marks real
    neighbours (index holes are left out of the softmax). Returns (N,) float32; −inf where no
    valid neighbour has the target. The original used −10000 there; with 0 < λ the mixture
    stays finite either way, and the two differ by at most λ·e^−10000 in probability.
    """
    if valid is not None:
        scores = scores.float().masked_fill(~valid, NEG_INF)
    return knn_log_probs(scores, values == targets.unsqueeze(-1), [temp])[0]


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
