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

Simulated ranks (``simulate_ranks`` W > 1, DESIGN "Next seams"): one process computes exactly what W
ranks compute. The B segments are cut into W consecutive chunks, one per rank; rank r's rows query
a stream built by ``simulated_gathers`` as make_group_gather builds it on rank r (its own chunk
keeps its gradient, other chunks are constants), trime_ext draws one coin per rank in rank order,
and the W losses add up. The gradient is then the sum over ranks of each rank's gradient (what
data parallelism with a sum gives), not the gradient of the one-process loss.

Named fixes: pad targets are neither scored nor memory entries (spec §2.7, §11.11).
Letters: B segments, L positions, N = B·L rows, R gathered rows, d key width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trime.config import CRITERIA, MTTrainConfig, TrainConfig
from trime.errors import ConfigError, DataError
from trime.memory import masks
from trime.memory.joint import combine, memory_stats, score_scale, score_stats
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
    simulate_ranks: int = 1  # W: compute in one process what W ranks compute (trime_long, trime_ext)
    simulate_group: int = 0  # simulated ranks per memory group (num_comb_shards, spec §3.1); 0: all W
    rank_segments: int = 0  # segments of a full batch of one simulated rank (0: B / W, which must divide)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        check_keytype(self.keytype)
        W, c = self.simulate_ranks, self.simulate_group
        if W < 1 or c < 0 or (c and W % c):
            raise ConfigError(f"{W} simulated ranks cannot form memory groups of {c} ranks")

    @classmethod
    def of(cls, cfg: TrainConfig, pad: int) -> LossSettings:
        return cls(
            cfg.criterion,
            cfg.knn_keytype,
            pad,
            cfg.cross_sent_ratio,
            cfg.chunk_size,
            simulate_ranks=cfg.simulate_ranks,
            simulate_group=_simulated_group(cfg),
            rank_segments=cfg.max_tokens // cfg.tokens_per_sample // cfg.simulate_ranks,
        )


def _simulated_group(cfg: TrainConfig) -> int:
    """Simulated ranks per memory group, formed as train._group_size forms real ones: trime_ext
    gathers every rank (0); trime_long groups --train-mem-size tokens, counted in one rank's share
    of --max-tokens, and without it (0) each rank is a group of its own (no gather)."""
    W = cfg.simulate_ranks
    if W == 1 or cfg.criterion != "trime_long":
        return 0
    per_rank = cfg.max_tokens // W  # the --max-tokens of one real rank
    if not cfg.train_mem_size:
        return 1
    c = cfg.train_mem_size // per_rank
    if cfg.train_mem_size % per_rank or not c or W % c:
        raise ConfigError(
            f"--train-mem-size {cfg.train_mem_size} must be a multiple of one simulated rank's {per_rank} tokens "
            f"(--max-tokens / --simulate-ranks) that divides the {W} simulated ranks"
        )
    return c


@dataclass
class LossOutput:
    """A criterion's result for one batch on one process; tensors, so the trainer never waits on them."""

    loss: Tensor  # () float32: Σ over non-pad targets of −log p(y_i)
    n_targets: Tensor  # () int64: number of non-pad targets
    ce_sum: Tensor  # () plain (adaptive-)softmax cross-entropy sum, detached, for logging (ori_loss)
    own_hidden: bool | None = None  # trime_ext: whether the own segment was hidden this call
    diag: Tensor | None = None  # (len(DIAG_SUMS),) float64 sums for the training log; None without memory


# What the training log says about the memory, as sums over one batch (``memory_diagnostics``) that
# add over micro-batches and ranks; the trainer divides each by its count. Scores and cosines are
# read for DIAG_ROWS query rows spread evenly over the batch, against every entry each one sees.
DIAG_SUMS = ("mem_share", "n_rows", "mem_score", "mem_cos", "n_entries", "key_norm", "n_keys", "mem_score_max")
DIAG_ROWS = 256


@torch.no_grad()
def memory_diagnostics(
    q: Tensor,
    keys: Tensor,
    visible: masks.Visibility,
    tok_log_z: Tensor,
    mem_log_z: Tensor,
    keep: Tensor,
    scale: float,
    dist: str = "ip",
) -> Tensor:
    """Sums (DIAG_SUMS) that show a collapse as it happens: the memory's share of the softmax
    Z_mem / (Z_tok + Z_mem) over scored rows; the memory scores s = scale·q·k and cosines q̂·k̂ of
    DIAG_ROWS sampled rows against their visible entries (and the largest score); the key norms ‖k‖.

    q (N, d) queries, keys (M, d), tok_log_z / mem_log_z (N,) log Z_tok / log Z_mem, keep (N,); ``dist``:
    the score's similarity (:func:`mt_similarity`; TrimeMT may use l2)."""
    share = torch.sigmoid((mem_log_z - tok_log_z).float())  # (N,) Z_mem / (Z_tok + Z_mem); 0 when Z_mem = 0
    rows = keep.nonzero().flatten()
    rows = rows[torch.linspace(0, rows.numel() - 1, min(DIAG_ROWS, rows.numel()), device=rows.device).long()]
    with torch.autocast(q.device.type, enabled=False):
        qr, k = q[rows].float(), keys.float()  # (n, d), (M, d)
        vis = visible.rows(rows)  # (n, M)
        s = mt_similarity(qr, k, dist) * scale  # (n, M)
        cos = F.normalize(qr, dim=1) @ F.normalize(k, dim=1).T  # (n, M)
        n_vis = vis.sum()
        top = s.masked_fill(~vis, float("-inf")).amax() if s.numel() else s.new_tensor(float("-inf"))
        norms = k.norm(dim=1)  # (M,)
    sums = [share[keep].sum(), keep.sum(), s[vis].sum(), cos[vis].sum(), n_vis, norms.sum(), norms.numel(), top]
    return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=q.device) for x in sums])


def diagnostics_record(sums: Tensor) -> dict[str, float]:
    """The log fields from summed DIAG_SUMS (over micro-batches and ranks; the max already a max)."""
    d = dict(zip(DIAG_SUMS, sums.tolist()))

    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "mem_share": div(d["mem_share"], d["n_rows"]),
        "mem_score_mean": div(d["mem_score"], d["n_entries"]),
        "mem_score_max": d["mem_score_max"] if d["n_entries"] else float("nan"),
        "mem_cos": div(d["mem_cos"], d["n_entries"]),
        "key_norm": div(d["key_norm"], d["n_keys"]),
    }


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
    diagnose: bool = False,
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
    diagnose: also return the memory diagnostics (``diag``, DIAG_SUMS) when a memory is used; the trainer
    asks on the updates it logs only, so that other updates pay nothing for them.
    ``settings.simulate_ranks`` W > 1: the batch is W ranks' batches (module docstring); own_hidden
    is then True when any rank hid its own segment, and diag adds the ranks' sums (max of the max).
    """
    s = LossSettings(settings) if isinstance(settings, str) else settings
    B, L = targets.shape
    if out.h.shape[:2] != (B, L):
        raise ValueError(f"hidden states {tuple(out.h.shape)} do not match targets {tuple(targets.shape)}")
    W = s.simulate_ranks
    if W > 1 and gather is not None:
        raise ConfigError("--simulate-ranks simulates every rank in one process; it cannot run over real ranks")
    # each simulated rank takes up to c segments in rank order: a short batch (an epoch's last, or one cut at
    # a BM25 chain's end) leaves the last ranks short or empty, as real ranks' shards are padded
    c = s.rank_segments or B // W
    if W > 1 and not s.rank_segments and B % W:
        raise ConfigError(f"--simulate-ranks {W} must divide the {B} segments per batch")
    if W > 1 and W * c < B:
        raise ConfigError(f"a batch of {B} segments is more than {W} simulated ranks of {c} segments")
    N = B * L
    y = targets.reshape(N)  # (N,)
    keep = y != s.pad  # (N,)
    tlp, tln = head.target_logp(out.h.reshape(N, -1), y, tail_quirk=s.tail_quirk)  # (N,), (N,)
    ce_sum = -torch.where(keep, tlp, torch.zeros_like(tlp)).sum().detach()
    own_hidden = diag = None
    if use_ce or s.criterion == "ce":
        log_p = tlp
    else:
        q = select_keys(out, s.keytype).reshape(N, -1)  # (N, d)
        if W == 1 or s.criterion == "trime":  # local memory lies inside each segment: ranks change nothing
            gathers, cuts = [gather], [0, N]
        else:
            cuts = [min(r * c, B) * L for r in range(W + 1)]  # row offsets of the ranks' chunks
            gathers = simulated_gathers(q, y, cuts, s.simulate_group or W)
        parts, hides = [], []
        for r, g in enumerate(gathers):  # in rank order: trime_ext draws rank r's coin r-th
            if cuts[r] == cuts[r + 1]:
                continue  # an empty rank has no queries
            rows = slice(cuts[r], cuts[r + 1])
            b = (cuts[r + 1] - cuts[r]) // L
            ids = None if seg_ids is None else seg_ids[cuts[r] // L : cuts[r + 1] // L]
            lp, hidden, d = _rank_log_p(
                s, q[rows], y[rows], tlp[rows], tln[rows], b, L, g, training, generator, ids, diagnose
            )
            parts.append(lp)
            hides.append(hidden)
            diag = add_diagnostics(diag, d)
        log_p = torch.cat(parts)  # (N,)
        # trime_ext: whether any rank hid its own segment (each rank draws its own coin); else None
        own_hidden = None if hides[0] is None else any(hides)
    loss = -torch.where(keep, log_p.float(), torch.zeros_like(log_p, dtype=torch.float32)).sum()
    return LossOutput(loss=loss, n_targets=keep.sum(), ce_sum=ce_sum, own_hidden=own_hidden, diag=diag)


def _rank_log_p(
    s: LossSettings,
    q: Tensor,
    y: Tensor,
    tlp: Tensor,
    tln: Tensor,
    B: int,
    L: int,
    gather: Gather | None,
    training: bool,
    generator: torch.Generator | None,
    seg_ids: Tensor | None,
    diagnose: bool,
) -> tuple[Tensor, bool | None, Tensor | None]:
    """log p(y) (N,) of one rank's rows under the joint softmax with its memory, whether it hid its
    own segment (trime_ext), and its memory diagnostics (when ``diagnose``)."""
    setup = _memory_setup(s, q, y, B, L, gather, training, generator, seg_ids)
    scale = score_scale(q.shape[-1])
    lzc, lzpos = memory_stats(q, setup.keys, setup.values, y, setup.visible, scale, s.chunk_size)
    diag = None
    if diagnose:  # on every rank alike, scored rows or not: the trainer all-reduces the sums
        diag = memory_diagnostics(
            q.detach(), setup.keys.detach(), setup.visible, tln.detach(), lzc.detach(), y != s.pad, scale
        )
    return combine(tlp, tln, lzc, lzpos), setup.own_hidden, diag


def add_diagnostics(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Two DIAG_SUMS vectors as one: the sums added, the last entry (a maximum) the larger."""
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a[:-1] + b[:-1], torch.maximum(a[-1:], b[-1:])])


def simulated_gathers(q: Tensor, y: Tensor, cuts: list[int], group: int) -> list[Gather]:
    """What ``trime.distributed.make_group_gather(group)`` gives each of W ranks, in one process.

    The rows q (N, d), y (N,) are W consecutive chunks, rank r's being rows [cuts[r], cuts[r + 1])
    (W + 1 offsets; a chunk may be empty). Ranks
    [g·group, (g+1)·group) form memory group g; rank r's gather returns its group's chunks in rank
    order, its own argument (with its gradient) in its place and the others detached (spec §3.2),
    its offset in that stream and the bounds [0, R] (a real gather also holds only its own group).
    """
    W = len(cuts) - 1
    qs = [q[a:b] for a, b in zip(cuts, cuts[1:])]
    ys = [y[a:b] for a, b in zip(cuts, cuts[1:])]

    def gather_of(r: int) -> Gather:
        first = r - r % group  # the group's first rank

        def gather(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, int, list[int]]:
            ranks = range(first, first + group)
            all_keys = [keys if i == r else qs[i].detach() for i in ranks]
            all_values = [values if i == r else ys[i] for i in ranks]
            offset = sum(k.shape[0] for k in all_keys[: r - first])
            total = sum(k.shape[0] for k in all_keys)
            return torch.cat(all_keys), torch.cat(all_values), offset, [0, total]

        return gather

    return [gather_of(r) for r in range(W)]


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


# ---------------------------------------------------------------------------------------------
# Translation (MT spec §4, §6): label-smoothed cross-entropy, or TrimeMT's memory of the other sentences


@dataclass(frozen=True)
class MTLossSettings:
    """A translation criterion (MT spec §4, §6, §12): ``ce`` is fairseq's label-smoothed cross-entropy
    (ε ``--label-smoothing``); ``trime_mt`` has τ ``--temp``, ``--topk-mem`` (0: every entry), ``--dist-func``."""

    temp: float = 1.0
    topk: int = 0
    dist: str = "ip"  # ip: s = h·h'/(√d·τ); l2: s = −‖h − h'‖²/(√d·τ)
    pad: int = 1
    chunk_size: int = 1024
    criterion: str = "trime_mt"  # ce | trime_mt
    label_smoothing: float = 0.0  # ce only (trime_mt, as the original, ignores it)

    def __post_init__(self) -> None:
        if self.criterion not in ("ce", "trime_mt"):
            raise ConfigError(f"unknown translation criterion {self.criterion!r}; choose ce or trime_mt")
        if self.dist not in ("ip", "l2"):
            raise ConfigError(f"--dist-func must be ip or l2, not {self.dist!r}")
        if self.temp <= 0 or self.topk < 0:
            raise ConfigError("--temp must be positive and --topk-mem at least 0")

    @classmethod
    def of(cls, cfg: MTTrainConfig, pad: int = 1) -> MTLossSettings:
        return cls(cfg.temp, cfg.topk_mem, cfg.dist_func, pad, criterion=cfg.criterion,
                   label_smoothing=cfg.label_smoothing)  # fmt: skip


def mt_similarity(q: Tensor, k: Tensor, dist: str) -> Tensor:
    """(n, m) raw similarities of queries q (n, d) to keys k (m, d): q·k, or −‖q − k‖² for l2."""
    ip = q @ k.T
    if dist == "ip":
        return ip
    return 2 * ip - (q * q).sum(1, keepdim=True) - (k * k).sum(1)[None, :]


def label_smoothed_ce(h: Tensor, targets: Tensor, head, eps: float, pad: int = 1) -> LossOutput:
    """fairseq's ``label_smoothed_cross_entropy`` for decoder outputs h (B, T, d) and targets (B, T):
    for a target y with log-probabilities lp (V,), loss = (1 − ε − ε/(V−1))·(−lp[y]) + ε/(V−1)·(−Σ_v lp[v]),
    summed over non-pad targets; ``ce_sum`` is the plain NLL. ``head.log_probs(h (M, d)) -> (M, V)``."""
    keep = targets != pad  # (B, T)
    lp = head.log_probs(h[keep]).float()  # (M, V) non-pad target positions only
    y = targets[keep]  # (M,)
    nll = -lp.gather(1, y[:, None]).squeeze(1)  # (M,)
    loss = nll
    if eps > 0:
        eps_i = eps / (lp.shape[1] - 1)
        loss = (1.0 - eps - eps_i) * nll + eps_i * -lp.sum(1)
    return LossOutput(loss=loss.sum(), n_targets=keep.sum(), ce_sum=nll.sum().detach())


def compute_mt_loss(
    settings: MTLossSettings, out: LMOutput, targets: Tensor, head: Head, *, use_ce: bool = False,
    gather: Gather | None = None, diagnose: bool = False,
) -> LossOutput:  # fmt: skip
    """The loss of ``settings.criterion`` for B target sentences of T positions (out.h (B, T, d)).

    ``ce``: :func:`label_smoothed_ce` (no smoothing while ``use_ce``: the CE warm-up switch).
    ``trime_mt`` (MT spec §4): each target position's memory is every non-pad decoder output h_j of the
    *other* sentences of the batch (gathered over ranks; other ranks' entries carry no gradient),
    scored s_ij = similarity / (√d·τ), of which the ``topk`` best are kept; p(y_i) is the joint softmax
    of memory.joint with those entries; ``use_ce``: plain CE. ``diagnose``: the memory diagnostics of
    :func:`memory_diagnostics` (``diag``), as for the language-model criteria. Named fix: masked
    entries are −inf (the original added −10000, which differs by at most e^−10000)."""
    s = settings
    if s.criterion == "ce":
        return label_smoothed_ce(out.h, targets, head, 0.0 if use_ce else s.label_smoothing, s.pad)
    B, T = targets.shape
    N = B * T
    y = targets.reshape(N)  # (N,)
    keep = y != s.pad
    h = out.h.reshape(N, -1)  # (N, d): h is also the memory key (MT spec §1)
    tlp, tln = head.target_logp(h, y)  # (N,), (N,)
    ce_sum = -torch.where(keep, tlp, torch.zeros_like(tlp)).sum().detach()
    diag = None
    if use_ce:
        log_p = tlp
    else:
        keys, values, offset, _ = _stream(h, y, gather)  # (R, d), (R,)
        own = offset + torch.arange(N, device=h.device) // T * T  # (N,) stream row where each query's sentence starts
        vis = masks.Visibility(own, own + T, values != s.pad, inside=False)  # other sentences only
        lzc, lzpos = [], []
        scale = score_scale(h.shape[-1], s.temp)
        with torch.autocast(h.device.type, enabled=False):  # the memory math runs in float32 (spec §2.8)
            for a in range(0, N, s.chunk_size):
                b = min(a + s.chunk_size, N)
                scores = mt_similarity(h[a:b].float(), keys.float(), s.dist) * scale  # (c, R)
                scores = scores.masked_fill(~vis.block(a, b), float("-inf"))
                vals = values[None, :].expand(b - a, -1)
                if s.topk and s.topk < scores.shape[1]:
                    scores, idx = scores.topk(s.topk, dim=1)  # (c, K): gradients flow through the kept scores
                    vals = values[idx]
                c, p = score_stats(scores, vals, y[a:b])
                lzc.append(c)
                lzpos.append(p)
        log_z_mem = torch.cat(lzc)  # (N,)
        log_p = combine(tlp, tln, log_z_mem, torch.cat(lzpos))
        if diagnose:
            diag = memory_diagnostics(h.detach(), keys.detach(), vis, tln.detach(), log_z_mem.detach(), keep, scale,
                                      dist=s.dist)  # fmt: skip
    loss = -torch.where(keep, log_p.float(), torch.zeros_like(log_p, dtype=torch.float32)).sum()
    return LossOutput(loss=loss, n_targets=keep.sum(), ce_sum=ce_sum, diag=diag)


class MTObjective(torch.nn.Module):
    """A translation model and its criterion in one forward (so data parallelism sees the output
    layer's use), as trime.train.Objective is for a language model. ``gather``: TrimeMT's memory over
    ranks (None: this process only); ``generator`` is saved and restored with the run."""

    def __init__(self, model: torch.nn.Module, settings: MTLossSettings, seed: int, gather: Gather | None = None,
                 rank: int = 0):  # fmt: skip
        super().__init__()
        self.model, self.settings, self.gather = model, settings, gather
        self.generator = torch.Generator().manual_seed(seed + 7919 * rank)

    def forward(self, src_tokens, prev_output_tokens, target, use_ce: bool = False, diagnose: bool = False):
        out = self.model(src_tokens, prev_output_tokens)
        res = compute_mt_loss(self.settings, out, target, self.model.head, use_ce=use_ce, gather=self.gather,
                              diagnose=diagnose)  # fmt: skip
        return res.loss, res.n_targets.to(res.loss.dtype), res.ce_sum, res.diag
