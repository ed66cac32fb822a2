"""The joint softmax (spec §2 step 3) against the loops of tests/reference.py; chunked == dense."""

import math

import pytest
import torch

from trime.memory import joint, masks

import reference as ref

NEG = float("-inf")


def _case(N=6, M=7, V=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    tlp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=dtype), -1)[:, 0]  # (N,)
    tln = torch.randn(N, generator=g, dtype=dtype) * 3  # (N,)
    scores = torch.randn(N, M, generator=g, dtype=dtype) * 2  # (N, M)
    scores[torch.rand(N, M, generator=g) < 0.3] = NEG
    values = torch.randint(0, V, (M,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    return tlp, tln, scores, values, targets


def test_matches_loops_with_duplicates_missing_positives_and_empty_rows():
    tlp, tln, scores, values, targets = _case()
    values[:3] = targets[0]  # duplicate values: every positive counts
    targets[1] = 4
    values[values == 4] = 3  # row 1: no positive at all
    scores[2] = NEG  # row 2: nothing visible
    got = joint.joint_log_prob(tlp, tln, scores, values, targets)
    want = torch.tensor(ref.joint_log_prob(tlp, tln, scores, values, targets), dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_per_row_values():
    tlp, tln, scores, _, targets = _case(seed=1)
    values = torch.randint(0, 5, scores.shape, generator=torch.Generator().manual_seed(9))  # (N, M)
    values[:, -1] = -1  # an unlabelled external slot
    got = joint.joint_log_prob(tlp, tln, scores, values, targets)
    want = torch.tensor(ref.joint_log_prob(tlp, tln, scores, values, targets), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("M", [0, 4])
def test_no_visible_entry_is_exactly_the_token_part_with_finite_gradients(M):
    tlp, tln, scores, values, targets = _case(N=4, M=max(M, 1), seed=2, dtype=torch.float32)
    scores = torch.full((4, M), NEG)
    values = values[:M]
    for x in (tlp, tln, scores):
        x.requires_grad_(True)
    got = joint.joint_log_prob(tlp, tln, scores, values, targets)
    assert torch.equal(got, tlp)  # exactly log p_tok(y), not approximately
    grads = torch.autograd.grad(got.sum(), (tlp, tln, scores))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0], torch.ones(4)) and not grads[1].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    tlp, tln, scores, values, targets = _case(seed=3, dtype=torch.float32)
    args = [x.to(dtype) for x in (tlp, tln, scores)]
    got = joint.joint_log_prob(*args, values, targets)
    assert got.dtype == torch.float32
    want = ref.joint_log_prob(*[x.double() for x in args], values, targets)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_input():
    tlp, tln, scores, values, targets = _case(seed=4)
    for x in (tlp, tln, scores):
        x.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b, c: joint.joint_log_prob(a, b, c, values, targets), (tlp, tln, scores))


def test_combine_equals_dense_from_statistics():
    tlp, tln, scores, values, targets = _case(seed=5)
    lzc, lzpos = joint.score_stats(scores, values, targets)
    for i in range(len(targets)):
        visible = [float(s) for s in scores[i]]
        pos = [float(s) for s, v in zip(scores[i], values) if v == targets[i]]
        assert math.isclose(float(lzc[i]), ref._logsumexp(visible), abs_tol=1e-12) or lzc[i] == NEG
        assert math.isclose(float(lzpos[i]), ref._logsumexp(pos), abs_tol=1e-12) or lzpos[i] == NEG
    dense = joint.joint_log_prob(tlp, tln, scores, values, targets)
    torch.testing.assert_close(joint.combine(tlp, tln, lzc, lzpos), dense)


def _heads():
    heads = [("plain", ref.FakeHead(4, 9)), ("fake_adaptive", ref.FakeAdaptiveHead(4, 9, cutoff=5))]
    try:
        from trime.model.adaptive import AdaptiveSoftmax

        heads.append(("adaptive", AdaptiveSoftmax(9, 4, [3, 6], factor=2.0)))
    except ImportError:
        pass
    return heads


@pytest.mark.parametrize("name,head", _heads(), ids=lambda x: x if isinstance(x, str) else "")
def test_probabilities_over_the_whole_vocabulary_sum_to_one(name, head):
    torch.manual_seed(0)
    V, N, M = 9, 5, 8
    h, q, keys = torch.randn(N, 4), torch.randn(N, 4), torch.randn(M, 4)
    values = torch.tensor([0, 2, 2, 8, 5, 2, 7, 0])
    visible = torch.rand(N, M) < 0.6
    visible[0] = False
    scale = 0.5
    scores = (q @ keys.T * scale).masked_fill(~visible, NEG).double()  # (N, M)
    with torch.no_grad():
        logp_tok = head.log_probs(h).double()  # (N, V)
        log_z = ref.head_log_norm(head, h).double()  # (N,)
        per_y = torch.stack(
            [joint.joint_log_prob(logp_tok[:, y], log_z, scores, values, torch.full((N,), y)) for y in range(V)], 1
        )  # (N, V)
    torch.testing.assert_close(per_y.exp().sum(1), torch.ones(N, dtype=torch.float64), atol=1e-6, rtol=0)
    for i in range(N):
        want = ref.full_vocab_probs(head, h[i], q[i], keys, values, visible[i], scale)
        torch.testing.assert_close(per_y[i].exp(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# chunked fast path == dense reference, value and gradient


def _rules(N, L):
    idx = torch.arange(N)
    valid = torch.ones(N, dtype=torch.bool)
    valid[5] = False
    return {
        "local": masks.local(N // L, L, key_valid=valid),
        "long": masks.long(N, N, 0, [0, N], key_valid=valid),
        "ext": masks.external(idx // L, idx % L, idx // L, idx % L, False, key_valid=valid),
        "ext_hidden": masks.external(idx // L, idx % L, idx // L, idx % L, True, key_valid=valid),
    }


def _check_chunked(queries, keys, leaves, values, targets, vis, chunk, tol):
    g = torch.Generator().manual_seed(7)
    n = targets.shape[0]
    w_c, w_p = torch.rand(n, generator=g), torch.rand(n, generator=g)
    results = []
    for fn in (
        lambda: joint.memory_stats(queries(), keys(), values, targets, vis, 0.3, chunk),
        lambda: joint.dense_memory_stats(queries(), keys(), values, targets, vis, 0.3),
    ):
        lzc, lzpos = fn()
        # a loss that touches both statistics; rows with -inf statistics contribute nothing
        loss = (torch.where(torch.isfinite(lzc), lzc, 0) * w_c.to(lzc)).sum()
        loss = loss + (torch.where(torch.isfinite(lzpos), lzpos, 0) * w_p.to(lzc)).sum()
        grads = torch.autograd.grad(loss, leaves)
        results.append((lzc.detach(), lzpos.detach(), grads))
    (c1, p1, g1), (c2, p2, g2) = results
    torch.testing.assert_close(c1, c2, atol=tol, rtol=tol)
    torch.testing.assert_close(p1, p2, atol=tol, rtol=tol)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rule", ["local", "long", "ext", "ext_hidden"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_chunked_equals_dense_same_tensor(dtype, tol, rule, chunk):
    N, L, d = 16, 4, 6
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 4, (N,), generator=g)
    _check_chunked(lambda: x, lambda: x, (x,), y, y, _rules(N, L)[rule], chunk, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_equals_dense_overlapping_views_and_separate_tensors(dtype, tol):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(14, 5, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 3, (14,), generator=g)
    vis = masks.long(10, 12, 2, [0, 12])  # queries are stream rows 2..11 of the keys
    _check_chunked(lambda: x[2:12] * 1.5, lambda: x[:12], (x,), y[:12], y[2:12], vis, 3, tol)
    k = torch.randn(12, 5, generator=g, dtype=dtype, requires_grad=True)
    ext = masks.external(torch.arange(10) // 5, torch.arange(10) % 5, torch.arange(12) // 4, torch.arange(12) % 4)
    _check_chunked(lambda: x[:10], lambda: k, (x, k), y[:12], y[:10], ext, 4, tol)


def test_chunked_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, 3, 2, 2, 3, 4, 2, 3])
    vis = masks.local(2, 4)
    tlp, tln = torch.full((8,), -1.5, dtype=torch.float64), torch.full((8,), 0.7, dtype=torch.float64)
    fn = lambda x: joint.combine(tlp, tln, *joint.memory_stats(x, x, y, y, vis, 0.4, 3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_half_inputs(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 4, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, 3, (12,), generator=g)
    vis = masks.local(3, 4)
    lzc, lzpos = joint.memory_stats(x, x, y, y, vis, 0.5, 5)
    assert lzc.dtype == torch.float32
    want = joint.dense_memory_stats(x.detach().float(), x.detach().float(), y, y, vis, 0.5)
    torch.testing.assert_close(lzc, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lzpos, want[1], atol=1e-5, rtol=1e-5)
    (gx,) = torch.autograd.grad(torch.where(torch.isfinite(lzc), lzc, 0).sum(), x)
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all()


def test_shape_mismatch_raises():
    x, z6, z2 = torch.randn(6, 3), torch.zeros(6, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        joint.memory_stats(x, x, z6, z6, masks.local(2, 2), 1.0)  # rule for 4 rows, 6 given
    with pytest.raises(ValueError):
        joint.joint_log_prob(torch.zeros(2), torch.zeros(2), torch.zeros(2, 3), torch.zeros(4, dtype=torch.long), z2)


def test_chunked_saves_no_score_block_for_backward():
    N, d = 40, 3
    x = torch.randn(N, d, requires_grad=True)
    y = torch.randint(0, 5, (N,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lzc, _ = joint.memory_stats(x, x, y, y, masks.long(N, N, 0, [0, N]), 0.5, 8)
    assert saved and max(saved) <= N * d  # queries/keys, values/targets and the (N,) outputs only
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        joint.dense_memory_stats(x, x, y, y, masks.long(N, N, 0, [0, N]), 0.5)
    assert max(saved) >= N * N  # the dense reference does keep (N, M) blocks


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_is_exact_when_positives_are_far_below_the_maximum(dtype, tol):
    # scores spread over hundreds of nats: exp(s - row max) underflows for many positives
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 4, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 3, (24,), generator=g)
    vis = masks.long(24, 24, 0, [0, 24])
    a = joint.memory_stats(x, x, y, y, vis, 60.0, 7)
    b = joint.dense_memory_stats(x, x, y, y, vis, 60.0)
    gap = (a[0] - a[1])[torch.isfinite(a[1])]
    assert (gap > 100).any()  # the exact path is exercised
    tlp, tln = torch.full((24,), -2.0, dtype=dtype), torch.full((24,), 3.0, dtype=dtype)
    la, lb = joint.combine(tlp, tln, *a), joint.combine(tlp, tln, *b)
    torch.testing.assert_close(la, lb, atol=tol, rtol=tol)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=tol, rtol=tol)
    w = torch.rand(24, generator=g, dtype=dtype)
    ga = torch.autograd.grad((la * w).sum() + torch.where(torch.isfinite(a[1]), a[1], 0).sum(), x)[0]
    gb = torch.autograd.grad((lb * w).sum() + torch.where(torch.isfinite(b[1]), b[1], 0).sum(), x)[0]
    torch.testing.assert_close(ga, gb, atol=tol * 100, rtol=tol)


@pytest.mark.parametrize("rule", ["local", "long", "ext", "ext_hidden"])
def test_visible_positive_count_matches_the_dense_mask(rule):
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 6, (16,), generator=g)
    vis = _rules(16, 4)[rule]
    want = ((y[None, :] == y[:, None]) & vis.dense()).any(1)
    assert torch.equal(joint._visible_positive(vis, y, y), want)
