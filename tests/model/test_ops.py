"""trime.model.ops: the CPU fast paths keep torch's semantics."""

import pytest
import torch
import torch.nn.functional as F

from trime import device
from trime.model.ops import FLASH_ATTENTION_FROM, FP32_ATTENTION_BELOW, Dropout, attention, dropout, target_log_softmax


def _qkv(L: int, dtype: torch.dtype, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, L, 8, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_short_reduced_precision_attention_runs_in_float32(causal):
    q, k, v = _qkv(10, torch.bfloat16, grad=True)
    mask = None if causal else torch.tensor([True] * 7 + [False] * 3).view(1, 1, 1, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, mask, causal)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, want.to(torch.bfloat16))
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_long_masked_or_float32_attention_is_torch_sdpa():
    for L, dtype in (
        (FLASH_ATTENTION_FROM, torch.bfloat16),
        (12, torch.float32),
        (FP32_ATTENTION_BELOW, torch.float32),
    ):
        q, k, v = _qkv(L, dtype)
        assert torch.equal(attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = _qkv(FP32_ATTENTION_BELOW, torch.bfloat16)
    mask = torch.rand(FP32_ATTENTION_BELOW, generator=torch.Generator().manual_seed(1)).view(1, 1, 1, -1) < 0.8
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize(
    "Lq, Lk, causal",
    [(256, 256, True), (256, 256, False), (300, 300, True), (260, 300, True), (300, 260, True)],
)  # causal ones run by blocks of queries, the last one short; Lq ≠ Lk: top-left causal, as SDPA
def test_mid_length_reduced_precision_attention_is_matmuls_to_bf16_accuracy(Lq, Lk, causal, monkeypatch):
    assert FP32_ATTENTION_BELOW <= Lk < FLASH_ATTENTION_FROM
    q, k, v = _qkv(Lk, torch.bfloat16, grad=True)
    q = q[:, :, :Lq].detach().requires_grad_(True) if Lq < Lk else _qkv(Lq, torch.bfloat16, grad=True)[0]
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    with monkeypatch.context() as m, torch.autocast("cpu", dtype=torch.bfloat16):
        m.setattr(F, "scaled_dot_product_attention", None)  # not called
        y = attention(q, k, v, causal=causal)
    assert y.dtype == torch.bfloat16 and y.shape == want.shape
    torch.testing.assert_close(y.float(), want, atol=0.03, rtol=0.02)  # bf16 has 8 bits of mantissa
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g.bfloat16())
    want.backward(g)
    for t, t32 in ((q, q32), (k, k32), (v, v32)):
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.grad.float(), t32.grad, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_log_softmax_equals_the_plain_expression_and_its_gradient_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = (5 * torch.randn(50, 37, generator=g)).to(dtype).requires_grad_(True)
    y = torch.randint(0, 37, (50,), generator=g)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    xf = x.float()
    log_z = torch.logsumexp(xf, dim=-1)
    logp = xf.gather(1, y.unsqueeze(1)).squeeze(1) - log_z
    got_logp, got_log_z = target_log_softmax(x, y)
    assert got_logp.dtype == got_log_z.dtype == torch.float32
    assert torch.equal(got_logp, logp) and torch.equal(got_log_z, log_z)
    for wa, wb in ((a, b), (a, 0 * b), (0 * a, b)):  # both outputs used, then each alone
        (want,) = torch.autograd.grad((wa * logp + wb * log_z).sum(), x, retain_graph=True)
        (got,) = torch.autograd.grad((wa * got_logp + wb * got_log_z).sum(), x, retain_graph=True)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales(dtype):
    p, n = 0.3, 400_000
    x = torch.full((n,), 2.0, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, p, training=True)
    kept = y != 0
    # the kept share is Binomial(n, 0.7)/n: 6 standard deviations is 0.0044
    assert abs(kept.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))
    y.float().sum().backward()
    assert torch.equal(x.grad, kept.to(dtype) * torch.tensor(1 / (1 - p), dtype=dtype))
    torch.manual_seed(5)
    assert torch.equal(dropout(x, p, training=True), y)  # the global generator: seeded runs repeat


def test_dropout_identity_and_edges():
    x = torch.randn(4, 5)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    m = Dropout(0.5).eval()
    assert m(x) is x


def test_tune_cpu_allocator_is_idempotent_and_yields_to_the_environment(monkeypatch):
    device.tune_cpu_allocator()
    assert device.tune_cpu_allocator() is False  # already done (or not glibc)
    monkeypatch.setattr(device, "_allocator_tuned", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert device.tune_cpu_allocator() is False
