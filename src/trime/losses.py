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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trime.config import CRITERIA, TrainConfig
from trime.errors import ConfigError, DataError
from trime.memory import masks
from trime.memory.joint import combine, memory_stats, score_scale
from trime.model.base import Head, LMOutput, check_keytype, select_keys

Gather = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int, Any]]


@dataclass(frozen=True)
class LossSettings:
    """What a criterion needs besides the batch: fixed for a whole run."""

    criterion: str = "ce"  # ce | trime | trime_long | trime_ext
    keytype: str = "last_ffn_input"  # memory key: q (last_ffn_input) or h (final)
    pad: int = 1  # target id that is neither scored nor a memory entry
    cross_sent_ratio: float = 0.9  # trime_ext: probability of hiding the own segment
    chunk_size: int = 1024  # query rows per block of the chunked memory softmax
    tail_quirk: bool = False  # the original's adaptive-softmax tail bug (spec §5.2)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        check_keytype(self.keytype)

    @classmethod
    def of(cls, cfg: TrainConfig, pad: int) -> LossSettings:
        return cls(cfg.criterion, cfg.knn_keytype, pad, cfg.cross_sent_ratio, cfg.chunk_size)


@dataclass
class LossOutput:
    """A criterion's result for one batch on one process; tensors, so the trainer never waits on them."""

    loss: Tensor  # () float32: Σ over non-pad targets of −log p(y_i)
    n_targets: Tensor  # () int64: number of non-pad targets
    ce_sum: Tensor  # () plain (adaptive-)softmax cross-entropy sum, detached, for logging (ori_loss)
    own_hidden: bool | None = None  # trime_ext: whether the own segment was hidden this call


def compute_loss(
    settings: LossSettings | str,
    out: LMOutput,
    targets: Tensor,
    head: Head,
    *,
    use_ce: bool = False,
    gather: Gather | None = None,
    training: bool = True,
    generator: torch.Generator | None = None,
    seg_ids: Tensor | None = None,
) -> LossOutput:
    """The loss of ``settings.criterion`` (a criterion name for the defaults) for B segments of L
    targets (spec §2, §3, §4).

    out: h (B, L, d) for the output layer and q (B, L, d) memory keys; targets (B, L); head:
    ``target_logp(h (N, d), y (N,), tail_quirk) -> (log p_tok(y), log Z_tok)`` (model.base.Head).
    use_ce: plain CE whatever the criterion (the CE warm-up switch of §2.1; the trainer decides).
    gather: see the module docstring; None = this process only. trime_ext hides the own segment with
    probability ``cross_sent_ratio`` per call (drawn from ``generator``), only when ``training``.
    seg_ids (B,): dataset ids of the rows (on the CPU); trime_ext refuses a batch that holds one
    segment twice (the copy would show the own segment's future).
    """
    s = LossSettings(settings) if isinstance(settings, str) else settings
    B, L = targets.shape
    if out.h.shape[:2] != (B, L):
        raise ValueError(f"hidden states {tuple(out.h.shape)} do not match targets {tuple(targets.shape)}")
    N = B * L
    y = targets.reshape(N)  # (N,)
    keep = y != s.pad  # (N,)
    tlp, tln = head.target_logp(out.h.reshape(N, -1), y, tail_quirk=s.tail_quirk)  # (N,), (N,)
    ce_sum = -torch.where(keep, tlp, torch.zeros_like(tlp)).sum().detach()
    own_hidden = None
    if use_ce or s.criterion == "ce":
        log_p = tlp
    else:
        q = select_keys(out, s.keytype).reshape(N, -1)  # (N, d)
        setup = _memory_setup(s, q, y, B, L, gather, training, generator, seg_ids)
        lzc, lzpos = memory_stats(q, setup.keys, setup.values, y, setup.visible, score_scale(q.shape[-1]), s.chunk_size)
        log_p = combine(tlp, tln, lzc, lzpos)  # (N,)
        own_hidden = setup.own_hidden
    loss = -torch.where(keep, log_p.float(), torch.zeros_like(log_p, dtype=torch.float32)).sum()
    return LossOutput(loss=loss, n_targets=keep.sum(), ce_sum=ce_sum, own_hidden=own_hidden)


@dataclass
class _Memory:
    keys: Tensor  # (R, d)
    values: Tensor  # (R,)
    visible: masks.Visibility
    own_hidden: bool | None = None


def _stream(q: Tensor, y: Tensor, gather: Gather | None) -> tuple[Tensor, Tensor, int, Any]:
    """This process's keys, or the gathered stream of its memory group (spec §3.2)."""
    if gather is None:
        return q, y, 0, [0, q.shape[0]]
    keys, values, offset, bounds = gather(q, y)
    return keys, values, int(offset), bounds


def _memory_setup(
    s: LossSettings,
    q: Tensor,
    y: Tensor,
    B: int,
    L: int,
    gather: Gather | None,
    training: bool,
    generator: torch.Generator | None,
    seg_ids: Tensor | None,
) -> _Memory:
    """The memory entries and their visibility rule for one criterion."""
    if s.criterion == "trime":  # §2: own segment, strictly earlier positions, no gather
        return _Memory(q, y, masks.local(B, L, key_valid=y != s.pad, device=q.device))
    keys, values, offset, bounds = _stream(q, y, gather)
    N, R = B * L, keys.shape[0]
    if s.criterion == "trime_long":  # §3.2 / §3.3: same group, strictly earlier in the stream
        return _Memory(keys, values, masks.long(N, R, offset, bounds, key_valid=values != s.pad, device=q.device))
    # trime_ext, §4: other segments fully visible; own segment strictly earlier unless hidden
    if seg_ids is not None and len(set(seg_ids.tolist())) < seg_ids.numel():
        raise DataError("a trime_ext batch holds the same segment twice; its copy would show the future")
    keys, values, offset = _own_group(keys, values, offset, bounds)
    R = keys.shape[0]
    if R % L or offset % L:
        raise ValueError(f"trime_ext needs whole segments of {L} rows; got {R} rows at offset {offset}")
    hide = training and _coin(generator) < s.cross_sent_ratio
    idx = torch.arange(R, device=q.device)
    seg_k, pos_k = idx // L, idx % L  # (R,) every row of the stream is its own segment
    seg_q, pos_q = seg_k[offset : offset + N], pos_k[offset : offset + N]  # (N,)
    vis = masks.external(seg_q, pos_q, seg_k, pos_k, hide, key_valid=values != s.pad)
    return _Memory(keys, values, vis, own_hidden=hide)


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
