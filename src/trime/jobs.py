"""Opening a job that runs a language model over text: the one way every such command starts.

``trime eval``, ``trime datastore build``, ``trime generate`` and ``trime explain`` all begin the
same way: load the model a config names (a trime checkpoint, a fairseq ``.pt`` or a Hugging Face
backbone), refuse a checkpoint of another kind, check the data's vocabulary against the model's,
read a split and cut it into the evaluation windows, open the external memory checked against the
model's fingerprint and against the precision its queries are computed in. :func:`open_model` does the
first three; a :class:`Job` then hands out the rest, so that no command can skip a check another one makes.

A config is anything with the evaluation-style fields it uses: ``path``, ``device``,
``trust_checkpoint``, and when present ``hf_model``, ``gguf_file``, ``amp``, ``knn_keytype``, ``data``,
``tokens_per_sample``, ``context_window``, ``dstore``/``indexfile``/``k``/``probe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from trime.checkpoint import checkpoint_dictionary, load_model, source_fingerprint
from trime.data.blocks import eval_windows
from trime.data.dictionary import Dictionary
from trime.data.prepare import check_vocabulary, load_split, special_ids
from trime.device import autocast_dtype, pick_device
from trime.errors import DataError, DatastoreError
from trime.memory.external import ExternalMemory

PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> its name
AMP_FLAGS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # the --amp that gives each precision


@dataclass
class Job:
    """A loaded language model and what the job's data and memories must agree with."""

    cfg: object  # the job's config (evaluation-style fields, module docstring)
    model: torch.nn.Module
    model_cfg: object  # ModelConfig | HFModelConfig
    ckpt_dir: Path  # a checkpoint directory, a .pt file, or a Hugging Face directory / hub name
    device: torch.device
    dictionary: Dictionary | None  # None for a Hugging Face tokenizer's ids
    data: str = ""  # the prepared data directory whose vocabulary was checked ("" when none)
    specials: tuple[int, int] | None = None  # (pad, eos) of a text the job tokenised itself, without data

    @cached_property
    def fingerprint(self) -> str:
        """The model's weights fingerprint (what datastores and caches are labelled with)."""
        return config_fingerprint(self.cfg)

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of the job's ``--amp`` on its device (None: float32)."""
        return autocast_dtype(getattr(self.cfg, "amp", "none"), self.device)

    @property
    def precision(self) -> str:
        """The precision the job's model computes keys and queries in: fp32, bf16 or fp16."""
        return PRECISIONS[self.amp]

    @property
    def dim(self) -> int:
        return int(self.model_cfg.d_model)

    @property
    def pad_eos(self) -> tuple[int, int]:
        """(pad, eos) of the job's data, else of the text it tokenised, else of the model's dictionary."""
        if self.specials is not None:
            return self.specials
        if self.data:
            return special_ids(self.data)
        d = self.need_dictionary()
        return d.pad, d.eos

    def need_dictionary(self) -> Dictionary:
        """The model's dictionary, for a job that turns ids into text (or text into ids)."""
        if self.dictionary is None:
            raise DataError(f"{self.ckpt_dir}: no dict.txt; convert the checkpoint with `trime convert --dict`")
        return self.dictionary

    def split(self, subset: str, max_tokens: int = 0) -> np.ndarray:
        """(n,) int32 tokens of a split of the checked data directory (at most ``max_tokens``; 0: all)."""
        if not self.data:
            raise DataError("this job needs a prepared data directory")
        tokens = load_split(self.data, subset)
        return tokens[:max_tokens] if max_tokens else tokens

    @property
    def window(self) -> int:
        """Window length L: ``--tokens-per-sample``, else the model's maximum."""
        return int(getattr(self.cfg, "tokens_per_sample", 0) or self.model_cfg.max_positions)

    def windows(self, tokens: np.ndarray, break_mode: str = "none") -> np.ndarray:
        """(W, 3) evaluation windows (start, end, context) over ``tokens`` (trime.data.blocks.eval_windows)."""
        return eval_windows(tokens, self.window, self.cfg.context_window, break_mode, self.pad_eos[1])

    def external(self) -> ExternalMemory | None:
        """The external memory the config names (``--use-external`` / ``--use-interp``), checked
        against this model's width, vocabulary, key type and fingerprint; None when it names none."""
        cfg = self.cfg
        if not (getattr(cfg, "use_external", False) or getattr(cfg, "use_interp", False)):
            return None
        external = ExternalMemory.of(cfg, self.model_cfg, self.fingerprint)
        built = external.meta.get("precision")  # None: a datastore from before it was recorded
        if built is not None and built != self.precision:
            raise DatastoreError(
                f"{cfg.dstore}: its keys were computed in {built} and this job's queries would be in "
                f"{self.precision}: pass --amp {AMP_FLAGS[built]} (or rebuild it with --amp {AMP_FLAGS[self.precision]})"
            )
        return external


def open_model(cfg, *, data: str = "") -> Job:
    """Load the language model of ``cfg`` (a translation checkpoint is one clear line: checkpoint.load_model's
    ``task``) and check ``data``'s vocabulary against it (when given)."""
    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(
        cfg.path,
        task="lm",
        device=device,
        trust=cfg.trust_checkpoint,
        hf_model=getattr(cfg, "hf_model", ""),
        gguf_file=getattr(cfg, "gguf_file", ""),
        keytype=getattr(cfg, "knn_keytype", "last_ffn_input"),
    )
    dictionary = checkpoint_dictionary(ckpt_dir)
    if data:
        check_vocabulary(data, model_cfg.vocab_size, dictionary)
    return Job(cfg, model, model_cfg, Path(ckpt_dir), device, dictionary, data)


def config_fingerprint(cfg) -> str:
    """The weights fingerprint of the model ``cfg`` names (``path``, or ``hf_model`` + ``gguf_file``),
    without loading it (trime.checkpoint.source_fingerprint)."""
    hf = {"hf_model": getattr(cfg, "hf_model", ""), "gguf_file": getattr(cfg, "gguf_file", "")}
    return source_fingerprint(cfg.path, **hf)
