"""Decoding with an external memory: kNN-MT and TrimeMT as per-step combiners (MT spec §9.2, §9.3).

Each step searches the datastore once for every live hypothesis (its decoder output h is the query)
and mixes the k neighbours (raw similarities a_j: inner products, or −squared L2 distances; their
tokens v_j) into the model's distribution:

- ``knn`` (kNN-MT): P(y) = (1 − λ)·p_vocab(y) + λ·p_knn(y), p_knn ∝ Σ_{v_j = y} exp(a_j / T);
- ``trime`` (paper-consistent TrimeMT): the training equation with the neighbours as memory,
  P(y) = (Z_t·p_vocab(y) + Σ_{v_j = y} e^{s_j}) / (Z_t + Σ_j e^{s_j}), s_j = a_j / (√d·T): it sums to 1;
- ``trime_released`` (as the released code decodes, MT spec §9.3): λ = Z_c / (Z_t + Z_c) and
  P(y) = (1 − λ)·p_vocab(y) + p_knn(y) with p_knn ∝ exp(s_j): it sums to 2 − λ, and the beam
  search uses these unnormalised scores as they are (the published 33.73 BLEU came from this mode).

Scores come from memory.joint.memory_logits (the one score formula), the mixtures from memory.mix and
memory.knn.interpolate. Letters: N hypotheses, k neighbours, V target vocabulary, d key width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from trime.errors import ConfigError
from trime.memory.joint import joint_denominator, memory_logits
from trime.memory.knn import NEG_INF, scaled_logsumexp, shifted
from trime.memory.mix import entry_logsumexp, trime_released_log_probs

MODES = ("knn", "trime", "trime_released")
Search = Callable[[Tensor], tuple[Tensor, Tensor]]  # h (N, d) -> (similarities (N, k), −inf holes; tokens (N, k))


class MemoryCombiner:
    """A beam-search combiner (trime.generate.combiners) that mixes in the k nearest datastore entries."""

    def __init__(self, search: Search, log_z: Callable[[Tensor], Tensor], *, mode: str, lmbda: float = 0.0,
                 temp: float = 1.0, dim: int) -> None:  # fmt: skip
        if mode not in MODES:
            raise ConfigError(f"unknown memory decoding mode {mode!r} (choose {', '.join(MODES)})")
        if not 0.0 <= lmbda <= 1.0 or temp <= 0:
            raise ConfigError("--lmbda must be in [0, 1] and --knn-temp positive")
        self.search, self.log_z, self.mode, self.lmbda, self.temp, self.dim = search, log_z, mode, lmbda, temp, dim
        self.searches = 0  # queries sent to the index (one per hypothesis and step)

    @property
    def uses_log_z(self) -> bool:
        """Whether the mode needs log Z_t: a decoder that has it from the logits of ``logp`` passes it."""
        return self.mode != "knn"

    def __call__(self, step: int, h: Tensor, logp: Tensor, log_z: Tensor | None = None) -> Tensor:
        """``log_z`` (N,): log Z_t of the rows when the caller has it (else ``self.log_z(h)`` computes it)."""
        scores, values = self.search(h)  # (N, k), (N, k)
        self.searches += h.shape[0]
        logp = logp.float()
        if scores.shape[1] == 0:
            return logp
        empty = ~torch.isfinite(scores).any(1, keepdim=True)  # (N, 1): no neighbour at all (index holes)
        mixed = self._mix(h, logp, scores.float(), values, log_z)
        return torch.where(empty, logp, mixed) if bool(empty.any()) else mixed

    def _mix(self, h: Tensor, logp: Tensor, scores: Tensor, values: Tensor, log_z: Tensor | None = None) -> Tensor:
        """memory.mix's (N, V) forms computed where the neighbours' tokens are: every other token keeps
        the model's term alone (its memory sum is 0), so the log / exp passes run over (N, k), not (N, V)."""
        if self.mode == "knn":
            if self.lmbda == 0.0:
                return logp
            s = memory_logits(scores, None, self.temp)  # a / T
            norm = scaled_logsumexp(shifted(s), 1.0)  # (N,)
            knn = (entry_logsumexp(s, values, logp.shape[1]) - norm[:, None]).masked_fill(
                torch.isneginf(norm)[:, None], NEG_INF
            )  # (N, k): log p_knn of each neighbour's token (knn_vocab_log_probs)
            if self.lmbda == 1.0:  # p_knn alone, exactly (memory.knn.interpolate)
                return torch.full_like(logp, NEG_INF).scatter_(1, values, knn)
            out = logp.float() + math.log1p(-self.lmbda)  # memory.knn.interpolate, term by term
            return out.scatter_(1, values, torch.logaddexp(out.gather(1, values), knn + math.log(self.lmbda)))
        s = memory_logits(scores, self.dim, self.temp)  # a / (√d·T)
        log_zt = (self.log_z(h) if log_z is None else log_z).float()  # (N,)
        if self.mode == "trime":  # joint_vocab_log_probs, term by term
            N, V = logp.shape
            token_share, log_den = joint_denominator(log_zt, scaled_logsumexp(shifted(s), 1.0))  # (N,), (N,)
            out = logp.float() + token_share[:, None]
            pos = entry_logsumexp(s, values, V) - log_den[:, None]  # (N, k)
            return out.scatter_(1, values, torch.logaddexp(out.gather(1, values), pos))
        return trime_released_log_probs(logp, log_zt, s, values)
