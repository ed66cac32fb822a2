"""Attention, the output head's target log-softmax and dropout for trime's Transformers, with CPU fast
paths where torch's own are slow.

Each keeps torch's semantics; only the CPU cost changes (measured on 2 cores of an Intel Xeon with AMX, a
(64, 24, 256) activation, forward + backward; bench/bench_mt.py shows the effect on a training step):

- :func:`attention` is ``F.scaled_dot_product_attention``, but on the CPU in bf16/fp16 with fewer than
  256 keys it computes in float32: torch's reduced-precision flash-attention backward costs a near-fixed
  ~10 ms a call there (12 ms against fp32's 3 ms at 24 positions; equal at 256, bf16 ahead at 512).
  Translation sentences are short: an mt_cpu training step under bf16 autocast went from 4,188 to
  5,276 target tokens/s with this (float32: 3,830). From 256 to 1023 keys without a mask (the LM's
  causal self-attention) it runs as two bf16/fp16 matmuls around a softmax instead, causal ones by
  blocks of 128 queries: torch's flash kernel reaches a third of the matmul rate there (the tiny
  preset's (16, 4, 256, 64) heads, forward + backward on 1 thread of an AMD EPYC: 61 ms flash, 66 ms
  flash in float32, 28 ms matmuls; (4, 8, 512, 64): 112 ms flash, 63 ms matmuls; (2, 8, 1024, 64): 146
  ms flash, 129 ms matmuls: too little for the memory, so flash from 1024 keys on). The scores are rounded to bf16 before the
  softmax, as autocast's own matmul would, and the softmax is kept for backward: about tokens × heads ×
  keys / 2 bf16 values per layer where flash keeps O(tokens × heads).
- :func:`target_log_softmax` is ``x.gather(y) − logsumexp(x)`` and ``logsumexp(x)`` with autograd's own
  formulas, but its backward makes the (N, C) gradient in one buffer (sub, exp_, mul_, scatter_add_) where
  autograd chains seven (N, C) passes and four temporaries: the tiny preset's (4096, 2002) bf16 head
  logits, forward + backward on 1 thread of an AMD EPYC, 55 ms → 45 ms (105 ms → 44 ms when each new
  buffer page-faults, as large ones still do in a training step). Same numbers, bit for bit.
- :func:`dropout` is ``F.dropout``, but on the CPU it draws its mask from 31-bit random integers
  instead of ``bernoulli_`` (2.8 ms → 1.4 ms); the keep probability is exact to 2^-31. Other devices
  use ``F.dropout`` (a fused kernel on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

FP32_ATTENTION_BELOW = 256  # keys: shorter CPU attention in bf16/fp16 runs in float32 (module docstring)
FLASH_ATTENTION_FROM = 1024  # keys: from FP32_ATTENTION_BELOW to here, unmasked, it runs as matmuls
CAUSAL_BLOCK = 128  # queries per block of causal matmul attention (_matmul_attention)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0
) -> Tensor:
    """q (B, H, Lq, hd), k/v (B, H, Lk, hd), mask broadcastable to (B, H, Lq, Lk), True = may attend
    -> (B, H, Lq, hd) in q's dtype."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] < FP32_ATTENTION_BELOW:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, is_causal=causal
            )
        return y.to(q.dtype)
    if (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and mask is None
        and k.shape[-2] < FLASH_ATTENTION_FROM
    ):
        return _matmul_attention(q, k, v, causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float) -> Tensor:
    """softmax(q·kᵀ/√hd)·v in q's dtype with explicit matmuls; ``causal`` as SDPA's is_causal (top-left).

    Causal attention runs by blocks of CAUSAL_BLOCK queries, each against the keys its last query sees:
    at 256 positions 3/4 of the full product (the tiny preset's heads, forward + backward: 24% faster)."""
    if not causal:
        return _softmax_matmuls(q, k, v, None, dropout_p)
    Lq, Lk = q.shape[-2], k.shape[-2]
    out = []
    for r in range(0, Lq, CAUSAL_BLOCK):
        n = min(r + CAUSAL_BLOCK, Lq) - r  # queries r .. r + n − 1
        seen = min(r + n, Lk)  # keys 0 .. r + n − 1
        above = torch.full((n, seen), float("-inf"), dtype=q.dtype, device=q.device).triu_(r + 1)  # key j > query i
        out.append(_softmax_matmuls(q[..., r : r + n, :], k[..., :seen, :], v[..., :seen, :], above, dropout_p))
    return torch.cat(out, dim=-2) if len(out) > 1 else out[0]


def _softmax_matmuls(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q·kᵀ/√hd + bias)·v; bias (Lq, Lk) holds 0 or −inf (adding it: 7x faster than masked_fill_
    here, and nothing to undo in backward)."""
    with torch.autocast(q.device.type, enabled=False):
        s = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # (B, H, Lq, Lk)
        if bias is not None:
            s.add_(bias)
        p = dropout(torch.softmax(s, dim=-1), dropout_p, dropout_p > 0)
        return torch.matmul(p, v)  # (B, H, Lq, hd)


class _TargetLogSoftmax(torch.autograd.Function):
    """(log_softmax(x)[y], logsumexp(x)) from logits x (N, C) in any float dtype; see target_log_softmax."""

    @staticmethod
    def forward(ctx, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = logits.float()  # (N, C)
        log_z = torch.logsumexp(x, dim=-1)  # (N,)
        logp = x.gather(1, y.unsqueeze(1)).squeeze(1) - log_z  # (N,)
        ctx.save_for_backward(logits, y, log_z)
        return logp, log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp: Tensor, g_log_z: Tensor) -> tuple[Tensor, None]:
        logits, y, log_z = ctx.saved_tensors
        # autograd's terms, in its order: log Z's two uses sum to c = g_log_z − g_logp, logsumexp's backward
        # is c·exp(x − log Z) (x − log Z in float32, as logits.float() − log Z), gather's adds g_logp at y
        c = g_log_z - g_logp  # (N,)
        grad = logits.to(torch.float32, copy=True).sub_(log_z.unsqueeze(1)).exp_().mul_(c.unsqueeze(1))  # (N, C)
        grad.scatter_add_(1, y.unsqueeze(1), g_logp.unsqueeze(1))
        return grad.to(logits.dtype), None


def target_log_softmax(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """logits (N, C) any float dtype, y (N,) int64 -> (log softmax(logits)[y] (N,), logsumexp(logits) (N,)),
    both float32 and computed as ``logits.float().gather(y) − logsumexp`` (so equal to that expression, and
    so are the gradients; the backward is cheaper: module docstring)."""
    return _TargetLogSoftmax.apply(logits, y)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: each element kept with probability 1 − p and scaled by 1/(1 − p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    draws = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # uniform on [0, 2^31)
    keep = draws >= round(p * 2**31)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """:func:`dropout` as a module (where a layer list needs one, e.g. the adaptive softmax's tails)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
