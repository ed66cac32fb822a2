"""The joint softmax over the output vocabulary and memory entries (spec §2 steps 1–3, DESIGN.md).

For query i with token log-probability log p_tok(y_i), head partition function Z_tok(i), and
memory scores s_ij (already scaled; −inf where entry j is invisible to i):

    p(y_i) = [ Z_tok·p_tok(y_i) + Σ_{j: v_j = y_i} e^{s_ij} ] / [ Z_tok + Σ_j e^{s_ij} ]

Everything is computed in log space from two memory statistics per row,
log Z_c = log Σ_j e^{s_ij} and log Z_pos = log Σ_{j: v_j = y_i} e^{s_ij}, in float32 (float64 stays
float64) whatever the input dtype. A row with no visible entry has log Z_c = −inf and reduces
exactly to log p_tok(y_i), with finite gradients.

``joint_log_prob`` is the dense reference (public: losses, evaluation, MT, HF backbones).
``memory_stats`` is the training fast path: it never holds more than a chunk × M block of scores
and recomputes each block in backward.

Letters: N query rows, M memory entries, d key width.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from trime.memory.masks import Visibility


def score_scale(dim: int | None, temp: float = 1.0) -> float:
    """The factor that turns a similarity (q·k, or −‖q − k‖² for l2) into a memory logit.

    The joint softmax uses s = q·k / √d / τ (``dim`` = d; τ = ``--softmax-temp``, 1 in training);
    the kNN-LM distribution uses s = q·k / T (``dim`` None; T = ``--interp-temp``). Every
    place that scores memory entries (training, evaluation, datastore search, kNN-LM, the sweep)
    takes its factor from here.
    """
    return 1.0 / ((math.sqrt(dim) if dim else 1.0) * temp)


def memory_logits(similarity: Tensor, dim: int | None, temp: float = 1.0) -> Tensor:
    """Memory logits (float32) from raw similarities: ``similarity · score_scale(dim, temp)``; −inf stays −inf."""
    return similarity.float() * score_scale(dim, temp)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """logsumexp that returns −inf for all −inf (or empty) slices with a zero, not NaN, gradient."""
    if x.shape[dim] == 0:
        return x.sum(dim=dim) - float("inf")
    m = x.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(x - m).sum(dim=dim)
    empty = total <= 0
    out = torch.log(torch.where(empty, torch.ones_like(total), total)) + m.squeeze(dim)
    return torch.where(empty, torch.full_like(out, float("-inf")), out)


def combine(token_log_prob: Tensor, token_log_norm: Tensor, mem_log_norm: Tensor, mem_log_pos: Tensor) -> Tensor:
    """log p(y_i) from the token part and the two memory statistics (spec §2 step 3).

    token_log_prob (N,) log p_tok(y_i); token_log_norm (N,) log Z_tok(i);
    mem_log_norm (N,) log Σ_j e^{s_ij}; mem_log_pos (N,) log Σ_{j positive} e^{s_ij}. Returns (N,).
    """
    dt = _compute_dtype(token_log_prob, token_log_norm, mem_log_norm, mem_log_pos)
    token_share, log_den = joint_denominator(token_log_norm.to(dt), mem_log_norm.to(dt))
    return torch.logaddexp(token_log_prob.to(dt) + token_share, mem_log_pos.to(dt) - log_den)  # (N,)


def joint_denominator(token_log_norm: Tensor, mem_log_norm: Tensor) -> tuple[Tensor, Tensor]:
    """(log Z_tok / (Z_tok + Z_c), log (Z_tok + Z_c)) from log Z_tok and log Z_c (any equal shapes): the
    output layer's share of the joint softmax and its normaliser. The share is exactly 0 when Z_c = 0."""
    token_share = -F.softplus(mem_log_norm - token_log_norm)
    return token_share, token_log_norm - token_share


def score_stats(mem_scores: Tensor, mem_values: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log Z_c, log Z_pos), each (N,), from dense scores (N, M) and values (M,) or (N, M)."""
    n, m = mem_scores.shape
    if mem_values.shape not in ((m,), (n, m)) or targets.shape != (n,):
        raise ValueError(
            f"memory shapes do not fit: scores {tuple(mem_scores.shape)}, values {tuple(mem_values.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    s = mem_scores.to(_compute_dtype(mem_scores))  # (N, M)
    positive = mem_values.expand(n, m) == targets[:, None]  # (N, M)
    lzpos = safe_logsumexp(s.masked_fill(~positive, float("-inf")), dim=1)
    return safe_logsumexp(s, dim=1), lzpos


def joint_log_prob(
    token_log_prob: Tensor, token_log_norm: Tensor, mem_scores: Tensor, mem_values: Tensor, targets: Tensor
) -> Tensor:
    """log p(y_i) under the joint softmax of DESIGN.md "The one idea everything shares" (spec §2).

    token_log_prob (N,) log p_tok(y_i); token_log_norm (N,) log Z_tok(i); mem_scores (N, M) scaled
    scores with −inf for invisible entries; mem_values (M,) or (N, M) entry tokens; targets (N,).
    Returns (N,) float32 (float64 for float64 inputs); gradients flow into every float input.
    """
    lzc, lzpos = score_stats(mem_scores, mem_values, targets)
    return combine(token_log_prob, token_log_norm, lzc, lzpos)


def dense_memory_stats(
    queries: Tensor, keys: Tensor, values: Tensor, targets: Tensor, visible: Visibility, scale: float
) -> tuple[Tensor, Tensor]:
    """Reference for ``memory_stats``: builds the whole (N, M) score matrix."""
    dt = _compute_dtype(queries, keys)
    with _fp32_matmuls(queries):
        s = (queries.to(dt) @ keys.to(dt).T) * scale  # (N, M)
    s = s.masked_fill(~visible.dense(), float("-inf"))
    return score_stats(s, values, targets)


def _fp32_matmuls(t: Tensor):
    """Keep autocast from lowering the score matmuls: the memory math runs in float32 (spec §2.8)."""
    return torch.autocast(t.device.type, enabled=False)


# Positives far below the row maximum underflow in exp(s − max): rows whose positive mass is
# below e^−_FAR of the maximum's take an exact (rare, slower) path instead.
_FAR = 60.0


def _block(qs: Tensor, k: Tensor, vis: Visibility, span) -> Tensor:
    """Masked scores (n, m) of a span; qs are the queries already multiplied by the scale."""
    return vis.mask_(qs[span.q0 : span.q1] @ k[span.k0 : span.k1].T, span)


def _exact_rows(qs, k, values, targets, vis, span, rows) -> tuple[Tensor, Tensor]:
    """Masked scores (r, m) and positive mask of a few rows (indices local to the span)."""
    glob = rows + span.q0
    s = qs[glob] @ k[span.k0 : span.k1].T  # (r, m)
    s = s.masked_fill_(~vis.rows(glob, span.k0, span.k1), float("-inf"))
    return s, values[None, span.k0 : span.k1] == targets[glob, None]


def _visible_positive(vis: Visibility, values: Tensor, targets: Tensor) -> Tensor:
    """(N,) bool: does query i see at least one key whose value is y_i? O((N + M) log M), no block."""
    M = values.shape[0]
    if M == 0 or targets.numel() == 0:
        return torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    values, targets = values.long(), targets.long()
    sentinel = torch.minimum(values.min(), targets.min()) - 1
    vals = torch.where(vis.key_valid, values, sentinel)  # invalid keys match nothing
    code = (vals * (M + 1) + torch.arange(M, device=values.device)).sort().values  # by (value, index)

    def before(x: Tensor) -> Tensor:  # number of keys j < x whose value is y_i
        base = targets * (M + 1)
        return torch.searchsorted(code, base + x.clamp(0, M)) - torch.searchsorted(code, base)

    inside = (before(vis.hi) - before(vis.lo)).clamp_min(0)  # (N,) positives in [lo, hi)
    if vis.inside:
        return inside > 0
    return before(torch.full_like(vis.hi, M)) - inside > 0


def _forward_block(qs, k, values, targets, vis, span) -> tuple[Tensor, Tensor, Tensor]:
    """(log Z_c, log Z_pos, underflow) of one span's rows with one exp pass over the block;
    underflow marks rows whose positive mass is below e^−_FAR of the row maximum's."""
    s = _block(qs, k, vis, span)  # (n, m)
    pos = values[None, span.k0 : span.k1] == targets[span.q0 : span.q1, None]  # (n, m)
    top = s.amax(1, keepdim=True)  # (n, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = s.sub_(top).exp_()  # (n, m) reuses the score buffer; invisible entries are exactly 0
    lzc = torch.log(e.sum(1)) + top[:, 0]
    zpos = torch.where(pos, e, 0.0).sum(1)  # (n,)
    return lzc, torch.log(zpos) + top[:, 0], zpos < math.exp(-_FAR)


def _far_rows(spans, far: Tensor):
    """(span, row indices local to it) for the rows flagged in ``far`` (N,); one device sync."""
    rows = far.nonzero().flatten().tolist()
    if not rows:
        return
    for span in spans:
        mine = [r - span.q0 for r in rows if span.q0 <= r < span.q1]
        if mine and span.k0 < span.k1:
            yield span, torch.tensor(mine, device=far.device)


def _grad_block(qs, k, values, targets, vis, span, lzc, extra, g_c, far_rows) -> Tensor:
    """d loss / d s (n, m) of one span: g_c·softmax over visible + g_pos·softmax over positives.

    lzc: log Z_c with −inf replaced by 0; extra: g_pos·e^{lzc − lzpos} (0 on far rows, which
    ``far_rows`` (rows, lzpos, g_pos) recomputes exactly), so that e^{s−lzpos}·g_pos = extra·e^{s−lzc}.
    """
    q0, q1 = span.q0, span.q1
    s = _block(qs, k, vis, span)  # (n, m)
    pos = values[None, span.k0 : span.k1] == targets[q0:q1, None]  # (n, m)
    coef = torch.where(pos, (g_c[q0:q1] + extra[q0:q1])[:, None], g_c[q0:q1, None])  # (n, m)
    ds = s.sub_(lzc[q0:q1, None]).exp_().mul_(coef)
    if far_rows is not None:
        rows, lzpos, g_pos = far_rows
        s_far, pos_far = _exact_rows(qs, k, values, targets, vis, span, rows)
        glob = rows + q0
        p_c = torch.exp(s_far - lzc[glob, None]) * g_c[glob, None]
        p_pos = torch.exp(s_far - lzpos[glob, None]).masked_fill_(~pos_far, 0.0) * g_pos[glob, None]
        ds[rows] = p_c + p_pos
    return ds


class _MemoryStats(torch.autograd.Function):
    """Chunked (log Z_c, log Z_pos) that saves only queries, keys, values, targets and the outputs."""

    @staticmethod
    def forward(ctx, queries, keys, values, targets, visible, scale, chunk):
        dt = _compute_dtype(queries, keys)
        with _fp32_matmuls(queries):
            qs, k = queries.to(dt) * scale, keys.to(dt)  # (N, d), (M, d)
            spans = visible.spans(chunk)
            lzc = qs.new_full((qs.shape[0],), float("-inf"))  # (N,)
            lzpos = qs.new_full((qs.shape[0],), float("-inf"))  # (N,)
            tiny = torch.zeros_like(lzc, dtype=torch.bool)  # (N,)
            for span in spans:
                if span.k0 < span.k1:
                    rows = slice(span.q0, span.q1)
                    lzc[rows], lzpos[rows], tiny[rows] = _forward_block(qs, k, values, targets, visible, span)
            # a visible positive far below its row's maximum underflowed: recompute those rows exactly
            far = tiny & _visible_positive(visible, values, targets)
            for span, rows in _far_rows(spans, far):
                s_far, pos_far = _exact_rows(qs, k, values, targets, visible, span, rows)
                lzpos[rows + span.q0] = safe_logsumexp(s_far.masked_fill_(~pos_far, float("-inf")), dim=1)
        ctx.save_for_backward(queries, keys, values, targets, lzc, lzpos)
        ctx.visible, ctx.scale, ctx.spans = visible, scale, spans
        return lzc, lzpos

    @staticmethod
    def backward(ctx, g_c, g_pos):
        queries, keys, values, targets, lzc, lzpos = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dt = lzc.dtype
        with _fp32_matmuls(lzc):
            qs, k = queries.to(dt) * ctx.scale, keys.to(dt)
            g_c, g_pos = g_c.to(dt), g_pos.to(dt)
            has_pos = torch.isfinite(lzpos)
            far = has_pos & (lzc - lzpos > _FAR)  # e^{lzc − lzpos} would overflow: exact path
            ratio = torch.where(has_pos & ~far, lzc - lzpos, torch.full_like(lzc, float("-inf")))
            extra = g_pos * torch.exp(ratio)  # (N,)
            finite_c = torch.where(torch.isfinite(lzc), lzc, torch.zeros_like(lzc))
            far_by_span = {span.q0: rows for span, rows in _far_rows(ctx.spans, far)}
            dq = torch.zeros_like(qs) if need_q else None  # (N, d)
            dk = torch.zeros_like(k) if need_k else None  # (M, d)
            for span in ctx.spans:
                if span.k0 == span.k1:
                    continue
                rows = far_by_span.get(span.q0)
                far_rows = None if rows is None else (rows, lzpos, g_pos)
                ds = _grad_block(qs, k, values, targets, ctx.visible, span, finite_c, extra, g_c, far_rows)  # (n, m)
                if need_q:
                    dq[span.q0 : span.q1] = (ds @ k[span.k0 : span.k1]).mul_(ctx.scale)
                if need_k:
                    dk[span.k0 : span.k1].addmm_(ds.T, qs[span.q0 : span.q1])
        dq = dq.to(queries.dtype) if need_q else None
        dk = dk.to(keys.dtype) if need_k else None
        return dq, dk, None, None, None, None, None


def memory_stats(
    queries: Tensor, keys: Tensor, values: Tensor, targets: Tensor, visible: Visibility, scale: float, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """(log Z_c (N,), log Z_pos (N,)) for s_ij = scale · q_i·k_j over the entries ``visible`` allows.

    queries (N, d), keys (M, d) (may be the same tensor or overlapping views), values (M,),
    targets (N,). Memory-efficient: at most a chunk × M block of scores exists at a time, in forward
    and in backward (which recomputes it). Gradients flow into queries and keys. Feed the result to
    ``combine``. Equal to ``dense_memory_stats`` in value and gradient.
    """
    n, m = queries.shape[0], keys.shape[0]
    if keys.shape[1:] != queries.shape[1:] or values.shape != (m,) or targets.shape != (n,):
        raise ValueError(
            f"memory shapes do not fit: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, "
            f"values {tuple(values.shape)}, targets {tuple(targets.shape)}"
        )
    if (visible.n_query, visible.n_key) != (n, m):
        raise ValueError(f"visibility is for {visible.n_query}x{visible.n_key}, scores are {n}x{m}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return _MemoryStats.apply(queries, keys, values, targets, visible, float(scale), int(chunk))
