"""Attention and dropout for trime's Transformers, with CPU fast paths where torch's own are slow.

Both keep torch's semantics; only the CPU cost changes (measured on 2 cores of an Intel Xeon with AMX, a
(64, 24, 256) activation, forward + backward; bench/bench_mt.py shows the effect on a training step):

- :func:`attention` is ``F.scaled_dot_product_attention``, but on the CPU in bf16/fp16 with fewer than
  256 keys it computes in float32: torch's reduced-precision flash-attention backward costs a near-fixed
  ~10 ms a call there (12 ms against fp32's 3 ms at 24 positions; equal at 256, bf16 ahead at 512).
  Translation sentences are short: an mt_cpu training step under bf16 autocast went from 4,188 to
  5,276 target tokens/s with this (float32: 3,830).
- :func:`dropout` is ``F.dropout``, but on the CPU it draws its mask from 31-bit random integers
  instead of ``bernoulli_`` (2.8 ms → 1.4 ms); the keep probability is exact to 2^-31. Other devices
  use ``F.dropout`` (a fused kernel on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP32_ATTENTION_BELOW = 256  # keys: shorter CPU attention in bf16/fp16 runs in float32 (module docstring)


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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


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
