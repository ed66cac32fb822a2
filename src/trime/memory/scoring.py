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

from trime.memory.joint import memory_logits, score_scale
from trime.memory.knn import interpolate, knn_log_probs
from trime.memory.mix import joint_token_log_probs, joint_vocab_log_probs, knn_vocab_log_probs


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


def _entries(mem_scores: Tensor, ext_scores: Tensor, k: int, dim: int, ext_in_joint: bool) -> Tensor:
    """The joint softmax's entry logits before τ (n, m [+ k]): local/long q·k/√d, then the first k
    neighbours' score/√d when the external memory is in the joint softmax."""
    scores = mem_scores.float()
    if ext_in_joint and k:
        scores = torch.cat([scores, memory_logits(ext_scores[:, :k], dim)], 1)  # (n, m + k)
    return scores


def _joint(r: MemoryRows, taus: Sequence[float], k: int, dim: int, ext_in_joint: bool) -> list[Tensor]:
    """[log p_joint (n,) for each τ] (memory.mix.joint_token_log_probs)."""
    pos = r.mem_pos
    if ext_in_joint and k:
        pos = torch.cat([pos, r.ext_values[:, :k] == r.targets[:, None]], 1)
    scores = _entries(r.mem_scores, r.ext_scores, k, dim, ext_in_joint)
    return joint_token_log_probs(r.tok_logp, r.tok_log_z, scores, pos, taus)


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


@dataclass
class StepRows:
    """What the memories contribute to the next position of each of B hypotheses, temperature-free
    (:class:`MemoryRows` for every candidate token at once: values instead of a positive mask)."""

    tok_logp: Tensor  # (B, V) log p_tok of every token
    tok_log_z: Tensor  # (B,) log Z_tok
    mem_scores: Tensor  # (B, m) q·k/√d of local + long entries
    mem_values: Tensor  # (B, m) int64 their tokens
    ext_scores: Tensor  # (B, k) raw similarities, best first, −inf for holes
    ext_values: Tensor  # (B, k) int64
    n_local: int = 0  # the first n_local entries are local, the rest long-term


def vocab_log_probs(rows: StepRows, setting: Setting, dim: int) -> Tensor:
    """log p(y) (B, V) float32 for every token y: :func:`log_probs`'s formula (the joint softmax, then
    kNN-LM interpolation) for the whole vocabulary (memory.mix)."""
    V = rows.tok_logp.shape[1]
    k_all = rows.ext_scores.shape[1]
    k = k_all if setting.k is None else min(setting.k, k_all)
    scores = _entries(rows.mem_scores, rows.ext_scores, k, dim, setting.ext_in_joint)
    values = torch.cat([rows.mem_values, rows.ext_values[:, :k]], 1) if setting.ext_in_joint and k else rows.mem_values
    lp = joint_vocab_log_probs(rows.tok_logp, rows.tok_log_z, scores, values, setting.softmax_temp)
    if setting.lmbda > 0:
        if k == 0:
            raise ValueError("interpolation (lambda > 0) needs external neighbours")
        s = rows.ext_scores[:, :k].float() * score_scale(None, setting.interp_temp)  # (B, k)
        lp = interpolate(lp, knn_vocab_log_probs(s, rows.ext_values[:, :k], V), setting.lmbda)
    return lp.float()
