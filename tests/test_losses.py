"""Training criteria (spec §2, §2.1, §3, §4) against brute-force loops in tests/reference.py."""

import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from trime.errors import ConfigError, DataError
from trime.losses import LossSettings, compute_loss, diagnostics_record
from trime.memory import joint

import reference as ref

PAD = 1


@dataclass
class Out:  # the two fields of trime.model.transformer.LMOutput the losses read
    h: torch.Tensor
    q: torch.Tensor


def _batch(B=3, L=5, d=4, V=7, seed=0, pads=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, d, generator=g, requires_grad=True)
    q = torch.randn(B, L, d, generator=g, requires_grad=True)
    targets = torch.randint(2, V, (B, L), generator=g)  # small V: many duplicate values
    for b, t in ((0, L - 1), (B - 1, L // 2)) if pads is None else pads:
        targets[b, t] = PAD
    torch.manual_seed(seed)
    return Out(h, q), targets, ref.FakeHead(d, V)


def _ref(out, targets, head, pred, keys=None, values=None):
    N = targets.numel()
    h, q, y = out.h.reshape(N, -1), out.q.reshape(N, -1), targets.reshape(N)
    keys = q if keys is None else keys
    return ref.trime_loss(h, q, y, head, keys, y if values is None else values, pred, PAD)


def _ce(out, targets, head):
    tlp, _ = head.target_logp(out.h.reshape(targets.numel(), -1), targets.reshape(-1))
    return -tlp[targets.reshape(-1) != PAD].sum().item()


def test_trime_matches_loops_and_skips_pad():
    out, y, head = _batch()
    res = compute_loss("trime", out, y, head)
    L, valid = y.shape[1], (y.reshape(-1) != PAD).tolist()
    want = _ref(out, y, head, lambda i, j: ref.local_visible(i, j, L, valid))
    assert math.isclose(res.loss.item(), want, rel_tol=1e-5)
    assert res.loss.dtype == torch.float32 and res.loss.dim() == 0
    assert res.n_targets == y.numel() - 2 == int((y != PAD).sum())
    assert math.isclose(res.ce_sum, _ce(out, y, head), rel_tol=1e-6)


def test_trime_with_adaptive_head_matches_loops():
    out, y, _ = _batch(V=9, seed=1)
    head = ref.FakeAdaptiveHead(4, 9, cutoff=5)
    res = compute_loss("trime", out, y, head)
    L, valid = y.shape[1], (y.reshape(-1) != PAD).tolist()
    want = _ref(out, y, head, lambda i, j: ref.local_visible(i, j, L, valid))
    assert math.isclose(res.loss.item(), want, rel_tol=1e-5)


def test_pad_rows_neither_scored_nor_in_memory():
    out, y, head = _batch(seed=2)
    base = compute_loss("trime", out, y, head).loss.item()
    pad = (y == PAD)[..., None]
    moved = Out(torch.where(pad, 100.0, out.h.detach()), torch.where(pad, -7.0, out.q.detach()))
    for crit in ("trime", "trime_long"):
        a = compute_loss(crit, Out(out.h.detach(), out.q.detach()), y, head).loss.item()
        b = compute_loss(crit, moved, y, head).loss.item()
        assert a == pytest.approx(b, rel=1e-6)
    assert base == pytest.approx(compute_loss("trime", moved, y, head).loss.item(), rel=1e-6)


def test_position_zero_and_empty_memory_give_exactly_ce():
    out, y, head = _batch(B=4, L=1, pads=())  # every row is position 0 of its segment
    ce = compute_loss("ce", out, y, head)
    assert torch.equal(compute_loss("trime", out, y, head).loss, ce.loss)
    out, y, head = _batch(B=1, L=6, pads=())  # one segment, own segment hidden: memory is empty
    ext = compute_loss(LossSettings("trime_ext", cross_sent_ratio=1.0), out, y, head)
    assert ext.own_hidden is True
    assert torch.equal(ext.loss, compute_loss("ce", out, y, head).loss)


def test_use_ce_switch_gives_ce_for_every_criterion():
    out, y, head = _batch(seed=3)
    ce = compute_loss("ce", out, y, head)
    assert math.isclose(ce.loss.item(), _ce(out, y, head), rel_tol=1e-6)
    for crit in ("trime", "trime_long", "trime_ext"):
        res = compute_loss(crit, out, y, head, use_ce=True)
        assert torch.equal(res.loss, ce.loss)
        assert compute_loss(crit, out, y, head, training=False).loss.item() != ce.loss.item()


def test_trime_long_same_device_matches_loops():
    out, y, head = _batch(seed=4)
    N, valid = y.numel(), (y.reshape(-1) != PAD).tolist()
    res = compute_loss("trime_long", out, y, head)
    want = _ref(out, y, head, lambda i, j: ref.long_visible(i, j, [0, N], valid))
    assert math.isclose(res.loss.item(), want, rel_tol=1e-5)


@pytest.mark.parametrize("hidden", [False, True])
def test_trime_ext_in_batch_matches_loops(hidden):
    out, y, head = _batch(seed=5)
    L, valid = y.shape[1], (y.reshape(-1) != PAD).tolist()
    res = compute_loss(LossSettings("trime_ext", cross_sent_ratio=float(hidden)), out, y, head)
    assert res.own_hidden is bool(hidden)
    pred = lambda i, j: ref.ext_visible(i // L, i % L, j // L, j % L, hidden, valid[j])  # noqa: E731
    assert math.isclose(res.loss.item(), _ref(out, y, head, pred), rel_tol=1e-5)


def test_memory_diagnostics_equal_loops():
    """The training log's memory diagnostics, against per-entry loops over the visible entries (every
    row is sampled: the batch has fewer rows than DIAG_ROWS)."""
    out, y, head = _batch(B=3, L=6, d=4, seed=6)
    res = compute_loss("trime_long", out, y, head, diagnose=True)
    d = diagnostics_record(res.diag)
    N = y.numel()
    h, q, t = out.h.detach().reshape(N, -1), out.q.detach().reshape(N, -1), y.reshape(N)
    valid = (t != PAD).tolist()
    shares, scores, coss = [], [], []
    for i in range(N):
        if not valid[i]:
            continue
        seen = [j for j in range(N) if ref.long_visible(i, j, [0, N], valid)]
        s = [float(q[i] @ q[j]) / math.sqrt(4) for j in seen]
        coss += [float(torch.nn.functional.cosine_similarity(q[i], q[j], dim=0)) for j in seen]
        with torch.no_grad():
            _, log_z = head.target_logp(h[i : i + 1], t[i : i + 1])
        z_mem = sum(math.exp(x) for x in s)
        shares.append(z_mem / (math.exp(float(log_z)) + z_mem))
        scores += s
    assert d["mem_share"] == pytest.approx(sum(shares) / len(shares), rel=1e-5)
    assert d["mem_score_mean"] == pytest.approx(sum(scores) / len(scores), rel=1e-5, abs=1e-6)
    assert d["mem_score_max"] == pytest.approx(max(scores), rel=1e-5)
    assert d["mem_cos"] == pytest.approx(sum(coss) / len(coss), rel=1e-5, abs=1e-6)
    assert d["key_norm"] == pytest.approx(float(q.norm(dim=1).mean()), rel=1e-5)
    assert compute_loss("trime_long", out, y, head).diag is None  # only when asked: the logged updates
    assert compute_loss("trime_long", out, y, head, use_ce=True, diagnose=True).diag is None


def test_trime_ext_never_hides_in_evaluation_and_draws_from_the_generator():
    out, y, head = _batch(B=1, L=3, pads=())
    assert (
        compute_loss(LossSettings("trime_ext", cross_sent_ratio=1.0), out, y, head, training=False).own_hidden is False
    )
    draws = []
    for seed in (0, 0, 1):
        g = torch.Generator().manual_seed(seed)
        runs = [
            compute_loss(LossSettings("trime_ext", cross_sent_ratio=0.5), out, y, head, generator=g) for _ in range(40)
        ]
        draws.append([r.own_hidden for r in runs])
    assert draws[0] == draws[1] != draws[2]
    assert 8 < sum(draws[0]) < 32


def _fake_gather(streams, me, bounds=None):
    """A 2-rank gather simulated in one process: other ranks' rows are constants (spec §3.2)."""

    def gather(keys, values):
        parts = [(keys, values) if r == me else (k.detach(), v) for r, (k, v) in enumerate(streams)]
        offset = sum(p[0].shape[0] for p in parts[:me])
        total = sum(p[0].shape[0] for p in parts)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), offset, bounds or [0, total]

    return gather


def test_trime_long_over_ranks_equals_concatenation():
    out, y, head = _batch(B=4, L=3, seed=6)
    halves = [(Out(out.h[2 * r : 2 * r + 2], out.q[2 * r : 2 * r + 2]), y[2 * r : 2 * r + 2]) for r in range(2)]
    streams = [(o.q.reshape(-1, 4), t.reshape(-1)) for o, t in halves]
    per_rank = [
        compute_loss("trime_long", o, t, head, gather=_fake_gather(streams, r)) for r, (o, t) in enumerate(halves)
    ]
    whole = compute_loss("trime_long", out, y, head)
    assert math.isclose(sum(r.loss.item() for r in per_rank), whole.loss.item(), rel_tol=1e-6)
    assert sum(r.n_targets for r in per_rank) == whole.n_targets
    (g_q,) = torch.autograd.grad(per_rank[1].loss, out.q)  # rank 1 must not reach rank 0's keys
    assert not g_q[:2].any() and g_q[2:].any()


def test_trime_long_groups_block_other_groups():
    out, y, head = _batch(B=4, L=3, seed=7)
    N = y.numel()
    streams = [(out.q.reshape(N, -1)[6 * r : 6 * r + 6], y.reshape(N)[6 * r : 6 * r + 6]) for r in range(2)]
    mine = Out(out.h[2:], out.q[2:])
    res = compute_loss("trime_long", mine, y[2:], head, gather=_fake_gather(streams, 1, bounds=[0, 6, 12]))
    alone = compute_loss("trime_long", mine, y[2:], head)  # group of its own: same memory
    assert math.isclose(res.loss.item(), alone.loss.item(), rel_tol=1e-6)


def test_trime_ext_over_ranks_sees_other_ranks_segments():
    out, y, head = _batch(B=2, L=4, seed=8)
    N, L = y.numel(), 4
    streams = [(out.q.reshape(N, -1)[4 * r : 4 * r + 4], y.reshape(N)[4 * r : 4 * r + 4]) for r in range(2)]
    mine = Out(out.h[1:], out.q[1:])
    res = compute_loss(
        LossSettings("trime_ext", cross_sent_ratio=0.0), mine, y[1:], head, gather=_fake_gather(streams, 1)
    )
    valid = (y.reshape(N) != PAD).tolist()
    pred = lambda i, j: ref.ext_visible(1, i, j // L, j % L, False, valid[j])  # noqa: E731
    h, q, yy = out.h[1].reshape(4, -1), out.q[1].reshape(4, -1), y[1]
    want = ref.trime_loss(h, q, yy, head, out.q.reshape(N, -1), y.reshape(N), pred, PAD)
    assert math.isclose(res.loss.item(), want, rel_tol=1e-5)


@pytest.mark.parametrize("crit", ["trime", "trime_long", "trime_ext"])
def test_gradients_equal_dense_reference(crit):
    out, y, head = _batch(seed=9)
    B, L = y.shape
    N, d = B * L, out.q.shape[-1]
    res = compute_loss(LossSettings(crit, cross_sent_ratio=0.0, chunk_size=4), out, y, head)
    params = [out.h, out.q, head.proj.weight]
    got = torch.autograd.grad(res.loss, params)
    yy, valid = y.reshape(N), (y.reshape(N) != PAD).tolist()
    preds = {
        "trime": lambda i, j: ref.local_visible(i, j, L, valid),
        "trime_long": lambda i, j: ref.long_visible(i, j, [0, N], valid),
        "trime_ext": lambda i, j: ref.ext_visible(i // L, i % L, j // L, j % L, False, valid[j]),
    }
    mask = ref.mask_from(preds[crit], N, N)
    q = out.q.reshape(N, d)
    scores = (q @ q.T / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    tlp, tln = head.target_logp(out.h.reshape(N, d), yy)
    logp = joint.joint_log_prob(tlp, tln, scores, yy, yy)
    dense = -logp[yy != PAD].sum()
    assert math.isclose(res.loss.item(), dense.item(), rel_tol=1e-5)
    for a, b in zip(got, torch.autograd.grad(dense, params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_final_keytype_uses_h():
    out, y, head = _batch(seed=10)
    swapped = Out(out.h, out.h)
    final = compute_loss(LossSettings("trime", keytype="final"), out, y, head)
    assert torch.equal(final.loss, compute_loss("trime", swapped, y, head).loss)


def test_bad_options_raise():
    out, y, head = _batch()
    with pytest.raises(ConfigError):
        compute_loss("knn", out, y, head)
    with pytest.raises(ConfigError):
        compute_loss(LossSettings("trime", keytype="attn"), out, y, head)


def test_real_model_runs_every_criterion():
    tr = importlib.import_module("trime.model.transformer")
    from trime.config import ModelConfig

    cfg = ModelConfig(
        n_layers=1,
        d_model=16,
        d_ffn=32,
        n_heads=2,
        vocab_size=24,
        dropout=0.0,
        adaptive_softmax_cutoff=[8],
        adaptive_softmax_factor=2.0,
    )
    model = tr.build_model(cfg)
    tokens = torch.randint(4, 24, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(tokens)
    L, valid = tokens.shape[1], [True] * tokens.numel()
    want = {  # brute force over the adaptive head's full distribution, each criterion's visibility rule
        "ce": _ce(out, tokens, model.head),
        "trime": _ref(out, tokens, model.head, lambda i, j: ref.local_visible(i, j, L, valid)),
        "trime_long": _ref(out, tokens, model.head, lambda i, j: ref.long_visible(i, j, [0, 12], valid)),
        "trime_ext": _ref(
            out, tokens, model.head, lambda i, j: ref.ext_visible(i // L, i % L, j // L, j % L, False, valid[j])
        ),
    }
    for crit, value in want.items():
        res = compute_loss(LossSettings(crit, cross_sent_ratio=0.0), out, tokens, model.head)
        (g,) = torch.autograd.grad(res.loss, out.q, retain_graph=True)
        assert res.n_targets == 12 and math.isclose(res.loss.item(), value, rel_tol=1e-5), crit
        assert torch.isfinite(g).all()


def test_trime_ext_keeps_to_its_memory_group():
    out, y, head = _batch(B=4, L=3, seed=11)
    N = y.numel()
    streams = [(out.q.reshape(N, -1)[6 * r : 6 * r + 6], y.reshape(N)[6 * r : 6 * r + 6]) for r in range(2)]
    mine = Out(out.h[2:], out.q[2:])
    grouped = compute_loss(
        LossSettings("trime_ext", cross_sent_ratio=0.0),
        mine,
        y[2:],
        head,
        gather=_fake_gather(streams, 1, bounds=[0, 6, 12]),
    )
    alone = compute_loss(LossSettings("trime_ext", cross_sent_ratio=0.0), mine, y[2:], head)
    assert math.isclose(grouped.loss.item(), alone.loss.item(), rel_tol=1e-6)


def test_trime_ext_refuses_a_segment_twice():
    out, y, head = _batch(B=2, L=3)
    with pytest.raises(DataError):
        compute_loss("trime_ext", out, y, head, seg_ids=torch.tensor([7, 7]))
    ok = compute_loss(LossSettings("trime_ext", cross_sent_ratio=0.0), out, y, head, seg_ids=torch.tensor([7, 8]))
    assert ok.loss.item() == compute_loss(LossSettings("trime_ext", cross_sent_ratio=0.0), out, y, head).loss.item()


def test_memory_math_stays_float32_under_autocast():
    out, y, head = _batch(seed=12)
    want = compute_loss("trime_long", out, y, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute_loss("trime_long", out, y, head)
        (g,) = torch.autograd.grad(got.loss, out.q)
    assert got.loss.dtype == torch.float32 and torch.isfinite(g).all()
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-2)  # only the head's matmul is bf16


# ---------------------------------------------------------------------------------------------
# TrimeMT (MT spec §4)


@torch.no_grad()
def _mt_reference(h, y, head, temp, topk, dist, keys=None, values=None, own_rows=None):
    """Spec §4.4 by loops (float64): per query, scores of every other sentence's non-pad entry, top-K,
    then (e^{logit_y} + Σ_{kept j: y_j = y} e^{s_ij}) / (Z_t + Σ_{kept j} e^{s_ij})."""
    B, T = y.shape
    hh, yy = h.reshape(B * T, -1).double(), y.reshape(-1)
    keys = hh if keys is None else keys.double()
    values = yy if values is None else values
    logp_full = torch.log_softmax(head.log_probs(h.reshape(B * T, -1)).double(), -1)  # normalised token part
    log_zt = ref.head_log_norm(head, h.reshape(B * T, -1)).double()
    d, total = hh.shape[1], 0.0
    for i in range(B * T):
        if int(yy[i]) == PAD:
            continue
        own = range(i // T * T, i // T * T + T) if own_rows is None else own_rows(i)
        cand = []
        for j in range(keys.shape[0]):
            if j in own or int(values[j]) == PAD:
                continue
            sim = float(hh[i] @ keys[j]) if dist == "ip" else -float(((hh[i] - keys[j]) ** 2).sum())
            cand.append((sim / math.sqrt(d) / temp, int(values[j])))
        cand.sort(key=lambda c: -c[0])
        if topk:
            cand = cand[:topk]
        zt = math.exp(float(log_zt[i]))
        num = zt * math.exp(float(logp_full[i, yy[i]])) + sum(math.exp(s) for s, v in cand if v == int(yy[i]))
        den = zt + sum(math.exp(s) for s, _ in cand)
        total -= math.log(num / den)
    return total


@pytest.mark.parametrize("dist", ["ip", "l2"])
@pytest.mark.parametrize("topk", [0, 3])
def test_trime_mt_loss_equals_per_token_loop(dist, topk):
    from trime.losses import MTLossSettings, compute_mt_loss

    out, y, head = _batch(B=3, L=4, d=4, seed=5)
    res = compute_mt_loss(MTLossSettings(temp=2.0, topk=topk, dist=dist, chunk_size=5), out, y, head)
    want = _mt_reference(out.h.detach(), y, head, 2.0, topk, dist)
    assert math.isclose(res.loss.item(), want, rel_tol=1e-5), (res.loss.item(), want)
    assert int(res.n_targets) == int((y != PAD).sum())


@pytest.mark.parametrize("dist", ["ip", "l2"])
def test_trime_mt_diagnostics_are_the_lm_criteria_diagnostics(dist):
    """diagnose=True adds the memory diagnostics of the TRIME losses (the same sums, the MT similarity)
    and changes nothing else; the label-smoothed CE has no memory and none."""
    from trime.losses import DIAG_SUMS, MTLossSettings, compute_mt_loss, diagnostics_record

    out, y, head = _batch(B=3, L=4, d=4, seed=5)
    s = MTLossSettings(temp=2.0, topk=3, dist=dist)
    plain, diag = compute_mt_loss(s, out, y, head), compute_mt_loss(s, out, y, head, diagnose=True)
    assert plain.diag is None and torch.equal(plain.loss, diag.loss) and diag.diag.shape == (len(DIAG_SUMS),)
    record = diagnostics_record(diag.diag)
    assert 0 < record["mem_share"] < 1 and -1 <= record["mem_cos"] <= 1
    h = out.h.detach().reshape(12, -1)
    own = torch.arange(12) // 4
    keep = y.reshape(12) != PAD
    visible = (own[:, None] != own[None, :]) & keep[None, :] & keep[:, None]  # scored rows, other sentences
    sim = h @ h.T if dist == "ip" else -(torch.cdist(h, h) ** 2)
    assert math.isclose(record["mem_score_max"], float(sim[visible].max()) / 2 / 2.0, rel_tol=1e-4)
    assert compute_mt_loss(MTLossSettings(criterion="ce"), out, y, head, diagnose=True).diag is None
    assert compute_mt_loss(s, out, y, head, use_ce=True, diagnose=True).diag is None


def test_trime_mt_with_one_sentence_is_ce():
    from trime.losses import MTLossSettings, compute_mt_loss

    out, y, head = _batch(B=1, L=6, pads=())
    mt = compute_mt_loss(MTLossSettings(temp=10.0, topk=8), out, y, head)
    assert torch.equal(mt.loss, compute_loss("ce", out, y, head).loss)  # no other sentence: no memory


def test_trime_mt_gradient_reaches_only_this_ranks_keys():
    """Two ranks simulated with a fake gather: the other rank's rows are constants (spec §4)."""
    from trime.losses import MTLossSettings, compute_mt_loss

    out, y, head = _batch(B=4, L=3, d=4, seed=9)
    N = y.numel()
    h = out.h.reshape(N, -1)
    other = h[6:].detach()  # rank 1's decoder outputs, received as constants
    mine = Out(out.h[:2], out.q[:2])

    def gather(keys, values):
        return torch.cat([keys, other]), torch.cat([values, y.reshape(N)[6:]]), 0, [0, N]

    res = compute_mt_loss(MTLossSettings(temp=1.0), mine, y[:2], head, gather=gather)
    want = _mt_reference(
        out.h[:2].detach(), y[:2], head, 1.0, 0, "ip", keys=h.detach(), values=y.reshape(N),
        own_rows=lambda i: range(i // 3 * 3, i // 3 * 3 + 3),
    )  # fmt: skip
    assert math.isclose(res.loss.item(), want, rel_tol=1e-5)
    (g,) = torch.autograd.grad(res.loss, out.h)
    assert g[2:].abs().sum() == 0 and g[:2].abs().sum() > 0  # only this rank's rows get a gradient


# ---------------------------------------------------------------------------------------------
# Simulated ranks (DESIGN "Next seams"): one process computes what W ranks compute


@pytest.mark.parametrize("crit", ["trime", "trime_long", "trime_ext"])
def test_one_simulated_rank_is_the_plain_loss(crit):
    out, y, head = _batch(B=4, L=3, seed=13)
    params = [out.h, out.q, head.proj.weight]
    plain = compute_loss(LossSettings(crit, cross_sent_ratio=0.0), out, y, head, diagnose=True)
    one = compute_loss(LossSettings(crit, cross_sent_ratio=0.0, simulate_ranks=1), out, y, head, diagnose=True)
    assert torch.equal(one.loss, plain.loss) and torch.equal(one.diag, plain.diag)
    assert one.own_hidden == plain.own_hidden
    for a, b in zip(torch.autograd.grad(one.loss, params), torch.autograd.grad(plain.loss, params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "crit,W,group,ratio",
    [
        ("trime_long", 2, 0, 0.0),  # one group of both ranks
        ("trime_long", 4, 2, 0.0),  # two groups of two ranks (num_comb_shards 2)
        ("trime_long", 4, 1, 0.0),  # every rank alone (--train-mem-size 0)
        ("trime_ext", 2, 0, 0.0),
        ("trime_ext", 4, 0, 1.0),
    ],
)
def test_simulated_ranks_equal_per_rank_references(crit, W, group, ratio):
    """Rank r's rows query the stream of its memory group (spec §3.2, §4): the simulated loss is the
    sum over ranks of that loss, by the loops of tests/reference.py."""
    out, y, head = _batch(B=4, L=3, seed=13)
    B, L = y.shape
    N, n, c = B * L, B * L // W, group or W
    h, q, t = out.h.reshape(N, -1), out.q.reshape(N, -1), y.reshape(N)
    settings = LossSettings(crit, cross_sent_ratio=ratio, simulate_ranks=W, simulate_group=group)
    res = compute_loss(settings, out, y, head)
    want = 0.0
    for r in range(W):
        first = (r - r % c) * n  # the group's stream starts at its first rank's rows
        keys, values, off = q[first : first + c * n], t[first : first + c * n], r * n - first
        valid = (values != PAD).tolist()

        def pred(i, j, off=off, valid=valid):
            if crit == "trime_long":
                return ref.long_visible(off + i, j, [0, c * n], valid)
            return ref.ext_visible((off + i) // L, i % L, j // L, j % L, ratio == 1.0, valid[j])

        rows = slice(r * n, (r + 1) * n)
        want += ref.trime_loss(h[rows], q[rows], t[rows], head, keys, values, pred, PAD)
    assert res.loss.item() == pytest.approx(want, rel=1e-5)
    assert res.n_targets == int((y != PAD).sum())
    assert res.own_hidden is (None if crit == "trime_long" else ratio == 1.0)


@pytest.mark.parametrize("crit", ["trime_long", "trime_ext"])
def test_simulated_ranks_gradient_is_the_sum_of_rank_gradients(crit):
    """Other ranks' keys are constants (spec §3.2): the simulated gradient is the sum over ranks of
    each rank's gradient, written densely with detach; for q it is not the one-process gradient."""
    out, y, head = _batch(B=4, L=3, seed=14)
    (B, L), W = y.shape, 2
    N, n, d = B * L, B * L // W, out.q.shape[-1]
    params = [out.h, out.q, head.proj.weight]
    got = torch.autograd.grad(
        compute_loss(LossSettings(crit, cross_sent_ratio=0.0, simulate_ranks=W), out, y, head).loss, params
    )
    plain = torch.autograd.grad(compute_loss(LossSettings(crit, cross_sent_ratio=0.0), out, y, head).loss, params)
    h, q, t = out.h.reshape(N, d), out.q.reshape(N, d), y.reshape(N)
    valid = (t != PAD).tolist()
    preds = {
        "trime_long": lambda i, j: ref.long_visible(i, j, [0, N], valid),
        "trime_ext": lambda i, j: ref.ext_visible(i // L, i % L, j // L, j % L, False, valid[j]),
    }
    mask = ref.mask_from(preds[crit], N, N)  # stream rows: one group of both ranks
    tlp, tln = head.target_logp(h, t)
    dense = torch.zeros(())
    for r in range(W):
        rows = slice(r * n, (r + 1) * n)
        keys = torch.cat([q[s * n : (s + 1) * n] if s == r else q[s * n : (s + 1) * n].detach() for s in range(W)])
        scores = (q[rows] @ keys.T / math.sqrt(d)).masked_fill(~mask[rows], float("-inf"))
        logp = joint.joint_log_prob(tlp[rows], tln[rows], scores, t, t[rows])
        dense = dense - logp[t[rows] != PAD].sum()
    for a, b in zip(got, torch.autograd.grad(dense, params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], plain[0], atol=1e-6, rtol=1e-5)  # h: the same loss values per row
    assert (got[1] - plain[1]).abs().max() > 1e-2  # q: the cross-rank keys' share is missing


def test_simulated_trime_ext_draws_one_coin_per_rank_in_rank_order():
    """Each simulated rank draws its coin from the generator, rank 0 first; each rank's loss and
    diagnostics are those of a rank with a gather (tests' _fake_gather) and that coin."""
    out, y, head = _batch(B=4, L=3, seed=15)
    W, n = 4, 3
    settings = LossSettings("trime_ext", cross_sent_ratio=0.5, simulate_ranks=W)
    seed = next(s for s in range(100) if 0 < sum(_coins(s, W)) < W)  # some ranks hide, some do not
    hides = _coins(seed, W)
    res = compute_loss(settings, out, y, head, generator=torch.Generator().manual_seed(seed), diagnose=True)
    q, t = out.q.reshape(W * n, -1), y.reshape(-1)
    streams = [(q[r * n : (r + 1) * n], t[r * n : (r + 1) * n]) for r in range(W)]
    loss, diag = 0.0, None
    for r in range(W):
        mine = Out(out.h[r : r + 1], out.q[r : r + 1])
        one = LossSettings("trime_ext", cross_sent_ratio=float(hides[r]))
        part = compute_loss(one, mine, y[r : r + 1], head, gather=_fake_gather(streams, r), diagnose=True)
        loss += part.loss.item()
        d = part.diag
        diag = d if diag is None else torch.cat([diag[:-1] + d[:-1], torch.maximum(diag[-1:], d[-1:])])
    assert res.loss.item() == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(res.diag, diag)
    assert res.own_hidden is True


def _coins(seed, W):
    g = torch.Generator().manual_seed(seed)
    return [float(torch.rand((), generator=g)) < 0.5 for _ in range(W)]


@pytest.mark.parametrize("crit", ["trime_long", "trime_ext"])
def test_a_short_batch_leaves_the_last_simulated_ranks_empty(crit):
    """A batch shorter than W ranks of rank_segments (an epoch's last, a BM25 chain's end) fills the ranks
    in order and leaves the last ones without queries: 3 segments on 4 ranks of 1 are 3 ranks of 1."""
    out, y, head = _batch(B=3, L=5, seed=9)
    four = compute_loss(LossSettings(crit, cross_sent_ratio=0.0, simulate_ranks=4, rank_segments=1), out, y, head)
    three = compute_loss(LossSettings(crit, cross_sent_ratio=0.0, simulate_ranks=3, rank_segments=1), out, y, head)
    assert four.loss.item() == pytest.approx(three.loss.item(), rel=1e-6)
    (g4,) = torch.autograd.grad(four.loss, out.q)
    (g3,) = torch.autograd.grad(three.loss, out.q)
    torch.testing.assert_close(g4, g3)
    with pytest.raises(ConfigError, match="more than 2 simulated ranks of 1"):
        compute_loss(LossSettings(crit, simulate_ranks=2, rank_segments=1), out, y, head)


def test_simulated_ranks_refuse_what_ranks_cannot_do():
    from trime.config import TrainConfig

    out, y, head = _batch(B=4, L=3)
    with pytest.raises(ConfigError, match="--simulate-ranks 3 must divide the 4 segments"):
        compute_loss(LossSettings("trime_long", simulate_ranks=3), out, y, head)
    with pytest.raises(ConfigError, match="real ranks"):
        compute_loss(LossSettings("trime_long", simulate_ranks=2), out, y, head, gather=_fake_gather([], 0))
    with pytest.raises(ConfigError):
        LossSettings("trime_long", simulate_ranks=4, simulate_group=3)
    # memory groups as the trainer forms them for real ranks (train._group_size), per simulated rank
    cfg = dict(criterion="trime_long", keep_order=True, tokens_per_sample=32, max_tokens=128, simulate_ranks=4)
    assert LossSettings.of(TrainConfig(**cfg, train_mem_size=64), PAD).simulate_group == 2
    assert LossSettings.of(TrainConfig(**cfg), PAD).simulate_group == 1  # no --train-mem-size: each rank alone
    assert LossSettings.of(TrainConfig(**{**cfg, "criterion": "trime_ext"}), PAD).simulate_group == 0  # all ranks
    with pytest.raises(ConfigError, match="--train-mem-size 48"):
        LossSettings.of(TrainConfig(**cfg, train_mem_size=48), PAD)
