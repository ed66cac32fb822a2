"""Per-step combiners: the one place where a search's next-token log-probabilities can be changed.

A combiner is any callable ``combiner(step, h, logp) -> logp``:

- ``step`` (int): the decoding step (0 = the first target token); ``-1`` when called by
  :func:`trime.generate.beam.score_reference` on whole teacher-forced sequences (rows are then all
  non-pad target positions of a batch, in row-major order).
- ``h`` (N, d): the decoder output of each row at this step (the model's ``MTOutput.h``; also the
  TrimeMT memory query, MT spec §1).
- ``logp`` (N, V) float32: the model's normalised log-probabilities ``log_softmax(E h)``.
- a combiner whose ``uses_log_z`` is true (TrimeMT) is also given ``log_z`` (N,), the log partition
  function of the logits behind ``logp``, when the decoder has it (one output projection, not two).
- returns (N, V) log-scores. They need not be normalised (the TRIME release's combination sums to
  2 − λ, MT spec §9.3); the search uses them as they are.

The search applies its own masks afterwards (pad never chosen, unk penalty, min/max length), as
fairseq does after the model's ``get_normalized_probs``. Combiners are called in ``torch.no_grad``
during search and must not keep per-row state: rows are reordered between steps. kNN-MT and TrimeMT
(part 2) are combiners; :func:`vanilla` returns the model's distribution unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Combiner = Callable[[int, Tensor, Tensor], Tensor]


def vanilla(step: int, h: Tensor, logp: Tensor) -> Tensor:
    """The model alone (MT spec §9.1)."""
    return logp
