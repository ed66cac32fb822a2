"""The translation job: the paper's MT table (MT spec §11) on one pair corpus, resumable, in one command.

    trime mt reproduce [--preset mt_cpu] [--corpus bible-es-en] [--out runs/mt-reproduce]

1. fetch and prepare the corpus (Moses tokenisation, joint BPE);
2. the BM25 order of the training targets (MT spec §5);
3. train, with the same budget (epochs): a vanilla model (label-smoothed CE) and TrimeMT (``trime_mt``
   on BM25 batches); each keeps its checkpoint_best by validation BLEU, as the original's recipe;
4. a datastore of each over the training targets (teacher-forced decoder outputs) and its faiss index:
   L2 for kNN-MT, inner product for TrimeMT (MT spec §7–8);
5. tune on valid from the references' cached neighbours (``trime sweep``'s machinery, exact because
   references need no beam): kNN-MT's λ and T, TrimeMT's T — by the references' perplexity;
6. decode valid and test with beam search: vanilla, vanilla + kNN-MT, TrimeMT, TrimeMT + external
   memory (the paper's equation, and the released form (1 − λ)·p + p_knn at the same T); sacreBLEU;
7. print the table, write results.json / results.md and bleu.png.

Every stage is skipped when its artifact exists and was made from the same inputs, by content (corpus
files, data, model weights, datastore, index, settings); a stage whose inputs changed is made again
and says so. A rerun after a kill resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trime import config as C
from trime import io
from trime.checkpoint import model_fingerprint
from trime.data.pair_batching import PairData
from trime.data.pair_corpora import PAIR_CORPORA, fetch_pairs
from trime.data.pairs import corpus_files, load_pair_dictionaries, prepare_pairs, read_pairs_meta
from trime.datastore_build import build_mt_datastore
from trime.errors import ConfigError
from trime.evaluate import BACKEND_FIELDS
from trime.generate.beam import BeamConfig
from trime.generate.text import detokenize
from trime.memory.datastore import build_mismatch
from trime.memory.index import build_index
from trime.memory.neighbors import NeighborCache, sweep
from trime.model.encoder_decoder import MTModelConfig
from trime.mt_generate import translate
from trime.pipelines.confidence import ALPHA, Ordering, paired_bleu, verdict
from trime.pipelines.report import plot_bars
from trime.pipelines.reproduce import BUDGET_FREE, claim_out, corpus_dir, plain, slug
from trime.train import PATH_FIELDS, run_differences
from trime.translation import bm25_pair_order, fit_translation

MARKER = "mt-reproduce.json"  # marks an --out directory as this job's


@dataclass
class MTSystem:
    """One row of the table: a trained model decoded with or without the training-set datastore."""

    name: str
    model: str  # vanilla | trime_mt
    memory: str  # as printed in the table
    mode: str | None = None  # knn | trime | trime_released (TranslateConfig.knn_mode); None: no memory
    tune: tuple[str, ...] = ()  # tuned on valid: lmbda, knn_temp
    settings_of: str | None = None  # decoded with the settings another row tuned


SYSTEMS = [
    MTSystem("Transformer (CE)", "vanilla", "none"),
    MTSystem("+ kNN-MT", "vanilla", "external: (1−λ)·p + λ·p_knn, λ fixed", "knn", ("lmbda", "knn_temp")),
    MTSystem("TrimeMT", "trime_mt", "none"),
    MTSystem("TrimeMT + external", "trime_mt", "external: joint softmax, λ dynamic", "trime", ("knn_temp",)),
    MTSystem(
        "TrimeMT + external (released form)",
        "trime_mt",
        "external: (1−λ)·p + p_knn, λ dynamic",
        "trime_released",
        settings_of="TrimeMT + external",
    ),
]
# (better, worse) on test BLEU: the paper's orderings (IWSLT'14 De→En: 32.58 → 33.15 → 33.73)
CLAIMS = [
    ("+ kNN-MT", "Transformer (CE)"),
    ("TrimeMT + external", "+ kNN-MT"),
    ("TrimeMT + external", "TrimeMT"),
    ("TrimeMT + external (released form)", "+ kNN-MT"),
]


class MTPipeline:
    def __init__(
        self,
        preset: str,
        out: Path,
        corpus: str,
        max_epoch: int = 0,
        langs: tuple[str | None, ...] = (),
        max_update: int = 0,
        backend: dict | None = None,
    ):
        p = C.load_preset(preset)
        if p["_source"]["task"] != "translation":
            raise ConfigError(f"preset {preset!r} is a language-model recipe; translation presets: mt_cpu, mt_micro")
        src = p["_source"]["path"]
        self.preset, self.out, self.corpus = preset, out, corpus
        self.langs = tuple(langs) + (None,) * (2 - len(langs))  # --source-lang, --target-lang
        self.model_cfg = C.build(MTModelConfig, p.get("model", {}), source=src)
        self.train_layer = p.get("train", {})
        self.rc = C.build(
            C.MTReproduceConfig,
            p.get("reproduce", {}),
            {"max_epoch": max_epoch, "min_update": 0} if max_epoch else {},  # the epochs asked for, no floor
            {"max_update": max_update} if max_update else {},
            backend or {},
            source=src,
        )
        self.data = out / "data-bin"
        self._per_epoch: dict[str, int] = {}  # updates per epoch of each model's batches (packing them reads the data)
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        print(f"| [{(time.time() - self.t0) / 60:5.1f} min] {msg}", flush=True)

    # 1. data -------------------------------------------------------------------------------
    def corpus_dir(self, fetch_it: bool = True) -> Path | None:
        return corpus_dir(self.corpus, self.out, PAIR_CORPORA, fetch_pairs, "translation corpus", fetch_it)

    def prepare_data(self) -> None:
        self.corpus_dir(fetch_it=False)  # an unknown --corpus is refused before OUT is made
        claim_out(self.out, MARKER, "mt-reproduce")
        src = self.corpus_dir()
        s, t, files = corpus_files(src, *self.langs)
        key = {
            "langs": [s, t],
            "files": {f"{split}.{lang}": io.sha256_file(path) for split, pair in files.items()
                      for lang, path in zip((s, t), pair)},
            "moses": self.rc.moses,
            "bpe_merges": self.rc.bpe_merges,
        }  # fmt: skip
        record = self.out / "data.json"
        if io.is_complete(self.data) and record.exists() and io.read_json(record) == key:
            return
        if io.is_complete(self.data):
            self.say("the corpus or its preparation changed: preparing it again")
        self.say(f"preparing {src} (Moses: {self.rc.moses}, BPE {self.rc.bpe_merges} merges)")
        prepare_pairs(
            src,
            self.data,
            source_lang=s,
            target_lang=t,
            moses=self.rc.moses,
            bpe_merges=self.rc.bpe_merges,
            overwrite=True,
        )
        io.write_json(record, key)

    # 2. models -----------------------------------------------------------------------------
    def bm25_order(self) -> Path:
        path = self.out / "bm25" / "order.json"
        target = read_pairs_meta(self.data)["langs"]["target"]
        setup = {"targets": read_pairs_meta(self.data)["splits"]["train"][target]["fingerprint"]}
        done = self.out / "bm25" / "done.json"
        if path.exists() and done.exists() and io.read_json(done) == setup:
            return path
        if path.parent.exists():
            shutil.rmtree(path.parent)
        self.say("BM25 order of the training targets")
        bm25_pair_order(self.data, path, work_dir=self.out / "bm25" / "work")
        io.write_json(done, setup)
        return path

    def run_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def objective(self, name: str) -> dict:
        """The training settings that make model ``name`` (beyond the preset's [train] table)."""
        if name != "trime_mt":
            return {}
        return {
            "criterion": "trime_mt",
            "temp": self.rc.trime_temp,
            "topk_mem": self.rc.trime_topk,
            "label_smoothing": 0.0,  # the original's trime_mt has none (MT spec §4)
            "predefined_batches": str(self.bm25_order()),
        }

    def train_cfg(self, name: str) -> C.MTTrainConfig:
        extra = self.objective(name)
        layers = {
            **self.train_layer,
            "data": str(self.data),
            "save_dir": str(self.run_dir(name)),
            "max_epoch": 0,
            "max_update": self.budget(),
            "max_time": 0.0,
            **extra,
        }
        return C.build(C.MTTrainConfig, layers)

    def updates_per_epoch(self, name: str) -> int:
        """Updates in one epoch of model ``name``'s training batches (BM25 batches pack differently)."""
        if name not in self._per_epoch:
            cfg = C.build(C.MTTrainConfig, {**self.train_layer, "data": str(self.data)}, self.objective(name))
            limits = (self.model_cfg.max_source_positions, self.model_cfg.max_target_positions)
            batches = PairData.load(cfg, limits, torch.device("cpu")).batches
            self._per_epoch[name] = max(1, len(batches) // cfg.update_freq)
        return self._per_epoch[name]

    def budget(self) -> int:
        """Updates per model, the same for both: ``max_update``, else ``max_epoch`` epochs of the vanilla
        model's batches and at least ``min_update``."""
        if self.rc.max_update:
            return self.rc.max_update
        return max(self.rc.max_epoch * self.updates_per_epoch("vanilla"), self.rc.min_update)

    def train(self, name: str) -> Path:
        """Train (or resume) ``name``; returns its checkpoint_best (by validation BLEU)."""
        run, cfg = self.run_dir(name), self.train_cfg(name)
        src_dict, tgt_dict = load_pair_dictionaries(self.data)
        model_cfg = dataclasses.replace(self.model_cfg, src_vocab_size=len(src_dict), tgt_vocab_size=len(tgt_dict))
        budget = {"max_epoch", "max_update"} if cfg.lr_scheduler in BUDGET_FREE else set()
        ignored = set(PATH_FIELDS) | budget
        diff = run_differences(
            run, model_cfg, cfg, fields=[f.name for f in dataclasses.fields(cfg) if f.name not in ignored]
        )
        if diff:
            self.say(f"{name}: {', '.join(diff)} changed since it was trained: training it again")
            shutil.rmtree(run)
        last = run / "checkpoint_last"
        done = io.read_meta(last)["updates"] if io.is_complete(last) else 0
        if done > cfg.max_update:
            self.say(f"{name}: trained for {done} updates, more than {cfg.max_update}: training it again")
            shutil.rmtree(run)
            done = 0
        if done < cfg.max_update:  # a larger budget continues a smaller one (the schedule does not depend on it)
            self.say(f"training {name} for {cfg.max_update} updates" + (f" (continuing after {done})" if done else ""))
            fit_translation(self.model_cfg, cfg)
        return run / "checkpoint_best"

    # 3. datastores -------------------------------------------------------------------------
    def datastore(self, name: str) -> tuple[Path, Path]:
        """The training-target datastore of model ``name`` and its index (L2 for kNN-MT, IP for TrimeMT)."""
        d = self.out / "dstore" / name
        cfg = C.MTDatastoreConfig(data=str(self.data), path=str(self.run_dir(name) / "checkpoint_best"), out=str(d))
        want = {"model_fingerprint": model_fingerprint(cfg.path)}
        if io.is_complete(d) and build_mismatch(d, want):
            self.say(f"datastore of {name}: the model changed: building it again")
            shutil.rmtree(d)
        if not io.is_complete(d):
            self.say(f"datastore of {name} over the training targets")
            build_mt_datastore(cfg)
        metric = self.rc.knn_metric if name == "vanilla" else "ip"
        index = d / f"knn.index.{metric}"
        if not index.exists():
            self.say(f"faiss index ({metric}) of {name}")
        build_index(
            d,
            index,
            metric=metric,
            probe=self.rc.probe,
            n_lists=self.rc.n_lists or None,
            train_size=self.rc.index_train_size,
            overwrite=True,
        )  # a no-op when the index on disk was built from this datastore with these settings
        return d, index

    # 4. tuning and decoding ----------------------------------------------------------------
    def translate_cfg(self, system: MTSystem, split: str, **kw) -> C.TranslateConfig:
        layers = {
            "data": str(self.data),
            "path": str(self.run_dir(system.model) / "checkpoint_best"),
            "gen_subset": split,
            "max_sentences_total": self.rc.test_sentences,
        }
        if system.mode:
            d, index = self.datastore(system.model)
            k = self.rc.knn_k if system.mode == "knn" else self.rc.trime_k
            layers.update(dstore=str(d), indexfile=str(index), knn_mode=system.mode, k=k, probe=self.rc.probe,
                          **C.backend_fields(self.rc))  # fmt: skip
        return C.build(C.TranslateConfig, layers, kw)

    def inputs(self, cfg: C.TranslateConfig) -> dict:
        """What a result of ``cfg`` is made from, by content: model, data, datastore, index, settings."""
        meta = read_pairs_meta(cfg.data)
        key = {
            "model": model_fingerprint(cfg.path),
            "data": meta["splits"][cfg.gen_subset],
            "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "path", "dstore",
                                                                                       "indexfile", "results_path",
                                                                                       "save_neighbors") + BACKEND_FIELDS},
        }  # fmt: skip
        if cfg.dstore:
            key["datastore"] = io.read_meta(cfg.dstore).get("fingerprint")
            key["index"] = io.read_json(Path(cfg.indexfile).with_name(Path(cfg.indexfile).name + ".json")).get("key")
        return plain(key)

    def tune(self, system: MTSystem) -> dict:
        """Best λ / T on valid by the references' perplexity, re-scored from cached neighbours."""
        if not system.tune:
            return {}
        path = self.out / "evals" / f"{slug(system.name)}.tuned.json"
        cache = self.out / "evals" / f"{slug(system.name)}.neighbors"
        cfg = self.translate_cfg(system, "valid", save_neighbors=str(cache), max_sentences_total=self.rc.tune_sentences)
        if system.mode == "knn":
            grid = [
                {"softmax_temp": 1.0, "lmbda": lam, "interp_temp": t}
                for lam in self.rc.knn_lmbdas
                for t in self.rc.knn_temps
            ]
        else:
            grid = [{"softmax_temp": t} for t in self.rc.trime_temps]
        key = plain({"inputs": self.inputs(cfg), "grid": grid})
        if path.exists() and io.read_json(path).get("key") == key:
            return io.read_json(path)["best"]
        made_from = cache.with_name(cache.name + ".inputs.json")
        if not (io.is_complete(cache) and made_from.exists() and io.read_json(made_from) == key["inputs"]):
            self.say(f"{system.name}: caching the neighbours of the valid references")
            translate(cfg)
            io.write_json(made_from, key["inputs"])
        rows = sweep(NeighborCache.load(cache), grid, ext_in_joint=system.mode != "knn")
        best = min(rows, key=lambda r: r["loss"])
        best = {"knn_temp": best["interp_temp" if system.mode == "knn" else "softmax_temp"]} | (
            {"lmbda": best["lmbda"]} if system.mode == "knn" else {}
        )
        io.write_json(path, {"best": best, "sweep": rows, "key": key})
        return best

    def beam(self) -> BeamConfig:
        rc = self.rc
        return BeamConfig(beam=rc.beam, lenpen=rc.lenpen, max_len_a=rc.max_len_a, max_len_b=rc.max_len_b)

    def score(self, system: MTSystem, split: str, best: dict) -> dict:
        path = self.out / "evals" / f"{slug(system.name)}.{split}.json"
        hyps = self.out / "evals" / f"{slug(system.name)}.{split}.out"
        cfg = self.translate_cfg(system, split, **best, results_path=str(hyps))
        key = plain({"inputs": self.inputs(cfg), "beam": dataclasses.asdict(self.beam())})
        if path.exists() and io.read_json(path).get("key") == key:
            return {k: v for k, v in io.read_json(path).items() if k != "key"}
        res = translate(cfg, self.beam())
        row = {
            "bleu": res.bleu.score,
            "bleu_line": str(res.bleu),
            "n_sentences": res.n_sentences,
            "seconds": res.seconds,
            "sentences_per_s": res.n_sentences / max(res.seconds, 1e-9),
            "settings": best,
        }
        io.write_json(path, {**row, "key": key})
        return row


SMALL_TEST = 500  # fewer test sentences than this: BLEU differences of a point or two are within the noise


def plan(p: MTPipeline) -> list[str]:
    """The plan printed before the job starts: updates and epochs per model, the time it should take, and
    warnings for a corpus small for the preset (its budget is raised to ``min_update``) or a small test set."""
    meta = read_pairs_meta(p.data)
    target = meta["langs"]["target"]
    per_epoch = {name: p.updates_per_epoch(name) for name in ("vanilla", "trime_mt")}
    U, rc = p.budget(), p.rc
    train_tokens = meta["splits"]["train"][target]["tokens"]
    n_eval = sum(min(meta["splits"][s]["pairs"], rc.test_sentences or 1 << 62) for s in ("valid", "test"))
    plain_systems = sum(1 for s in SYSTEMS if s.mode is None)
    minutes = (
        2 * U * train_tokens / per_epoch["vanilla"] / rc.train_tokens_per_s
        + n_eval * (plain_systems / rc.decode_per_s + (len(SYSTEMS) - plain_systems) / rc.memory_decode_per_s)
    ) / 60
    lines = [
        f"plan: vanilla and TrimeMT x {U} updates each ({U / per_epoch['vanilla']:.1f} and "
        f"{U / per_epoch['trime_mt']:.1f} epochs), 2 datastores, {len(SYSTEMS)} systems decoded on valid and test "
        f"(beam {rc.beam}); estimated {minutes:.0f} min on a 2-core CPU"
    ]
    if not rc.max_update and rc.max_epoch * per_epoch["vanilla"] < rc.min_update:
        lines.append(
            f"warning: the corpus is small for this preset: {rc.max_epoch} epochs are only "
            f"{rc.max_epoch * per_epoch['vanilla']} updates, so both models train {U} updates instead"
        )
    n_test = min(meta["splits"]["test"]["pairs"], rc.test_sentences or 1 << 62)
    if n_test < SMALL_TEST:
        lines.append(
            f"warning: {n_test} test sentences: orderings of a BLEU point or two will be within the noise, and "
            "reported as not shown"
        )
    return lines


def read_results(path: Path) -> tuple[list[str], list[str]]:
    """(hypotheses, references) of a results file as its BLEU scored them: the D- lines' text, and the
    T- lines Moses-detokenised (trime mt generate's --detok moses, the job's setting)."""
    hyps: dict[int, str] = {}
    refs: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        tag, _, rest = line.partition("-")
        if tag in ("D", "T"):
            i, _, text = rest.partition("\t")
            if tag == "D":
                hyps[int(i)] = text.split("\t", 1)[1] if "\t" in text else ""
            else:
                refs[int(i)] = text
    n = len(refs)
    return [hyps[i] for i in range(n)], detokenize([refs[i] for i in range(n)])


def orderings(results: dict, out: Path) -> list[Ordering]:
    """The paper's orderings on test BLEU, each with sacreBLEU's paired bootstrap verdict
    (trime.pipelines.confidence) over the hypotheses kept under ``out``; a system under the job's BLEU
    floor has not learned to translate, so its orderings are not shown."""
    t = {r["name"]: r["test"] for r in results["systems"]}
    floor = results["config"]["reproduce"].get("bleu_floor")
    found = []
    for a, b in CLAIMS:
        if a not in t or b not in t:
            continue
        files = [out / "evals" / f"{slug(x)}.test.out" for x in (a, b)]  # as MTPipeline.score writes them
        if all(f.exists() for f in files):
            (ha, refs), (hb, _) = read_results(files[0]), read_results(files[1])
            p, spread = paired_bleu(ha, hb, refs)
        else:
            p, spread = math.nan, "no hypotheses kept"
        found.append(verdict(f"{a} > {b}", t[a]["bleu"], t[b]["bleu"], p, spread, higher_is_better=True, floor=floor))
    return found


def table(results: dict) -> str:
    rows = results["systems"]
    base = rows[0]["test"]["bleu"]
    lines = [
        "| model | memory | tuned on valid | valid BLEU | test BLEU | test vs CE | test sent/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        tuned = ", ".join(f"{ {'lmbda': 'λ', 'knn_temp': 'T'}[k] }={v:g}" for k, v in r["settings"].items()) or "-"
        lines.append(
            f"| {r['name']} | {r['memory']} | {tuned} | {r['valid']['bleu']:.2f} | {r['test']['bleu']:.2f} | "
            f"{r['test']['bleu'] - base:+.2f} | {r['test']['sentences_per_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plot_bars(results, path, "bleu", "vanilla", "test BLEU (higher is better)", ".2f")


def write_report(results: dict, out: Path) -> None:
    checks = orderings(results, out)
    results["claims"] = {o.claim: o.verdict for o in checks}
    results["orderings"] = [o.to_dict() for o in checks]
    floor = results["config"]["reproduce"].get("bleu_floor")
    text = [f"# trime mt reproduce: {results['corpus']}, preset {results['preset']}", ""]
    if "updates" in results:
        ep = results["epochs"]
        text += [
            f"Both models trained {results['updates']} updates (vanilla {ep['vanilla']:.1f} epochs, TrimeMT "
            f"{ep['trime_mt']:.1f} epochs of its BM25 batches).",
            "",
        ]
    text += [table(results), ""]
    text += [
        f"Claims of the paper, on test BLEU (sacreBLEU's paired bootstrap; an ordering within the noise, p ≥ "
        f"{ALPHA:g}, or of a system under {floor:g} BLEU is not shown):",
        "",
    ]
    text += [o.line() for o in checks]
    text += ["", f"Total time: {results['minutes']:.1f} min."]
    io.write_json(out / "results.json", results)
    with io.atomic_file(out / "results.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    try:
        plot(results, out / "bleu.png")
    except ImportError:
        print("| matplotlib is not installed: no plot (pip install 'trime[plot]')")
    print("\n".join(text))


def mt_reproduce(
    preset: str = "mt_cpu",
    out: str | Path = "runs/mt-reproduce",
    corpus: str = "bible-es-en",
    max_epoch: int = 0,
    source_lang: str | None = None,
    target_lang: str | None = None,
    max_update: int = 0,
    backend: dict | None = None,
) -> dict:
    """Run (or resume) the translation job; returns the results dictionary also written to results.json.
    The budget, the same number of updates for both models: ``max_update``; else ``max_epoch`` epochs of
    the vanilla model's batches; else the preset's (its epochs, raised to its ``min_update``).
    ``backend``: BackendConfig fields over the preset's, where the external memories are searched."""
    p = MTPipeline(preset, Path(out), corpus, max_epoch, (source_lang, target_lang), max_update, backend)
    p.prepare_data()
    for line in plan(p):
        p.say(line)
    for name in ("vanilla", "trime_mt"):
        p.train(name)
    results: dict = {
        "preset": preset,
        "corpus": corpus,
        "updates": p.budget(),
        "epochs": {name: p.budget() / p.updates_per_epoch(name) for name in ("vanilla", "trime_mt")},
        "config": {"model": C.to_dict(p.model_cfg), "reproduce": dataclasses.asdict(p.rc)},
        "systems": [],
    }
    best_of: dict[str, dict] = {}
    for system in SYSTEMS:
        p.say(f"decoding {system.name}")
        best = best_of[system.settings_of] if system.settings_of else p.tune(system)
        best_of[system.name] = best
        row = {"name": system.name, "model": system.model, "memory": system.memory, "settings": best}
        row |= {split: p.score(system, split, best) for split in ("valid", "test")}
        results["systems"].append(row)
    results["minutes"] = (time.time() - p.t0) / 60
    write_report(results, p.out)
    return json.loads(json.dumps(results))
