"""Visibility rules (spec §2, §3.2, §3.3, §4) against the brute-force predicates of tests/reference.py."""

import pytest
import torch

from trime.memory import masks

import reference as ref


def _valid(n, seed, p_pad=0.2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) > p_pad  # (n,) False = pad-valued key


@pytest.mark.parametrize("B,L,seed", [(1, 1, 0), (1, 6, 1), (3, 4, 2), (2, 7, 3)])
def test_local_matches_predicate(B, L, seed):
    valid = _valid(B * L, seed)
    got = masks.local(B, L, key_valid=valid).dense()
    want = ref.mask_from(lambda i, j: ref.local_visible(i, j, L, valid), B * L, B * L)
    assert torch.equal(got, want)


def test_local_never_sees_later_or_other_segments():
    B, L = 3, 5
    vis = masks.local(B, L).dense()  # (15, 15)
    for i in range(B * L):
        for j in range(B * L):
            if j >= i or i // L != j // L:
                assert not vis[i, j]
            else:
                assert vis[i, j]
    assert not vis[torch.arange(0, B * L, L)].any()  # position 0 of a segment sees nothing


@pytest.mark.parametrize(
    "n_query,n_key,offset,bounds",
    [(12, 12, 0, [0, 12]), (4, 12, 4, [0, 12]), (4, 12, 8, [0, 6, 12]), (3, 10, 5, [0, 2, 5, 10])],
)
def test_long_matches_predicate(n_query, n_key, offset, bounds):
    valid = _valid(n_key, n_key + offset)
    got = masks.long(n_query, n_key, offset, bounds, key_valid=valid).dense()
    want = ref.mask_from(lambda i, j: ref.long_visible(offset + i, j, bounds, valid), n_query, n_key)
    assert torch.equal(got, want)


def test_long_sees_all_earlier_segments():
    B, L = 4, 3
    vis = masks.long(B * L, B * L, 0, [0, B * L]).dense()
    for s in range(B):
        rows = vis[s * L : (s + 1) * L]
        assert rows[:, : s * L].all()  # every entry of earlier segments
        assert not rows[:, (s + 1) * L :].any()  # nothing later


@pytest.mark.parametrize("hide", [False, True, "rows"])
def test_external_matches_predicate(hide):
    seg_k = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    pos_k = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 0])
    seg_q, pos_q = seg_k[3:8], pos_k[3:8]  # queries: segments 1 and 2 (one rank's rows)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    hidden = torch.tensor([True, False, True, False, True]) if hide == "rows" else torch.tensor([hide] * 5)
    got = masks.external(seg_q, pos_q, seg_k, pos_k, hidden if hide == "rows" else hide, key_valid=valid).dense()

    def pred(i, j):
        own, other = (int(seg_q[i]), int(pos_q[i])), (int(seg_k[j]), int(pos_k[j]))
        return ref.ext_visible(*own, *other, bool(hidden[i]), bool(valid[j]))

    want = ref.mask_from(pred, 5, 9)
    assert torch.equal(got, want)


def test_external_sees_all_of_others_and_with_hide_nothing_of_its_own():
    L = 4
    idx = torch.arange(3 * L)
    seg, pos = idx // L, idx % L
    shown = masks.external(seg, pos, seg, pos, False).dense()
    hidden = masks.external(seg, pos, seg, pos, True).dense()
    other = seg[:, None] != seg[None, :]
    assert shown[other].all() and hidden[other].all()  # no causality across segments
    assert not hidden[~other].any()
    own_earlier = (~other) & (pos[None, :] < pos[:, None])
    assert torch.equal(shown & ~other, own_earlier)


def test_external_needs_each_segment_as_one_run():
    seg = torch.tensor([0, 0, 1, 1, 0])
    pos = torch.tensor([0, 1, 0, 1, 2])
    with pytest.raises(ValueError):
        masks.external(seg, pos, seg, pos)
    with pytest.raises(ValueError):
        masks.external(seg[:4], pos[:4], seg[:4], torch.tensor([0, 2, 0, 1]))


def test_external_query_of_a_segment_without_keys_sees_everything():
    seg_k, pos_k = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    vis = masks.external(torch.tensor([5]), torch.tensor([0]), seg_k, pos_k, True).dense()
    assert vis.all()


@pytest.mark.parametrize("rule", ["local", "long", "long_groups", "ext", "ext_hidden"])
def test_pad_keys_never_visible(rule):
    vis = _rule(rule, key_valid=torch.tensor([True, False] * 6))
    assert not vis.dense()[:, 1::2].any()


def _rule(name, key_valid=None):
    if name == "local":
        return masks.local(3, 4, key_valid=key_valid)
    if name == "long":
        return masks.long(12, 12, 0, [0, 12], key_valid=key_valid)
    if name == "long_groups":
        return masks.long(6, 12, 6, [0, 4, 12], key_valid=key_valid)
    idx = torch.arange(12)
    return masks.external(idx // 4, idx % 4, idx // 4, idx % 4, name == "ext_hidden", key_valid=key_valid)


@pytest.mark.parametrize("rule", ["local", "long", "long_groups", "ext", "ext_hidden"])
@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
def test_spans_cover_the_queries_and_every_visible_key(rule, chunk):
    vis = _rule(rule, key_valid=_valid(12, 5))
    dense = vis.dense()
    spans = vis.spans(chunk)
    assert [s.q0 for s in spans] == sorted(s.q0 for s in spans) and spans[0].q0 == 0 and spans[-1].q1 == vis.n_query
    assert all(a.q1 == b.q0 and 0 < a.q1 - a.q0 <= chunk for a, b in zip(spans, spans[1:]))
    for span in spans:
        q0, q1, k0, k1, ragged = span
        cols = dense[q0:q1].any(0).nonzero().flatten()
        if len(cols):
            assert k0 <= int(cols.min()) and int(cols.max()) < k1
        if k0 == k1:
            continue
        assert torch.equal(vis.block(q0, q1, k0, k1), dense[q0:q1, k0:k1])
        # mask_ touches only the ragged columns and the pad keys, and agrees with block()
        scores = torch.randn(q1 - q0, k1 - k0)
        masked = vis.mask_(scores.clone(), span)
        torch.testing.assert_close(masked, scores.masked_fill(~dense[q0:q1, k0:k1], float("-inf")))
        for c in range(k0, k1):
            if not any(a <= c < b for a, b, _, _ in ragged) and vis.key_valid[c]:
                assert dense[q0:q1, c].all()


def test_spans_keep_local_chunks_inside_one_segment():
    spans = masks.local(4, 3).spans(5)
    assert [(s.q0, s.q1, s.k0, s.k1) for s in spans] == [(0, 3, 0, 2), (3, 6, 3, 5), (6, 9, 6, 8), (9, 12, 9, 11)]
    causal = masks.long(8, 8, 0, [0, 8]).spans(4)  # second chunk: keys 0..3 fully visible
    assert causal[1].k0 == 0 and causal[1].ragged == ((4, 7, False, True),)


@pytest.mark.parametrize("bounds", [[0, 5], [1, 12], [0, 8, 6, 12], [0]])
def test_bad_group_bounds_raise(bounds):
    with pytest.raises(ValueError):
        masks.long(4, 12, 0, bounds)
