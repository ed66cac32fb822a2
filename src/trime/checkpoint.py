"""Checkpoints: a directory of safetensors weights, JSON config, the dictionary and trainer state.

    checkpoint_dir/
      model.safetensors   weights (tied parameters stored once)
      config.json         {"model": ModelConfig, "train": TrainConfig | null}
      dict.txt            the vocabulary the embeddings are indexed by
      trainer.pt          optimizer / schedule / RNG / data position (only for resuming; tensors and
                          plain containers, loaded with weights_only=True: no pickled code runs)
      meta.json           written last; a directory without it is incomplete

Loading never runs pickled code; original fairseq ``.pt`` files (language or translation models) go
through ``trime.model.fairseq_import`` / ``fairseq_mt_import`` and need ``--trust-checkpoint`` only for
payloads beyond its allow-list. ``load_model`` routes every kind and refuses one of the wrong task.

A Hugging Face backbone (trime.model.hf) is saved in the save_pretrained layout instead (config.json,
safetensors weights, the source's tokenizer, trainer.pt, meta.json with ``"backbone": "hf"``); ``load_model`` tells the two
apart by that meta.json and also loads a plain transformers model (``hf_model``: directory, hub name
or GGUF file).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trime import io
from trime.config import ModelConfig, build
from trime.data.dictionary import Dictionary
from trime.data.hf_text import load_tokenizer
from trime.errors import CheckpointError, DataError
from trime.model.encoder_decoder import MTModelConfig, build_mt_model
from trime.model.fairseq_import import load_fairseq_checkpoint, read_checkpoint
from trime.model.fairseq_mt_import import load_fairseq_mt_checkpoint
from trime.model.hf import HFBackbone, hf_fingerprint, is_hf_checkpoint, load_hf, load_hf_checkpoint, save_hf_checkpoint
from trime.model.transformer import TransformerLM, build_model

WEIGHTS, CONFIG, DICT, TRAINER = "model.safetensors", "config.json", "dict.txt", "trainer.pt"
MODEL_TYPES = {ModelConfig: "transformer_lm", MTModelConfig: "transformer_mt"}  # config.json's model_type


def state_dict_unique(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with each shared (tied) storage kept once, contiguous, on CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    model_cfg: Any,
    dictionaries: str | Path | dict[str, Path],
    *,
    train_cfg: Any = None,
    trainer_state: dict | None = None,
    **meta: Any,
) -> Path:
    """Write a checkpoint directory atomically (replacing an older one at the same path).

    ``dictionaries``: the dict.txt of a language model, or {file name: path} (a translation model's
    dict.SRC.txt and dict.TGT.txt); they are copied in. ``model_cfg`` is a ModelConfig or MTModelConfig.
    A Hugging Face backbone is written by trime.model.hf.save_hf_checkpoint (``dictionaries`` unused:
    its data has the tokenizer's ids; the tokenizer of ``train_cfg.hf_model`` is saved with it, when it has one).
    """
    path = Path(path)
    if isinstance(model, HFBackbone):
        source = getattr(train_cfg, "hf_model", "")
        tokenizer = source_tokenizer(source, getattr(train_cfg, "gguf_file", "")) if source else None
        hf = {"tokenizer": tokenizer, "train_cfg": train_cfg, "trainer_state": trainer_state}
        return save_hf_checkpoint(path, model, **hf, **meta)
    if not isinstance(dictionaries, dict):
        dictionaries = {DICT: Path(dictionaries)}
    with io.atomic_dir(path, overwrite=True, kind="checkpoint") as tmp:
        save_file(state_dict_unique(model), str(tmp / WEIGHTS))
        cfg = {
            "model_type": MODEL_TYPES[type(model_cfg)],
            "model": _asdict(model_cfg),
            "train": _asdict(train_cfg) if train_cfg is not None else None,
        }
        io.write_json(tmp / CONFIG, cfg)
        for name, src in dictionaries.items():
            shutil.copyfile(src, tmp / name)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        vocab = getattr(model_cfg, "vocab_size", None) or getattr(model_cfg, "tgt_vocab_size", None)
        weights = io.sha256_file(tmp / WEIGHTS)
        io.write_meta(tmp, "checkpoint", vocab_size=vocab, weights_sha256=weights, **meta)
    return path


@functools.lru_cache(maxsize=4)
def source_tokenizer(hf_model: str, gguf_file: str = ""):
    """The tokenizer a Hugging Face model source ships (saved next to its fine-tuned weights, so that the
    checkpoint is a whole save_pretrained model), or None when it has none; loaded once per source."""
    try:
        return load_tokenizer(hf_model, gguf_file=gguf_file or None)
    except DataError:
        return None


def _asdict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (best, else last) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (a fairseq checkpoint must end in .pt)")
    if (path / WEIGHTS).exists() or is_hf_checkpoint(path):
        if not io.is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json); it was not finished writing")
        return path
    for name in ("checkpoint_best", "checkpoint_last"):
        io.recover_dir(path / name)
        if io.is_complete(path / name):
            return path / name
    raise CheckpointError(
        f"{path}: neither a checkpoint directory ({WEIGHTS}, {CONFIG}) nor a run with a complete "
        "checkpoint_best or checkpoint_last"
    )


def read_config(ckpt_dir: Path) -> dict:
    try:
        cfg = json.loads((ckpt_dir / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir}: unreadable {CONFIG} ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{ckpt_dir / CONFIG}: not a trime checkpoint config (no 'model' table)")
    return cfg


# The kinds of model a command takes, and where a checkpoint of the other kind should go instead.
TASKS = {
    "lm": ("a language model", "`trime eval`, `trime generate`, `trime datastore build` or `trime explain`"),
    "mt": ("a translation model", "`trime mt generate` or `trime mt datastore`"),
}


def wrong_kind(path: str | Path, kind: str, task: str) -> CheckpointError:
    """The one-line error for a checkpoint of ``kind`` given to a command that takes ``task``."""
    return CheckpointError(f"{path}: {TASKS[kind][0]}, not {TASKS[task][0]}; use it with {TASKS[kind][1]}")


def fairseq_kind(path: str | Path, *, trust: bool = False) -> str:
    """'mt' for a fairseq encoder-decoder ``.pt`` (encoder weights), else 'lm' (reads the file)."""
    weights = read_checkpoint(path, trust=trust)["model"]
    return "mt" if isinstance(weights, dict) and any(str(k).startswith("encoder.") for k in weights) else "lm"


def _load_fairseq(path: Path, task: str | None, trust: bool):
    """(weights, config, meta) of a fairseq ``.pt`` of ``task`` (None: either kind)."""
    loaders = {"lm": load_fairseq_checkpoint, "mt": load_fairseq_mt_checkpoint}
    try:
        return loaders[task or "lm"](path, trust=trust)
    except CheckpointError:
        kind = fairseq_kind(path, trust=trust)  # read again only on the way to an error
        if kind == (task or "lm"):
            raise
    if task is not None:
        raise wrong_kind(path, kind, task)
    return loaders[kind](path, trust=trust)


def load_model(
    path: str | Path,
    *,
    task: str | None = "lm",
    device: str | torch.device = "cpu",
    trust: bool = False,
    hf_model: str = "",
    gguf_file: str = "",
    keytype: str = "last_ffn_input",
):
    """Load (model in eval mode, its config, checkpoint dir) of any kind of checkpoint:

    - a trime checkpoint or run directory: a TransformerLM (ModelConfig) or a TransformerMT
      (MTModelConfig), as its config.json says;
    - a fairseq ``.pt`` file, converted on the fly (trime.model.fairseq_import for a language model,
      trime.model.fairseq_mt_import for a translation model); its "checkpoint dir" is the file itself;
    - a Hugging Face backbone (HFModelConfig) saved by a run with ``--hf-model``, or with ``hf_model``
      (and no ``path``) a transformers causal LM (trime.model.hf.load_hf), whose "checkpoint dir" is
      its directory, GGUF file or hub name; ``keytype`` 'final' lets a model whose FFN cannot be found load.

    ``task``: the kind the caller takes, 'lm' (the default) or 'mt'; a checkpoint of the other kind
    is one CheckpointError line (:func:`wrong_kind`). None takes either.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} or None, not {task!r}")
    if hf_model:
        if task == "mt":
            raise wrong_kind(hf_model, "lm", task)
        key = "final" if keytype == "final" else "last_ffn_input"
        model = load_hf(hf_model, gguf_file=gguf_file or None, device=device, key=key)
        return model, model.cfg, Path(hf_model) / gguf_file if gguf_file else Path(hf_model)
    path = Path(path)
    if path.is_dir() and is_hf_checkpoint(resolve(path)):
        if task == "mt":
            raise wrong_kind(resolve(path), "lm", task)
        model, _ = load_hf_checkpoint(resolve(path), device=device)
        return model, model.cfg, resolve(path)
    if path.is_file() and path.suffix == ".pt":
        state, model_cfg, _ = _load_fairseq(path, task, trust)
        ckpt_dir = path
    else:
        ckpt_dir = resolve(path)
        config = read_config(ckpt_dir)
        model_type = config.get("model_type", "transformer_lm")  # checkpoints before translation are LMs
        cls = {v: k for k, v in MODEL_TYPES.items()}.get(model_type)
        if cls is None:
            raise CheckpointError(f"{ckpt_dir}: unknown model_type {model_type!r} in {CONFIG}")
        kind = "mt" if cls is MTModelConfig else "lm"
        if task is not None and kind != task:
            raise wrong_kind(ckpt_dir, kind, task)
        model_cfg = build(cls, config["model"], source=str(ckpt_dir / CONFIG))
        state = load_weights(ckpt_dir)
    model = build_mt_model(model_cfg) if isinstance(model_cfg, MTModelConfig) else build_model(model_cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that differs from the config's
        raise CheckpointError(f"{ckpt_dir}: weights do not fit the config ({_first_line(e)})") from None
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval(), model_cfg, ckpt_dir


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def model_fingerprint(path: str | Path) -> str:
    """A short hash of a checkpoint's weights (ties datastores, indexes and results to their model):
    from meta.json when the checkpoint recorded it (no re-hashing); else of a fairseq .pt or GGUF file
    itself or a trime checkpoint's model.safetensors; else (a sharded Hugging Face directory or a hub
    name) trime.model.hf.hf_fingerprint."""
    path = Path(path)
    if path.is_dir() and io.is_complete(path):
        recorded = io.read_json(path / "meta.json").get("weights_sha256")
        if recorded:
            return recorded[:16]
    if path.is_file():  # a GGUF file is hashed once per process (its cache entry is keyed by the same hash)
        return io.sha256_file(path, remember=True)[:16]
    if (path / WEIGHTS).is_file():
        return io.sha256_file(path / WEIGHTS)[:16]
    return hf_fingerprint(path)


def source_fingerprint(path: str | Path = "", *, hf_model: str = "", gguf_file: str = "") -> str:
    """The weights fingerprint of a config's model without loading it: a local ``hf_model`` (its GGUF file)
    or the checkpoint ``path`` names by :func:`model_fingerprint`; a hub name by
    trime.model.hf.hf_fingerprint (pinned to the revision in the hub cache)."""
    if hf_model:
        local = Path(hf_model) / gguf_file if gguf_file else Path(hf_model)
        return model_fingerprint(local) if local.exists() else hf_fingerprint(hf_model, gguf_file or None)
    path = Path(path)
    return model_fingerprint(path if path.is_file() else resolve(path))


def load_weights(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a trime checkpoint directory. Its meta.json's ``weights_sha256`` is verified first
    (a file damaged on disk is one CheckpointError line, not a model that scores wrong numbers); the
    hash reads the file once more, about 0.7 s per GB at 1.5 GB/s on these CPUs."""
    path = Path(ckpt_dir) / WEIGHTS
    recorded = io.read_meta(ckpt_dir).get("weights_sha256") if io.is_complete(ckpt_dir) else None
    if recorded and path.is_file() and io.sha256_file(path) != recorded:
        raise CheckpointError(
            f"{path}: the file is damaged or truncated, or was replaced (its sha256 is not the one the checkpoint "
            "recorded); restore it or train again"
        )
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(
            f"{path}: cannot read weights, the file is damaged or truncated ({_first_line(e)})"
        ) from None


def load_trainer_state(ckpt_dir: str | Path) -> dict | None:
    p = Path(ckpt_dir) / TRAINER
    if not p.exists():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle
        raise CheckpointError(
            f"{p}: cannot read the trainer state, the file is damaged or truncated ({_first_line(e)})"
        ) from None


def checkpoint_dictionary(ckpt_dir: Path) -> Dictionary | None:
    """The dictionary a checkpoint's embeddings are indexed by (None for a bare fairseq .pt)."""
    path = Path(ckpt_dir) / DICT
    return Dictionary.load(path) if path.is_file() else None


def convert(path: str | Path, out_dir: str | Path, dict_path: str | Path | None = None, *, trust: bool = False) -> Path:
    """Write a trime checkpoint directory (this module's layout) from a fairseq ``.pt``.

    ``dict_path`` defaults to the dict.txt next to the checkpoint; its length must equal the
    embedding's vocabulary size. The directory appears complete (meta.json) only at the end.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    io.check_replaceable(Path(out_dir), "checkpoint", overwrite=True)  # before the (slow) conversion
    dict_path = Path(dict_path) if dict_path is not None else path.with_name(DICT)
    if not dict_path.is_file():
        raise CheckpointError(f"{dict_path}: no dictionary; pass the dict.txt the model was trained with")
    weights, cfg, meta = _load_fairseq(path, "lm", trust)
    n = len(Dictionary.load(dict_path))
    if n != cfg.vocab_size:
        raise CheckpointError(f"{dict_path} has {n} symbols but {path} embeds {cfg.vocab_size}: wrong dictionary")
    model = TransformerLM(cfg)
    model.load_state_dict(weights, strict=True)
    meta.update(sha256=io.sha256_file(path), dict_sha256=io.sha256_file(dict_path))
    return save_checkpoint(out_dir, model, cfg, dict_path, fairseq=meta)
