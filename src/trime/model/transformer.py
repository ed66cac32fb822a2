"""Decoder-only Transformer LM with fairseq ``transformer_lm`` semantics (spec §0, §1); returns (h, q).

Legend: B batch, T positions, d model width, H heads, hd = d / H, f FFN width, V vocabulary.

Forward: x = embed_scale·embed(tokens) + sinusoid(positions); dropout; per pre-norm layer
``x += Drop(Attn(LN(x)))``, ``u = LN(x)``, ``x += Drop(W2·Drop_act(ReLU(W1·u + b1)) + b2)``; optional
final LayerNorm. ``h`` feeds the output head; ``q`` = the last layer's ``u`` (fairseq's
``last_ffn_input``, the TRIME memory key). Causal attention only: with right padding, outputs at
non-pad positions equal fairseq's (which also masks pad keys); outputs at pad positions are unspecified.
The residual stream is kept in the parameters' dtype, so under autocast it stays float32.

State-dict names (fairseq's, minus the leading ``decoder.``):

- ``embed_tokens.weight`` (V, d), or with ``--adaptive-input`` ``embed_tokens.embeddings.{b}.0.weight``
  (V_b, w_b) and ``embed_tokens.embeddings.{b}.1.weight`` (d, w_b).
- ``layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}``, ``layers.{i}.self_attn_layer_norm.{weight,bias}``,
  ``layers.{i}.fc1.{weight,bias}`` (f, d), ``layers.{i}.fc2.{weight,bias}`` (d, f),
  ``layers.{i}.final_layer_norm.{weight,bias}``; ``layer_norm.{weight,bias}`` when ``final_norm``.
- Adaptive softmax under ``adaptive_softmax.*`` (names and the tied copies fairseq also stores: see
  trime.model.adaptive). Plain untied softmax: ``output_projection.weight`` (V, d) (fairseq ≥ 0.10;
  fairseq 0.9's ``decoder.embed_out``). Plain tied softmax: no entry.
- Not stored here: fairseq's ``decoder.version``, ``embed_positions._float_tensor`` and other
  ``_float_tensor`` buffers; checkpoints older than fairseq 0.8 keep ``self_attn.in_proj_{weight,bias}``
  (q/k/v fused: trime.model.attention.split_in_proj).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trime.config import ModelConfig
from trime.errors import ConfigError
from trime.model.adaptive import AdaptiveInput, AdaptiveSoftmax, OutputHead, PlainSoftmax
from trime.model.attention import Attention, KVCache
from trime.model.base import LMOutput
from trime.model.ops import dropout


def make_positions(tokens: Tensor, padding_idx: int) -> Tensor:
    """fairseq ``make_positions``: non-pad tokens count padding_idx+1, padding_idx+2, ...; pads get padding_idx."""
    mask = tokens.ne(padding_idx).long()  # (B, T)
    return torch.cumsum(mask, dim=1) * mask + padding_idx


def sinusoidal_embedding(positions: Tensor, dim: int, padding_idx: int) -> Tensor:
    """fairseq sinusoid (spec §1): [sin(p·ω_k), cos(p·ω_k)] with ω_k = exp(-k·log(10000)/(dim/2 - 1)),
    k < dim//2; a zero column for odd dim; zero vectors at pad positions. Float32, shape (..., dim)."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device) * -step)  # (half,)
    angles = positions.float().unsqueeze(-1) * freqs  # (..., half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (..., 2·half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill(positions.eq(padding_idx).unsqueeze(-1), 0.0)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    m = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(m.weight)
    nn.init.zeros_(m.bias)
    return m


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (spec §1); returns (output, normalised FFN input u)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout
        self.self_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1, self.fc2 = _linear(d, cfg.d_ffn), _linear(cfg.d_ffn, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> tuple[Tensor, Tensor]:
        a = self.self_attn(self.self_attn_layer_norm(x), causal=True, cache=cache, layer=layer)  # (B, T, d)
        x = x + dropout(a, self.dropout, self.training)
        u = self.final_layer_norm(x)  # (B, T, d) the last layer's u is the memory key q
        f = dropout(F.relu(self.fc1(u)), self.activation_dropout, self.training)  # (B, T, f)
        x = x + dropout(self.fc2(f), self.dropout, self.training)
        return x, u


def _check(cfg: ModelConfig, padding_idx: int) -> None:
    if cfg.vocab_size <= padding_idx:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is not set (it comes from dict.txt)")
    if cfg.n_layers < 1 or cfg.d_model < 4:
        raise ConfigError("the model needs at least one layer and d_model >= 4")
    if cfg.tie_adaptive_weights and cfg.adaptive_input_factor != cfg.adaptive_softmax_factor:
        raise ConfigError("--tie-adaptive-weights needs equal adaptive input and softmax factors")
    if cfg.adaptive_input and not cfg.adaptive_softmax_cutoff and cfg.share_input_output_embed:
        raise ConfigError(
            "adaptive input has no single matrix to share: add --adaptive-softmax-cutoff "
            "or --no-share-decoder-input-output-embed"
        )


class TransformerLM(nn.Module):
    """fairseq ``transformer_lm`` decoder (spec §1). ``forward(tokens)`` returns LMOutput(h, q);
    the output layer is ``self.head`` (registered as ``adaptive_softmax`` or ``output_projection``)."""

    def __init__(self, cfg: ModelConfig, padding_idx: int = 1) -> None:
        super().__init__()
        _check(cfg, padding_idx)
        self.cfg, self.padding_idx = cfg, padding_idx
        V, d = cfg.vocab_size, cfg.d_model
        if cfg.adaptive_input:
            self.embed_tokens = AdaptiveInput(V, d, cfg.adaptive_input_cutoff, cfg.adaptive_input_factor, padding_idx)
        else:
            self.embed_tokens = nn.Embedding(V, d, padding_idx=padding_idx)
            nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=d**-0.5)
            with torch.no_grad():
                self.embed_tokens.weight[padding_idx].zero_()
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.dropout = cfg.dropout
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(d, eps=1e-5) if cfg.final_norm else None
        if cfg.adaptive_softmax_cutoff:
            tied = self.embed_tokens if cfg.tie_adaptive_weights else None
            self.adaptive_softmax = AdaptiveSoftmax(
                V,
                d,
                cfg.adaptive_softmax_cutoff,
                cfg.adaptive_softmax_factor,
                cfg.adaptive_softmax_dropout,
                padding_idx,
                tied,
                cfg.tie_adaptive_proj,
            )
        else:
            tied = self.embed_tokens if cfg.share_input_output_embed else None
            self.output_projection = PlainSoftmax(V, d, padding_idx, tied)

    @property
    def head(self) -> OutputHead:
        """The output layer: AdaptiveSoftmax or PlainSoftmax."""
        return self.adaptive_softmax if self.cfg.adaptive_softmax_cutoff else self.output_projection

    def new_cache(self) -> KVCache:
        """An empty incremental-decoding state for ``forward(tokens, cache)``."""
        return KVCache(len(self.layers))

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> LMOutput:
        """tokens (B, T) int64, right padding with padding_idx allowed -> LMOutput(h, q), each (B, T, d).

        T is not checked against cfg.max_positions (sinusoids extend; the data pipeline keeps T within it).
        With a ``cache`` (``new_cache()``), ``tokens`` continue the t cached positions (no padding):
        they get positions t, t+1, ... and their keys/values join the cache.
        """
        dtype = self.layers[0].final_layer_norm.weight.dtype  # residual stream dtype
        x = self.embed_scale * self.embed_tokens(tokens).to(dtype)  # (B, T, d)
        positions = make_positions(tokens, self.padding_idx)  # (B, T)
        if cache is not None:
            positions = positions + cache.length()
        pos = sinusoidal_embedding(positions, self.cfg.d_model, self.padding_idx)
        x = dropout(x + pos.to(dtype), self.dropout, self.training)  # (B, T, d)
        q = x
        for i, layer in enumerate(self.layers):
            x, q = layer(x, cache, i)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return LMOutput(h=x, q=q)


def build_model(cfg: ModelConfig, padding_idx: int = 1) -> TransformerLM:
    """The model of ``cfg`` (``cfg.vocab_size`` must be set); works under ``with torch.device("meta")``."""
    return TransformerLM(cfg, padding_idx)


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters (a tied tensor counts once)."""
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in unique.values())
