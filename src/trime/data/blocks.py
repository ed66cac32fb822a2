"""Training segments and evaluation windows over a token stream (spec §5.1, §8).

A split is one stream of target tokens ``t[0..n)`` (int32, every line ended by eos). The input at
stream position i is ``t[i-1]`` (eos at position 0), so inputs are targets shifted right by one
*across* block boundaries, as fairseq's TokenBlockDataset does.

- A training segment s covers target positions ``[s·L, min((s+1)·L, n))``; the last may be short.
- An evaluation window scores target positions ``[start, end)`` after ``n_ctx`` positions of
  context ``[start - n_ctx, start)`` whose targets are not scored. Every position of the split is
  scored by exactly one window.
"""

from __future__ import annotations

import numpy as np

from trime.data.dictionary import Dictionary
from trime.errors import ConfigError

EOS = Dictionary.eos  # fairseq's; data prepared with another vocabulary says its own in meta.json


def input_tokens(tokens: np.ndarray, start: int, end: int, eos: int = EOS) -> np.ndarray:
    """Inputs for target positions ``[start, end)``: ``t[start-1 : end-1]``, eos before position 0."""
    if start == 0:
        return np.concatenate([np.array([eos], dtype=tokens.dtype), tokens[: end - 1]])
    return np.asarray(tokens[start - 1 : end - 1])


def num_segments(n_tokens: int, L: int) -> int:
    return -(-n_tokens // L)


def segment_bounds(n_tokens: int, L: int) -> np.ndarray:
    """(S, 2) int64 [start, end) of each training segment, fairseq break mode ``none``."""
    starts = np.arange(0, n_tokens, L, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + L, n_tokens)], axis=1)


def segment_windows(ids, n_tokens: int, L: int) -> np.ndarray:
    """(B, 3) int64 windows (start, end, 0) of training segments ``ids``: segment s scores
    ``[s·L, min((s+1)·L, n))`` with no context (the last may be short)."""
    starts = np.asarray(ids, dtype=np.int64) * L
    return np.stack([starts, np.minimum(starts + L, n_tokens), np.zeros_like(starts)], axis=1).reshape(-1, 3)


def _blocks_complete(tokens: np.ndarray, size: int, eos: int) -> list[tuple[int, int]]:
    """Greedy groups of whole lines of at most ``size`` tokens; a longer line is a block alone."""
    ends = np.flatnonzero(np.asarray(tokens) == eos) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    blocks: list[tuple[int, int]] = []
    start = prev = 0
    for e in ends.tolist():
        if e - start > size and prev > start:
            blocks.append((start, prev))
            start = prev
        prev = e
    if prev > start:
        blocks.append((start, prev))
    return blocks


def eval_windows(
    tokens: np.ndarray, L: int, context_window: int, break_mode: str = "none", eos: int = EOS
) -> np.ndarray:
    """(W, 3) int64 rows (start, end, n_ctx) of evaluation windows (spec §5.1).

    Blocks of ``L - context_window`` new tokens (``none``: fixed size; ``complete``: whole lines)
    each get up to ``context_window`` preceding positions as context, trimmed so that the window
    fits ``L``. Deviation from fairseq, named: a block longer than ``L`` (a very long line in
    ``complete`` mode) is split into pieces of ``L - context_window`` instead of being dropped,
    so that every token is scored exactly once.
    """
    if not 0 <= context_window < L:
        raise ConfigError(f"--context-window {context_window} must be in [0, {L}) for a window of {L} tokens")
    size = L - context_window
    n = len(tokens)
    if break_mode == "none":
        starts = np.arange(0, n, size, dtype=np.int64)
        blocks = list(zip(starts.tolist(), np.minimum(starts + size, n).tolist()))
    elif break_mode == "complete":
        blocks = []
        for s, e in _blocks_complete(tokens, size, eos):
            pieces = range(s, e, size) if e - s > L else [s]
            blocks += [(p, min(p + size, e)) if e - s > L else (s, e) for p in pieces]
    else:
        raise ConfigError(f"unknown --sample-break-mode {break_mode!r} (none, complete)")
    rows = [(s, e, min(context_window, s, L - (e - s))) for s, e in blocks]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)
