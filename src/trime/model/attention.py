"""Multi-head attention and its incremental-decoding cache: one of each for trime's Transformers (the LM
of trime.model.transformer and both sides of trime.model.encoder_decoder), fairseq MultiheadAttention.

Legend: B batch (or N hypothesis rows), H heads, hd = d / H, Lq queries, Lk keys, t cached positions.

``Attention(x, kv=None, mask, causal, cache, layer)``: y = out_proj(concat_heads(softmax(q·kᵀ/√hd + m)·v))
with q = q_proj(x) and k, v = k_proj/v_proj of x (self-attention) or of ``kv`` (cross-attention, keys
from a ``kdim``-wide input). ``mask`` (True = may attend) and ``causal`` shape m. With a :class:`KVCache`,
x holds the positions after the t cached ones: their keys/values join the cache and they attend to all
of it (and, when ``causal``, causally among themselves), so running positions piece by piece equals
one full forward. The kernel is trime.model.ops.attention (SDPA with a CPU fast path).

State-dict names: ``{q,k,v,out}_proj.{weight,bias}``. fairseq < 0.8 stored q/k/v fused as
``in_proj_weight`` (3d, d) / ``in_proj_bias`` (3d,): rows [0:d] are q, [d:2d] k, [2d:3d] v;
:func:`split_in_proj` and :func:`fuse_in_proj` convert between the two layouts.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from trime.model.ops import attention

QKV = ("q", "k", "v")


class Attention(nn.Module):
    """fairseq MultiheadAttention with biases on q/k/v/out; keys/values may come from a ``kdim``-wide input."""

    def __init__(self, d: int, n_heads: int, dropout: float, kdim: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        kdim = kdim or d
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(kdim, d), nn.Linear(kdim, d)
        self.out_proj = nn.Linear(d, d)
        gain = 2**-0.5 if kdim == d else 1.0  # fairseq's scaled init when q/k/v share the width
        for p in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(p.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(p.bias)

    def heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        """x (B, L, d_in) -> proj(x) split into heads (B, H, L, hd)."""
        B, L, _ = x.shape
        return proj(x).view(B, L, self.n_heads, -1).transpose(1, 2)

    def keys_values(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Projected keys and values (B, H, Lk, hd) of a source kv (B, Lk, kdim) (cached once per source)."""
        return self.heads(kv, self.k_proj), self.heads(kv, self.v_proj)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """q (B, H, Lq, hd), k/v (B, H, Lk, hd), mask broadcastable to (B, H, Lq, Lk) (True = may attend)
        -> out_proj of the heads' outputs (B, Lq, d)."""
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, causal, p)  # (B, H, Lq, hd)
        B, H, Lq, hd = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, Lq, H * hd))

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x (B, Lq, d) queries; kv (B, Lk, kdim) the keys/values source (None: x, self-attention) -> (B, Lq, d).

        With a ``cache`` (self-attention; ``mask`` unused): x's keys/values are appended to the cache's
        ``layer`` and x attends to all its positions, the new ones causally when ``causal``.
        """
        q = self.heads(x, self.q_proj)  # (B, H, Lq, hd)
        k, v = self.keys_values(x if kv is None else kv)  # (B, H, Lk, hd)
        if cache is not None:
            T, past = x.shape[1], cache.length(layer)
            k, v = cache.append(layer, k, v)  # (B, H, past + T, hd)
            # one new position sees everything; several see the cache and (causal) their own past
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past) if causal and T > 1 else None
            causal = False
        return self.attend(q, k, v, mask, causal)


class KVCache:
    """Incremental decoding state of self-attention: per layer, the keys and values (N, H, t, hd) of the
    t positions already run, kept in buffers of ``capacity`` positions that grow by doubling (so one
    position more copies nothing). ``reorder`` follows beam search's choice of rows."""

    def __init__(self, n_layers: int, capacity: int = 0) -> None:
        self.capacity = capacity
        self._k: list[Tensor | None] = [None] * n_layers
        self._v: list[Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers

    def length(self, layer: int = 0) -> int:
        """Positions cached in ``layer``."""
        return self._len[layer]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (N, H, T, hd) to ``layer``; returns all of its keys and values (N, H, t + T, hd)."""
        t, T = self._len[layer], k.shape[2]
        if self._k[layer] is None or self._k[layer].shape[2] < t + T:  # allocate, or grow by doubling
            cap = max(self.capacity, 2 * t, t + T)
            new_k, new_v = (x.new_empty(x.shape[0], x.shape[1], cap, x.shape[3]) for x in (k, v))
            if t:
                new_k[:, :, :t], new_v[:, :, :t] = self._k[layer][:, :, :t], self._v[layer][:, :, :t]
            self._k[layer], self._v[layer] = new_k, new_v
        self._k[layer][:, :, t : t + T] = k
        self._v[layer][:, :, t : t + T] = v
        self._len[layer] = t + T
        return self._k[layer][:, :, : t + T], self._v[layer][:, :, : t + T]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (N',) of the N rows, in that order (beam search); N' may differ from N."""
        for buf in (self._k, self._v):  # index_select of whole buffers: 2-4x faster than indexing the prefix
            buf[:] = [None if x is None else x.index_select(0, index) for x in buf]


_FUSED = re.compile(r"(.*\.)in_proj_(weight|bias)")


def split_in_proj(key: str, t: Tensor) -> dict[str, Tensor] | None:
    """fairseq < 0.8's fused ``<prefix>.in_proj_weight`` (3d, d) / ``in_proj_bias`` (3d,) -> the three
    ``<prefix>.{q,k,v}_proj.{weight,bias}`` it holds; None when ``key`` is not a fused projection."""
    m = _FUSED.fullmatch(key)
    if m is None:
        return None
    return {f"{m.group(1)}{n}_proj.{m.group(2)}": part.contiguous() for n, part in zip(QKV, t.chunk(3, dim=0))}


def fuse_in_proj(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The inverse of :func:`split_in_proj`: pops ``<prefix>{q,k,v}_proj.{weight,bias}`` from ``weights``
    and returns fairseq's fused ``<prefix>in_proj_{weight,bias}``."""
    return {
        f"{prefix}in_proj_{kind}": torch.cat([weights.pop(f"{prefix}{n}_proj.{kind}") for n in QKV])
        for kind in ("weight", "bias")
    }
