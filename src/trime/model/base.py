"""What every backbone gives the memory code: hidden states ``h``, memory keys ``q`` and a head.

A backbone is any module whose ``forward(inputs (B, T) int64)`` returns :class:`LMOutput` and whose
``head`` has ``target_logp(h (N, d), y (N,), tail_quirk=False) -> (log p_tok(y) (N,), log Z_tok (N,))``
(see trime.model.adaptive.OutputHead). The memory math, the objectives, the datastore, the index
and kNN-LM take those tensors and never ask which backbone made them: the fairseq-style
TransformerLM, an encoder-decoder's decoder, or a Hugging Face causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from trime.config import KEYTYPES
from trime.errors import ConfigError


@dataclass
class LMOutput:
    h: Tensor  # (B, T, d) final output that feeds the head (after the final LayerNorm, if any)
    q: Tensor  # (B, T, d) memory key `last_ffn_input`: the last layer's normalised FFN input


class Head(Protocol):
    def target_logp(self, h: Tensor, targets: Tensor, tail_quirk: bool = False) -> tuple[Tensor, Tensor]: ...


def check_keytype(keytype: str) -> str:
    if keytype not in KEYTYPES:
        raise ConfigError(f"unknown key type {keytype!r}; choose one of {', '.join(KEYTYPES)}")
    return keytype


def select_keys(out: LMOutput, keytype: str) -> Tensor:
    """The memory keys of a backbone's output (B, T, d): ``last_ffn_input`` (q) or ``final`` (h)."""
    return out.q if check_keytype(keytype) == "last_ffn_input" else out.h
