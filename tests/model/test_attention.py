"""trime.model.attention: the one attention module and KV cache of the LM and the MT model, against a
brute-force reference softmax(Q·Kᵀ/√hd + M)·V in float64, and incremental decoding against a full forward."""

import pytest
import torch

from trime.model.attention import Attention, KVCache, fuse_in_proj, split_in_proj

D, H = 16, 4


@pytest.fixture(autouse=True)
def _double():
    """The reference and the module both in float64, so they agree to rounding."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _attn(kdim: int | None = None, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    a = Attention(D, H, dropout=0.0, kdim=kdim).eval()
    with torch.no_grad():  # nonzero biases, so that a misplaced bias shows
        for p in (a.q_proj, a.k_proj, a.v_proj, a.out_proj):
            p.bias.normal_()
    return a


def reference(a: Attention, x: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """x (B, Lq, d), kv (B, Lk, kdim), allowed (B, Lq, Lk) bool -> (B, Lq, d), one head at a time."""
    hd = D // H
    q, k, v = a.q_proj(x), a.k_proj(kv), a.v_proj(kv)  # (B, L, d)
    m = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))  # (B, Lq, Lk)
    heads = []
    for h in range(H):
        s = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / hd**0.5 + m, dim=-1)  # (B, Lq, Lk)
        heads.append(w @ v[..., s])
    return a.out_proj(torch.cat(heads, -1))


def test_self_attention_causal_and_padded_match_the_reference():
    a, x = _attn(), torch.randn(2, 7, D)
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    torch.testing.assert_close(a(x, causal=True), reference(a, x, x, causal), atol=1e-12, rtol=0)
    keep = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])  # (B, S): left padding, as MT sources
    got = a(x, mask=keep[:, None, None, :])
    torch.testing.assert_close(got, reference(a, x, x, keep[:, None, :].expand(2, 7, 7)), atol=1e-12, rtol=0)


def test_cross_attention_from_a_wider_source_matches_the_reference():
    a = _attn(kdim=24)
    x, enc = torch.randn(3, 5, D), torch.randn(3, 9, 24)
    keep = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[:, 0] = True
    got = a(x, enc, mask=keep[:, None, None, :])
    torch.testing.assert_close(got, reference(a, x, enc, keep[:, None, :].expand(3, 5, 9)), atol=1e-12, rtol=0)
    k, v = a.keys_values(enc)  # (B, H, S, hd): what a decoder cache keeps of the source
    torch.testing.assert_close(a.attend(a.heads(x, a.q_proj), k, v, keep[:, None, None, :]), got, atol=0, rtol=0)


@pytest.mark.parametrize("capacity", [0, 3, 64])
def test_incremental_equals_full_forward(capacity):
    """Pieces of several positions and of one, across buffer growth: the same as one causal forward."""
    a, x = _attn(), torch.randn(2, 12, D)
    full = a(x, causal=True)
    cache = KVCache(n_layers=2, capacity=capacity)
    pieces = [(0, 4), (4, 5), (5, 6), (6, 10), (10, 11), (11, 12)]
    got = torch.cat([a(x[:, i:j], causal=True, cache=cache, layer=1) for i, j in pieces], 1)
    torch.testing.assert_close(got, full, atol=1e-12, rtol=0)
    assert cache.length(1) == 12 and cache.length(0) == 0


def test_reorder_follows_rows_and_may_change_their_number():
    a, x = _attn(), torch.randn(3, 8, D)
    cache = KVCache(1, capacity=4)
    a(x[:, :5], causal=True, cache=cache)
    for index in (torch.tensor([2, 0, 1]), torch.tensor([1, 1])):  # a permutation, then 2 rows of row 1
        cache.reorder(index)
        x = x[index]
    got = torch.cat([a(x[:, t : t + 1], causal=True, cache=cache) for t in range(5, 8)], 1)
    torch.testing.assert_close(got, a(x, causal=True)[:, 5:], atol=1e-12, rtol=0)


def test_state_dict_names_and_fairseq_fused_layout():
    a = _attn()
    assert list(a.state_dict()) == [f"{n}_proj.{k}" for n in ("q", "k", "v", "out") for k in ("weight", "bias")]
    w = {f"layers.0.self_attn.{k}": t for k, t in a.state_dict().items()}
    fused = fuse_in_proj(dict(w), "layers.0.self_attn.")
    assert fused["layers.0.self_attn.in_proj_weight"].shape == (3 * D, D)
    torch.testing.assert_close(fused["layers.0.self_attn.in_proj_weight"][D : 2 * D], a.k_proj.weight, atol=0, rtol=0)
    split = {}
    for k, t in fused.items():
        split.update(split_in_proj(k, t))
    assert split.keys() == {k for k in w if "out_proj" not in k}
    assert all(torch.equal(split[k], w[k]) for k in split)
    assert split_in_proj("layers.0.self_attn.q_proj.weight", a.q_proj.weight) is None
