"""Search over an encoder-decoder: beam search (fairseq semantics), reference scoring, per-step combiners, BLEU.

from trime.generate import BeamConfig, beam_search, score_reference, vanilla
"""

from trime.generate.beam import BeamConfig, Hypothesis, beam_search, max_length, score_reference
from trime.generate.combiners import Combiner, vanilla

__all__ = ["BeamConfig", "Combiner", "Hypothesis", "beam_search", "max_length", "score_reference", "vanilla"]
