"""Batch orders: shuffled, consecutive (long memory, spec §3.1) and predefined (BM25, spec §4)."""

import numpy as np

from trime.data.batching import epoch_batches, valid_batches


def test_shuffled_is_a_seeded_permutation_each_epoch():
    a = epoch_batches(20, 4, 1, seed=3)
    assert sorted(np.concatenate(a).tolist()) == list(range(20))
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(20, 4, 1, seed=3)]
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(20, 4, 2, seed=3)]


def test_shuffled_round_robin_over_ranks():
    full = epoch_batches(20, 2, 1, seed=1)
    r0 = epoch_batches(20, 2, 1, seed=1, rank=0, world_size=2)
    r1 = epoch_batches(20, 2, 1, seed=1, rank=1, world_size=2)
    assert [x.tolist() for x in r0] == [x.tolist() for x in full[0::2]]
    assert [x.tolist() for x in r1] == [x.tolist() for x in full[1::2]]


def test_consecutive_identity_order_every_epoch():
    a = epoch_batches(10, 3, 1, mode="consecutive")
    assert [x.tolist() for x in a] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [x.tolist() for x in epoch_batches(10, 3, 5, mode="consecutive")] == [x.tolist() for x in a]


def test_consecutive_group_sharding():
    # 4 ranks in one group of 4: at step k the ranks hold batches 4k..4k+3 in rank order
    per_rank = [epoch_batches(16, 1, 1, mode="consecutive", rank=r, world_size=4, num_comb_shards=4) for r in range(4)]
    for step in range(4):
        assert [per_rank[r][step][0] for r in range(4)] == [4 * step + r for r in range(4)]
    # 2 ranks, groups of 1: each rank walks its own contiguous half
    r0 = epoch_batches(16, 2, 1, mode="consecutive", rank=0, world_size=2)
    r1 = epoch_batches(16, 2, 1, mode="consecutive", rank=1, world_size=2)
    assert np.concatenate(r0).tolist() == list(range(8)) and np.concatenate(r1).tolist() == list(range(8, 16))


def test_consecutive_shuffled_keeps_each_steps_memory_and_covers_the_corpus():
    # one rank: every batch is a run of consecutive segments, as in "consecutive"; the runs come in a
    # seeded random order, new each epoch, so the first batches of an epoch are not the corpus's start
    a = epoch_batches(40, 4, 1, mode="consecutive_shuffled", seed=2)
    assert sorted(x.tolist() for x in a) == [x.tolist() for x in epoch_batches(40, 4, 1, mode="consecutive")]
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(40, 4, 1, mode="consecutive")]
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(40, 4, 1, mode="consecutive_shuffled", seed=2)]
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(40, 4, 2, mode="consecutive_shuffled", seed=2)]
    # 4 ranks in 2 groups of 2: at every step the 2 ranks of a group hold 2 consecutive batches in rank
    # order (one step's memory, spec §3.1); over the epoch every full run is walked exactly once
    ranks = [
        epoch_batches(48, 2, 1, mode="consecutive_shuffled", rank=r, world_size=4, num_comb_shards=2) for r in range(4)
    ]
    assert len({len(x) for x in ranks}) == 1
    for g in (0, 2):
        for lo, hi in zip(ranks[g], ranks[g + 1]):
            assert hi.tolist() == [lo[-1] + 1, lo[-1] + 2] and lo.tolist() == [lo[0], lo[0] + 1] and lo[0] % 4 == 0
    seen = sorted(int(b[0]) for r in ranks for b in r)
    assert seen == list(range(0, 48, 2))


def test_predefined_groups_stay_together():
    order = np.array([5, 3, 9, 1, 0, 2, 8, 7, 6, 4])
    ranks = [epoch_batches(10, 1, 2, mode="predefined", order=order, rank=r, world_size=2) for r in range(2)]
    pairs = {(a[0], b[0]) for a, b in zip(*ranks)}
    assert pairs == {(5, 3), (9, 1), (0, 2), (8, 7), (6, 4)}
    single = epoch_batches(10, 2, 1, mode="predefined", order=order)
    assert sorted(tuple(b.tolist()) for b in single) == sorted([(5, 3), (9, 1), (0, 2), (8, 7), (6, 4)])


def test_valid_batches_cover_everything():
    b = valid_batches(7, 2)
    assert np.concatenate(b).tolist() == list(range(7))
