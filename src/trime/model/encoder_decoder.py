"""Encoder-decoder Transformer with fairseq ``transformer`` semantics (MT spec §1, §3); returns (h, q = h).

Legend: B sentences, S source positions, T target positions, N hypothesis rows (B·G, G rows per
sentence in beam search), d width, H heads, hd = d / H, f FFN width, V vocabulary.

Encoder: x = scale·E_src[src] + sinusoid(positions) (positions count from pad+1 over non-pad
tokens, so left padding is allowed); dropout; per layer, post-norm (fairseq default)
``x = LN(x + Drop(Attn(x)))``, ``x = LN(x + Drop(FFN(x)))`` or pre-norm (``--encoder-normalize-before``)
``x += Drop(Attn(LN(x)))``, ``x += Drop(FFN(LN(x)))`` with a final LayerNorm. Pad keys are masked.

Decoder: the same embedding scheme over ``prev_output_tokens`` (eos + y_1..y_{T-1}, right padding),
per layer causal self-attention, attention over the encoder output (pad keys masked) and the FFN,
each post- or pre-norm (``--decoder-normalize-before``, then a final LayerNorm unless
``--no-decoder-final-norm``). ``h`` = the last layer's output after that final LayerNorm: the vector
multiplied by the output matrix, and the memory key/query of TrimeMT (MT spec §1: "knn_embed").
The output head is :class:`trime.model.adaptive.PlainSoftmax` (``target_logp``, ``log_probs``), tied
to the decoder input embedding or not; ``--share-all-embeddings`` also ties encoder and decoder input.
Outputs at pad positions are unspecified.

State-dict names are fairseq's (``encoder.``/``decoder.`` prefixes kept):
``{encoder,decoder}.embed_tokens.weight``; ``encoder.layers.{i}.{self_attn.{q,k,v,out}_proj,
self_attn_layer_norm, fc1, fc2, final_layer_norm}.{weight,bias}``; ``decoder.layers.{i}.`` the same
plus ``encoder_attn.{q,k,v,out}_proj`` and ``encoder_attn_layer_norm``; ``{encoder,decoder}.layer_norm``
when pre-norm; ``decoder.output_projection.weight`` only when untied (fairseq also stores the tied copy:
the importer checks and drops it).

Incremental decoding: :meth:`TransformerMT.start_cache` makes a :class:`DecoderCache` (per layer the
self-attention keys/values of the prefix and the projected encoder keys/values, stored once per
sentence and shared by its G rows); :meth:`TransformerMT.decode_step` takes the last token of each row
and returns that row's ``h``; :meth:`DecoderCache.reorder` follows beam search's row selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trime.config import Config, build, load_preset, opt
from trime.errors import ConfigError
from trime.model.adaptive import PlainSoftmax
from trime.model.attention import Attention, KVCache
from trime.model.ops import dropout
from trime.model.transformer import _linear, make_positions, sinusoidal_embedding


@dataclass
class MTModelConfig(Config):
    """fairseq ``transformer`` options (MT spec §3). Defaults: ``transformer_iwslt_de_en`` dims with the
    TRIME release's flags (post-norm encoder, pre-norm decoder + final LayerNorm, tied decoder embeddings)."""

    arch: str = opt("transformer_iwslt_de_en", "architecture name (informational; presets set it)")
    encoder_layers: int = opt(6, "encoder layers", "--encoder-layers", ge=1)
    decoder_layers: int = opt(6, "decoder layers", "--decoder-layers", ge=1)
    encoder_embed_dim: int = opt(512, "encoder width", "--encoder-embed-dim", ge=1)
    decoder_embed_dim: int = opt(512, "decoder width d (= h's width)", "--decoder-embed-dim", ge=1)
    encoder_ffn_embed_dim: int = opt(1024, "encoder FFN width", "--encoder-ffn-embed-dim", ge=1)
    decoder_ffn_embed_dim: int = opt(1024, "decoder FFN width", "--decoder-ffn-embed-dim", ge=1)
    encoder_attention_heads: int = opt(4, "encoder attention heads", "--encoder-attention-heads", ge=1)
    decoder_attention_heads: int = opt(4, "decoder attention heads", "--decoder-attention-heads", ge=1)
    encoder_normalize_before: bool = opt(
        False, "pre-norm encoder layers + final LayerNorm", "--encoder-normalize-before"
    )
    decoder_normalize_before: bool = opt(True, "pre-norm decoder layers", "--decoder-normalize-before")
    decoder_final_norm: bool = opt(True, "final decoder LayerNorm when pre-norm (off = --no-decoder-final-norm)")
    dropout: float = opt(0.3, "dropout after embeddings and sub-layers", "--dropout", ge=0, lt=1)
    attention_dropout: float = opt(0.0, "dropout on attention probabilities", "--attention-dropout", ge=0, lt=1)
    activation_dropout: float = opt(0.0, "dropout after the FFN ReLU", "--activation-dropout", ge=0, lt=1)
    share_decoder_input_output_embed: bool = opt(
        True, "tie the output matrix to the decoder input embedding", "--share-decoder-input-output-embed"
    )
    share_all_embeddings: bool = opt(
        False, "one embedding for encoder input, decoder input and output (joined dictionary)", "--share-all-embeddings"
    )
    scale_embedding: bool = opt(True, "multiply token embeddings by sqrt(d) (off = --no-scale-embedding)")
    max_source_positions: int = opt(1024, "longest source", "--max-source-positions", ge=1)
    max_target_positions: int = opt(
        1024, "longest target (beam search caps max length at this - 1)", "--max-target-positions", ge=1
    )
    src_vocab_size: int = opt(0, "source dictionary size (set from dict.<src>.txt when 0)", ge=0)
    tgt_vocab_size: int = opt(0, "target dictionary size (set from dict.<tgt>.txt when 0)", ge=0)

    def check(self) -> None:
        for side in ("encoder", "decoder"):
            d, h = getattr(self, f"{side}_embed_dim"), getattr(self, f"{side}_attention_heads")
            if d % h:
                raise ConfigError(f"{side}_embed_dim {d} is not divisible by {side}_attention_heads {h}")
        if self.share_all_embeddings:
            if self.encoder_embed_dim != self.decoder_embed_dim:
                raise ConfigError("--share-all-embeddings needs equal encoder and decoder widths")
            if self.src_vocab_size != self.tgt_vocab_size:
                raise ConfigError("--share-all-embeddings needs one joined dictionary (equal vocabulary sizes)")


def mt_preset(name: str, **overrides) -> MTModelConfig:
    """The MTModelConfig of a translation preset (``trime/configs/NAME.toml`` with ``task = "translation"``,
    e.g. transformer_iwslt_de_en or the CPU-sized mt_cpu) with field overrides (e.g. vocabulary sizes)."""
    preset = load_preset(name)
    if preset["_source"]["task"] != "translation":
        raise ConfigError(f"preset {name!r} is not a translation preset")
    return build(MTModelConfig, preset.get("model", {}), overrides, source=preset["_source"]["path"])


@dataclass
class EncoderOut:
    out: Tensor  # (B, S, d_enc) last encoder layer (after its final LayerNorm when pre-norm)
    pad_mask: Tensor  # (B, S) bool, True at source pads


@dataclass
class MTOutput:
    h: Tensor  # (B, T, d) final decoder output: input of the output layer
    q: Tensor  # (B, T, d) memory key/query of TrimeMT: the same tensor as h (MT spec §1)


class FFN(nn.Module):
    def __init__(self, d: int, f: int, activation_dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = _linear(d, f), _linear(f, d)
        self.activation_dropout = activation_dropout

    def ffn(self, x: Tensor) -> Tensor:
        return self.fc2(dropout(F.relu(self.fc1(x)), self.activation_dropout, self.training))


def _sublayer(x: Tensor, norm: nn.LayerNorm, fn, pre: bool, p: float, training: bool) -> Tensor:
    """One residual block: pre-norm ``x + Drop(fn(LN(x)))`` or post-norm ``LN(x + Drop(fn(x)))``."""
    y = dropout(fn(norm(x) if pre else x), p, training)
    return x + y if pre else norm(x + y)


class EncoderLayer(FFN):
    def __init__(self, cfg: MTModelConfig) -> None:
        d = cfg.encoder_embed_dim
        super().__init__(d, cfg.encoder_ffn_embed_dim, cfg.activation_dropout)
        self.pre, self.dropout = cfg.encoder_normalize_before, cfg.dropout
        self.self_attn = Attention(d, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, S, d); keep (B, 1, 1, S) True at non-pad keys."""
        x = _sublayer(
            x, self.self_attn_layer_norm, lambda u: self.self_attn(u, mask=keep), self.pre, self.dropout, self.training
        )
        return _sublayer(x, self.final_layer_norm, self.ffn, self.pre, self.dropout, self.training)


class DecoderLayer(FFN):
    def __init__(self, cfg: MTModelConfig) -> None:
        d = cfg.decoder_embed_dim
        super().__init__(d, cfg.decoder_ffn_embed_dim, cfg.activation_dropout)
        self.pre, self.dropout = cfg.decoder_normalize_before, cfg.dropout
        self.self_attn = Attention(d, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.encoder_attn = Attention(d, cfg.decoder_attention_heads, cfg.attention_dropout, cfg.encoder_embed_dim)
        self.self_attn_layer_norm, self.encoder_attn_layer_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.final_layer_norm = nn.LayerNorm(d)

    def _block(self, x: Tensor, norm: nn.LayerNorm, fn) -> Tensor:
        return _sublayer(x, norm, fn, self.pre, self.dropout, self.training)

    def forward(self, x: Tensor, enc: Tensor, keep: Tensor) -> Tensor:
        """Teacher forcing: x (B, T, d), enc (B, S, d_enc), keep (B, 1, 1, S)."""
        x = self._block(x, self.self_attn_layer_norm, lambda u: self.self_attn(u, causal=True))
        x = self._block(x, self.encoder_attn_layer_norm, lambda u: self.encoder_attn(u, enc, keep))
        return self._block(x, self.final_layer_norm, self.ffn)

    def step(self, x: Tensor, cache: DecoderCache, i: int) -> Tensor:
        """One position for N rows: x (N, 1, d); appends this position's keys/values to layer i's cache."""

        def enc_attn(u: Tensor) -> Tensor:  # the G rows of a sentence are G query positions of one attention
            a, (N, _, d), G = self.encoder_attn, u.shape, cache.group
            q = a.heads(u.view(N // G, G, d), a.q_proj)  # (B, H, G, hd)
            return a.attend(q, cache.enc_k[i], cache.enc_v[i], cache.keep).reshape(N, 1, d)

        x = self._block(x, self.self_attn_layer_norm, lambda u: self.self_attn(u, causal=True, cache=cache, layer=i))
        x = self._block(x, self.encoder_attn_layer_norm, enc_attn)
        return self._block(x, self.final_layer_norm, self.ffn)


class DecoderCache(KVCache):
    """Incremental state of the decoder for N = B·G rows (G consecutive rows per source sentence).

    The self-attention keys/values of the prefix (a :class:`KVCache`, N rows) and, per layer, the
    encoder's projected keys/values (B, H, S, hd), shared by a sentence's G rows; ``keep`` (B, 1, 1, S)
    marks non-pad source positions.
    """

    def __init__(self, enc_k: list[Tensor], enc_v: list[Tensor], keep: Tensor, group: int, capacity: int) -> None:
        super().__init__(len(enc_k), max(1, capacity))
        self.enc_k, self.enc_v, self.keep, self.group = enc_k, enc_v, keep, group

    @property
    def rows(self) -> int:
        return self.keep.shape[0] * self.group

    def reorder(self, new_order: Tensor) -> None:
        """Keep rows ``new_order`` (N',) of the current N rows, in that order.

        Rows must stay within their sentence's group and each kept sentence keeps G rows (beam search
        reorders and drops whole sentences like that); the encoder part then follows per sentence.
        """
        G = self.group
        if new_order.numel() % G:
            raise ValueError(f"reorder: {new_order.numel()} rows is not a multiple of the group size {G}")
        sent = new_order.view(-1, G)[:, 0] // G  # (B',)
        if not torch.equal(new_order.view(-1, G) // G, sent.unsqueeze(1).expand(-1, G)):
            raise ValueError("reorder: a row moved to another sentence's group")
        super().reorder(new_order)
        if sent.numel() != self.keep.shape[0] or not torch.equal(sent, torch.arange(sent.numel(), device=sent.device)):
            self.enc_k = [k.index_select(0, sent) for k in self.enc_k]
            self.enc_v = [v.index_select(0, sent) for v in self.enc_v]
            self.keep = self.keep.index_select(0, sent)


def _embedding(V: int, d: int, padding_idx: int) -> nn.Embedding:
    e = nn.Embedding(V, d, padding_idx=padding_idx)
    nn.init.normal_(e.weight, mean=0.0, std=d**-0.5)
    with torch.no_grad():
        e.weight[padding_idx].zero_()
    return e


class _Stack(nn.Module):
    """Token embedding + sinusoidal positions + layers (+ final LayerNorm): shared by both sides."""

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        dtype = self.layers[0].final_layer_norm.weight.dtype
        x = self.embed_scale * self.embed_tokens(tokens).to(dtype)  # (B, L, d)
        pos = sinusoidal_embedding(positions, self.embed_tokens.embedding_dim, self.padding_idx)
        return dropout(x + pos.to(dtype), self.dropout, self.training)


class TransformerEncoder(_Stack):
    def __init__(self, cfg: MTModelConfig, embed: nn.Embedding, padding_idx: int) -> None:
        super().__init__()
        self.embed_tokens, self.padding_idx, self.dropout = embed, padding_idx, cfg.dropout
        self.embed_scale = math.sqrt(cfg.encoder_embed_dim) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim) if cfg.encoder_normalize_before else None

    def forward(self, src_tokens: Tensor) -> EncoderOut:
        """src_tokens (B, S), left or right padding."""
        pad = src_tokens.eq(self.padding_idx)  # (B, S)
        x = self._embed(src_tokens, make_positions(src_tokens, self.padding_idx))
        x = x.masked_fill(pad.unsqueeze(-1), 0.0)  # as fairseq: pad rows zero
        keep = ~pad[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, keep)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return EncoderOut(out=x, pad_mask=pad)


class TransformerDecoder(_Stack):
    def __init__(self, cfg: MTModelConfig, embed: nn.Embedding, padding_idx: int) -> None:
        super().__init__()
        self.embed_tokens, self.padding_idx, self.dropout = embed, padding_idx, cfg.dropout
        self.embed_scale = math.sqrt(cfg.decoder_embed_dim) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        final = cfg.decoder_normalize_before and cfg.decoder_final_norm
        self.layer_norm = nn.LayerNorm(cfg.decoder_embed_dim) if final else None
        tied = embed if (cfg.share_decoder_input_output_embed or cfg.share_all_embeddings) else None
        self.output_projection = PlainSoftmax(cfg.tgt_vocab_size, cfg.decoder_embed_dim, padding_idx, tied)

    def _finish(self, x: Tensor) -> Tensor:
        return x if self.layer_norm is None else self.layer_norm(x)

    def forward(self, prev_output_tokens: Tensor, enc: EncoderOut) -> Tensor:
        """prev_output_tokens (B, T), right padding -> h (B, T, d)."""
        x = self._embed(prev_output_tokens, make_positions(prev_output_tokens, self.padding_idx))
        keep = ~enc.pad_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, enc.out, keep)
        return self._finish(x)

    def step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """tokens (N,) the last token of each row (a prefix without pads) -> h (N, d) of that position."""
        pos = tokens.new_full((1, 1), self.padding_idx + 1 + cache.length())  # (1, 1): the same for every row
        x = self._embed(tokens.unsqueeze(1), pos)  # (N, 1, d)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i)
        return self._finish(x).squeeze(1)


class TransformerMT(nn.Module):
    """fairseq ``transformer`` translation model. ``forward(src, prev)`` -> MTOutput(h, q); ``head`` scores h."""

    def __init__(self, cfg: MTModelConfig, padding_idx: int = 1) -> None:
        super().__init__()
        if min(cfg.src_vocab_size, cfg.tgt_vocab_size) <= padding_idx:
            raise ConfigError("src_vocab_size/tgt_vocab_size are not set (they come from the dictionaries)")
        self.cfg, self.padding_idx = cfg, padding_idx
        enc_embed = _embedding(cfg.src_vocab_size, cfg.encoder_embed_dim, padding_idx)
        dec_embed = (
            enc_embed
            if cfg.share_all_embeddings
            else _embedding(cfg.tgt_vocab_size, cfg.decoder_embed_dim, padding_idx)
        )
        self.encoder = TransformerEncoder(cfg, enc_embed, padding_idx)
        self.decoder = TransformerDecoder(cfg, dec_embed, padding_idx)

    @property
    def head(self) -> PlainSoftmax:
        """The output layer (``decoder.output_projection``): ``target_logp(h, y)``, ``log_probs(h)``."""
        return self.decoder.output_projection

    def max_decoder_positions(self) -> int:
        return self.cfg.max_target_positions

    def encode(self, src_tokens: Tensor) -> EncoderOut:
        return self.encoder(src_tokens)

    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor) -> MTOutput:
        """src_tokens (B, S), prev_output_tokens (B, T) -> MTOutput(h, q=h), each (B, T, d)."""
        h = self.decoder(prev_output_tokens, self.encoder(src_tokens))
        return MTOutput(h=h, q=h)

    def start_cache(self, enc: EncoderOut, group: int = 1, capacity: int = 64) -> DecoderCache:
        """A decoder cache for ``group`` rows per sentence of ``enc`` (rows b·G .. b·G+G-1 decode sentence b).

        The encoder keys/values of every decoder layer are projected here, once per sentence.
        """
        ks, vs = zip(*(layer.encoder_attn.keys_values(enc.out) for layer in self.decoder.layers))  # (B, H, S, hd)
        return DecoderCache(list(ks), list(vs), ~enc.pad_mask[:, None, None, :], group, capacity)

    def decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """tokens (N,) each row's last token (eos at step 0) -> h (N, d) at that position; advances the cache."""
        return self.decoder.step(tokens, cache)


def build_mt_model(cfg: MTModelConfig, padding_idx: int = 1) -> TransformerMT:
    """The model of ``cfg`` (vocabulary sizes must be set); works under ``with torch.device("meta")``."""
    return TransformerMT(cfg, padding_idx)
