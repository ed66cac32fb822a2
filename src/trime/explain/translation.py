"""``trime explain`` on a translation model: one sentence pair, and for every target token what the datastore did.

The target is the pair's reference (teacher-forced) or, with ``--beam K``, the model's beam hypothesis (decoded
with the memory, as ``trime mt generate`` decodes). Each target position is scored by the combiner
``trime mt generate`` decodes with (mt_generate.memory_combiner over memory.mix), fed once by the
teacher-forced decoder outputs (generate.score_reference); the report records, per position (natural log):

- ``lp`` / ``lp0``: log p(y) with the memory (the combiner's number) and without (the model alone);
- ``p_tok`` and ``p_mem``: p(y) = p_tok + p_mem, the model's part (times 1 − λ) and the part of the
  neighbours whose token is y; ``share``: λ (kNN-MT) or the neighbours' share Z_c / (Z_t + Z_c) (TrimeMT);
- ``nb``: the k neighbours, best first: {row: datastore row, sent/pos: the training pair and target
  position it stores, v: its token, a: raw similarity (inner product, or −squared L2 distance), w: its
  part of p(v)};
- ``alt``: the most likely tokens there, [token, p with, p without].

The memory is the datastore of ``trime mt datastore`` (row r = the r-th target token of its split): with
``--use-interp`` kNN-MT, (1 − λ)·p + λ·p_knn, p_knn ∝ exp(a / T) (λ = ``--lmbda``, T = ``--interp-temp``);
with ``--use-external`` TrimeMT's joint softmax over the model and the neighbours, s = a / (√d·T)
(T = ``--softmax-temp``), or with ``--released`` as the released code decodes (MT spec §9.3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from trime import io
from trime.checkpoint import load_model, model_fingerprint
from trime.config import ExplainConfig, TranslateConfig, backend_fields
from trime.data.dictionary import Dictionary
from trime.data.pairs import KIND as PAIRS_KIND
from trime.data.pairs import PairSplit, check_pair_vocabulary, load_pair_split, read_pairs_meta
from trime.device import pick_device
from trime.errors import ConfigError, DataError
from trime.generate import BeamConfig, beam_search, score_reference, vanilla
from trime.memory.external import ExternalMemory
from trime.memory.joint import memory_logits
from trime.memory.mix import joint_breakdown, knn_weights
from trime.mt_generate import SPECIALS, memory_combiner, open_external


def is_pairs_dir(data: str) -> bool:
    """Whether ``data`` is a prepared pairs directory (a translation job), read from its meta.json."""
    meta = Path(data) / io.META
    return bool(data) and meta.is_file() and io.read_json(meta).get("kind") == PAIRS_KIND


def _mode(cfg: ExplainConfig) -> str:
    """The memory_combiner mode of the memory flags: '' (none), knn, trime or trime_released."""
    if cfg.use_local or cfg.use_long or cfg.text:
        raise ConfigError("a translation model is explained on a sentence of DATA with its datastore: "
                          "--use-local/--use-long/--text are for language models")  # fmt: skip
    if cfg.use_external and cfg.use_interp:
        raise ConfigError("translation: --use-interp (kNN-MT) or --use-external (TrimeMT), not both")
    return "knn" if cfg.use_interp else ("trime_released" if cfg.released else "trime") if cfg.use_external else ""


def translate_config(cfg: ExplainConfig, mode: str) -> TranslateConfig:
    """The ``trime mt generate`` config that decodes with the memory of ``cfg``."""
    temp = cfg.interp_temp if mode == "knn" else cfg.softmax_temp
    return TranslateConfig(data=cfg.data, path=cfg.path, gen_subset=cfg.gen_subset, dstore=cfg.dstore,
                           indexfile=cfg.indexfile, knn_mode=mode, k=cfg.k, probe=cfg.probe, lmbda=cfg.lmbda,
                           knn_temp=temp, device=cfg.device, trust_checkpoint=cfg.trust_checkpoint,
                           **backend_fields(cfg))  # fmt: skip


class _RecordingSearch:
    """ExternalMemory.search that keeps what it returned and the datastore rows behind it."""

    def __init__(self, external: ExternalMemory):
        self.external = external
        self.scores = self.values = self.rows = None

    def __call__(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.scores, self.values, self.rows = self.external.search_rows(queries)  # (n, k) each, best first
        return self.scores, self.values


class _RecordingCombiner:
    """A combiner (generate.combiners) that keeps its last call: h, log p without and with memory."""

    def __init__(self, combiner):
        self.combiner = combiner
        self.h = self.logp0 = self.logp = None

    def __call__(self, step: int, h: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        self.h, self.logp0 = h, logp.float()
        self.logp = self.combiner(step, h, logp).float()
        return self.logp


def votes(mode: str, tcfg: TranslateConfig, dim: int, tok_logp, log_z, scores) -> tuple[torch.Tensor, ...]:
    """(the model's part of p(y) (n,), each neighbour's part of p(its token) (n, k), the memory's share (n,))
    of the combiner's mixture (generate.memory.MemoryCombiner), from the memory.mix functions it uses.
    tok_logp (n,) log p_vocab(y), log_z (n,) log Z_t, scores (n, k) raw similarities (−inf holes)."""
    empty = ~torch.isfinite(scores).any(1)  # (n,) rows the combiner leaves to the model alone
    if mode == "knn":
        lam = torch.where(empty, 0.0, tcfg.lmbda)  # (n,)
        w = knn_weights(memory_logits(scores, None, tcfg.knn_temp)) * lam[:, None]
        return tok_logp.float().exp() * (1 - lam), w, lam
    s = memory_logits(scores, dim, tcfg.knn_temp)  # a / (√d·T)
    log_tok, log_parts, log_share = joint_breakdown(tok_logp, log_z, s)
    w = log_parts.exp() if mode == "trime" else knn_weights(s)  # released: (1 − λ)·p_vocab + p_knn
    return log_tok.exp(), w, log_share.exp()


def _strings(d: Dictionary) -> list[str]:
    return ["</s>" if i == d.eos else s for i, s in enumerate(d.symbols)]


def _r(x: float, n: int = 6) -> float | None:
    return round(float(x), n) if math.isfinite(x) else None


def _dstore_split(cfg: ExplainConfig, external: ExternalMemory) -> tuple[PairSplit | None, str]:
    """(the pairs split the datastore's rows come from, "") or (None, why neighbours have no text and the fix)."""
    split, fp = external.meta.get("split"), external.meta.get("split_fingerprint")
    if external.meta.get("grown_from"):
        return None, (f"The datastore {cfg.dstore} grew by trime mt datastore --add: its neighbours are shown "
                      "without their training pairs")  # fmt: skip
    if not split or not fp:
        return None, (f"The datastore {cfg.dstore} does not record which split its rows come from: rebuild it with "
                      "`trime mt datastore` to see each neighbour's sentence pair.")  # fmt: skip
    for where in [cfg.dstore_data] if cfg.dstore_data else [cfg.data]:
        meta = read_pairs_meta(where)
        have = meta["splits"].get(split, {}).get(meta["langs"]["target"], {}).get("fingerprint")
        if have == fp:
            return load_pair_split(where, split), ""
        if cfg.dstore_data:
            raise DataError(f"--dstore-data {where}: its {split!r} split is not the one the datastore {cfg.dstore} "
                            "was built from; pass the pairs directory the datastore was built from")  # fmt: skip
    return None, (f"The datastore was built from another {split!r} split than {cfg.data}'s: pass its pairs "
                  "directory as --dstore-data DIR to see each neighbour's sentence pair.")  # fmt: skip


def _neighbours(search: _RecordingSearch, w: torch.Tensor, dsplit: PairSplit | None) -> tuple[list, dict]:
    """(per target position its neighbours (the module docstring's ``nb``), {training pair: [source ids, target
    ids]} of the pairs they name); without ``dsplit`` (the datastore's split) a neighbour names no pair."""
    out, pairs = [], {}
    for rows, a, v, ws in zip(*(x.tolist() for x in (search.rows, search.scores, search.values, w))):
        nb = []
        for row, at, vt, wt in zip(rows, a, v, ws):
            if row < 0:
                continue  # an index hole
            e = {"row": row, "v": vt, "a": _r(at, 4), "w": _r(wt)}
            if dsplit is not None:
                sent = int(np.searchsorted(dsplit.tgt_offsets, row, side="right")) - 1
                e.update(sent=sent, pos=row - int(dsplit.tgt_offsets[sent]))
                if sent not in pairs:
                    pairs[sent] = [dsplit.source(sent).tolist(), dsplit.target(sent).tolist()]
            nb.append(e)
        out.append(nb)
    return out, pairs


@torch.no_grad()
def explain_translation(cfg: ExplainConfig) -> dict:
    """The report's data (module docstring) of pair ``cfg.sentence`` of ``cfg.gen_subset``."""
    mode = _mode(cfg)
    device = pick_device(cfg.device)
    model, model_cfg, ckpt_dir = load_model(cfg.path, task="mt", device=device, trust=cfg.trust_checkpoint)
    fingerprint = model_fingerprint(ckpt_dir)
    src_dict, tgt_dict = check_pair_vocabulary(cfg.data, model_cfg.src_vocab_size, model_cfg.tgt_vocab_size)
    split = load_pair_split(cfg.data, cfg.gen_subset)
    if cfg.sentence >= len(split):
        raise DataError(f"--sentence {cfg.sentence}: the {cfg.gen_subset!r} split has {len(split)} pairs")
    tcfg = translate_config(cfg, mode) if mode else None
    external = open_external(tcfg, model_cfg, fingerprint) if tcfg else None
    search = _RecordingSearch(external) if external else None
    combiner = memory_combiner(tcfg, model, model_cfg, fingerprint, search=search) if tcfg else vanilla
    src = torch.tensor(split.source(cfg.sentence), dtype=torch.long, device=device)[None]  # (1, S)
    ref = torch.tensor(split.target(cfg.sentence), dtype=torch.long)
    target, baseline = ref, None
    if cfg.beam:
        beam = BeamConfig(beam=cfg.beam)
        target = beam_search(model, src, beam, combiner, **SPECIALS, unk=Dictionary.unk)[0][0].tokens.cpu()
        if tcfg:  # what the model translates alone, for comparison
            baseline = beam_search(model, src, beam, **SPECIALS, unk=Dictionary.unk)[0][0].tokens.tolist()
    rec = _RecordingCombiner(combiner)
    scored = score_reference(model, src, target[None].to(device), rec, **SPECIALS)[0]
    y = target.to(device)
    lp, lp0 = scored.positional_scores, rec.logp0.gather(1, y[:, None])[:, 0]  # (T,)
    n = len(y)
    tok_logp, log_z = model.head.target_logp(rec.h, y)
    if search is not None:
        p_tok, w, share = votes(mode, tcfg, model_cfg.decoder_embed_dim, tok_logp, log_z, search.scores.float())
        voted = search.values == y[:, None]  # (T, k)
        p_mem = torch.where(voted, w, 0.0).sum(1)
    else:
        p_tok, share, p_mem = lp.exp(), torch.zeros(n), torch.zeros(n)
    alt_p, alt_tok = rec.logp.exp().topk(min(cfg.top, rec.logp.shape[1]), dim=1)  # (T, top)
    alt_p0 = rec.logp0.exp().gather(1, alt_tok)
    dsplit, note = _dstore_split(cfg, external) if external else (None, "")
    nbs, sentences, grid = [[] for _ in range(n)], {}, None
    if search is not None:
        nbs, sentences = _neighbours(search, w, dsplit)
        grid = rescoring_grid(tcfg, lambda c, s: memory_combiner(c, model, model_cfg, fingerprint, search=s), rec.h,
                              rec.logp0, y, search.scores, search.values)  # fmt: skip
    tokens = [{
        "tok": int(y[t]), "lp": _r(lp[t], 5), "lp0": _r(lp0[t], 5), "p_tok": _r(p_tok[t]), "p_mem": _r(p_mem[t]),
        "share": _r(share[t], 4), "nb": nbs[t],
        "alt": [[int(k), _r(p, 5), _r(p0, 5)] for k, p, p0 in zip(alt_tok[t].tolist(), alt_p[t].tolist(),
                                                                  alt_p0[t].tolist())],
    } for t in range(n)]  # fmt: skip
    src_ids = split.source(cfg.sentence).tolist() + [i for s in sentences.values() for i in s[0]]
    tgt_ids = ref.tolist() + target.tolist() + (baseline or []) + [i for s in sentences.values() for i in s[1]]
    tgt_ids += [x["v"] for tk in tokens for x in tk["nb"]] + [a[0] for tk in tokens for a in tk["alt"]]
    ss, ts = _strings(src_dict), _strings(tgt_dict)
    total, total0 = float(lp.sum()), float(lp0.sum())
    what = f"beam hypothesis (beam {cfg.beam})" if cfg.beam else "reference"
    summary = {
        "task": "translation",
        "model": str(cfg.path),
        "source": f"{cfg.data} ({cfg.gen_subset}), pair {cfg.sentence}",
        "target": what,
        "mode": mode,
        "n_tokens": n,
        "lp": _r(total, 4),
        "lp0": _r(total0, 4),
        "helped": int((lp > lp0).sum()),
        "settings": _settings(tcfg, model_cfg.decoder_embed_dim) if tcfg else {},
        "datastore_split": external.meta.get("split") if external else None,
        "metric": io.read_json(f"{cfg.indexfile}.json").get("metric") if external else None,  # the index's sidecar
        "line": f"log p of the {what} with memory: {total:.3f}, without: {total0:.3f} ({n} tokens)",
    }
    return {
        "summary": summary,
        "src": split.source(cfg.sentence).tolist(),
        "ref": ref.tolist(),
        "tgt": target.tolist(),
        "baseline": baseline,
        "tokens": tokens,
        "sentences": {str(k): v for k, v in sentences.items()},
        "src_vocab": {str(i): ss[i] for i in sorted(set(src_ids))},
        "tgt_vocab": {str(i): ts[i] for i in sorted(set(tgt_ids))},
        "grid": grid,
        "notes": [note] if note else [],
        "config": asdict(cfg),
    }


def rescoring_grid(tcfg: TranslateConfig, combiner_of, h, logp0, y, scores, values) -> dict:
    """log p of each target token (T,) at other k, λ, T (the page's controls): {"k", "lmbda", "T": the values,
    "lp": [k][λ][T] lists}. The decoding combiner (``combiner_of(config, search)``) on the same decoder outputs,
    with the first k of the retrieved neighbours (a search for fewer returns the first of these, ties aside)."""
    ks = sorted({max(1, scores.shape[1] >> i) for i in range(5)})
    temps = sorted({round(tcfg.knn_temp * f, 6) for f in (0.1, 0.3, 1.0, 3.0, 10.0)})
    lams = sorted({i / 10 for i in range(11)} | {tcfg.lmbda}) if tcfg.knn_mode == "knn" else [tcfg.lmbda]
    lp = [[[None] * len(temps) for _ in lams] for _ in ks]
    for a, k in enumerate(ks):
        first = (scores[:, :k], values[:, :k])
        for b, lam in enumerate(lams):
            for c, t in enumerate(temps):
                combiner = combiner_of(replace(tcfg, k=k, lmbda=lam, knn_temp=t), lambda q, first=first: first)
                lp[a][b][c] = [_r(x, 5) for x in combiner(-1, h, logp0).gather(1, y[:, None])[:, 0].tolist()]
    return {"k": ks, "lmbda": lams, "T": temps, "lp": lp}


def _settings(tcfg: TranslateConfig, dim: int) -> dict:
    s = {"knn_mode": tcfg.knn_mode, "k": tcfg.k, "probe": tcfg.probe, "T": tcfg.knn_temp}
    if tcfg.knn_mode == "knn":
        s["lmbda"] = tcfg.lmbda
    else:
        s["score"] = f"a/(sqrt({dim})*T)"
    return {**s, "dstore": tcfg.dstore, "indexfile": tcfg.indexfile}
