"""Brute-force oracles written from the spec with plain Python loops (STYLE §7.6).

Nothing here is fast or clever on purpose: each function restates one formula of
reference/trime-lm-spec.md so the library's vectorised code can be checked against it.
Also small test doubles for the output head (plain softmax and a 2-cluster adaptive softmax).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# The joint softmax (spec §2 step 3; DESIGN.md "The one idea everything shares")


def _logsumexp(xs: list[float]) -> float:
    xs = [x for x in xs if x != -math.inf]
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(math.fsum(math.exp(x - m) for x in xs))


def joint_log_prob(tlp, tln, scores, values, targets) -> list[float]:
    """log p(y_i) = log(Z_tok·p_tok(y_i) + Σ_{j: v_j=y_i} e^{s_ij}) − log(Z_tok + Σ_j e^{s_ij}), by loops.

    Inputs are tensors or nested lists; scores (N, M) with −inf for invisible entries; values (M,)
    or (N, M). Returns N Python floats.
    """
    tlp, tln = [float(x) for x in tlp], [float(x) for x in tln]
    scores = [[float(s) for s in row] for row in scores]
    values = [[int(v) for v in row] for row in values] if _is_2d(values) else [[int(v) for v in values]] * len(tlp)
    out = []
    for i, y in enumerate(int(t) for t in targets):
        num = [tln[i] + tlp[i]] + [s for s, v in zip(scores[i], values[i]) if v == y]
        den = [tln[i]] + list(scores[i])
        out.append(_logsumexp(num) - _logsumexp(den))
    return out


def _is_2d(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 2
    return len(x) > 0 and isinstance(x[0], (list, tuple))


# ----------------------------------------------------------------------------------------------
# Visibility predicates (spec §2 step 2, §3.2, §3.3, §4); pad-valued keys never visible (§2.7 fix)


def local_visible(i: int, j: int, L: int, key_valid) -> bool:
    """Rows flattened (segment, position): same segment and strictly earlier position."""
    return bool(key_valid[j]) and i // L == j // L and j % L < i % L


def long_visible(i_stream: int, j: int, group_bounds, key_valid) -> bool:
    """Stream rows: same memory group and j strictly before i."""

    def group(r):
        for g in range(len(group_bounds) - 1):
            if group_bounds[g] <= r < group_bounds[g + 1]:
                return g
        raise AssertionError(r)

    return bool(key_valid[j]) and group(i_stream) == group(j) and j < i_stream


def ext_visible(seg_i, pos_i, seg_j, pos_j, hidden: bool, valid: bool) -> bool:
    """Other segments fully visible; own segment strictly earlier unless hidden."""
    if not valid:
        return False
    if seg_i != seg_j:
        return True
    return (not hidden) and pos_j < pos_i


def mask_from(pred, n: int, m: int) -> torch.Tensor:
    """Expand a predicate pred(i, j) into an (n, m) bool tensor with two loops."""
    out = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        for j in range(m):
            out[i, j] = pred(i, j)
    return out


# ----------------------------------------------------------------------------------------------
# Heads (test doubles for trime.model.adaptive.OutputHead)


class FakeHead(nn.Module):
    """Plain softmax over V with a bias-free linear layer."""

    def __init__(self, d: int, V: int):
        super().__init__()
        self.proj = nn.Linear(d, V, bias=False)

    def log_probs(self, h):
        return torch.log_softmax(self.proj(h).float(), dim=-1)  # (N, V)

    def target_logp(self, h, targets, tail_quirk=False):
        z = self.proj(h).float()  # (N, V)
        log_z = torch.logsumexp(z, dim=-1)
        return z.gather(1, targets[:, None]).squeeze(1) - log_z, log_z


class FakeAdaptiveHead(nn.Module):
    """Adaptive softmax with one tail cluster: head = cutoff shortlist words + 1 cluster logit.

    log p_tok(y) = log softmax_head(y) for y < cutoff, else log softmax_head(cluster) +
    log softmax_tail(y − cutoff); log Z_head is the head's partition function (spec §1, §2 step 1).
    """

    def __init__(self, d: int, V: int, cutoff: int):
        super().__init__()
        self.cutoff, self.V = cutoff, V
        self.head = nn.Linear(d, cutoff + 1, bias=False)
        self.tail = nn.Linear(d, V - cutoff, bias=False)

    def log_probs(self, h):
        head = torch.log_softmax(self.head(h).float(), dim=-1)  # (N, c+1)
        tail = torch.log_softmax(self.tail(h).float(), dim=-1) + head[:, -1:]  # (N, V-c)
        return torch.cat([head[:, :-1], tail], dim=-1)  # (N, V)

    def target_logp(self, h, targets, tail_quirk=False):
        z = self.head(h).float()
        log_z = torch.logsumexp(z, dim=-1)
        return self.log_probs(h).gather(1, targets[:, None]).squeeze(1), log_z


def head_log_norm(head, h) -> torch.Tensor:
    return head.target_logp(h, torch.zeros(h.shape[0], dtype=torch.long))[1]


# ----------------------------------------------------------------------------------------------
# Whole-vocabulary distribution and the TRIME loss, by loops


def full_vocab_probs(head, h_i, q_i, keys, values, visible_row, scale: float) -> list[float]:
    """p(y) for every y in V for one query: token mass Z·p_tok(y) plus visible memory mass."""
    with torch.no_grad():
        logp_tok = head.log_probs(h_i[None])[0].tolist()
        log_z = float(head_log_norm(head, h_i[None])[0])
    V = len(logp_tok)
    mass = [math.exp(log_z + lp) for lp in logp_tok]
    for j in range(keys.shape[0]):
        if visible_row[j]:
            mass[int(values[j])] += math.exp(float(q_i @ keys[j]) * scale)
    total = math.exp(log_z) + math.fsum(
        math.exp(float(q_i @ keys[j]) * scale) for j in range(keys.shape[0]) if visible_row[j]
    )
    return [mass[y] / total for y in range(V)]


def trime_loss(h, q, targets, head, keys, values, pred, pad: int) -> float:
    """Σ over non-pad rows of −log p(y_i), memory entries (keys, values) visible per pred(i, j)."""
    d = q.shape[-1]
    with torch.no_grad():
        tlp, tln = head.target_logp(h, targets)
    h, q, keys = h.detach(), q.detach(), keys.detach()
    total = 0.0
    for i in range(h.shape[0]):
        y = int(targets[i])
        if y == pad:
            continue
        scores = [float(q[i] @ keys[j]) / math.sqrt(d) if pred(i, j) else -math.inf for j in range(keys.shape[0])]
        total -= joint_log_prob([tlp[i]], [tln[i]], [scores], values, [y])[0]
    return total


# ----------------------------------------------------------------------------------------------
# Windows of a token stream (spec §5.1), by slicing: the oracle of trime.data.batching.make_batch


def window(tokens, start: int, end: int, n_ctx: int, pad: int = 1, eos: int = 2):
    """(inputs (T,), targets (T,)) int64 of one window, T = n_ctx + end - start: inputs are the
    stream shifted right by one (eos before position 0); the context's targets are pad."""
    import numpy as np

    lo = start - n_ctx
    inp = np.array([eos if i == 0 else int(tokens[i - 1]) for i in range(lo, end)], dtype=np.int64)
    tgt = np.array([pad if i < start else int(tokens[i]) for i in range(lo, end)], dtype=np.int64)
    return inp, tgt
