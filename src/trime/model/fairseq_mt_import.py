"""Load fairseq translation checkpoints (``--task translation --arch transformer*``) into TransformerMT.

Unpickling, the ``args``/``cfg`` generations, the allow-list and the weight conversion are those of
:mod:`trime.model.fairseq_import` (``FairseqCheckpoint``, ``convert_weight``, ``drop_tied_copies``):
nothing but tensors, plain containers, ``argparse.Namespace``, numpy scalars and inert omegaconf
stand-ins is unpickled unless ``trust=True``.

Weights keep fairseq's names (trime.model.encoder_decoder). On the way: fairseq's ``version`` and
``_float_tensor`` buffers are dropped; pre-0.8 fused ``in_proj_weight``/``in_proj_bias`` are split
into q/k/v; pre-0.8 ``layers.{i}.layer_norms.{j}`` get their later names; fairseq 0.9's
``decoder.embed_out`` becomes ``decoder.output_projection.weight``; the copy fairseq stores of a
tied output matrix is checked equal to the embedding and dropped; everything is cast to float32.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from trime.errors import CheckpointError, ConfigError
from trime.model.encoder_decoder import MTModelConfig, TransformerMT
from trime.model.fairseq_import import (
    UNSUPPORTED_LAYERS,
    FairseqCheckpoint,
    check_supported,
    convert_weight,
    drop_tied_copies,
    require_shapes,
)

# fairseq's base_architecture (transformer_legacy.py); used only for options a checkpoint lacks.
BASE_DEFAULTS: dict[str, Any] = {
    "encoder_embed_dim": 512,
    "encoder_ffn_embed_dim": 2048,
    "encoder_layers": 6,
    "encoder_attention_heads": 8,
    "encoder_normalize_before": False,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_normalize_before": False,
    "no_decoder_final_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "share_decoder_input_output_embed": False,
    "share_all_embeddings": False,
    "no_scale_embedding": False,
    "max_source_positions": 1024,
    "max_target_positions": 1024,
}
_BIG = {
    "encoder_embed_dim": 1024,
    "encoder_ffn_embed_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "dropout": 0.3,
}
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer_iwslt_de_en": {
        "encoder_ffn_embed_dim": 1024,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "decoder_ffn_embed_dim": 1024,
    },
    "transformer_vaswani_wmt_en_de_big": _BIG,
    "transformer_wmt_en_de_big": {**_BIG, "attention_dropout": 0.1},
    "transformer_wmt_en_de_big_t2t": {
        **_BIG,
        "attention_dropout": 0.1,
        "activation_dropout": 0.1,
        "encoder_normalize_before": True,
        "decoder_normalize_before": True,
    },
}
# Options TransformerMT does not implement: option -> the value it must have (None/absent also accepted).
UNSUPPORTED = {
    **UNSUPPORTED_LAYERS,
    "encoder_learned_pos": False,
    "cross_self_attention": False,
    "no_cross_attention": False,
    "adaptive_softmax_cutoff": None,
    "adaptive_input": False,
    "tie_adaptive_weights": False,
    "quant_noise_pq": 0,
    "encoder_layers_to_keep": None,
    "decoder_layers_to_keep": None,
}


def _options(opts: dict) -> dict:
    """Arch defaults, then base defaults, under the saved options (a saved None counts as a value)."""
    flat = dict(opts)
    for side in ("encoder", "decoder"):  # fairseq ≥ 0.11 dataclass configs nest these under encoder/decoder
        nested = opts.get(side)
        if isinstance(nested, dict):
            for k, v in nested.items():
                flat.setdefault(f"{side}_{k}", v)
    o = {**BASE_DEFAULTS, **ARCH_DEFAULTS.get(str(opts.get("arch")), {}), **flat}
    o.setdefault("decoder_embed_dim", o["encoder_embed_dim"])
    o.setdefault("decoder_ffn_embed_dim", o["encoder_ffn_embed_dim"])
    if not o.get("activation_dropout") and opts.get("relu_dropout"):  # fairseq ≤ 0.9 name
        o["activation_dropout"] = opts["relu_dropout"]
    return o


def mt_config(opts: dict, weights: dict[str, torch.Tensor]) -> MTModelConfig:
    """An MTModelConfig from fairseq model options (either generation) and the renamed weights."""
    for side in ("encoder", "decoder"):
        key = f"{side}.embed_tokens.weight"
        if key not in weights:
            raise CheckpointError(f"no {key} in the checkpoint: not an encoder-decoder translation model")
    o = _options(opts)
    check_supported(o, UNSUPPORTED)
    d_dec = int(o["decoder_embed_dim"])
    try:
        return MTModelConfig(
            arch=str(o.get("arch") or o.get("_name") or "transformer"),
            encoder_layers=int(o["encoder_layers"]),
            decoder_layers=int(o["decoder_layers"]),
            encoder_embed_dim=int(o["encoder_embed_dim"]),
            decoder_embed_dim=d_dec,
            encoder_ffn_embed_dim=int(o["encoder_ffn_embed_dim"]),
            decoder_ffn_embed_dim=int(o["decoder_ffn_embed_dim"]),
            encoder_attention_heads=int(o["encoder_attention_heads"]),
            decoder_attention_heads=int(o["decoder_attention_heads"]),
            encoder_normalize_before=bool(o["encoder_normalize_before"]),
            decoder_normalize_before=bool(o["decoder_normalize_before"]),
            decoder_final_norm=not o.get("no_decoder_final_norm"),
            dropout=float(o["dropout"]),
            attention_dropout=float(o["attention_dropout"] or 0.0),
            activation_dropout=float(o["activation_dropout"] or 0.0),
            share_decoder_input_output_embed=bool(o["share_decoder_input_output_embed"]),
            share_all_embeddings=bool(o["share_all_embeddings"]),
            scale_embedding=not o["no_scale_embedding"],
            max_source_positions=int(o["max_source_positions"] or 1024),
            max_target_positions=int(o["max_target_positions"] or 1024),
            src_vocab_size=int(weights["encoder.embed_tokens.weight"].shape[0]),
            tgt_vocab_size=int(weights["decoder.embed_tokens.weight"].shape[0]),
        )
    except ConfigError as e:
        raise CheckpointError(f"inconsistent fairseq model options: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"unusable fairseq model options ({type(e).__name__}: {e})") from None


_OLD_NORMS = {
    "encoder": {"0": "self_attn_layer_norm", "1": "final_layer_norm"},
    "decoder": {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"},
}


def _rename(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pre-0.8 ``layer_norms.{j}`` get their later names, then :func:`convert_weight`."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model_state.items():
        if not key.startswith(("encoder.", "decoder.")):
            raise CheckpointError(f"unexpected weight {key!r}: not an encoder-decoder model")
        old = re.fullmatch(r"(encoder|decoder)(\.layers\.\d+\.)layer_norms\.(\d)\.(weight|bias)", key)
        if old:
            key = f"{old.group(1)}{old.group(2)}{_OLD_NORMS[old.group(1)][old.group(3)]}.{old.group(4)}"
        convert_weight(key, t, out)
    return out


def _match(cfg: MTModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop checked tied copies, then require exactly the keys and shapes of TransformerMT(cfg)."""
    if cfg.share_decoder_input_output_embed or cfg.share_all_embeddings:
        drop_tied_copies(weights, {"decoder.output_projection.weight": "decoder.embed_tokens.weight"})
    if cfg.share_all_embeddings and not torch.equal(
        weights["encoder.embed_tokens.weight"], weights["decoder.embed_tokens.weight"]
    ):
        raise CheckpointError("--share-all-embeddings but the encoder and decoder embeddings differ")
    return require_shapes(lambda: TransformerMT(cfg), weights)


def load_fairseq_mt_checkpoint(
    path: str | Path, *, trust: bool = False
) -> tuple[dict[str, torch.Tensor], MTModelConfig, dict]:
    """Read a fairseq translation ``.pt`` -> (state dict for TransformerMT, MTModelConfig, meta).

    ``meta``: source, generation ("args" | "cfg"), arch, path, num_updates, source/target language,
    stored weight dtypes.
    """
    ck = FairseqCheckpoint.read(path, trust)
    try:
        weights = _rename(ck.weights)
        cfg = mt_config(ck.opts, weights)
        weights = _match(cfg, weights)
    except CheckpointError as e:
        raise CheckpointError(f"{ck.path}: {e}") from None
    lang = {f"{side}_lang": ck.task.get(f"{side}_lang") or ck.opts.get(f"{side}_lang") for side in ("source", "target")}
    return weights, cfg, ck.meta(cfg.arch, **lang)


def check_vocab(cfg: MTModelConfig, src_size: int | None, tgt_size: int | None, where: str = "") -> None:
    """CheckpointError unless the dictionaries' lengths equal the model's embedding rows."""
    for side, n, want in (("source", src_size, cfg.src_vocab_size), ("target", tgt_size, cfg.tgt_vocab_size)):
        if n is not None and n != want:
            raise CheckpointError(
                f"{where}the {side} dictionary has {n} symbols but the model embeds {want}: "
                "wrong dictionary for this checkpoint"
            )


def load_fairseq_mt(
    path: str | Path, *, src_dict_size: int | None = None, tgt_dict_size: int | None = None, trust: bool = False
) -> tuple[TransformerMT, dict]:
    """A ready TransformerMT (eval mode, float32) from a fairseq translation checkpoint, and its meta.

    Pass the dictionaries' lengths (``len(Dictionary.load(...))``) to have a mismatch refused.
    """
    weights, cfg, meta = load_fairseq_mt_checkpoint(path, trust=trust)
    check_vocab(cfg, src_dict_size, tgt_dict_size, f"{path}: ")
    model = TransformerMT(cfg)
    model.load_state_dict(weights, strict=True)
    return model.eval(), meta
