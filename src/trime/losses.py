"""Training criteria: ce, trime (local memory), trime_long (long-term), trime_ext (external).

Each returns the SUM over non-pad targets of −log p(y_i) and the count (STYLE §7.7 habit 5); the
trainer divides once by the global count. The memory of every criterion is the same joint softmax
(memory/joint.py); criteria differ only in where keys come from and which are visible
(memory/masks.py). Scores are s_ij = q_i·k_j / sqrt(d), with no temperature in training (spec §2.5).

Distribution enters only through ``gather`` (STYLE §7.3), a function
``gather(keys (N, d), values (N,)) -> (keys (R, d), values (R,), offset, group_bounds)`` that returns
the rank-ordered stream of the caller's memory group (this rank's rows at [offset, offset + N),
keeping their gradient; other ranks' rows are constants, spec §3.2) and the cumulative bounds of
the memory groups in it ([0, R] for one group). ``trime.distributed.make_group_gather`` makes one.

Named fixes: pad targets are neither scored nor memory entries (spec §2.7, §11.11).
Letters: B segments, L positions, N = B·L rows, R gathered rows, d key width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trime.errors import ConfigError, DataError
from trime.memory import masks
from trime.memory.joint import combine, memory_stats

if TYPE_CHECKING:
    from trime.model.transformer import LMOutput

CRITERIA = ("ce", "trime", "trime_long", "trime_ext")
KEYTYPES = ("last_ffn_input", "final")

Gather = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int, Any]]


@dataclass
class LossOutput:
    """A criterion's result for one batch on one process."""

    loss: Tensor  # () float32: Σ over non-pad targets of −log p(y_i)
    n_targets: int  # number of non-pad targets
    ce_sum: float  # plain (adaptive-)softmax cross-entropy sum, detached, for logging (ori_loss)
    logs: dict[str, float] = field(default_factory=dict)  # mem_share, n_mem, own_hidden ...


def compute_loss(
    criterion: str,
    out: LMOutput,
    targets: Tensor,
    head,
    *,
    keytype: str = "last_ffn_input",
    pad: int = 1,
    use_ce: bool = False,
    gather: Gather | None = None,
    cross_sent_ratio: float = 0.9,
    chunk_size: int = 1024,
    training: bool = True,
    generator: torch.Generator | None = None,
    seg_ids: Tensor | None = None,
    tail_quirk: bool = False,
) -> LossOutput:
    """The loss of ``criterion`` for a batch of B segments of L targets (spec §2, §3, §4).

    out: LMOutput with h (B, L, d) for the output layer and q (B, L, d) memory keys; targets (B, L);
    head: ``target_logp(h (N, d), y (N,), tail_quirk) -> (log p_tok(y), log Z_head)``.
    use_ce: plain CE whatever the criterion (the CE warm-up switch of §2.1; the trainer decides).
    gather: see the module docstring; None = this process only. trime_ext hides the own segment with
    probability ``cross_sent_ratio`` per call (drawn from ``generator``), only when ``training``.
    seg_ids (B,): optional dataset ids of the rows; trime_ext refuses a batch that holds one segment
    twice (the copy would show the own segment's future).
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if keytype not in KEYTYPES:
        raise ConfigError(f"unknown key type {keytype!r}; choose one of {', '.join(KEYTYPES)}")
    B, L = targets.shape
    if out.h.shape[:2] != (B, L):
        raise ValueError(f"hidden states {tuple(out.h.shape)} do not match targets {tuple(targets.shape)}")
    N = B * L
    y = targets.reshape(N)  # (N,)
    keep = y != pad  # (N,)
    tlp, tln = head.target_logp(out.h.reshape(N, -1), y, tail_quirk=tail_quirk)  # (N,), (N,)
    ce_sum = -torch.where(keep, tlp, torch.zeros_like(tlp)).sum()
    logs: dict[str, float] = {}
    if use_ce or criterion == "ce":
        log_p = tlp
    else:
        q = (out.q if keytype == "last_ffn_input" else out.h).reshape(N, -1)  # (N, d)
        setup = _memory_setup(criterion, q, y, B, L, pad, gather, cross_sent_ratio, training, generator, seg_ids)
        keys, values, vis, logs = setup
        scale = 1.0 / math.sqrt(q.shape[-1])
        lzc, lzpos = memory_stats(q, keys, values, y, vis, scale, chunk_size)  # (N,), (N,)
        log_p = combine(tlp, tln, lzc, lzpos)  # (N,)
        with torch.no_grad():
            share = torch.sigmoid(lzc.float() - tln.float())  # Z_c / (Z_tok + Z_c)
            logs["mem_share"] = float(share[keep].mean()) if bool(keep.any()) else 0.0
    loss = -torch.where(keep, log_p.float(), torch.zeros_like(log_p, dtype=torch.float32)).sum()
    return LossOutput(loss=loss, n_targets=int(keep.sum()), ce_sum=float(ce_sum.detach()), logs=logs)


def _stream(q: Tensor, y: Tensor, gather: Gather | None) -> tuple[Tensor, Tensor, int, Any]:
    """This process's keys, or the gathered stream of its memory group (spec §3.2)."""
    if gather is None:
        return q, y, 0, [0, q.shape[0]]
    keys, values, offset, bounds = gather(q, y)
    return keys, values, int(offset), bounds


def _memory_setup(criterion, q, y, B, L, pad, gather, ratio, training, generator, seg_ids):
    """Keys (R, d), values (R,), the Visibility rule and logs for one criterion."""
    N = B * L
    if criterion == "trime":  # §2: own segment, strictly earlier positions, no gather
        return q, y, masks.local(B, L, key_valid=y != pad, device=q.device), {"n_mem": float(N)}
    keys, values, offset, bounds = _stream(q, y, gather)
    R = keys.shape[0]
    logs = {"n_mem": float(R)}
    if criterion == "trime_long":  # §3.2 / §3.3: same group, strictly earlier in the stream
        return keys, values, masks.long(N, R, offset, bounds, key_valid=values != pad, device=q.device), logs
    # trime_ext, §4: other segments fully visible; own segment strictly earlier unless hidden
    keys, values, offset = _own_group(keys, values, offset, bounds)
    R = keys.shape[0]
    if R % L or offset % L:
        raise ValueError(f"trime_ext needs whole segments of {L} rows; got {R} rows at offset {offset}")
    hide = training and _coin(generator) < ratio
    logs["own_hidden"] = float(hide)
    if seg_ids is not None and seg_ids.unique().numel() < seg_ids.numel():
        raise DataError("a trime_ext batch holds the same segment twice; its copy would show the future")
    idx = torch.arange(R, device=q.device)
    seg_k, pos_k = idx // L, idx % L  # (R,) every row of the stream is its own segment
    seg_q, pos_q = seg_k[offset : offset + N], pos_k[offset : offset + N]  # (N,)
    vis = masks.external(seg_q, pos_q, seg_k, pos_k, hide, key_valid=values != pad)
    return keys, values, vis, logs


def _own_group(keys: Tensor, values: Tensor, offset: int, bounds) -> tuple[Tensor, Tensor, int]:
    """The rows of the memory group holding this rank's rows (the whole stream for one group)."""
    b = [int(x) for x in bounds]
    g = max(i for i in range(len(b) - 1) if b[i] <= offset)
    return keys[b[g] : b[g + 1]], values[b[g] : b[g + 1]], offset - b[g]


def _coin(generator: torch.Generator | None) -> float:
    """One uniform draw per forward call and process (spec §4)."""
    if generator is None:
        return float(torch.rand(()))
    return float(torch.rand((), generator=generator, device=generator.device))
