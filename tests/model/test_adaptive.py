"""Adaptive input, adaptive softmax and plain softmax against brute-force loops (spec §1, §2 step 1, §5.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trime.config import ModelConfig
from trime.errors import ConfigError
from trime.model.adaptive import AdaptiveInput, AdaptiveSoftmax, PlainSoftmax
from trime.model.transformer import build_model, count_parameters

V, D, PAD = 40, 16, 1
CUT = [10, 20]  # bands [0,10) [10,20) [20,40); factor 2: widths 16, 8, 4


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=D, d_ffn=32, n_heads=2, vocab_size=V, dropout=0.0)
    return ModelConfig(**{**base, **kw})


ADAPTIVE = {
    "tied_proj": dict(
        adaptive_input=True,
        adaptive_input_cutoff=CUT,
        adaptive_softmax_cutoff=CUT,
        adaptive_input_factor=2.0,
        adaptive_softmax_factor=2.0,
        tie_adaptive_weights=True,
        tie_adaptive_proj=True,
    ),
    "tied_words": dict(
        adaptive_input=True,
        adaptive_input_cutoff=CUT,
        adaptive_softmax_cutoff=CUT,
        adaptive_input_factor=2.0,
        adaptive_softmax_factor=2.0,
        tie_adaptive_weights=True,
    ),
    "untied": dict(adaptive_softmax_cutoff=CUT, adaptive_softmax_factor=2.0),
}


def _head_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**ADAPTIVE[name])).eval()


# ----------------------------------------------------------------------------------------------
# Brute-force reference: every logit a Python dot product, every softmax a loop (float64).


def _dot(a, b) -> float:
    return math.fsum(float(x) * float(y) for x, y in zip(a, b))


def _matvec(m, v) -> list[float]:
    return [_dot(row, v) for row in m]


def _lse(xs) -> float:
    m = max(xs)
    return m + math.log(math.fsum(math.exp(x - m) for x in xs))


def _matrices(model):
    """(shortlist words (C0, d), cluster rows (K, d), [(proj (w, d), words (V_c, w))]) as the spec defines them."""
    sm, cfg = model.head, model.cfg
    if cfg.tie_adaptive_weights:
        bands = model.embed_tokens.embeddings
        words, clusters = bands[0][0].weight, sm.head.class_proj.weight
        tails = [
            ((bands[c + 1][1].weight.t() if cfg.tie_adaptive_proj else sm.tail[c][0].weight), bands[c + 1][0].weight)
            for c in range(sm.n_clusters)
        ]
    else:
        words, clusters = sm.head.weight[: sm.cutoff[0]], sm.head.weight[sm.cutoff[0] :]
        tails = [(sm.tail[c][0].weight, sm.tail[c][2].weight) for c in range(sm.n_clusters)]
    return words.tolist(), clusters.tolist(), [(p.tolist(), w.tolist()) for p, w in tails]


def ref_adaptive(model, h_row) -> tuple[list[float], float, list[float]]:
    """(log p_tok over V, log Z_head, head logits) for one row: spec §1 decomposition by loops."""
    words, clusters, tails = _matrices(model)
    head = [_dot(h_row, w) for w in words] + [_dot(h_row, c) for c in clusters]
    log_z = _lse(head)
    logp = [z - log_z for z in head[: len(words)]]
    for c, (proj, out) in enumerate(tails):
        hid = _matvec(proj, h_row)
        tail = [_dot(hid, w) for w in out]
        t_lse = _lse(tail)
        logp += [head[len(words) + c] - log_z + t - t_lse for t in tail]
    return logp, log_z, head


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_adaptive_softmax_matches_bruteforce(name):
    model = _head_model(name)
    head = model.head
    h = torch.randn(3, D)
    lp = head.log_probs(h)  # (3, V)
    assert lp.dtype == torch.float32 and lp.shape == (3, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    ys = torch.arange(V)
    for i in range(3):
        logp_ref, log_z_ref, _ = ref_adaptive(model, h[i].tolist())
        torch.testing.assert_close(lp[i].double(), torch.tensor(logp_ref, dtype=torch.float64), atol=1e-5, rtol=0)
        tlp, log_z = head.target_logp(h[i].expand(V, D), ys)
        torch.testing.assert_close(tlp, lp[i], atol=1e-5, rtol=0)  # target_logp == log_probs gathered
        torch.testing.assert_close(log_z.double(), torch.full((V,), log_z_ref, dtype=torch.float64), atol=1e-5, rtol=0)
        # spec §2 step 1: Z_head·p_tok(y) summed over every y equals Z_head
        total = math.fsum(math.exp(x + log_z_ref) for x in logp_ref)
        assert total == pytest.approx(math.exp(log_z_ref), rel=1e-9)
        assert torch.exp(tlp.double() + log_z.double()).sum().item() == pytest.approx(math.exp(log_z_ref), rel=1e-5)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_tail_quirk_changes_only_cutoff_plus_one(name):
    model = _head_model(name, seed=1)
    head = model.head
    h = torch.randn(1, D).expand(V, D)
    ys = torch.arange(V)
    good, log_z = head.target_logp(h, ys)
    bad, log_z2 = head.target_logp(h, ys, tail_quirk=True)
    torch.testing.assert_close(log_z, log_z2)
    _, _, head_logits = ref_adaptive(model, h[0].tolist())
    changed = (good - bad).abs() > 1e-6
    assert changed.nonzero().squeeze(1).tolist() == [CUT[0] + 1, CUT[1] + 1]  # ids 11 and 21
    for c, cut in enumerate(CUT):  # the quirked word gets its cluster's head log-prob only
        expect = head_logits[CUT[0] + c] - _lse(head_logits)
        assert bad[cut + 1].item() == pytest.approx(expect, abs=1e-5)
        assert bad[cut + 1] > good[cut + 1]


def test_plain_softmax_tied_and_untied():
    for share in (True, False):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(share_input_output_embed=share)).eval()
        head = model.head
        assert isinstance(head, PlainSoftmax)
        W = head.output_weight()
        assert (W is model.embed_tokens.weight) == share
        h = torch.randn(2, D)
        lp = head.log_probs(h)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2), atol=1e-5, rtol=0)
        for i in range(2):
            logits = [_dot(h[i].tolist(), w) for w in W.tolist()]
            ref = torch.tensor([z - _lse(logits) for z in logits], dtype=torch.float64)
            torch.testing.assert_close(lp[i].double(), ref, atol=1e-5, rtol=0)
            tlp, log_z = head.target_logp(h[i].expand(V, D), torch.arange(V), tail_quirk=True)
            torch.testing.assert_close(tlp, lp[i], atol=1e-5, rtol=0)
            assert log_z[0].item() == pytest.approx(_lse(logits), abs=1e-5)


@pytest.mark.parametrize("name", ["tied_proj", "plain"])
def test_bf16_input_gives_float32(name):
    model = build_model(tiny_cfg(**ADAPTIVE.get(name, {}))).eval()
    h = torch.randn(6, D)
    y = torch.tensor([0, 1, 5, 12, 25, 39])
    tlp, log_z = model.head.target_logp(h.bfloat16(), y)
    assert tlp.dtype == log_z.dtype == torch.float32
    assert model.head.log_probs(h.bfloat16()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tlp2, log_z2 = model.head.target_logp(h, y)
    assert tlp2.dtype == log_z2.dtype == torch.float32
    torch.testing.assert_close(tlp2, model.head.target_logp(h, y)[0], atol=0.1, rtol=0)
    assert torch.isfinite(tlp).all()  # pad target (id 1) included


class _MaxNumel(TorchDispatchMode):
    """Largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_target_logp_never_builds_n_by_v():
    torch.manual_seed(0)
    sm = AdaptiveSoftmax(2000, 8, [20, 100], factor=2.0, dropout=0.1)  # weights ≤ 1900·2 elements
    n = 64
    # realistic (Zipf-like) targets: most in the shortlist, a few per tail cluster
    y = torch.cat([torch.randint(0, 20, (56,)), torch.randint(20, 100, (4,)), torch.randint(100, 2000, (4,))])
    h = torch.randn(n, 8, requires_grad=True)
    sm.train()
    with _MaxNumel() as seen:
        tlp, log_z = sm.target_logp(h, y)
        (tlp.sum() + log_z.sum()).backward()
    assert seen.largest <= 4 * 1900 < n * 2000 // 16, seen.largest  # the largest: one tail's (n_c, V_c)
    assert torch.isfinite(h.grad).all()


def test_dropout_only_in_training():
    torch.manual_seed(0)
    sm = AdaptiveSoftmax(V, D, CUT, factor=2.0, dropout=0.5)
    h, y = torch.randn(8, D), torch.randint(0, V, (8,))
    sm.eval()
    a, b = sm.target_logp(h, y)[0], sm.target_logp(h, y)[0]
    torch.testing.assert_close(a, b)
    sm.train()
    assert not torch.allclose(sm.target_logp(h, y)[0], a)


def test_adaptive_input_bands_bruteforce():
    torch.manual_seed(0)
    emb = AdaptiveInput(V, D, CUT, factor=2.0, padding_idx=PAD)
    assert [e[0].weight.shape[1] for e in emb.embeddings] == [16, 8, 4]
    assert [e[0].weight.shape[0] for e in emb.embeddings] == [10, 10, 20]
    for e in emb.embeddings:  # fairseq zeroes row padding_idx of every band at init
        assert e[0].weight[PAD].abs().sum() == 0
    tokens = torch.tensor([[0, 1, 9, 10, 19], [20, 39, 3, 15, 25]])
    out = emb(tokens)  # (2, 5, d)
    for (i, j), t in zip([(i, j) for i in range(2) for j in range(5)], tokens.flatten().tolist()):
        b = 0 if t < 10 else 1 if t < 20 else 2
        lo = [0, 10, 20][b]
        vec = emb.embeddings[b][0].weight[t - lo].tolist()
        ref = _matvec(emb.embeddings[b][1].weight.tolist(), vec)
        torch.testing.assert_close(out[i, j].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=0)
    assert out[0, 1].abs().sum() == 0  # pad embeds to zero


def test_tying_shares_parameters_once():
    model = _head_model("tied_proj")
    bands, sm = model.embed_tokens.embeddings, model.head
    assert sm.head.word_proj.weight is bands[0][0].weight
    for c in range(2):
        assert sm.tail[c][2].weight is bands[c + 1][0].weight
        assert sm.tail[c][0].weight is bands[c + 1][1].weight  # used transposed
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(id(p) for p in model.parameters()))  # no parameter registered twice
    assert not any(n.startswith("adaptive_softmax.tail") for n in names)
    assert set(model.state_dict()) == set(names)
    # independent count: bands 10·16+16·16, 10·8+8·16, 20·4+4·16; cluster rows 2·16; 2 layers; final LN
    layer = 4 * (D * D + D) + 2 * D * 32 + 32 + D + 4 * D
    emb = 10 * 16 + 16 * 16 + 10 * 8 + 8 * 16 + 20 * 4 + 4 * 16
    assert count_parameters(model) == 2 * layer + emb + 2 * D + 2 * D
    untied_proj = _head_model("tied_words")
    assert untied_proj.head.tail[0][0].weight.shape == (8, D)  # own Linear(d -> w)
    assert count_parameters(untied_proj) == count_parameters(model) + 8 * D + 4 * D


def test_tied_gradients_reach_the_embedding():
    model = _head_model("tied_proj")
    tlp, log_z = model.head.target_logp(torch.randn(4, D), torch.tensor([2, 11, 25, 30]))
    tlp.sum().backward()
    for b in range(3):
        assert model.embed_tokens.embeddings[b][0].weight.grad.abs().sum() > 0
    assert model.embed_tokens.embeddings[2][1].weight.grad.abs().sum() > 0


def test_bad_cutoffs_are_config_errors():
    with pytest.raises(ConfigError):
        AdaptiveSoftmax(V, D, [50])  # beyond V
    with pytest.raises(ConfigError):
        AdaptiveSoftmax(V, D, [20, 10])
    with pytest.raises(ConfigError):
        build_model(tiny_cfg(**{**ADAPTIVE["tied_proj"], "adaptive_softmax_factor": 4.0}))
    single = AdaptiveSoftmax(V, D, [V])  # cutoff = V: no tail, a plain softmax over V
    assert single.n_clusters == 0 and single.log_probs(torch.randn(2, D)).shape == (2, V)


def test_tying_survives_dtype_moves_and_deepcopy():
    import copy

    model = _head_model("tied_proj")
    twin = copy.deepcopy(model)
    assert twin.head.tail[1][2].weight is twin.embed_tokens.embeddings[2][0].weight
    assert twin.head.tail[1][2].weight is not model.embed_tokens.embeddings[2][0].weight
    model.double()  # Module._apply keeps the Parameter objects, so borrowed weights follow
    assert model.head.head.word_proj.weight.dtype == torch.float64
    assert model.head.tail[0][0].weight is model.embed_tokens.embeddings[1][1].weight
    tlp, log_z = model.head.target_logp(torch.randn(3, D), torch.tensor([3, 12, 33]))
    assert tlp.dtype == log_z.dtype == torch.float32
