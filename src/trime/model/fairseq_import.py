"""Load original fairseq / TRIME checkpoints without running pickled code (spec §1, §10.1).

A fairseq ``.pt`` file is a pickle: ``{"args" | "cfg", "model", "optimizer_history", "extra_state", ...}``.
Two generations exist:

- **args** (the TRIME release, a 2020 fork of fairseq ≈ 0.9, and fairseq < 0.10): ``args`` is an
  ``argparse.Namespace`` holding every option after the architecture function filled its defaults;
  training statistics may hold numpy scalars.
- **cfg** (fairseq ≥ 0.10): ``args`` is None and ``cfg`` a nested dict whose ``model`` section holds
  the model options (cutoffs as strings such as ``"20000,60000"``). fairseq 0.12 saves it with
  ``OmegaConf.to_container``: plain dicts, lists, numbers and strings (its training statistics are
  lists of tuples, dicts and tensors), so such a file needs no class at all. A cfg that was pickled
  as an omegaconf ``DictConfig`` (a checkpoint re-saved after fairseq's loader converted it) holds
  ``DictConfig``/``ListConfig``, node and metadata objects, ``typing.Any``, ``collections.defaultdict``
  and the builtin types.

Loading uses ``torch.load(weights_only=True)`` with that small allow-list: ``argparse.Namespace``,
numpy scalars and dtypes, and the omegaconf classes mapped to inert stand-ins that only keep their
pickled state (turned into plain dicts afterwards, ``${a.b}`` interpolations resolved), so omegaconf
need not be installed and nothing is executed. Any other global is refused with a CheckpointError
naming it; ``trust=True`` (``--trust-checkpoint``) then falls back to a full unpickle, for files
whose source the user trusts.

The weights map onto :class:`trime.model.transformer.TransformerLM` by dropping the ``decoder.``
prefix, fairseq's ``version``/``_float_tensor`` buffers and the copies fairseq stores of tied tensors
(checked equal first), splitting pre-0.8 ``in_proj_weight`` into q/k/v, and casting to float32
(``--fp16`` runs save float16 weights; fairseq-eval-lm also evaluates them in float32).
"""

from __future__ import annotations

import argparse
import collections
import pickle
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trime.config import ModelConfig
from trime.errors import CheckpointError
from trime.model.adaptive import full_cutoffs
from trime.model.attention import split_in_proj
from trime.model.transformer import TransformerLM

# spec §1 and fairseq's base_lm_architecture; used only for options an ``args`` checkpoint lacks.
BASE_DEFAULTS: dict[str, Any] = {
    "decoder_layers": 6,
    "decoder_embed_dim": 512,
    "decoder_ffn_embed_dim": 2048,
    "decoder_attention_heads": 8,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "no_decoder_final_norm": False,
    "adaptive_input": False,
    "adaptive_input_factor": 4,
    "adaptive_input_cutoff": None,
    "adaptive_softmax_cutoff": None,
    "adaptive_softmax_factor": 4,
    "adaptive_softmax_dropout": 0.0,
    "tie_adaptive_weights": False,
    "tie_adaptive_proj": False,
    "share_decoder_input_output_embed": False,
    "no_scale_embedding": False,
    "activation_fn": "relu",
    "decoder_normalize_before": True,
}
_WIKI103 = {
    "decoder_layers": 16,
    "decoder_attention_heads": 8,
    "dropout": 0.3,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
}
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer_lm_wiki103": {
        **_WIKI103,
        "decoder_embed_dim": 1024,
        "decoder_ffn_embed_dim": 4096,
        "no_decoder_final_norm": True,
        "adaptive_input": True,
        "tie_adaptive_weights": True,
        "tie_adaptive_proj": True,
        "adaptive_input_cutoff": "20000,60000",
        "adaptive_softmax_cutoff": "20000,60000",
        "adaptive_softmax_dropout": 0.2,
    },
    "transformer_lm_wiki103_150M": {
        **_WIKI103,
        "decoder_embed_dim": 410,
        "decoder_ffn_embed_dim": 2100,
        "decoder_attention_heads": 10,
    },
    "transformer_lm_enwik8": {
        **_WIKI103,
        "decoder_layers": 12,
        "decoder_embed_dim": 512,
        "decoder_ffn_embed_dim": 2048,
    },
}
# Options trime's Transformers (LM and MT) do not implement: option -> the value it must have (None also accepted).
UNSUPPORTED_LAYERS = {
    "decoder_learned_pos": False,
    "no_token_positional_embeddings": False,
    "layernorm_embedding": False,
    "activation_fn": "relu",
    "scale_fc": False,
    "scale_attn": False,
    "scale_heads": False,
    "scale_resids": False,
}
UNSUPPORTED = {**UNSUPPORTED_LAYERS, "character_embeddings": False, "decoder_normalize_before": True}


class _Inert:
    """Stands in for an omegaconf object while unpickling: keeps the pickled state, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DictConfig(_Inert):
    pass


class _ListConfig(_Inert):
    pass


_OMEGACONF = {"omegaconf.dictconfig.DictConfig": _DictConfig, "omegaconf.listconfig.ListConfig": _ListConfig}
_OMEGACONF.update(
    {
        f"omegaconf.{n}": _Inert
        for n in (
            "base.ContainerMetadata",
            "base.Metadata",
            "nodes.AnyNode",
            "nodes.StringNode",
            "nodes.IntegerNode",
            "nodes.FloatNode",
            "nodes.BooleanNode",
            "nodes.BytesNode",
            "nodes.PathNode",
            "nodes.InterpolationResultNode",
        )
    }
)


def _allow_list() -> list:
    """What the old and new generations pickle besides tensors and plain containers."""

    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, named per numpy version
    dtypes = {type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"}  # numpy 2 builds these dtype classes
    allowed: list = [argparse.Namespace, np.dtype, *dtypes, collections.defaultdict, dict, list, int, typing.Any]
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [(cls, name) for name, cls in _OMEGACONF.items()]
    return allowed


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (after torch's generic weights_only preamble)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:200]


def read_checkpoint(path: str | Path, *, trust: bool = False) -> dict:
    """The raw fairseq checkpoint dict, loaded through the allow-list (module docstring).

    Only when that refuses a global and ``trust`` is set does a full (code-running) unpickle follow.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        try:
            with torch.serialization.safe_globals(_allow_list()):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            name = re.search(r"GLOBAL (\S+)", str(e))
            if not (name or re.search(r"allowlisted|add_safe_globals", str(e))):
                raise  # damaged rather than refused
            if not trust:
                what = name.group(1) if name else _reason(e)
                raise CheckpointError(
                    f"{path}: refused to unpickle {what} (not on the allow-list); pass "
                    "--trust-checkpoint only if you trust where this file came from"
                ) from None
            state = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise CheckpointError(f"{path}: unpickling needs the module {e.name!r}, which is not installed") from None
    except CheckpointError:
        raise
    except Exception as e:  # torch.load reports a damaged or foreign file in many ways
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    return state


def _plain(x: Any) -> Any:
    """Inert omegaconf stand-ins, Namespaces and (real) omegaconf objects -> plain dicts and lists."""
    if isinstance(x, _Inert):
        content = getattr(x, "state", {}).get("_content", getattr(x, "state", {}).get("_val"))
        if isinstance(x, _DictConfig) and isinstance(content, dict):
            return {k: _plain(v) for k, v in content.items()}
        if isinstance(x, _ListConfig) and isinstance(content, list):
            return [_plain(v) for v in content]
        return None if content == "???" else _plain(content)
    if type(x).__module__.startswith("omegaconf"):  # trust=True with omegaconf installed
        from omegaconf import OmegaConf

        return _plain(OmegaConf.to_container(x, resolve=False))
    if isinstance(x, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(x).items()}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _resolve(x: Any, root: dict) -> Any:
    """Replace whole-string ``${a.b}`` interpolations with the value at that absolute path."""
    if isinstance(x, dict):
        return {k: _resolve(v, root) for k, v in x.items()}
    if isinstance(x, list):
        return [_resolve(v, root) for v in x]
    m = re.fullmatch(r"\$\{([\w.]+)\}", x) if isinstance(x, str) else None
    if not m:
        return x
    node: Any = root
    for part in m.group(1).split("."):
        if not isinstance(node, dict) or part not in node:
            return x
        node = node[part]
    return _resolve(node, root)


def model_options(state: dict) -> tuple[dict, dict, str]:
    """(model options, task options, generation "args" | "cfg") of a loaded checkpoint, as plain dicts.

    An ``args`` Namespace holds model and task options together, so both dicts are the same there.
    """
    if state.get("args") is not None:
        opts = _plain(state["args"])
        if not isinstance(opts, dict):
            raise CheckpointError("the checkpoint's args is not an argparse.Namespace")
        return opts, opts, "args"
    if state.get("cfg") is None:
        raise CheckpointError("the checkpoint has neither 'args' nor 'cfg': cannot tell its architecture")
    cfg = _plain(state["cfg"])
    cfg = _resolve(cfg, cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError("the checkpoint's cfg has no model section")
    opts = dict(cfg["model"])
    task = cfg["task"] if isinstance(cfg.get("task"), dict) else {}
    if opts.get("tokens_per_sample") is None:
        opts["tokens_per_sample"] = task.get("tokens_per_sample")
    opts["arch"] = opts.get("arch") or opts.get("_name")
    return opts, task, "cfg"


@dataclass
class FairseqCheckpoint:
    """A fairseq ``.pt`` read through the allow-list: its options, weights and what ``meta`` reports."""

    path: Path
    state: dict
    opts: dict  # model options (plain dicts)
    task: dict  # task options (the same dict as opts in the args generation)
    generation: str  # "args" | "cfg"

    @classmethod
    def read(cls, path: str | Path, trust: bool = False) -> FairseqCheckpoint:
        path = Path(path)
        state = read_checkpoint(path, trust=trust)
        opts, task, generation = model_options(state)
        raw = state["model"]
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise CheckpointError(f"{path}: the 'model' entry is not a dict of tensors")
        return cls(path, state, opts, task, generation)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The stored weights, under fairseq's names and in their stored dtypes."""
        return self.state["model"]

    def meta(self, arch: str, **extra: Any) -> dict:
        """source, generation, arch, path, num_updates, ``extra``, the stored weight dtypes."""
        history = self.state.get("optimizer_history") or [{}]
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in self.weights.values() if v.is_floating_point()})
        return {
            "source": "fairseq",
            "generation": self.generation,
            "arch": arch,
            "path": str(self.path),
            "num_updates": history[-1].get("num_updates") if isinstance(history[-1], dict) else None,
            **extra,
            "stored_dtypes": dtypes,
        }


def convert_weight(key: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Put one fairseq weight into ``out`` under trime's name: ``version``/``_float_tensor`` buffers
    dropped, float32, a pre-0.8 fused q/k/v projection split, fairseq 0.9's ``embed_out`` renamed."""
    if key.rsplit(".", 1)[-1] in ("version", "_float_tensor"):
        return
    t = t.float() if t.is_floating_point() else t
    out.update(split_in_proj(key, t) or {re.sub(r"(^|\.)embed_out$", r"\1output_projection.weight", key): t})


def check_supported(o: dict, unsupported: dict[str, Any]) -> None:
    """One CheckpointError naming every option of ``unsupported`` that has another value in ``o`` (a
    decoder input/output width other than decoder_embed_dim included)."""
    bad = [f"{k}={o[k]!r}" for k, want in unsupported.items() if o.get(k) not in (None, want)]
    if any(o.get(k) not in (None, o["decoder_embed_dim"]) for k in ("decoder_input_dim", "decoder_output_dim")):
        bad.append("decoder_input_dim/decoder_output_dim != decoder_embed_dim")
    if bad:
        raise CheckpointError(f"fairseq options trime does not implement: {', '.join(bad)}")


def drop_tied_copies(weights: dict[str, torch.Tensor], copies: dict[str, str]) -> None:
    """Remove each stored copy of a tied tensor (``copies``: copy key -> kept key) after checking it equal."""
    for copy, kept in copies.items():
        if copy in weights and kept in weights:
            if weights[copy].shape != weights[kept].shape or not torch.equal(weights[copy], weights[kept]):
                raise CheckpointError(f"tied weights {copy} and {kept} differ: the checkpoint is inconsistent")
            del weights[copy]


def _with_defaults(opts: dict) -> dict:
    """Fill what ``opts`` lacks from the arch defaults, then the base ones; map legacy option names.

    A saved value wins even when it is None: both generations store the options after fairseq's
    architecture function ran, so a None there is what the model was built with.
    """
    out = {**BASE_DEFAULTS, **ARCH_DEFAULTS.get(str(opts.get("arch")), {}), **opts}
    if "no_tie_adaptive_proj" in opts:  # fairseq's own rule for pre-0.8 checkpoints
        out["no_decoder_final_norm"] = True
        out["tie_adaptive_proj"] = not opts["no_tie_adaptive_proj"]
    if "decoder_final_norm" in opts:
        out["no_decoder_final_norm"] = not opts["decoder_final_norm"]
    if not out.get("activation_dropout") and opts.get("relu_dropout"):  # fairseq ≤ 0.9 name
        out["activation_dropout"] = opts["relu_dropout"]
    return out


def _cutoffs(value: Any) -> list[int]:
    """fairseq cutoffs: None, an int, a list, or a string such as "20000,60000" or "(20000, 60000)"."""
    if value is None:
        return []
    if isinstance(value, str):
        return [int(v) for v in re.findall(r"\d+", value)]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def vocab_size(weights: dict[str, torch.Tensor]) -> int:
    """Rows of the input embedding (all bands of an adaptive input), as fairseq's dictionary length."""
    if "embed_tokens.weight" in weights:
        return int(weights["embed_tokens.weight"].shape[0])
    bands = [v for k, v in weights.items() if re.fullmatch(r"embed_tokens\.embeddings\.\d+\.0\.weight", k)]
    if not bands:
        raise CheckpointError("no input embedding in the checkpoint (decoder.embed_tokens.*)")
    return int(sum(b.shape[0] for b in bands))


def model_config(opts: dict, weights: dict[str, torch.Tensor]) -> ModelConfig:
    """A trime ModelConfig from fairseq model options (either generation) and the renamed weights."""
    o = _with_defaults(opts)
    check_supported(o, UNSUPPORTED)
    tied = bool(o["tie_adaptive_weights"] and o["adaptive_input"])
    try:
        return ModelConfig(
            arch=str(o.get("arch") or "fairseq"),
            n_layers=int(o["decoder_layers"]),
            d_model=int(o["decoder_embed_dim"]),
            d_ffn=int(o["decoder_ffn_embed_dim"]),
            n_heads=int(o["decoder_attention_heads"]),
            dropout=float(o["dropout"]),
            attention_dropout=float(o["attention_dropout"]),
            activation_dropout=float(o["activation_dropout"] or 0.0),
            final_norm=not o["no_decoder_final_norm"],
            scale_embedding=not o["no_scale_embedding"],
            adaptive_input=bool(o["adaptive_input"]),
            adaptive_input_factor=float(o["adaptive_input_factor"]),
            adaptive_input_cutoff=_cutoffs(o["adaptive_input_cutoff"]) if o["adaptive_input"] else [],
            adaptive_softmax_cutoff=_cutoffs(o["adaptive_softmax_cutoff"]),
            adaptive_softmax_factor=float(o["adaptive_softmax_factor"]),
            adaptive_softmax_dropout=float(o["adaptive_softmax_dropout"] or 0.0),
            tie_adaptive_weights=tied,
            tie_adaptive_proj=bool(tied and o["tie_adaptive_proj"]),
            share_input_output_embed=bool(o["share_decoder_input_output_embed"]),
            max_positions=int(o.get("max_target_positions") or o.get("tokens_per_sample") or 1024),
            vocab_size=vocab_size(weights),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"unusable fairseq model options ({type(e).__name__}: {e})") from None


def _rename(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``decoder.``, then :func:`convert_weight`."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model_state.items():
        if not key.startswith("decoder."):
            raise CheckpointError(f"unexpected weight {key!r}: not a decoder-only language model")
        convert_weight(key[len("decoder.") :], t, out)
    return out


def _tied_copies(cfg: ModelConfig) -> dict[str, str]:
    """fairseq key stored for a tied tensor -> the key trime keeps (spec §1; trime.model.adaptive)."""
    copies: dict[str, str] = {}
    if cfg.adaptive_softmax_cutoff and cfg.tie_adaptive_weights:
        copies["adaptive_softmax.head.word_proj.weight"] = "embed_tokens.embeddings.0.0.weight"
        for c in range(len(full_cutoffs(cfg.adaptive_softmax_cutoff, cfg.vocab_size)) - 1):
            copies[f"adaptive_softmax.tail.{c}.2.weight"] = f"embed_tokens.embeddings.{c + 1}.0.weight"
            if cfg.tie_adaptive_proj:
                copies[f"adaptive_softmax.tail.{c}.0.weight"] = f"embed_tokens.embeddings.{c + 1}.1.weight"
    elif not cfg.adaptive_softmax_cutoff and cfg.share_input_output_embed:
        copies["output_projection.weight"] = "embed_tokens.weight"
    return copies


def _match(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop checked tied copies, then require exactly the keys and shapes of TransformerLM(cfg)."""
    drop_tied_copies(weights, _tied_copies(cfg))
    return require_shapes(lambda: TransformerLM(cfg), weights)


def require_shapes(build, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` when they hold exactly the keys and shapes of the module ``build()`` makes (built on
    the meta device, so nothing is allocated); else one CheckpointError naming what differs."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build().state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit the architecture: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, shape in expected.items():
        if weights[k].shape != shape:
            raise CheckpointError(
                f"weight {k} has shape {tuple(weights[k].shape)}, the architecture needs {tuple(shape)}"
            )
    return weights


def load_fairseq_checkpoint(
    path: str | Path, *, trust: bool = False
) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Read a fairseq / TRIME ``.pt`` -> (state dict for TransformerLM, ModelConfig, meta).

    Nothing beyond the module docstring's allow-list is unpickled unless ``trust`` is true. ``meta``
    records the generation, arch, update count, the training ``tokens_per_sample`` and break mode,
    the stored weight dtype and ``add_bos_token`` (trime's evaluation assumes it is off).
    """
    ck = FairseqCheckpoint.read(path, trust)
    weights = _rename(ck.weights)
    cfg = model_config(ck.opts, weights)
    try:
        weights = _match(cfg, weights)
    except CheckpointError as e:
        raise CheckpointError(f"{ck.path}: {e}") from None
    meta = ck.meta(
        cfg.arch,
        tokens_per_sample=ck.opts.get("tokens_per_sample"),
        sample_break_mode=ck.task.get("sample_break_mode"),
        add_bos_token=bool(ck.opts.get("add_bos_token", False)),
    )
    return weights, cfg, meta
