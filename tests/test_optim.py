"""Optimisers and schedules against hand-written references of fairseq's definitions (spec §9)."""

import math

import pytest
import torch

from trime.config import TrainConfig
from trime.optim import NAG, build_optimizer, cosine, inverse_sqrt, schedule


def nag_reference(p0, grads, lrs, mu, wd):
    """fairseq nag.py, one scalar at a time."""
    p, buf, lr_old, out = p0, 0.0, lrs[0], []
    for g, lr in zip(grads, lrs):
        corr = lr / lr_old
        p = p * (1 - lr * wd)
        p = p + mu * mu * corr * buf - (1 + mu) * lr * g
        buf = mu * corr * buf - lr * g
        lr_old = lr
        out.append(p)
    return out


def test_nag_matches_fairseq_update_with_changing_lr():
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    opt = NAG([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    lrs = [0.1, 0.05, 0.2, 0.2, 0.01]
    seen = []
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        loss = (w**2).sum() + w.sum()
        opt.zero_grad()
        loss.backward()
        seen.append(w.grad.clone())
        opt.step()
    for i in range(2):
        ref = nag_reference([0.5, -1.0][i], [g[i].item() for g in seen], lrs, 0.9, 0.01)
        assert w[i].item() == pytest.approx(ref[-1], rel=1e-12)


def test_cosine_spec_points():
    kw = dict(max_lr=1.0, min_lr=1e-4, warmup_updates=16000, warmup_init_lr=1e-7, period=270000, t_mult=2, shrink=0.75)
    assert cosine(0, **kw) == pytest.approx(1e-7)
    assert cosine(8000, **kw) == pytest.approx((1e-7 + 1.0) / 2)
    assert cosine(16000, **kw) == pytest.approx(1.0)
    assert cosine(16000 + 135000, **kw) == pytest.approx(1e-4 + 0.5 * (1 - 1e-4))
    assert cosine(285999, **kw) == pytest.approx(1e-4, abs=1e-9)
    # second period: twice as long, shrunk by 0.75
    assert cosine(16000 + 270000, **kw) == pytest.approx(0.75)
    assert cosine(16000 + 270000 + 270000, **kw) == pytest.approx(0.75 * (1e-4 + 0.5 * (1 - 1e-4)))


def test_cosine_t_mult_one_restarts():
    kw = dict(max_lr=2.5e-4, min_lr=0.0, warmup_updates=0, warmup_init_lr=0.0, period=100, t_mult=1.0, shrink=1.0)
    assert cosine(0, **kw) == pytest.approx(2.5e-4)
    assert cosine(50, **kw) == pytest.approx(1.25e-4)
    assert cosine(100, **kw) == pytest.approx(2.5e-4)


def test_inverse_sqrt():
    assert inverse_sqrt(0, 5e-4, 8000, 1e-7) == pytest.approx(1e-7)
    assert inverse_sqrt(8000, 5e-4, 8000, 1e-7) == pytest.approx(5e-4)
    assert inverse_sqrt(32000, 5e-4, 8000, 1e-7) == pytest.approx(2.5e-4)


def test_schedule_from_config_and_adam_is_decoupled():
    cfg = TrainConfig(lr_scheduler="cosine", lr=1.0, cosine_min_lr=0.0, max_update=10, warmup_updates=0)
    lr = schedule(cfg)
    assert lr(0) == pytest.approx(1.0) and lr(5) == pytest.approx(0.5)
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([w], TrainConfig(optimizer="adam", lr=0.1, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW)
    w.grad = torch.zeros(3)
    opt.step()  # zero gradient: only the decoupled decay acts
    assert torch.allclose(w, torch.full((3,), 1 - 0.1 * 0.5))
    assert math.isclose(opt.param_groups[0]["betas"][1], 0.98)
