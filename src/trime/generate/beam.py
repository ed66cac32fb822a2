"""Translation search: fairseq-generate's options, the translation model as a decoder, reference scoring.

:func:`beam_search` is the one batched search (generate.search: beam search with fairseq
``SequenceGenerator`` semantics, MT spec §9 "Common"; greedy is beam 1) over :class:`MTDecoder`, the
encoder output + decoder cache + output layer + per-step combiner of a translation model. Translation
sets the last step to max_len = min(int(max_len_a · S + max_len_b), max_target_positions − 1), S the
*padded* source width of the batch (eos included), so results may depend on the batch; a hypothesis has
at most max_len tokens, then eos (forced at step max_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trime.config import Config, opt
from trime.errors import ConfigError
from trime.generate.combiners import Combiner, vanilla
from trime.generate.search import Hypothesis, SearchSpec, search


@dataclass
class BeamConfig(Config):
    """fairseq-generate's search options (MT spec §9 "Common"; fairseq defaults)."""

    beam: int = opt(5, "beam size K (1 = greedy)", "--beam", ge=1)
    lenpen: float = opt(1.0, "length penalty: final score = sum of log-probs / length^lenpen", "--lenpen", ge=0)
    max_len_a: float = opt(0.0, "max length = a · padded source length + b", "--max-len-a", ge=0)
    max_len_b: int = opt(200, "max length = a · padded source length + b", "--max-len-b")
    min_len: int = opt(1, "minimum length (eos excluded)", "--min-len", ge=0)
    nbest: int = opt(1, "hypotheses returned per sentence", "--nbest", ge=1)
    unk_penalty: float = opt(0.0, "subtracted from the unk log-probability", "--unkpen")
    normalize_scores: bool = opt(True, "divide by length^lenpen (off = --unnormalized)")

    def check(self) -> None:
        if self.nbest > self.beam:
            raise ConfigError(f"--nbest {self.nbest} must be at most --beam {self.beam}")


def max_length(cfg: BeamConfig, src_width: int, max_target_positions: int) -> int:
    """fairseq's max_len for a batch whose padded source width (eos included) is ``src_width``."""
    return min(int(cfg.max_len_a * src_width + cfg.max_len_b), max_target_positions - 1)


@dataclass
class MTState:
    cache: object  # the model's DecoderCache
    h: Tensor  # (N, d) decoder output of each row's last position
    step: int  # the step ``h`` predicts (0 = the first target token)


class MTDecoder:
    """A translation model as a decoder (generate.search.Decoder): encoder output, decoder cache, output
    layer and the per-step combiner (generate.combiners)."""

    def __init__(self, model, combiner: Combiner = vanilla, *, capacity: int = 64, eos: int = 2) -> None:
        self.model, self.combiner, self.capacity, self.eos = model, combiner, capacity, eos
        self.vocab_size = model.cfg.tgt_vocab_size

    def start(self, src_tokens: Tensor, group: int) -> MTState:
        cache = self.model.start_cache(self.model.encode(src_tokens), group=group, capacity=self.capacity)
        first = torch.full((src_tokens.shape[0] * group,), self.eos, dtype=torch.long, device=src_tokens.device)
        return MTState(cache, self.model.decode_step(first, cache), 0)  # (N,) eos: fairseq's bos

    def log_probs(self, state: MTState) -> Tensor:
        head = self.model.head
        if getattr(self.combiner, "uses_log_z", False) and hasattr(head, "log_probs_and_log_z"):
            logp, log_z = head.log_probs_and_log_z(state.h)  # (N, V), (N,): one output projection, not two
            return self.combiner(state.step, state.h, logp, log_z).float()
        return self.combiner(state.step, state.h, head.log_probs(state.h)).float()  # (N, V)

    def reorder(self, state: MTState, index: Tensor) -> MTState:
        state.cache.reorder(index)
        return MTState(state.cache, state.h.index_select(0, index), state.step)

    def advance(self, state: MTState, tokens: Tensor) -> MTState:
        return MTState(state.cache, self.model.decode_step(tokens, state.cache), state.step + 1)


@torch.no_grad()
def beam_search(
    model,
    src_tokens: Tensor,
    cfg: BeamConfig | None = None,
    combiner: Combiner = vanilla,
    *,
    pad: int = 1,
    eos: int = 2,
    unk: int = 3,
) -> list[list[Hypothesis]]:
    """Translate a batch: src_tokens (B, S) (left padding as fairseq, eos last) -> per sentence the
    ``cfg.nbest`` best finished hypotheses, best first (generate.search).

    ``model`` is a :class:`trime.model.encoder_decoder.TransformerMT` (anything with ``encode``,
    ``start_cache``, ``decode_step``, ``head.log_probs``, ``max_decoder_positions`` and
    ``cfg.tgt_vocab_size``); it is put in eval mode.
    """
    cfg = cfg or BeamConfig()
    model.eval()
    L = max_length(cfg, src_tokens.shape[1], model.max_decoder_positions())
    if cfg.min_len > L:
        raise ConfigError(f"min length {cfg.min_len} exceeds the max length {L} of this batch")
    spec = SearchSpec(last=L, pad=pad, eos=eos, beam=cfg.beam, nbest=cfg.nbest, lenpen=cfg.lenpen,
                      normalize_scores=cfg.normalize_scores, min_len=cfg.min_len, unk=unk,
                      unk_penalty=cfg.unk_penalty)  # fmt: skip
    return search(MTDecoder(model, combiner, capacity=L + 1, eos=eos), src_tokens, spec)


@torch.no_grad()
def score_reference(
    model, src_tokens: Tensor, target: Tensor, combiner: Combiner = vanilla, *, pad: int = 1, eos: int = 2
) -> list[Hypothesis]:
    """fairseq-generate --score-reference: teacher-forced log-probabilities of each reference.

    target (B, T) right-padded, eos last; the decoder reads eos + target[:-1] (fairseq's
    prev_output_tokens). score = mean positional log-prob (no length penalty), as fairseq prints it.
    """
    model.eval()
    lengths = target.ne(pad).sum(1)  # (B,)
    prev = torch.full_like(target, pad)  # (B, T)
    prev[:, 0] = eos
    prev[:, 1:] = target[:, :-1]
    prev = prev.masked_fill(target.eq(pad), pad)
    h = model(src_tokens, prev).h  # (B, T, d)
    real = target.ne(pad)
    rows = h[real]  # (M, d)
    lp = combiner(-1, rows, model.head.log_probs(rows)).float()  # (M, V)
    lp = lp.gather(1, target[real].unsqueeze(1)).squeeze(1)  # (M,)
    out, start = [], 0
    for b, n in enumerate(lengths.tolist()):
        pos = lp[start : start + n]
        out.append(Hypothesis(tokens=target[b, :n].clone(), score=float(pos.sum() / n), positional_scores=pos))
        start += n
    return out
