"""Decoding: one batched search (greedy, sampling, beam with fairseq semantics) over any decoder, the
translation model's decoder and reference scoring, per-step combiners, BLEU; the language model's in lm.

from trime.generate import BeamConfig, beam_search, score_reference, vanilla
"""

from trime.generate.beam import BeamConfig, MTDecoder, beam_search, max_length, score_reference
from trime.generate.combiners import Combiner, vanilla
from trime.generate.search import Decoder, Hypothesis, SearchSpec, search

__all__ = [
    "BeamConfig",
    "Combiner",
    "Decoder",
    "Hypothesis",
    "MTDecoder",
    "SearchSpec",
    "beam_search",
    "max_length",
    "score_reference",
    "search",
    "vanilla",
]
