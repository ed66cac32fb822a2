"""Which memory entries each query may see (spec §2, §3.2, §3.3, §4), as data.

Keys are rows of one flattened stream (segment by segment, position by position, ranks in rank
order). Every rule of the paper is then one key interval per query plus a per-key validity flag:

    inside rules (local, long):  visible(i, j) = key_valid[j] and lo[i] <= j < hi[i]
    outside rule (external):     visible(i, j) = key_valid[j] and not (lo[i] <= j < hi[i])

- local (§2): [lo, hi) = [start of i's segment, i): own segment, strictly earlier positions.
- long (§3.2, §3.3): [lo, hi) = [start of i's memory group, i): everything earlier in the group.
- external (§4): the hidden interval is i's own segment from position pos(i) on (nothing earlier
  is hidden), or the whole own segment when it is hidden; every other segment is visible.

Named fix (spec §2.7, §11.11): keys whose value is pad are never visible (``key_valid``).

The rule is never stored as an (N, M) matrix: ``block`` expands one chunk of queries, and
``mask_`` masks a chunk of scores in place, touching only the columns where the chunk's rows
disagree (a causal chunk is masked on its diagonal part only).

Letters: N query rows, M keys, B segments, L positions per segment, n/m rows/keys of a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

# Query rows per block for inside (causal) rules: the masked upper triangle of a block is computed
# and thrown away, so shorter blocks waste less (measured on CPU: 128-256 rows are fastest).
CAUSAL_ROWS = 256


class Span(NamedTuple):
    """Queries [q0, q1) whose visible keys all lie in [k0, k1); ``ragged`` are the column ranges
    (c0, c1, check_lo, check_hi) inside [k0, k1) where some row of the chunk sees a key another row
    does not, with whether the rows' lo / hi bounds fall inside the range (else they can be skipped)."""

    q0: int
    q1: int
    k0: int
    k1: int
    ragged: tuple[tuple[int, int, bool, bool], ...]


@dataclass(frozen=True, eq=False)
class Visibility:
    """A visibility rule over N queries and M keys (see the module docstring)."""

    lo: Tensor  # (N,) int64
    hi: Tensor  # (N,) int64
    key_valid: Tensor  # (M,) bool: False for pad-valued entries
    inside: bool = True  # True: visible iff lo <= j < hi; False: visible iff not
    pad_keys: Tensor = field(init=False, repr=False)  # (P,) indices of the invalid keys

    def __post_init__(self) -> None:
        object.__setattr__(self, "pad_keys", (~self.key_valid).nonzero().flatten())

    @property
    def n_query(self) -> int:
        return self.lo.shape[0]

    @property
    def n_key(self) -> int:
        return self.key_valid.shape[0]

    def block(self, q0: int, q1: int, k0: int = 0, k1: int | None = None) -> Tensor:
        """Visibility of keys [k0, k1) to queries [q0, q1): BoolTensor (q1-q0, k1-k0)."""
        return self.rows(torch.arange(q0, q1, device=self.lo.device), k0, k1)

    def rows(self, rows: Tensor, k0: int = 0, k1: int | None = None) -> Tensor:
        """Visibility of keys [k0, k1) to the query rows ``rows`` (n,): BoolTensor (n, k1-k0)."""
        k1 = self.n_key if k1 is None else k1
        hidden = self._hidden(self.lo[rows], self.hi[rows], k0, k1)
        return ~hidden & self.key_valid[None, k0:k1]

    def dense(self) -> Tensor:
        """The whole (N, M) mask; for tests and small inputs only."""
        return self.block(0, self.n_query)

    def _hidden(self, lo: Tensor, hi: Tensor, c0: int, c1: int, check_lo: bool = True, check_hi: bool = True) -> Tensor:
        """Structural invisibility (ignoring key_valid) of keys [c0, c1) to queries with bounds lo, hi (n,).

        check_lo / check_hi False promise that every lo <= c0 / every hi >= c1, saving a pass."""
        j = torch.arange(c0, c1, device=lo.device)[None, :]  # (1, m)
        lo, hi = lo[:, None], hi[:, None]  # (n, 1)
        if self.inside:  # hidden iff j < lo or j >= hi
            if check_lo and check_hi:
                return (j < lo) | (j >= hi)  # (n, m)
            return j < lo if check_lo else j >= hi
        if check_lo and check_hi:  # hidden iff lo <= j < hi
            return (j >= lo) & (j < hi)
        return j < hi if check_hi else j >= lo

    def mask_(self, scores: Tensor, span: Span) -> Tensor:
        """Set invisible entries of the chunk's scores (q1-q0, k1-k0) to −inf, in place."""
        q0, q1, k0, k1, ragged = span
        for c0, c1, check_lo, check_hi in ragged:
            hidden = self._hidden(self.lo[q0:q1], self.hi[q0:q1], c0, c1, check_lo, check_hi)  # (n, c1-c0)
            scores[:, c0 - k0 : c1 - k0].masked_fill_(hidden, float("-inf"))
        pads = self.pad_keys
        if pads.numel():
            cols = pads[(pads >= k0) & (pads < k1)] - k0
            if cols.numel():
                scores.index_fill_(1, cols, float("-inf"))
        return scores

    def spans(self, chunk: int) -> list[Span]:
        """Cut the queries into chunks of at most ``chunk`` rows and bound each chunk's keys.

        Inside rules never let a chunk straddle a change of ``lo`` (a new segment for local
        memory), so no chunk computes a block of another segment's keys, and use at most
        CAUSAL_ROWS rows per chunk. Two device syncs in all.
        """
        cuts = [0]
        if self.inside:  # a causal block computes its upper triangle for nothing: keep blocks short
            chunk = min(chunk, CAUSAL_ROWS)
        if self.inside and self.n_query > 1:
            cuts += ((self.lo[1:] != self.lo[:-1]).nonzero().flatten() + 1).tolist()
        cuts.append(self.n_query)
        rows = [(a, min(a + chunk, b)) for s, b in zip(cuts[:-1], cuts[1:]) for a in range(s, b, chunk)]
        if not rows:
            return []
        sizes = torch.tensor([q1 - q0 for q0, q1 in rows], device=self.lo.device)
        cid = torch.repeat_interleave(torch.arange(len(rows), device=self.lo.device), sizes)  # (N,) chunk of a row
        lo, hi, M = self.lo, self.hi, self.n_key
        nonempty = lo < hi

        def reduce(x: Tensor, how: str, init: int) -> Tensor:
            return torch.full((len(rows),), init, dtype=x.dtype, device=x.device).scatter_reduce(0, cid, x, how)

        stats = torch.stack(
            [
                reduce(torch.where(nonempty, lo, M), "amin", M),  # lowest key any row sees
                reduce(torch.where(nonempty, hi, 0), "amax", 0),  # one past the highest
                reduce(lo, "amax", 0),
                reduce(hi, "amin", M),
            ],
            1,
        ).tolist()  # (chunks, 4): one device sync
        return [self._span(q0, q1, *st) for (q0, q1), st in zip(rows, stats)]

    def _span(self, q0: int, q1: int, lo_min: int, hi_max: int, lo_max: int, hi_min: int) -> Span:
        if self.inside:
            if lo_min >= hi_max:  # no row sees anything
                return Span(q0, q1, 0, 0, ())
            k0, k1 = lo_min, hi_max
            a, b = max(lo_max, k0), min(hi_min, k1)  # [a, b): columns every row sees
            regions = ((k0, k1),) if a >= b else ((k0, a), (b, k1))
        else:  # everything may be visible; rows disagree only on [lo_min, hi_max)
            k0, k1 = 0, self.n_key
            regions = ((lo_min, hi_max),)
        ragged = tuple((c0, c1, lo_max > c0, hi_min < c1) for c0, c1 in regions if c0 < c1)
        return Span(q0, q1, k0, k1, ragged)


def _valid(key_valid: Tensor | None, n: int, device) -> Tensor:
    if key_valid is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if key_valid.shape != (n,):
        raise ValueError(f"key_valid has shape {tuple(key_valid.shape)}, expected ({n},)")
    return key_valid.to(device=device, dtype=torch.bool)


def local(B: int, L: int, *, key_valid: Tensor | None = None, device=None) -> Visibility:
    """Local memory (spec §2): rows flattened as (segment, position); key j is visible to query i
    iff both lie in the same segment and pos(j) < pos(i). Queries and keys are the same B·L rows."""
    i = torch.arange(B * L, device=device)  # (N,)
    return Visibility(i - i % L, i, _valid(key_valid, B * L, i.device))


def causal(rows: Tensor, n_key: int, *, key_valid: Tensor | None = None) -> Visibility:
    """Local memory of an evaluation window (spec §5.3): the query at window position ``rows[i]``
    sees the window positions j < rows[i] (context included); keys are the window's n_key positions."""
    return Visibility(torch.zeros_like(rows), rows, _valid(key_valid, n_key, rows.device))


def group_ids(group_bounds: Sequence[int] | Tensor, n: int, device=None) -> Tensor:
    """Group id (n,) of stream rows 0..n-1 given cumulative bounds [0, b1, ..., n]."""
    b = torch.as_tensor(group_bounds, dtype=torch.long, device=device)
    if b.numel() < 2 or b[0].item() != 0 or b[-1].item() != n or bool((b[1:] < b[:-1]).any()):
        raise ValueError(f"group bounds {b.tolist()} do not cut a stream of {n} rows")
    return torch.bucketize(torch.arange(n, device=b.device), b[1:], right=True)  # (n,)


def long(
    n_query: int,
    n_key: int,
    query_offset: int,
    group_bounds: Sequence[int] | Tensor,
    *,
    key_valid: Tensor | None = None,
    device=None,
) -> Visibility:
    """Long-term memory (spec §3.2, §3.3). Keys form one flattened, rank-ordered stream cut into
    memory groups by ``group_bounds`` ([0, b1, ..., n_key]); query i is stream row
    ``query_offset + i`` and sees key j iff both are in the same group and j < query_offset + i.
    Same device: one group, offset 0. Across ranks: the gathered stream and this rank's offset."""
    if not 0 <= query_offset <= n_key - n_query:
        raise ValueError(f"queries [{query_offset}, {query_offset + n_query}) fall outside the {n_key} keys")
    b = torch.as_tensor(group_bounds, dtype=torch.long, device=device)
    rows = torch.arange(query_offset, query_offset + n_query, device=b.device)  # (N,) stream rows
    start = b[group_ids(b, n_key)[rows]]  # (N,) first row of each query's group
    return Visibility(start, rows, _valid(key_valid, n_key, b.device))


def external(
    seg_q: Tensor,
    pos_q: Tensor,
    seg_k: Tensor,
    pos_k: Tensor,
    hide_own: Tensor | bool = False,
    *,
    key_valid: Tensor | None = None,
) -> Visibility:
    """External / cross-segment memory (spec §4): every key of another segment is visible, with no
    causal restriction; keys of the query's own segment are visible iff strictly earlier, and none
    when ``hide_own`` (a bool, or a bool per query row) is set.

    The keys of each segment must be one run of the stream with positions 0, 1, 2, ... (how every
    stream here is laid out); raises ValueError otherwise. A query whose segment has no key sees all.
    """
    n, m, device = seg_q.shape[0], seg_k.shape[0], seg_q.device
    seg_q, pos_q, seg_k, pos_k = seg_q.long(), pos_q.long(), seg_k.long(), pos_k.long()
    new = torch.ones(m, dtype=torch.bool, device=device)
    new[1:] = seg_k[1:] != seg_k[:-1]
    run_start = new.nonzero().flatten()  # (S,) first key of each segment's run
    run_seg = seg_k[run_start]  # (S,)
    run_len = torch.diff(run_start, append=torch.tensor([m], device=device))  # (S,)
    idx = torch.arange(m, device=device)
    starts = run_start.repeat_interleave(run_len)  # (M,) run start of every key
    if run_seg.unique().numel() != run_seg.numel() or not torch.equal(pos_k, idx - starts):
        raise ValueError("external memory keys must hold each segment as one run with positions 0, 1, 2, ...")
    match = seg_q[:, None] == run_seg[None, :]  # (N, S): which run is the query's own segment
    has = match.any(1)
    which = match.long().argmax(1)
    start = torch.where(has, run_start[which], 0)  # (N,)
    end = torch.where(has, run_start[which] + run_len[which], 0)
    hide = torch.as_tensor(hide_own, dtype=torch.bool, device=device).expand(n)
    lo = torch.where(hide, start, torch.minimum(start + pos_q, end))  # hidden from lo to the segment's end
    return Visibility(lo, end, _valid(key_valid, m, device), inside=False)
