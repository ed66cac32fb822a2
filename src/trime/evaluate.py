"""Sliding-window evaluation with any mix of memories (spec §5).

Each window scores the positions ``[start, end)`` of the split after up to ``--context-window``
positions of context (trime.data.blocks.eval_windows), so every token is scored exactly once.
For a scored position i the probability of its target is the joint softmax of DESIGN.md:

    p(y | i) = [Z_tok·p_tok(y) + Σ_{visible j, v_j = y} e^{s_ij}] / [Z_tok + Σ_{visible j} e^{s_ij}]

with s_ij = q_i·k_j / sqrt(d) / τ and the visible entries
- local (``--use-local``): every earlier position of the window (context included), labelled
  with the token that followed it (spec §5.3; memory.masks.causal);
- long (``--use-long --mem-size M``): a FIFO of the last M *scored* positions of earlier windows,
  all visible, on top of the local window (so the context appears twice, as in the original);
- external (``--use-external``): the k nearest datastore entries, score = inner product / sqrt(d) / τ.
``--use-interp`` then mixes in the kNN-LM distribution of the same neighbours (spec §5.5).

A window is first turned into temperature-free rows (memory.scoring.MemoryRows), which
memory.scoring.log_probs scores, the same function ``trime sweep`` re-scores cached rows with;
only then does the long-term FIFO take the window's scored positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trime import io
from trime.config import EvalConfig
from trime.data.batching import Batch, make_batch
from trime.data.prepare import data_fingerprint, read_data_meta
from trime.device import autocast
from trime.jobs import config_fingerprint, open_model
from trime.memory import masks
from trime.memory.cache import MemoryFIFO
from trime.memory.external import ExternalMemory
from trime.memory.index import search_threads
from trime.memory.joint import memory_logits
from trime.memory.neighbors import NeighborCacheWriter
from trime.memory.scoring import MemoryRows, Setting, log_probs
from trime.model.base import select_keys

LN2 = math.log(2)
OVERLAP_SEARCH: bool | None = None  # None: when it pays (overlap_pays); bench/profile_memory.py forces it


@dataclass
class EvalResult:
    loss: float  # base-2 loss per token (bits per byte for character-level data)
    ppl: float
    n_tokens: int
    level: str = "word"
    log_probs: np.ndarray | None = field(default=None, repr=False)  # (n_tokens,) natural log

    def line(self) -> str:
        text = f"Loss (base 2): {self.loss:.4f}, Perplexity: {self.ppl:.2f}"
        return text + (f", bits per byte: {self.loss:.4f}" if self.level == "char" else "")


def setting_of(cfg: EvalConfig) -> Setting:
    """The scoring setting an evaluation config asks for."""
    return Setting(
        softmax_temp=cfg.softmax_temp,
        lmbda=cfg.lmbda if cfg.use_interp else 0.0,
        interp_temp=cfg.interp_temp,
        k=None,
        ext_in_joint=cfg.use_external,
    )


@dataclass
class _Pending:
    """A batch between :meth:`Scorer.prepare` and :meth:`Scorer.finish`."""

    batch: Batch
    keys: torch.Tensor  # (b, T, d)
    spans: list[torch.Tensor]  # each window's scored positions
    targets: torch.Tensor  # (n_all,) their targets
    tok_logp: torch.Tensor  # (n_all,)
    log_z: torch.Tensor  # (n_all,)
    found: Future | None  # the external search of every scored position: (scores, values) (n_all, k)


def _done(value) -> Future:
    """A search already made, as a finished Future."""
    f: Future = Future()
    f.set_result(value)
    return f


def spare_cores(device: torch.device) -> int:
    """CPU cores a forward pass on ``device`` leaves to a search thread (all of them on a GPU)."""
    cores = os.cpu_count() or 1
    return cores if device.type != "cpu" else max(1, cores - torch.get_num_threads())


def overlap_pays(device: torch.device) -> bool:
    """A search thread beside the forward pass pays when the forward leaves CPU cores idle: on a GPU,
    or when torch runs on fewer threads than there are cores. (On 2 cores shared by both, measured
    by bench/profile_memory.py, overlapping made IVF-PQ evaluation 0.29× memory-free against 0.52×
    in order: two thread pools on the same cores slow each other down.)"""
    return device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)


def score_batches(scorer: Scorer, batches, *, overlap: bool = True):
    """Yield ``(batch, log p)`` for each batch in order. With ``overlap`` and an external memory, batch
    i + 1's forward pass runs while batch i's external search runs in a thread; the numbers are the
    same either way (tests/test_evaluate.py)."""
    pool = None
    if overlap and scorer.external is not None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="trime-search", initializer=search_threads,
                                  initargs=(spare_cores(next(scorer.model.parameters()).device),))  # fmt: skip
    pending = None
    try:
        for batch in batches:
            nxt = scorer.prepare(batch, pool)
            if pending is not None:
                yield pending.batch, scorer.finish(pending)
            pending = nxt
        if pending is not None:
            yield pending.batch, scorer.finish(pending)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class Scorer:
    """Scores batches of windows in order, keeping the long-term FIFO between windows.

    With a ``writer`` (trime.memory.neighbors.NeighborCacheWriter) it also records every scored
    token's rows, which is all ``trime sweep`` needs to re-score at another τ, λ, T or k.
    """

    def __init__(
        self,
        model,
        cfg: EvalConfig,
        *,
        dim: int,
        pad: int,
        external: ExternalMemory | None = None,
        writer: NeighborCacheWriter | None = None,
    ):
        self.model, self.cfg, self.dim, self.pad = model, cfg, dim, pad
        self.external, self.writer = external, writer
        self.fifo = MemoryFIFO(cfg.mem_size) if cfg.use_long else None
        self.setting = setting_of(cfg)

    def score(self, batch: Batch) -> torch.Tensor:
        """Natural-log probabilities of the scored targets of a batch of windows, in order."""
        return self.finish(self.prepare(batch))

    @torch.no_grad()
    def prepare(self, batch: Batch, pool: ThreadPoolExecutor | None = None) -> _Pending:
        """The model's part of :meth:`score`: the forward pass, the output layer's terms and one external
        search for every scored position of the batch, run by ``pool`` (a thread: faiss and torch release
        the GIL, so the next batch's forward runs meanwhile) or here."""
        out = self.model(batch.inputs)
        keys = select_keys(out, self.cfg.knn_keytype)  # (b, T, d)
        device = batch.inputs.device
        spans = [torch.arange(c, c + n, device=device) for c, n in zip(batch.n_ctx, batch.n_score)]
        w_idx = torch.cat([torch.full_like(r, w) for w, r in enumerate(spans)])  # (n_all,)
        p_idx = torch.cat(spans)  # (n_all,)
        targets = batch.targets[w_idx, p_idx]
        tok_logp, log_z = self.model.head.target_logp(
            out.h[w_idx, p_idx], targets, tail_quirk=self.cfg.original_tail_quirk
        )
        found = None
        if self.external is not None:
            queries = keys[w_idx, p_idx].float()  # (n_all, d)
            found = pool.submit(self.external.search, queries) if pool else _done(self.external.search(queries))
        return _Pending(batch, keys, spans, targets, tok_logp, log_z, found)

    @torch.no_grad()
    def finish(self, p: _Pending) -> torch.Tensor:
        """The memories' part of :meth:`score`, in batch order (the long-term FIFO moves here)."""
        if not (self.cfg.use_local or self.external is not None or self.writer is not None):
            return p.tok_logp
        ext_scores, ext_values = p.found.result() if p.found is not None else (None, None)
        if not self.cfg.use_local and self.fifo is None:  # the rows of every window at once
            r = MemoryRows.build(p.tok_logp, p.log_z, p.targets, None, None, ext_scores, ext_values)
            if self.writer is not None:
                self.writer.add_rows(r)
            return log_probs(r, [self.setting], self.dim)[0]
        results, a = [], 0
        for w, rows in enumerate(p.spans):
            b = a + len(rows)
            ext = (ext_scores[a:b], ext_values[a:b]) if ext_scores is not None else (None, None)
            r = self.window_rows(p.keys[w], p.batch.targets[w], rows, p.tok_logp[a:b], p.log_z[a:b], ext)
            results.append(log_probs(r, [self.setting], self.dim)[0])
            if self.writer is not None:
                self.writer.add_rows(r)
            if self.fifo is not None:  # the scored positions join the long-term memory after scoring
                self.fifo.append(p.keys[w, rows].detach(), r.targets)
            a = b
        return torch.cat(results)

    def window_rows(self, keys, labels, rows, tok_logp, log_z, ext=None) -> MemoryRows:
        """The memories' rows for one window's scored positions ``rows`` (n,): keys (T, d), labels (T,);
        ``ext`` the external neighbours of those positions (scores (n, k), values (n, k)), searched here
        when None."""
        queries = keys[rows].float()  # (n, d)
        mem_scores = mem_values = None
        if self.cfg.use_local:
            T = int((labels != self.pad).sum())
            visible = masks.causal(rows, T, key_valid=labels[:T] != self.pad).dense()  # (n, T)
            parts = [memory_logits(queries @ keys[:T].float().T, self.dim).masked_fill(~visible, float("-inf"))]
            values = [labels[:T]]
            if self.fifo is not None and len(self.fifo):
                mem_keys, mem_vals = self.fifo.entries()
                parts.append(memory_logits(queries @ mem_keys.float().T, self.dim))  # (n, M_long): all visible
                values.append(mem_vals.to(labels.device))
            mem_scores, mem_values = torch.cat(parts, 1), torch.cat(values)
        if ext is None:
            ext = self.external.search(queries) if self.external is not None else (None, None)
        return MemoryRows.build(tok_logp, log_z, labels[rows], mem_scores, mem_values, *ext)


BACKEND_FIELDS = ("memory_backend", "ray_address", "memory_mmap", "ray_shard_cpus")  # where it is searched, not what
PATH_FIELDS = ("data", "path", "hf_model", "gguf_file", "dstore", "indexfile", "save_neighbors", "output_word_probs")
PATH_FIELDS = PATH_FIELDS + ("trust_checkpoint",)
PATH_FIELDS = PATH_FIELDS + BACKEND_FIELDS  # left out of a result's key


def eval_inputs(cfg: EvalConfig, fingerprint: str | None = None) -> dict:
    """What a result of ``cfg`` is made from, by content (never paths), from the inputs' meta.json
    files (nothing re-hashed): the model's weights (``fingerprint``, else trime.jobs.config_fingerprint:
    a trime checkpoint or ``--hf-model``), the split, the datastore and index, the settings."""
    key = {
        "model": fingerprint or config_fingerprint(cfg),
        "data": data_fingerprint(cfg.data, [cfg.gen_subset]),
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PATH_FIELDS},
    }
    if cfg.use_external or cfg.use_interp:
        key["datastore"] = io.read_meta(cfg.dstore).get("fingerprint")
        index_side = Path(cfg.indexfile).with_name(Path(cfg.indexfile).name + ".json")
        key["index"] = io.read_json(index_side).get("key")
    return json.loads(json.dumps(key, sort_keys=True))


@contextlib.contextmanager
def _neighbor_writer(cfg: EvalConfig, dim: int, fingerprint: str):
    if not cfg.save_neighbors:
        yield None
        return
    meta = {"eval_config": dataclasses.asdict(cfg), "inputs": eval_inputs(cfg, fingerprint)}
    with NeighborCacheWriter(
        cfg.save_neighbors,
        dim=dim,
        ext_in_joint=cfg.use_external,
        mem_top=cfg.neighbors_top or None,
        meta=meta,
        overwrite=True,
    ) as writer:
        yield writer


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Score a split of ``cfg.data`` with the checkpoint ``cfg.path`` and the chosen memories."""
    if cfg.output_word_probs:
        io.check_output_file(cfg.output_word_probs, io.WORD_PROBS)  # before the work, and again when written
    job = open_model(cfg, data=cfg.data)
    model, model_cfg, device = job.model, job.model_cfg, job.device
    pad, eos = job.pad_eos
    tokens = job.split(cfg.gen_subset, cfg.max_eval_tokens)
    windows = job.windows(tokens, cfg.sample_break_mode)
    batch_size = 1 if cfg.use_long else cfg.batch_size
    external, amp = job.external(), job.amp
    out = []
    with _neighbor_writer(cfg, model_cfg.d_model, job.fingerprint) as writer:
        scorer = Scorer(model, cfg, dim=model_cfg.d_model, pad=pad, external=external, writer=writer)
        bar = tqdm(
            total=len(tokens),
            desc=f"eval {cfg.gen_subset}",
            unit="tok",
            dynamic_ncols=True,
            leave=False,
            disable=not sys.stderr.isatty(),
        )
        batches = (
            make_batch(tokens, windows[i : i + batch_size], pad=pad, eos=eos, device=device)
            for i in range(0, len(windows), batch_size)
        )
        with autocast(device, amp):  # autocast is per thread: the search thread runs without it
            overlap = overlap_pays(device) if OVERLAP_SEARCH is None else OVERLAP_SEARCH
            for batch, logp in score_batches(scorer, batches, overlap=overlap):
                out.append(logp.float().cpu())
                bar.update(sum(batch.n_score))
        bar.close()
        if writer is not None:
            writer.finalize()
    logp = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    n = len(logp)
    loss = float(-logp.astype(np.float64).sum() / max(n, 1) / LN2)
    level = read_data_meta(cfg.data).get("level", "word")
    result = EvalResult(loss=loss, ppl=2**loss, n_tokens=n, level=level, log_probs=logp)
    if cfg.output_word_probs:
        with io.output_file(cfg.output_word_probs, io.WORD_PROBS) as tmp, open(tmp, "wb") as f:
            np.save(f, logp.astype(np.float32), allow_pickle=False)
    return result
