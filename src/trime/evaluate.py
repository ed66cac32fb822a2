"""Sliding-window evaluation with any mix of memories (spec §5).

Each window scores the positions ``[start, end)`` of the split after up to ``--context-window``
positions of context (trime.data.blocks.eval_windows), so every token is scored exactly once.
For a scored position i the probability of its target is the joint softmax of DESIGN.md:

    p(y | i) = [Z_tok·p_tok(y) + Σ_{visible j, v_j = y} e^{s_ij}] / [Z_tok + Σ_{visible j} e^{s_ij}]

with s_ij = q_i·k_j / sqrt(d) / τ and the visible entries
- local (``--use-local``): every earlier position of the window (context included), labelled
  with the token that followed it (spec §5.3);
- long (``--use-long --mem-size M``): a FIFO of the last M *scored* positions of earlier windows,
  all visible, on top of the local window (so the context appears twice, as in the original);
- external (``--use-external``): the k nearest datastore entries, score = inner product / sqrt(d) / τ.
``--use-interp`` then mixes in the kNN-LM distribution of the same neighbours (spec §5.5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trime import io
from trime.checkpoint import DICT, load_model, model_fingerprint
from trime.config import EvalConfig
from trime.data.blocks import eval_windows, input_tokens
from trime.errors import CheckpointError
from trime.memory.cache import MemoryFIFO
from trime.memory.joint import combine, score_stats
from trime.train import autocast, autocast_dtype, pick_device

LN2 = math.log(2)
PAD = 1


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


def _check_vocabulary(data_dir: Path, ckpt_dir: Path) -> None:
    from trime.data.prepare import load_dictionary

    ckpt_dict = ckpt_dir / DICT
    if not ckpt_dict.exists():
        return  # e.g. a bare fairseq checkpoint: its embedding size is checked instead
    from trime.data.dictionary import Dictionary

    if Dictionary.load(ckpt_dict).symbols != load_dictionary(data_dir).symbols:
        raise CheckpointError(f"{data_dir}/dict.txt differs from the checkpoint's dictionary {ckpt_dict}: "
                              "prepare the data with `trime data prepare ... --dict` from the checkpoint")


class Scorer:
    """Scores windows one batch at a time, keeping the long-term FIFO between windows.

    With a ``writer`` (trime.memory.neighbors.NeighborCacheWriter) it also records, per scored
    token, what re-scoring at another τ, λ or T needs (``trime sweep``).
    """

    def __init__(self, model, cfg: EvalConfig, fingerprint: str | None = None, writer=None):
        self.model, self.cfg, self.writer = model, cfg, writer
        self.fifo = MemoryFIFO(cfg.mem_size) if cfg.use_long else None
        self.external = None
        if cfg.use_external or cfg.use_interp:
            from trime.external import ExternalMemory

            self.external = ExternalMemory.open(cfg, model.cfg, fingerprint)

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, labels: torch.Tensor, n_ctx: list[int], n_score: list[int]) -> torch.Tensor:
        """Natural-log probabilities of the scored targets of a batch of windows, in order.

        inputs, labels: (b, T); labels hold the token after every position (context included), pad after the end.
        """
        from trime.external import select_keys

        out = self.model(inputs)
        keys = select_keys(out, self.cfg.knn_keytype)  # (b, T, d)
        spans = [torch.arange(c, c + n, device=inputs.device) for c, n in zip(n_ctx, n_score)]
        w_idx = torch.cat([torch.full_like(r, w) for w, r in enumerate(spans)])  # (n_all,)
        p_idx = torch.cat(spans)  # (n_all,)
        targets = labels[w_idx, p_idx]
        tok_logp, log_z = self.model.head.target_logp(out.h[w_idx, p_idx], targets, tail_quirk=self.cfg.original_tail_quirk)
        if not (self.cfg.use_local or self.external is not None or self.writer is not None):
            return tok_logp
        results, a = [], 0
        for w, rows in enumerate(spans):
            b = a + len(rows)
            results.append(self.with_memory(keys[w], labels[w], rows, targets[a:b], tok_logp[a:b], log_z[a:b]))
            a = b
        return torch.cat(results)

    def memory_scores(self, keys, labels, rows, targets) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Raw scores q_i·k_j/√d (n, M) of local then long entries (−inf = invisible) and their values (M,)."""
        if not self.cfg.use_local:
            return None, None
        queries = keys[rows].float()  # (n, d)
        scale = 1.0 / math.sqrt(queries.shape[-1])
        T = int((labels != PAD).sum())
        local = queries @ keys[:T].float().T * scale  # (n, T)
        visible = torch.arange(T, device=local.device).view(1, -1) < rows.view(-1, 1)
        parts, values = [local.masked_fill(~visible, float("-inf"))], [labels[:T]]
        if self.fifo is not None:
            if len(self.fifo):
                mem_keys, mem_vals = self.fifo.entries()
                parts.append(queries @ mem_keys.float().T * scale)  # (n, M_long): all visible
                values.append(mem_vals.to(labels.device))
            self.fifo.append(keys[rows].detach(), targets)
        return torch.cat(parts, 1), torch.cat(values)

    def with_memory(self, keys, labels, rows, targets, tok_logp, log_z) -> torch.Tensor:
        cfg = self.cfg
        raw, values = self.memory_scores(keys, labels, rows, targets)
        nb = self.external.search(keys[rows].float()) if self.external is not None else None
        stats = []
        if raw is not None:
            stats.append(score_stats(raw / cfg.softmax_temp, values, targets))
        if cfg.use_external:
            from trime.external import joint_scores

            stats.append(score_stats(joint_scores(nb, keys.shape[-1], cfg.softmax_temp), nb.values, targets))
        logp = tok_logp
        if stats:
            log_zc = torch.logsumexp(torch.stack([s[0] for s in stats]), dim=0)
            log_pos = torch.logsumexp(torch.stack([s[1] for s in stats]), dim=0)
            logp = combine(tok_logp, log_z, log_zc, log_pos)
        if cfg.use_interp:
            logp = self.external.interpolate(logp, nb, targets)
        if self.writer is not None:
            ext = (nb.scores.masked_fill(~nb.valid, float("-inf")), nb.values) if nb is not None else (None, None)
            self.writer.add(tok_logp, log_z, targets, raw, values, *ext)
        return logp


def batches(tokens: np.ndarray, windows: np.ndarray, batch_size: int, device):
    """Yield (inputs (b, T), labels (b, T), n_ctx, n_score) for consecutive windows."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        T = int((chunk[:, 1] - chunk[:, 0] + chunk[:, 2]).max())
        inputs = torch.full((len(chunk), T), PAD, dtype=torch.long)
        labels = torch.full((len(chunk), T), PAD, dtype=torch.long)
        for j, (s, e, c) in enumerate(chunk.tolist()):
            inputs[j, : e - s + c] = torch.from_numpy(input_tokens(tokens, s - c, e).astype(np.int64))
            labels[j, : e - s + c] = torch.from_numpy(np.asarray(tokens[s - c : e], dtype=np.int64))
        yield inputs.to(device), labels.to(device), chunk[:, 2].tolist(), (chunk[:, 1] - chunk[:, 0]).tolist()


@contextlib.contextmanager
def _neighbor_writer(cfg: EvalConfig, model_cfg):
    if not cfg.save_neighbors:
        yield None
        return
    from trime.memory.neighbors import NeighborCacheWriter

    meta = {"eval_config": dataclasses.asdict(cfg)}
    with NeighborCacheWriter(cfg.save_neighbors, dim=model_cfg.d_model, ext_in_joint=cfg.use_external,
                             mem_top=cfg.neighbors_top or None, meta=meta, overwrite=True) as writer:
        yield writer


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Score a split of ``cfg.data`` with the checkpoint ``cfg.path`` and the chosen memories."""
    from trime.data.prepare import load_split, read_data_meta

    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(cfg.path, device=device, trust=cfg.trust_checkpoint)
    data_dir = Path(cfg.data)
    _check_vocabulary(data_dir, ckpt_dir)
    tokens = load_split(data_dir, cfg.gen_subset)
    if int(tokens.max(initial=0)) >= model_cfg.vocab_size:
        raise CheckpointError(f"{data_dir}: token ids exceed the model's vocabulary of {model_cfg.vocab_size}")
    if cfg.max_eval_tokens:
        tokens = tokens[: cfg.max_eval_tokens]
    L = cfg.tokens_per_sample or model_cfg.max_positions
    windows = eval_windows(tokens, L, cfg.context_window, cfg.sample_break_mode)
    batch_size = 1 if cfg.use_long else cfg.batch_size
    fingerprint = model_fingerprint(ckpt_dir) if cfg.use_external or cfg.use_interp else None
    with _neighbor_writer(cfg, model_cfg) as writer:
        scorer = Scorer(model, cfg, fingerprint, writer)
        amp = autocast_dtype(cfg.amp, device)
        out = []
        bar = tqdm(total=len(tokens), desc=f"eval {cfg.gen_subset}", unit="tok", dynamic_ncols=True, leave=False,
                   disable=not sys.stderr.isatty())
        for inputs, labels, n_ctx, n_score in batches(tokens, windows, batch_size, device):
            with autocast(device, amp):
                out.append(scorer.score(inputs, labels, n_ctx, n_score).float().cpu())
            bar.update(sum(n_score))
        bar.close()
        if writer is not None:
            writer.finalize()
    logp = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    n = len(logp)
    loss = float(-logp.astype(np.float64).sum() / max(n, 1) / LN2)
    level = read_data_meta(data_dir).get("level", "word")
    result = EvalResult(loss=loss, ppl=2**loss, n_tokens=n, level=level, log_probs=logp)
    if cfg.output_word_probs:
        io.save_npy(cfg.output_word_probs, logp.astype(np.float32))
    return result
