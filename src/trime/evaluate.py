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
from trime.data.blocks import eval_windows, window
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
    """Scores windows one batch at a time, keeping the long-term FIFO between windows."""

    def __init__(self, model, cfg: EvalConfig, fingerprint: str | None = None):
        self.model, self.cfg = model, cfg
        self.fifo = MemoryFIFO(cfg.mem_size) if cfg.use_long else None
        self.external = None
        if cfg.use_external or cfg.use_interp:
            from trime.external import ExternalMemory

            self.external = ExternalMemory.open(cfg, model.cfg, fingerprint)

    def keys(self, out) -> torch.Tensor:
        return out.q if self.cfg.knn_keytype == "last_ffn_input" else out.h

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, labels: torch.Tensor, n_ctx: list[int], n_score: list[int]) -> torch.Tensor:
        """Natural-log probabilities of the scored targets of a batch of windows, in order.

        inputs, labels: (b, T); labels hold the token after every position (context included), pad after the end.
        """
        out = self.model(inputs)
        keys = self.keys(out)
        results = []
        for w in range(inputs.shape[0]):
            rows = torch.arange(n_ctx[w], n_ctx[w] + n_score[w], device=inputs.device)  # (n,)
            targets = labels[w, rows]
            tok_logp, log_z = self.model.head.target_logp(out.h[w, rows], targets, tail_quirk=self.cfg.original_tail_quirk)
            logp = self.with_memory(keys[w], labels[w], rows, targets, tok_logp, log_z)
            results.append(logp)
        return torch.cat(results)

    def with_memory(self, keys, labels, rows, targets, tok_logp, log_z) -> torch.Tensor:
        cfg = self.cfg
        if not (cfg.use_local or cfg.use_external or cfg.use_interp):
            return tok_logp
        queries = keys[rows].float()  # (n, d)
        scale = 1.0 / math.sqrt(queries.shape[-1]) / cfg.softmax_temp
        stats = []
        if cfg.use_local:
            T = int((labels != PAD).sum())
            s = queries @ keys[:T].float().T * scale  # (n, T)
            visible = torch.arange(T, device=s.device).view(1, -1) < rows.view(-1, 1)
            stats.append(score_stats(s.masked_fill(~visible, float("-inf")), labels[:T], targets))
        if self.fifo is not None:
            mem_keys, mem_vals = self.fifo.entries()
            if mem_keys is not None and len(mem_keys):
                stats.append(score_stats(queries @ mem_keys.float().T * scale, mem_vals, targets))
            self.fifo.append(keys[rows].detach(), targets)
        knn = None
        if self.external is not None:
            from trime.external import joint_scores

            knn = self.external.search(queries)
            if cfg.use_external:
                stats.append(score_stats(joint_scores(knn, queries.shape[-1], cfg.softmax_temp), knn.values, targets))
        if stats:
            log_zc = torch.logsumexp(torch.stack([s[0] for s in stats]), dim=0)
            log_pos = torch.logsumexp(torch.stack([s[1] for s in stats]), dim=0)
            logp = combine(tok_logp, log_z, log_zc, log_pos)
        else:
            logp = tok_logp
        if cfg.use_interp:
            logp = self.external.interpolate(logp, knn, targets)
        return logp


def batches(tokens: np.ndarray, windows: np.ndarray, batch_size: int, device):
    """Yield (inputs (b, T), labels (b, T), n_ctx, n_score) for consecutive windows."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        pairs = [window(tokens, int(s), int(e), int(c)) for s, e, c in chunk]
        T = max(len(p[0]) for p in pairs)
        inputs = torch.full((len(pairs), T), PAD, dtype=torch.long)
        labels = torch.full((len(pairs), T), PAD, dtype=torch.long)
        for j, ((inp, _), (s, e, c)) in enumerate(zip(pairs, chunk)):
            inputs[j, : len(inp)] = torch.from_numpy(inp)
            labels[j, : len(inp)] = torch.from_numpy(np.asarray(tokens[s - c : e], dtype=np.int64))
        yield inputs.to(device), labels.to(device), chunk[:, 2].tolist(), (chunk[:, 1] - chunk[:, 0]).tolist()


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
    scorer = Scorer(model, cfg, fingerprint)
    amp = autocast_dtype(cfg.amp, device)
    out = []
    bar = tqdm(total=len(tokens), desc=f"eval {cfg.gen_subset}", unit="tok", dynamic_ncols=True, leave=False,
               disable=not sys.stderr.isatty())
    for inputs, labels, n_ctx, n_score in batches(tokens, windows, batch_size, device):
        with autocast(device, amp):
            out.append(scorer.score(inputs, labels, n_ctx, n_score).float().cpu())
        bar.update(sum(n_score))
    bar.close()
    logp = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    n = len(logp)
    loss = float(-logp.astype(np.float64).sum() / max(n, 1) / LN2)
    level = read_data_meta(data_dir).get("level", "word")
    result = EvalResult(loss=loss, ppl=2**loss, n_tokens=n, level=level, log_probs=logp)
    if cfg.output_word_probs:
        io.save_npy(cfg.output_word_probs, logp.astype(np.float32))
    return result
