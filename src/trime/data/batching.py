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

import numpy as np

from trime.errors import ConfigError


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


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
        batches = _chunks(rng.permutation(n_segments), segments_per_batch)
        n = len(batches) // world_size * world_size
        return batches[rank:n:world_size]
    if mode == "consecutive":
        batches = _chunks(np.arange(n_segments), segments_per_batch)
        c = num_comb_shards
        per_group = len(batches) // world_size * c  # equal share for every rank
        group, p = divmod(rank, c)
        mine = batches[group * per_group : (group + 1) * per_group]
        return mine[p::c]
    if mode == "predefined":
        if order is None:
            raise ConfigError("the predefined order needs --predefined-batches")
        batches = _chunks(np.asarray(order), segments_per_batch)
        n = len(batches) // world_size * world_size
        groups = [batches[i : i + world_size] for i in range(0, n, world_size)]
        return [groups[g][rank] for g in rng.permutation(len(groups))]
    raise ConfigError(f"unknown batch order {mode!r}")


def valid_batches(n_segments: int, segments_per_batch: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Validation: consecutive segments in text order, round-robin over ranks (never dropped)."""
    batches = _chunks(np.arange(n_segments), segments_per_batch)
    return batches[rank::world_size]
