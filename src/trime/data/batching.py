"""Which segments form each batch, per epoch and per rank (spec §3.1, §4).

Three orders, each a pure function of (epoch, seed, rank, world size), so that a resumed run
rebuilds exactly the batches it was walking through:

- ``shuffled``: a seeded permutation of the segments each epoch (plain CE and ``trime``);
  global batch g goes to rank g mod W (fairseq's round-robin ShardedIterator).
- ``consecutive`` (``--keep-order``, long memory): the identity order every epoch, B consecutive
  segments per batch; ranks form W/c groups of c = num_comb_shards; group k walks the k-th
  contiguous chunk of batches and its c ranks hold c consecutive batches in rank order
  (fairseq's SequentialShardedIterator).
- ``predefined`` (``--predefined-batches``, BM25 order for ``trime_ext``): the given order cut into
  batches of B; each epoch, groups of W consecutive batches are shuffled (seed + epoch) with the
  order inside a group kept, and batch k of a group goes to rank k.

Every rank gets the same number of batches: a tail that does not fill all ranks is dropped
(fairseq pads it with empty batches, which a data-parallel step cannot use).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trime.data.blocks import input_tokens
from trime.errors import ConfigError, DataError
from trime.io import read_json


@dataclass
class Batch:
    """Windows of a token stream as tensors: the one batch layout of training, evaluation and datastores.

    Row j covers stream positions ``[start - n_ctx, end)``: ``inputs`` hold t[i-1] (eos before the
    split's first token) and ``targets`` t[i] at every position, context included (the context's
    targets label local-memory entries but are not scored); both are ``pad`` after the row's end.
    """

    inputs: torch.Tensor  # (b, T) int64
    targets: torch.Tensor  # (b, T) int64
    n_ctx: list[int]  # context positions at the start of each row
    n_score: list[int]  # scored positions after them


def make_batch(
    tokens: np.ndarray, windows: np.ndarray, *, pad: int, eos: int, width: int = 0, device: torch.device | str = "cpu"
) -> Batch:
    """The :class:`Batch` of ``windows`` (b, 3) rows (start, end, n_ctx) of ``tokens``, right-padded to
    the longest row or to ``width``, whichever is larger (training pads short segments to L)."""
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 3)
    lengths = windows[:, 1] - windows[:, 0] + windows[:, 2]
    T = max(int(lengths.max(initial=0)), width)
    inputs = np.full((len(windows), T), pad, dtype=np.int64)
    targets = np.full((len(windows), T), pad, dtype=np.int64)
    for j, (s, e, c) in enumerate(windows.tolist()):
        inputs[j, : e - s + c] = input_tokens(tokens, s - c, e, eos)
        targets[j, : e - s + c] = tokens[s - c : e]
    return Batch(
        torch.from_numpy(inputs).to(device, non_blocking=True),
        torch.from_numpy(targets).to(device, non_blocking=True),
        windows[:, 2].tolist(),
        (windows[:, 1] - windows[:, 0]).tolist(),
    )


def load_batch_order(
    path, n_segments: int, rebuild: str = "rebuild it with `trime bm25 batches` for this data and --tokens-per-sample"
) -> np.ndarray:
    """(S,) int64 training order from a batch-order file (``trime bm25 batches``): a JSON
    permutation of the segment ids 0..S-1."""
    order = read_json(path)
    if not isinstance(order, list) or any(type(i) is not int for i in order):
        raise DataError(f"{path}: not a JSON list of segment ids; {rebuild}")
    if len(order) != n_segments:
        raise DataError(
            f"{path}: lists {len(order)} segment ids but the training data has {n_segments} segments; {rebuild}"
        )
    arr = np.asarray(order, dtype=np.int64)  # (S,)
    bad = np.flatnonzero((arr < 0) | (arr >= n_segments))
    if len(bad):
        raise DataError(
            f"{path}: id {arr[bad[0]]} at position {bad[0]} is not a segment id in [0, {n_segments}); {rebuild}"
        )
    counts = np.bincount(arr, minlength=n_segments)
    if (counts != 1).any():
        dup = int(np.flatnonzero(counts > 1)[0])
        raise DataError(f"{path}: not a permutation (segment {dup} appears {counts[dup]} times); {rebuild}")
    return arr


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def deal(batches: list, rank: int, world_size: int) -> list:
    """Batch g to rank g mod W (fairseq's round-robin ShardedIterator); a tail that does not fill
    every rank is dropped. Language-model segments and translation pairs are dealt alike."""
    n = len(batches) // world_size * world_size
    return batches[rank:n:world_size]


def deal_in_groups(batches: list, permutation: np.ndarray, rank: int, world_size: int) -> list:
    """A predefined (BM25) order's batches: groups of W consecutive batches walked in ``permutation``
    (of the ``len(batches) // W`` groups), batch k of a group to rank k (spec §4; MT spec §5.7)."""
    n = len(batches) // world_size * world_size
    groups = [batches[i : i + world_size] for i in range(0, n, world_size)]
    return [groups[g][rank] for g in permutation]


def epoch_batches(
    n_segments: int,
    segments_per_batch: int,
    epoch: int,
    *,
    mode: str = "shuffled",
    seed: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_comb_shards: int = 1,
    order: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The list of batches (arrays of segment ids) that ``rank`` walks in ``epoch`` (1-based)."""
    if world_size % num_comb_shards:
        raise ConfigError(f"world size {world_size} is not a multiple of the {num_comb_shards} ranks per memory group")
    rng = np.random.default_rng([seed, epoch])
    if mode == "shuffled":
        return deal(_chunks(rng.permutation(n_segments), segments_per_batch), rank, world_size)
    if mode == "consecutive":
        batches = _chunks(np.arange(n_segments), segments_per_batch)
        c = num_comb_shards
        per_group = len(batches) // world_size * c  # equal share for every rank
        group, p = divmod(rank, c)
        mine = batches[group * per_group : (group + 1) * per_group]
        return mine[p::c]
    if mode == "consecutive_shuffled":
        # the runs of c consecutive batches that make one step's memory of a rank group, walked in a new
        # random order each epoch and dealt to the W/c groups in turn: the in-batch memory is exactly
        # that of "consecutive", but a budget under one epoch covers the whole corpus, not its beginning
        batches = _chunks(np.arange(n_segments), segments_per_batch)
        c, n_groups = num_comb_shards, world_size // num_comb_shards
        runs = [batches[i : i + c] for i in range(0, len(batches) // c * c, c)]
        runs = [runs[j] for j in rng.permutation(len(runs))]
        group, p = divmod(rank, c)
        return [run[p] for run in deal(runs, group, n_groups)]
    if mode == "predefined":
        if order is None:
            raise ConfigError("the predefined order needs --predefined-batches")
        batches = _chunks(np.asarray(order), segments_per_batch)
        return deal_in_groups(batches, rng.permutation(len(batches) // world_size), rank, world_size)
    raise ConfigError(f"unknown batch order {mode!r}")


def valid_batches(n_segments: int, segments_per_batch: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Validation: consecutive segments in text order, round-robin over ranks (never dropped)."""
    batches = _chunks(np.arange(n_segments), segments_per_batch)
    return batches[rank::world_size]
