"""``trime explain``: score a text as ``trime eval`` does and record, for every token, what memory did.

For each scored position i with target y (all numbers natural log / probabilities):

- ``lp``: log p(y) with the memories of the config: evaluation's number (evaluate.Scorer's row
  builder and memory.scoring.log_probs, the functions ``trime eval`` uses);
- ``lp0``: log p_tok(y), the model without memory (what ``trime eval`` gives with no memory flag);
- ``share``: the memories' share of the joint softmax's normaliser, Z_c / (Z_tok + Z_c), at τ;
- ``p_tok`` and ``p_mem``: p(y) = p_tok + p_mem, the part from the output layer (times 1 − λ) and the
  part the memory entries labelled y contribute (their joint-softmax mass times 1 − λ, plus λ times
  their kNN-LM weight);
- ``mem``: the top entries labelled y, each {m: local | long | ext, w: its part of p(y), s: its score
  (q·k/√d/τ in the joint softmax; the raw similarity for an external neighbour), pos: the stream
  position it stores (local, long) or the datastore row (ext)};
- ``alt``: the most likely tokens with memory, [token, p with, p without].

External neighbours are datastore rows; row r is the r-th scored position of the split the datastore
was built from (trime.datastore_build), named with its fingerprint in the datastore's meta.json.
With ``--dstore-data`` (that split's prepared data directory, checked against the fingerprint) each
row gets the text around it; without, the report says which column it cannot show and how to fix it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import torch

from trime import io
from trime.config import ExplainConfig
from trime.data.batching import make_batch
from trime.data.dictionary import Dictionary
from trime.data.hf_text import choose_pad
from trime.data.prepare import load_split, read_data_meta
from trime.device import autocast, autocast_dtype
from trime.errors import ConfigError, DataError
from trime.evaluate import Scorer
from trime.explain.html import render
from trime.explain.mt_html import render_translation
from trime.explain.translation import explain_translation, is_pairs_dir
from trime.generate.lm import HFCodec, is_byte_dictionary, job_codec
from trime.jobs import Job, open_model
from trime.memory.datastore import sources
from trime.memory.external import ExternalMemory
from trime.memory.joint import memory_logits, score_scale
from trime.memory.mix import joint_breakdown, knn_weights
from trime.memory.scoring import StepRows, log_probs, vocab_log_probs

KINDS = ("local", "long", "ext")


class _RecordingExternal:
    """ExternalMemory.search that also keeps the datastore rows it returned (best first)."""

    def __init__(self, external: ExternalMemory):
        self.external = external
        self.ids: torch.Tensor | None = None

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, values, ids = self.external.search_rows(queries)
        scores, order = scores.sort(dim=1, descending=True, stable=True)  # the order MemoryRows.build keeps
        self.ids = ids.gather(1, order.to(ids.device))
        return scores, values.gather(1, order.to(values.device))


def token_strings(d: Dictionary) -> list[str]:
    """How each token id is shown: the word, or for byte-level data the character (\\xNN if unprintable)."""
    if not is_byte_dictionary(d):
        return ["\n" if i == d.eos else s for i, s in enumerate(d.symbols)]
    out = []
    for i, s in enumerate(d.symbols):
        if i == d.eos:
            out.append("\n")
        elif s.isdigit() and int(s) < 256:
            b = int(s)
            out.append(chr(b) if 32 <= b < 127 else f"\\x{b:02x}")
        else:
            out.append(s)
    return out


def _settings(cfg: ExplainConfig) -> dict:
    s = {
        "context_window": cfg.context_window,
        "tokens_per_sample": cfg.tokens_per_sample,
        "knn_keytype": cfg.knn_keytype,
    }
    if cfg.use_local:
        s["use_local"] = True
        s["softmax_temp"] = cfg.softmax_temp
    if cfg.use_long:
        s.update(use_long=True, mem_size=cfg.mem_size)
    if cfg.use_external or cfg.use_interp:
        s.update(dstore=cfg.dstore, indexfile=cfg.indexfile, k=cfg.k, probe=cfg.probe)
    if cfg.use_external:
        s.update(use_external=True, softmax_temp=cfg.softmax_temp)
    if cfg.use_interp:
        s.update(use_interp=True, lmbda=cfg.lmbda, interp_temp=cfg.interp_temp)
    return s


def _dstore_text(cfg: ExplainConfig, external: ExternalMemory | None) -> tuple[np.ndarray | None, str]:
    """(the tokens the datastore's rows come from, "") or (None, why the snippet column is empty and how to
    fill it). A grown datastore (trime datastore add) is the concatenation of its sources' splits."""
    if external is None:
        return None, ""
    texts = [(s.get("split"), s.get("split_fingerprint")) for s in sources(external.meta)]
    if not all(split and fp for split, fp in texts):
        return None, (
            f"The datastore {cfg.dstore} does not record which split its rows come from, so external "
            "neighbours are shown without their text. Rebuild it with `trime datastore build` (which records "
            "the split and its fingerprint) and pass --dstore-data DIR."
        )
    names = " + ".join(repr(split) for split, _ in texts)
    if not cfg.dstore_data:
        return None, (
            f"External neighbours are shown without their text: pass --dstore-data DIR, the prepared data "
            f"directory of the datastore's {names} split{'s' if len(texts) > 1 else ''}, to see the text around each one."
        )
    splits = read_data_meta(cfg.dstore_data).get("splits", {})
    for split, fp in texts:
        have = splits.get(split, {}).get("fingerprint")
        if have != fp:
            raise DataError(
                f"--dstore-data {cfg.dstore_data}: its {split!r} split (fingerprint {have}) is not the one the "
                f"datastore {cfg.dstore} was built from ({fp}); pass the data directory the datastore was built from"
            )
    return np.concatenate([load_split(cfg.dstore_data, split) for split, _ in texts]), ""


def _load_tokens(cfg: ExplainConfig, job: Job, codec) -> tuple[np.ndarray, str]:
    if cfg.text:
        text = cfg.text if cfg.text.endswith("\n") else cfg.text + "\n"  # every line ends with </s>, as in data
        return np.asarray(codec.encode(text), dtype=np.int32), "--text"
    return np.asarray(job.split(cfg.gen_subset, cfg.max_eval_tokens)), f"{cfg.data} ({cfg.gen_subset})"


def _round(x: float, n: int = 5) -> float | None:
    return None if not math.isfinite(x) else round(float(x), n)


@torch.no_grad()
def explain_tokens(cfg: ExplainConfig) -> dict:
    """The report's data (module docstring): {"summary", "tokens", "vocab", "notes", "dstore_snippets"}."""
    job = open_model(cfg, data=cfg.data)
    model, model_cfg, device, codec = job.model, job.model_cfg, job.device, job_codec(job, cfg.data)
    tokens, source = _load_tokens(cfg, job, codec)
    if len(tokens) == 0:
        raise DataError(f"{source}: nothing to score")
    dim, V = model_cfg.d_model, model_cfg.vocab_size
    if isinstance(codec, HFCodec) and not cfg.data:  # a tokenizer's ids have no pad: one the text never uses
        job.specials = choose_pad(None, np.bincount(tokens, minlength=V)), codec.eos
    pad, eos = job.pad_eos
    windows = job.windows(tokens, cfg.sample_break_mode)
    external = job.external()
    recorder = _RecordingExternal(external) if external is not None else None
    dstore_tokens, dstore_note = _dstore_text(cfg, external)
    scorer = Scorer(model, cfg, dim=dim, pad=pad, external=recorder)
    setting = scorer.setting
    memory = cfg.use_local or recorder is not None
    fifo_pos = torch.empty(0, dtype=torch.long)  # stream positions of the FIFO's entries, oldest first
    amp = autocast_dtype(cfg.amp, device)
    out_tokens, ext_rows = [], set()
    lam = setting.lmbda
    for s, e, c in windows.tolist():
        batch = make_batch(tokens, [(s, e, c)], pad=pad, eos=eos, device=device)
        with autocast(device, amp):
            out = model(batch.inputs)
        keys = out.q if cfg.knn_keytype == "last_ffn_input" else out.h
        rows = torch.arange(c, c + e - s, device=device)
        labels = batch.targets[0]
        targets = labels[rows]
        h = out.h[0, rows]
        tok_logp, log_z = model.head.target_logp(h, targets, tail_quirk=cfg.original_tail_quirk)
        vocab_tok = model.head.log_probs(h).float()  # (n, V)
        n = len(rows)
        if memory:
            r = scorer.window_rows(keys[0], labels, rows, tok_logp, log_z)
            lp = log_probs(r, [setting], dim)[0]
            T = int((labels != pad).sum()) if cfg.use_local else 0  # local entries: the window's tokens
            mem_values = labels[:T]
            kinds = torch.zeros(T, dtype=torch.long)
            pos = torch.arange(s - c, s - c + T)
            if scorer.fifo is not None and len(scorer.fifo):
                mem_values = torch.cat([mem_values, scorer.fifo.entries()[1].to(device)])
                kinds = torch.cat([kinds, torch.ones(len(scorer.fifo), dtype=torch.long)])
                pos = torch.cat([pos, fifo_pos[-len(scorer.fifo) :]])
            k = r.ext_scores.shape[1]
            step = StepRows(
                vocab_tok, log_z, r.mem_scores, mem_values.expand(n, -1), r.ext_scores, r.ext_values, n_local=T
            )
            vocab = vocab_log_probs(step, setting, dim)  # (n, V) with memory
            # parts of p(y) (memory.mix.joint_breakdown): the joint softmax's terms times (1 − λ); kNN weights times λ
            joint = r.mem_scores.float() * score_scale(None, setting.softmax_temp)  # (n, m)
            ext_joint = memory_logits(r.ext_scores, dim, setting.softmax_temp) if setting.ext_in_joint and k else None
            entries = torch.cat([joint] + ([ext_joint] if ext_joint is not None else []), 1)  # (n, m [+ k])
            log_tok_part, log_parts, log_share = joint_breakdown(tok_logp, log_z, entries)
            w_mem = log_parts[:, : joint.shape[1]].exp() * (1 - lam)  # (n, m)
            w_ext = torch.zeros_like(r.ext_scores)
            if ext_joint is not None:
                w_ext = w_ext + log_parts[:, joint.shape[1] :].exp() * (1 - lam)
            if lam > 0 and k:
                w_ext = w_ext + knn_weights(r.ext_scores * score_scale(None, setting.interp_temp)) * lam
            share = log_share.exp()
            p_tok = log_tok_part.exp() * (1 - lam)
            vote_mem = torch.where(r.mem_pos, w_mem, 0.0)
            vote_ext = torch.where(r.ext_values == targets[:, None], w_ext, 0.0)
            p_mem = vote_mem.sum(1) + vote_ext.sum(1)
            top_mem = vote_mem.topk(min(cfg.top, vote_mem.shape[1]), dim=1) if vote_mem.shape[1] else None
            top_ext = vote_ext.topk(min(cfg.top, k), dim=1) if k else None
            ext_ids = recorder.ids if recorder is not None else None
        else:
            lp, vocab = tok_logp.float(), vocab_tok
            share = p_mem = torch.zeros(n)
            p_tok = tok_logp.float().exp()
            top_mem = top_ext = None
        alt_p, alt_tok = vocab.exp().topk(min(cfg.top, V), dim=1)
        alt_p0 = vocab_tok.exp().gather(1, alt_tok)
        if top_mem is not None:  # per window, as Python lists: (n, top) weights, scores, kinds, positions
            kind_l, pos_l = kinds.tolist(), pos.tolist()
            mem_w, mem_j = top_mem.values.tolist(), top_mem.indices.tolist()
            mem_s = joint.gather(1, top_mem.indices).tolist()
        if top_ext is not None:
            ext_w, ext_s = top_ext.values.tolist(), r.ext_scores.gather(1, top_ext.indices).tolist()
            ext_r = ext_ids.gather(1, top_ext.indices.to(ext_ids.device)).tolist()
        for a in range(n):
            entries = []
            if top_mem is not None:
                for w, j, sc in zip(mem_w[a], mem_j[a], mem_s[a]):
                    if w > 0:
                        entries.append({"m": KINDS[kind_l[j]], "w": _round(w, 6), "s": _round(sc), "pos": pos_l[j]})
            if top_ext is not None:
                for w, sc, row in zip(ext_w[a], ext_s[a], ext_r[a]):
                    if w > 0:
                        ext_rows.add(row)
                        entries.append({"m": "ext", "w": _round(w, 6), "s": _round(sc), "pos": row})
            entries.sort(key=lambda x: -x["w"])
            out_tokens.append(
                {
                    "tok": int(targets[a]),
                    "lp": _round(float(lp[a])),
                    "lp0": _round(float(tok_logp[a])),
                    "share": _round(float(share[a]), 4),
                    "p_tok": _round(float(p_tok[a]), 6),
                    "p_mem": _round(float(p_mem[a]), 6),
                    "mem": entries[: cfg.top],
                    "alt": [
                        [int(t), _round(float(p), 5), _round(float(p0), 5)]
                        for t, p, p0 in zip(alt_tok[a].tolist(), alt_p[a].tolist(), alt_p0[a].tolist())
                    ],
                }
            )
        if scorer.fifo is not None:  # the window's scored positions join the long-term memory after scoring
            scorer.fifo.append(keys[0, rows].detach(), targets)
            fifo_pos = torch.cat([fifo_pos, torch.arange(s, e)])[-cfg.mem_size :]
    lp = np.array([t["lp"] if t["lp"] is not None else -np.inf for t in out_tokens], dtype=np.float64)
    lp0 = np.array([t["lp0"] if t["lp0"] is not None else -np.inf for t in out_tokens], dtype=np.float64)
    symbol = codec.symbol if isinstance(codec, HFCodec) else token_strings(codec.d).__getitem__
    snippets = {}
    if dstore_tokens is not None:
        for row in sorted(ext_rows):
            a, b = max(0, row - cfg.snippet), min(len(dstore_tokens), row + cfg.snippet + 1)
            snippets[str(row)] = [a, [int(t) for t in dstore_tokens[a:b]]]
    notes = [dstore_note] if dstore_note else []
    if cfg.original_tail_quirk:
        notes.append("--original-tail-quirk: the competing tokens use the true adaptive-softmax distribution.")
    used = sorted({t for t in tokens.tolist()} | {t for x in out_tokens for t, _, _ in x["alt"]})
    used += sorted({t for sn in snippets.values() for t in sn[1]} - set(used))
    summary = {
        "n_tokens": len(out_tokens),
        "ppl": _round(float(np.exp(-lp.mean())), 4),  # None (JSON null) if a token had probability 0
        "ppl0": _round(float(np.exp(-lp0.mean())), 4),
        "model": str(cfg.path),
        "source": source,
        "level": "hf" if isinstance(codec, HFCodec) else "char" if is_byte_dictionary(codec.d) else "word",
        "settings": _settings(cfg),
        "memories": [m for m, on in zip(KINDS, (cfg.use_local, cfg.use_long, external is not None)) if on],
        "datastore_split": " + ".join(str(s["split"]) for s in sources(external.meta)) if external else None,
    }
    summary["line"] = (
        f"Perplexity with memory: {summary['ppl'] or math.inf:.2f}, without: {summary['ppl0'] or math.inf:.2f}"
    )
    return {
        "summary": summary,
        "tokens": out_tokens,
        "text": tokens.tolist(),
        "vocab": {str(t): symbol(t) for t in used},
        "snippets": snippets,
        "notes": notes,
        "config": asdict(cfg),
    }


def explain(cfg: ExplainConfig) -> dict:
    """Write the HTML report (and the JSON with ``cfg.json``); returns the report's data. DATA a pairs
    directory: a translation model's report on one sentence (trime.explain.translation)."""
    io.check_output_file(cfg.out, io.HTML_REPORT)  # both refused before the work if they are a user's
    if cfg.json:
        io.check_output_file(cfg.json, io.JSON_REPORT)
    if is_pairs_dir(cfg.data):
        report, page = explain_translation(cfg), render_translation
    elif cfg.sentence or cfg.beam or cfg.released:
        raise ConfigError("--sentence/--beam/--released explain a translation model: DATA must be a pairs directory")
    else:
        report, page = explain_tokens(cfg), render
    if cfg.json:
        with io.output_file(cfg.json, io.JSON_REPORT) as tmp:
            tmp.write_text(json.dumps({"generator": io.GENERATOR, **report}, indent=2, sort_keys=True) + "\n")
    with io.output_file(cfg.out, io.HTML_REPORT) as tmp:
        tmp.write_text(page(report), encoding="utf-8")
    return report
