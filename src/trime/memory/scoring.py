"""Scoring tokens with memories at evaluation time: one function for ``trime eval`` and ``trime sweep``.

Evaluation collects, for every scored token, what the memories contribute *before* any
temperature (:class:`MemoryRows`); :func:`log_probs` then turns rows into log p(y) under one or
many settings (τ, λ, T, k). ``trime eval`` calls it with its one setting window by window;
``trime sweep`` calls it with a whole grid on rows cached by ``--save-neighbors``
(trime.memory.neighbors), so tuning and evaluation cannot disagree.

For a row with token log-probability log p_tok(y), head log-partition log Z_tok, local/long
entries with scaled scores q·k/√d and external neighbours with raw similarities (spec §5.4, §5.5):

    log p_joint(y) = combine(log p_tok, log Z_tok, lse_j s_j/τ, lse_{j: v_j = y} s_j/τ)
        with s = q·k/√d for local/long entries and, when the external memory is in the joint
        softmax, s = score/√d for the first k neighbours (memory.joint.score_scale);
    log p(y) = log((1 − λ)·p_joint(y) + λ·p_knn(y)),  p_knn ∝ exp(score/T) over the first k neighbours.

Letters: n rows, m local/long entries per row, k neighbours (best first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from trime.memory.joint import combine, memory_logits, score_scale
from trime.memory.knn import NEG_INF, interpolate, knn_log_probs, scaled_logsumexp, shifted


@dataclass
class MemoryRows:
    """Per scored token: everything the memories contribute, temperature-free."""

    tok_logp: Tensor  # (n,) log p_tok(y) of the output layer
    tok_log_z: Tensor  # (n,) log Z_tok
    targets: Tensor  # (n,) int64
    mem_scores: Tensor  # (n, m) q·k/√d of local + long entries, −inf where invisible
    mem_pos: Tensor  # (n, m) bool: the entry's token is the target
    ext_scores: Tensor  # (n, k) raw similarities of the external neighbours, best first, −inf for holes
    ext_values: Tensor  # (n, k) int64 the neighbours' tokens

    @classmethod
    def build(
        cls,
        tok_logp: Tensor,
        tok_log_z: Tensor,
        targets: Tensor,
        mem_scores: Tensor | None = None,
        mem_values: Tensor | None = None,
        ext_scores: Tensor | None = None,
        ext_values: Tensor | None = None,
    ) -> MemoryRows:
        """Rows from what a window gives: mem_scores (n, M) q·k/√d with −inf for invisible entries and
        mem_values (M,) or (n, M); ext_scores / ext_values (n, k) raw similarities (−inf for holes) and
        tokens, in any order (sorted best first here), or None for no memory of that kind."""
        targets = targets.long()
        n, device = targets.shape[0], targets.device
        if mem_scores is None:
            mem_scores, mem_values = torch.empty(n, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
        mem_pos = mem_values.to(device).expand(n, -1) == targets[:, None]  # (n, M)
        if ext_scores is None:
            ext_scores, ext_values = (
                torch.empty(n, 0, device=device),
                torch.empty(n, 0, dtype=torch.long, device=device),
            )
        ext_scores, order = ext_scores.float().sort(dim=1, descending=True, stable=True)  # (n, k)
        ext_values = ext_values.long().gather(1, order.to(ext_values.device))
        return cls(tok_logp, tok_log_z, targets, mem_scores, mem_pos, ext_scores, ext_values)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def rows(self, sl: slice) -> MemoryRows:
        return MemoryRows(**{f.name: getattr(self, f.name)[sl] for f in fields(self)})


@dataclass(frozen=True)
class Setting:
    """How to score: τ (``--softmax-temp``), λ (``--lmbda``), T (``--interp-temp``), k neighbours
    (None: all there are) and whether the neighbours join the joint softmax (``--use-external``)."""

    softmax_temp: float = 1.0
    lmbda: float = 0.0
    interp_temp: float = 1.0
    k: int | None = None
    ext_in_joint: bool = False


def _positive_part(scores: Tensor, positive: Tensor, compact: bool) -> Tensor:
    """Scores with non-positive entries at −inf; ``compact`` squeezes them to the largest number of
    positives in a row first (worth its sort when many temperatures reuse it)."""
    if not compact:
        return scores.masked_fill(~positive, NEG_INF)
    width = int(positive.sum(1).max()) if positive.numel() else 0
    order = positive.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :width]  # (n, p)
    return scores.gather(1, order).masked_fill(~positive.gather(1, order), NEG_INF)


def _joint(r: MemoryRows, taus: Sequence[float], k: int, dim: int, ext_in_joint: bool) -> list[Tensor]:
    """[log p_joint (n,) for each τ]: the row max is taken once, then one exp pass per τ."""
    scores, pos = r.mem_scores.float(), r.mem_pos
    if ext_in_joint and k:
        scores = torch.cat([scores, memory_logits(r.ext_scores[:, :k], dim)], 1)  # (n, m + k)
        pos = torch.cat([pos, r.ext_values[:, :k] == r.targets[:, None]], 1)
    norm = shifted(scores)
    positive = shifted(_positive_part(scores, pos, compact=len(taus) > 1))
    out = []
    for t in taus:
        c = score_scale(None, t)  # the scores already carry 1/√d
        out.append(combine(r.tok_logp, r.tok_log_z, scaled_logsumexp(norm, c), scaled_logsumexp(positive, c)))
    return out


def log_probs(rows: MemoryRows, settings: Sequence[Setting], dim: int, chunk: int = 8192) -> list[Tensor]:
    """log p(y) (n,) float32 of every row under each setting (module docstring); ``dim`` is the key
    width d. Rows are scored ``chunk`` at a time; each chunk is prepared once per k."""
    out: list[list[Tensor]] = [[] for _ in settings]
    k_all = rows.ext_scores.shape[1]
    for a in range(0, len(rows), chunk):
        r = rows.rows(slice(a, a + chunk))
        for k in sorted({k_all if s.k is None else min(s.k, k_all) for s in settings}):
            mine = [i for i, s in enumerate(settings) if (k_all if s.k is None else min(s.k, k_all)) == k]
            for ext in sorted({settings[i].ext_in_joint for i in mine}):
                group = [i for i in mine if settings[i].ext_in_joint == ext]
                taus = sorted({settings[i].softmax_temp for i in group})
                temps = sorted({settings[i].interp_temp for i in group if settings[i].lmbda > 0})
                joint = dict(zip(taus, _joint(r, taus, k, dim, ext)))
                if temps and k == 0:
                    raise ValueError("interpolation (lambda > 0) needs external neighbours")
                pos = r.ext_values[:, :k] == r.targets[:, None]
                knn = dict(zip(temps, knn_log_probs(r.ext_scores[:, :k], pos, temps))) if temps else {}
                for i in group:
                    s = settings[i]
                    lp = joint[s.softmax_temp]
                    out[i].append(interpolate(lp, knn[s.interp_temp], s.lmbda) if s.lmbda > 0 else lp.float())
    return [torch.cat(parts) if parts else torch.empty(0) for parts in out]
