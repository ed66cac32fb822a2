"""Token-budget batches of sentence pairs and their padded tensors, as fairseq's translation task makes them.

Order of operations (fairseq ``FairseqTask.get_batch_iterator`` with a ``LanguagePairDataset``):

1. :func:`ordered_indices`: a permutation drawn from numpy's legacy ``RandomState(seed)`` (fairseq runs
   ``np.random.permutation`` under ``numpy_seed(seed)``), then stably sorted by target length, then stably
   by source length. So pairs are length-bucketed, and equal lengths come in a seeded random order. The
   original's fairseq 0.10 seeds this with ``--seed``; fairseq 0.12 with ``--seed`` + 1 (its epoch-1 batches).
2. :func:`filter_by_size`: pairs whose source is longer than ``max_source_positions`` or whose target is
   longer than ``max_target_positions`` (lengths include eos) are dropped (fairseq's training behaviour;
   validation refuses them unless ``--skip-invalid-size-inputs-valid-test``: ``skip_invalid=False`` here).
3. :func:`batch_by_size`: walk that order; a pair costs max(src_len, tgt_len) tokens and a batch costs
   (its size) x (its longest pair). A batch is closed before it would cost more than ``max_tokens`` (or hold
   more than ``max_sentences``); its size is then cut back to the largest multiple of
   ``required_batch_size_multiple`` (8) that was reached, and the rest starts the next batch. Batches smaller
   than the multiple are kept whole. This is fairseq 0.12's ``batch_by_size_vec`` (which also splits a
   carried-over tail that alone exceeds the budget, so a batch never costs more than ``max_tokens``; the
   older ``batch_by_size_fast`` of fairseq 0.10 could exceed it in that corner case). Unlike fairseq 0.12's
   wrapper, the final batch is kept even when its size is not a multiple of 8 (0.12 drops it, and with it
   up to 7 sentences of every epoch, validation and test set; 0.10, the original's fork, keeps it).
4. :func:`epoch_batches`: each epoch the batch list is shuffled by ``RandomState(seed + epoch)`` (fairseq's
   ``EpochBatchIterator``, epochs counted from 1) and batch i goes to rank i mod world size. A tail that
   does not fill all ranks is dropped (fairseq pads it with empty batches), as in :mod:`trime.data.batching`.

:func:`collate` matches fairseq's ``language_pair_dataset.collate``: rows sorted by descending source length
(a stable sort here; fairseq's torch sort is not guaranteed stable, so rows of equal source length may come in
another order), source left-padded, target right-padded, ``prev_output_tokens`` = eos followed by the target
without its final eos (right-padded), ``ntokens`` = the number of target tokens including eos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trime.config import MTTrainConfig
from trime.data.batching import deal, deal_in_groups, load_batch_order
from trime.data.dictionary import Dictionary
from trime.data.pairs import PairSplit, chosen_langs, load_pair_split, pair_dictionary_files
from trime.errors import ConfigError, DataError


def ordered_indices(
    src_sizes: np.ndarray, tgt_sizes: np.ndarray, seed: int | None = 1, shuffle: bool = True
) -> np.ndarray:
    """(n,) int64 pair ids: seeded shuffle, then stable sorts by target then source length (fairseq order)."""
    n = len(src_sizes)
    idx = np.random.RandomState(seed).permutation(n).astype(np.int64) if shuffle else np.arange(n, dtype=np.int64)
    idx = idx[np.argsort(np.asarray(tgt_sizes)[idx], kind="mergesort")]
    return idx[np.argsort(np.asarray(src_sizes)[idx], kind="mergesort")]


def filter_by_size(
    indices: np.ndarray,
    src_sizes: np.ndarray,
    tgt_sizes: np.ndarray,
    max_source_positions: int,
    max_target_positions: int,
    skip_invalid: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, dropped) ids, order kept; with ``skip_invalid=False`` a too-long pair is a DataError."""
    too_long = (np.asarray(src_sizes)[indices] > max_source_positions) | (
        np.asarray(tgt_sizes)[indices] > max_target_positions
    )
    dropped = indices[too_long]
    if len(dropped) and not skip_invalid:
        i = int(dropped[0])
        raise DataError(
            f"{len(dropped)} sentence pair(s) are longer than --max-source-positions {max_source_positions} / "
            f"--max-target-positions {max_target_positions}, e.g. pair {i} ({int(src_sizes[i])}, {int(tgt_sizes[i])} "
            "tokens); raise the limits or skip them"
        )
    return indices[~too_long], dropped


def batch_by_size(
    indices: np.ndarray,
    num_tokens: np.ndarray,
    max_tokens: int | None,
    max_sentences: int | None = None,
    required_batch_size_multiple: int = 8,
    *,
    oversize_alone: bool = False,
) -> list[np.ndarray]:
    """Cut ``indices`` (in order) into batches (module docstring, step 3); ``num_tokens[i]`` is pair i's cost.

    The one token-budget packer of translation: training (multiple 8), and with
    ``required_batch_size_multiple=1`` the greedy batches of decoding and of a datastore build (a batch
    is closed before the pair that would overflow it). ``oversize_alone``: a pair costing more than
    ``max_tokens`` is a batch of its own instead of an error."""
    max_tokens = max_tokens or 0
    max_sentences = max_sentences or 0
    mult = max(1, required_batch_size_multiple)
    if max_tokens <= 0 and max_sentences <= 0:
        raise ConfigError("batching needs --max-tokens or --batch-size")
    cost = np.asarray(num_tokens, dtype=np.int64)[indices]  # (n,) in walking order
    if oversize_alone and max_tokens > 0:
        cost = np.minimum(cost, max_tokens)  # at the full budget it shares a batch with nothing
    if max_tokens > 0 and len(cost) and cost.max() > max_tokens:
        j = int(np.argmax(cost))
        raise ConfigError(
            f"sentence pair {int(indices[j])} has {int(cost[j])} tokens, more than --max-tokens {max_tokens}"
        )

    def too_big(n: int, width: int) -> bool:
        return (max_sentences > 0 and n > max_sentences) or (max_tokens > 0 and n * width > max_tokens)

    cuts: list[int] = []  # end positions of the closed batches
    start = 0  # first position of the open batch
    commit, commit_width = 0, 0  # [start, commit): the open batch's longest prefix of an allowed size; its width
    tail_width = 0  # widest pair in [commit, pos]
    for pos in range(len(cost)):
        tail_width = max(tail_width, int(cost[pos]))
        width = max(commit_width, tail_width)
        full = too_big(pos + 1 - start, width)
        if full:
            if max_tokens > 0 and (pos + 1 - commit) * tail_width > max_tokens:
                cuts.append(commit)  # the tail cannot open the next batch with this pair: it is a batch itself
                commit, tail_width = pos, int(cost[pos])
            cuts.append(commit)  # close the open batch at its allowed prefix; the tail opens the next one
            start, width = commit, tail_width
        size = pos + 1 - start
        if full or size < mult or size % mult == 0:
            commit, commit_width, tail_width = pos + 1, width, 0
    if commit != len(cost):
        cuts.append(commit)  # the last batch's tail beyond its allowed size is a batch of its own
    return [b for b in np.split(np.asarray(indices, dtype=np.int64), cuts) if len(b)]


def pair_batches(
    src_sizes: np.ndarray,
    tgt_sizes: np.ndarray,
    *,
    max_tokens: int | None,
    max_sentences: int | None = None,
    seed: int | None = 1,
    shuffle: bool = True,
    max_source_positions: int = 1024,
    max_target_positions: int = 1024,
    required_batch_size_multiple: int = 8,
    skip_invalid: bool = True,
) -> list[np.ndarray]:
    """The fixed list of batches of a split (steps 1-3); reshuffle it per epoch with :func:`epoch_batches`.

    Validation and test sets: ``shuffle=False`` (fairseq does not shuffle them) and ``skip_invalid=False``.
    """
    src_sizes, tgt_sizes = np.asarray(src_sizes), np.asarray(tgt_sizes)
    idx = ordered_indices(src_sizes, tgt_sizes, seed, shuffle)
    idx, _ = filter_by_size(idx, src_sizes, tgt_sizes, max_source_positions, max_target_positions, skip_invalid)
    return batch_by_size(idx, np.maximum(src_sizes, tgt_sizes), max_tokens, max_sentences, required_batch_size_multiple)


def epoch_batches(
    batches: list[np.ndarray], epoch: int, *, seed: int = 1, shuffle: bool = True, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """The batches ``rank`` walks in ``epoch`` (1-based): shuffled with RandomState(seed + epoch), round-robin."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    order = list(range(len(batches)))
    if shuffle:
        np.random.RandomState(seed + epoch).shuffle(order)  # a Python list, as fairseq shuffles its list of batches
    return deal([batches[i] for i in order], rank, world_size)


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass
class PairBatch:
    """A padded batch, fairseq's names. B pairs, S = longest source, T = longest target (eos included)."""

    ids: torch.Tensor  # (B,) int64 pair ids, in row order
    src_tokens: torch.Tensor  # (B, S) int64, left-padded
    src_lengths: torch.Tensor  # (B,) int64, descending
    prev_output_tokens: torch.Tensor  # (B, T) int64: eos, y_1 .. y_{T-1}, right-padded
    target: torch.Tensor  # (B, T) int64: y_1 .. y_T (= eos), right-padded
    ntokens: int  # target tokens, eos included


def _pad(flat: np.ndarray, lens: np.ndarray, pad: int, left: bool) -> torch.Tensor:
    """(B, max len) int64 rows of the sequences laid end to end in ``flat``, padded left or right."""
    width = int(lens.max())
    out = np.full((len(lens), width), pad, dtype=np.int64)  # (B, width)
    rows = np.repeat(np.arange(len(lens)), lens)  # (n,)
    first = np.repeat(np.cumsum(lens) - lens, lens)  # (n,) flat position of each token's sequence start
    cols = np.arange(len(flat)) - first + (np.repeat(width - lens, lens) if left else 0)
    out[rows, cols] = flat
    return torch.from_numpy(out)


def collate(
    split, ids, pad: int = 1, eos: int = 2, left_pad_source: bool = True, left_pad_target: bool = False
) -> PairBatch:
    """Padded tensors of the pairs ``ids`` of a :class:`trime.data.pairs.PairSplit` (fairseq's collater)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        raise DataError("cannot collate an empty batch")
    src_len = np.asarray([len(split.source(i)) for i in ids], dtype=np.int64)  # (B,)
    order = np.argsort(-src_len, kind="stable")  # rows by descending source length
    ids, src_len = ids[order], src_len[order]
    src = np.concatenate([split.source(i) for i in ids])  # (n_src,) sequences end to end
    tgt = np.concatenate([split.target(i) for i in ids])  # (n_tgt,)
    tgt_len = np.asarray([len(split.target(i)) for i in ids], dtype=np.int64)  # (B,)
    prev = np.roll(tgt, 1)  # each target shifted right by one: its eos moves to the front of the next one
    prev[np.cumsum(tgt_len) - tgt_len] = eos
    return PairBatch(
        ids=torch.from_numpy(ids),
        src_tokens=_pad(src, src_len, pad, left_pad_source),
        src_lengths=torch.from_numpy(src_len),
        prev_output_tokens=_pad(prev, tgt_len, pad, left_pad_target),
        target=_pad(tgt, tgt_len, pad, left_pad_target),
        ntokens=int(tgt_len.sum()),
    )


# ---------------------------------------------------------------------------------------------
# A training run's data


@dataclass
class PairData:
    """The sentence pairs of a translation run as the trainer's TrainData (trime.train): the fixed
    batches of train (reshuffled per epoch) and valid, this process's share, padded tensors."""

    train: PairSplit
    valid: PairSplit
    batches: list[np.ndarray]  # the fixed batches of train
    valid_fixed: list[np.ndarray]
    seed: int
    dictionaries: dict[str, Path] = field(default_factory=dict)  # file name in a checkpoint -> dictionary file
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    predefined: bool = False  # batches follow a BM25 order (--predefined-batches)
    # checkpoint_best's metric, (model) -> (name, value; higher is better), e.g. validation BLEU; None: the loss
    selection_metric: Callable | None = None
    pad: int = Dictionary.pad
    eos: int = Dictionary.eos

    @classmethod
    def load(
        cls, cfg: MTTrainConfig, max_positions: tuple[int, int], device: torch.device, *, rank: int = 0,
        world_size: int = 1,
    ) -> PairData:  # fmt: skip
        """``max_positions``: the model's (max_source_positions, max_target_positions)."""
        langs = chosen_langs(cfg)
        train, valid = load_pair_split(cfg.data, "train", **langs), load_pair_split(cfg.data, cfg.valid_subset, **langs)
        max_src, max_tgt = max_positions
        limits = {"max_tokens": cfg.max_tokens, "max_sentences": cfg.max_sentences or None,
                  "max_source_positions": max_src, "max_target_positions": max_tgt}  # fmt: skip
        if cfg.predefined_batches:  # BM25 order (MT spec §5.6): packed in its order, the same every epoch
            order = load_batch_order(
                cfg.predefined_batches, len(train), "rebuild it with `trime mt bm25` for this data"
            )
            order, _ = filter_by_size(order, train.src_sizes, train.tgt_sizes, max_src, max_tgt)
            sizes = np.maximum(train.src_sizes, train.tgt_sizes)
            batches = batch_by_size(order, sizes, cfg.max_tokens, cfg.max_sentences or None)
        else:
            batches = pair_batches(train.src_sizes, train.tgt_sizes, seed=cfg.seed, **limits)
        valid_fixed = pair_batches(valid.src_sizes, valid.tgt_sizes, shuffle=False, skip_invalid=False, **limits)
        return cls(
            train, valid, batches, valid_fixed, cfg.seed, pair_dictionary_files(cfg.data, **langs), device, rank,
            world_size, predefined=bool(cfg.predefined_batches),
        )  # fmt: skip

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        W = self.world_size
        if self.predefined:  # groups of W consecutive batches shuffled; batch k of a group to rank k (MT spec §5.7)
            perm = np.random.RandomState(self.seed + epoch).permutation(len(self.batches) // W)
            mine = deal_in_groups(self.batches, perm, self.rank, W)
        else:
            mine = epoch_batches(self.batches, epoch, seed=self.seed, rank=self.rank, world_size=W)
        if not mine:
            raise DataError(f"the training split gives no batch for each of {W} processes")
        return mine

    def valid_batches(self) -> list[np.ndarray]:
        return self.valid_fixed[self.rank :: self.world_size]

    def tensors(self, split: str, ids: np.ndarray) -> dict[str, torch.Tensor]:
        b = collate(self.train if split == "train" else self.valid, ids, pad=self.pad, eos=self.eos)
        return {
            "src_tokens": b.src_tokens.to(self.device, non_blocking=True),  # (B, S) left-padded
            "prev_output_tokens": b.prev_output_tokens.to(self.device, non_blocking=True),  # (B, T)
            "target": b.target.to(self.device, non_blocking=True),  # (B, T) right-padded
        }
