"""The main job: the paper's whole pipeline on one corpus, resumable, in one command.

    trime reproduce [--preset tiny] [--corpus shakespeare] [--out runs/reproduce]
                    [--max-update N | N1,N2,...] [--variants long_shuffled,ext_random,ext_local | all]

1. fetch and prepare the corpus;
2. train, with the same budget (model, steps, tokens per step): a CE model, TrimeLM (``trime``),
   TrimeLM_long (``trime_long``, consecutive segments) and TrimeLM_ext (``trime_ext`` on BM25 batches);
3. build the training-set datastore and index for the CE model and for TrimeLM_ext;
4. evaluate every system of the paper's table on valid and test, with τ, λ and T tuned on valid
   from cached neighbours (``trime sweep``'s machinery), then applied to test;
5. print the table, write results.json / results.md and two PNG plots.

Every stage is skipped when its finished artifact exists *and was made from the same inputs*: each
artifact records the content fingerprints of its inputs and the settings that change it (data:
the corpus files; models: data, model, train config and BM25 order; datastores: model weights,
split, windows; evaluations: model, split, datastore, index, settings); a stage whose inputs
changed is removed and made again, and says so. A rerun after a kill resumes; a rerun with
nothing changed only reads meta.json files.

A budget study (several ``--max-update``) trains every model once, through the budgets in increasing
order, keeping a copy of each model at each budget (``models/NAME/checkpoint_N``): with a schedule
that does not depend on --max-update (inverse_sqrt, fixed) the copy at N equals a run of N updates
from scratch (the trainer resumes exactly). Each budget is evaluated in ``budget-N/``; ``study.md``,
``study.json`` and ``study.png`` put the budgets side by side. ``--variants`` adds models that test
an explanation of a result (VARIANTS), each one more row at every budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from trime import config as C
from trime import io
from trime.checkpoint import TRAINER
from trime.data.bm25 import batches_setup as bm25_setup
from trime.data.bm25 import bm25_batches
from trime.data.fetch import CORPORA, fetch
from trime.data.prepare import prepare_corpus, read_data_meta
from trime.datastore_build import build_datastore, datastore_key
from trime.errors import ConfigError
from trime.evaluate import eval_inputs, evaluate
from trime.memory.datastore import build_mismatch
from trime.memory.index import build_index
from trime.memory.neighbors import NeighborCache, sweep
from trime.pipelines.report import write_report, write_study
from trime.train import PATH_FIELDS, fit, resolve_model_config, run_differences

MARKER = "reproduce.json"  # marks an --out directory as this job's
TRAINING_FIELDS = (
    "update",
    "loss",
    "ce_loss",
    "use_ce",
    "mem_share",
    "mem_score_mean",
    "mem_score_max",
    "mem_cos",
    "key_norm",
)


@dataclass
class System:
    """One row of the results table: a trained model evaluated with some memories."""

    name: str
    model: str  # ce | trime | trime_long | trime_ext
    memory: str  # as printed in the table
    flags: dict = field(default_factory=dict)  # EvalConfig overrides
    tune: tuple[str, ...] = ()  # tuned on valid: softmax_temp, lmbda, interp_temp
    dstore: str | None = None  # whose datastore


SYSTEMS = [
    System("Transformer (CE)", "ce", "none"),
    System("+ continuous cache", "ce", "local + long", {"use_local": True, "use_long": True}, ("softmax_temp",)),
    System("kNN-LM", "ce", "external (interp.)", {"use_interp": True}, ("lmbda", "interp_temp"), "ce"),
    System(
        "kNN-LM + cache",
        "ce",
        "local + long + external (interp.)",
        {"use_local": True, "use_long": True, "use_interp": True},
        ("softmax_temp", "lmbda", "interp_temp"),
        "ce",
    ),
    System("TrimeLM", "trime", "local", {"use_local": True}, ("softmax_temp",)),
    System("TrimeLM_long", "trime_long", "local + long", {"use_local": True, "use_long": True}, ("softmax_temp",)),
    System(
        "TrimeLM_ext",
        "trime_ext",
        "local + long + external + interp.",
        {"use_local": True, "use_long": True, "use_external": True, "use_interp": True},
        ("softmax_temp", "lmbda", "interp_temp"),
        "trime_ext",
    ),
]
MODEL_FLAGS = {
    "ce": {},
    "trime": {"criterion": "trime"},
    "trime_long": {"criterion": "trime_long", "keep_order": True},
    "trime_ext": {"criterion": "trime_ext", "predefined_batches": "bm25"},
}

# Variants that test an explanation of a result (``--variants``): each is one more model, trained with
# the same budget, and one more row of the table, evaluated as the system it varies.
VARIANTS = {
    "long_shuffled": (
        "trime_long_shuffled",
        {"criterion": "trime_long", "keep_order": True, "shuffle_groups": True},
        System(
            "TrimeLM_long, shuffled groups",
            "trime_long_shuffled",
            "local + long",
            {"use_local": True, "use_long": True},
            ("softmax_temp",),
        ),
    ),
    "ext_random": (
        "trime_ext_random",
        {"criterion": "trime_ext"},
        dataclasses.replace(
            SYSTEMS[6], name="TrimeLM_ext, random batches", model="trime_ext_random", dstore="trime_ext_random"
        ),
    ),
    "ext_local": (
        "trime_ext_local",
        {"criterion": "trime_ext", "predefined_batches": "bm25", "cross_sent_ratio": 0.0},
        dataclasses.replace(
            SYSTEMS[6], name="TrimeLM_ext, cross-sent ratio 0", model="trime_ext_local", dstore="trime_ext_local"
        ),
    ),
}
# the learning-rate schedules that do not depend on --max-update: a larger budget continues a smaller one
BUDGET_FREE = ("inverse_sqrt", "fixed")


class StageClock:
    """Wall-clock seconds per stage of the job. A stage entered inside another (a datastore built while
    tuning) is counted in the inner one only, so the stages add up to the time spent in any of them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []
        self._since = time.time()

    def _charge(self) -> None:
        now = time.time()
        if self._open:
            self.seconds[self._open[-1]] = self.seconds.get(self._open[-1], 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self._charge()
        self._open.append(stage)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def lines(self, total_s: float) -> list[str]:
        """The table printed at the end of the job: each stage's minutes and share, then the total."""
        rows = [f"{m / 60:7.1f} min  {100 * m / max(total_s, 1e-9):5.1f}%  {k}" for k, m in self.seconds.items()]
        return ["time per stage:", *rows, f"{total_s / 60:7.1f} min  total"]


class Pipeline:
    """The stages of the job. One instance serves every budget of a study: ``set_budget`` points the
    datastores, evaluations and results at that budget's directory (the run's own with one budget)."""

    def __init__(
        self,
        preset: str,
        out: Path,
        corpus: str,
        char_level: bool,
        budgets: list[int] | int = 0,
        variants: list[str] | tuple[str, ...] = (),
        seed: int | None = None,
        backend: dict | None = None,
    ):
        p = C.load_preset(preset)
        self.preset, self.out, self.corpus, self.char_level = preset, out, corpus, char_level
        self.model_cfg = C.build(C.ModelConfig, p.get("model", {}), source=preset)
        self.train_layer = {**p.get("train", {}), **({} if seed is None else {"seed": seed})}
        self.eval_layer = p.get("eval", {})
        budgets = [budgets] if isinstance(budgets, int) else list(budgets)
        if any(b < 0 for b in budgets):
            raise ConfigError(f"--max-update must be >= 0 (got {min(budgets)})")
        self.rc = C.build(C.ReproduceConfig, p.get("reproduce", {}), backend or {}, source=preset)
        self.budgets = sorted({b for b in budgets if b}) or [self.rc.max_update]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: unknown {unknown[0]!r} (known: {', '.join(VARIANTS)})")
        self.models = {**MODEL_FLAGS, **{VARIANTS[v][0]: VARIANTS[v][1] for v in variants}}
        self.systems = SYSTEMS + [VARIANTS[v][2] for v in variants]
        train = C.build(C.TrainConfig, self.train_layer)
        self.L = train.tokens_per_sample
        self.continues = train.lr_scheduler in BUDGET_FREE  # a larger budget resumes a smaller one
        self.data = out / "data-bin"
        self.t0 = time.time()
        self.clock = StageClock()
        self.set_budget(self.budgets[0])

    def set_budget(self, budget: int) -> None:
        self.rc = dataclasses.replace(self.rc, max_update=budget)
        self.stage = self.out if len(self.budgets) == 1 else self.out / f"budget-{budget}"
        self.stores: dict[str, tuple[Path, Path]] = {}  # checked once per budget, not per evaluation

    def say(self, msg: str) -> None:
        print(f"| [{(time.time() - self.t0) / 60:5.1f} min] {msg}", flush=True)

    # 1. data -------------------------------------------------------------------------------
    def corpus_dir(self, fetch_it: bool = True) -> Path | None:
        return corpus_dir(self.corpus, self.out, CORPORA, fetch, "corpus", fetch_it)

    def data_changes(self, src: Path) -> list[str]:
        """What differs between the corpus files and the prepared data (by size, time, then sha256)."""
        meta = read_data_meta(self.data)
        corpus = io.read_json(src / "meta.json") if (src / "meta.json").is_file() else None
        level = "char" if self.char_level or (corpus and corpus.get("level") == "char") else "word"
        diff = [] if meta.get("level") == level else ["level"]
        files = {s: src / f"{s}.txt" for s in ("train", "valid", "test") if (src / f"{s}.txt").exists()}
        if set(files) != set(meta["splits"]):
            return diff + ["splits"]
        for name, path in files.items():
            rec, st = meta["splits"][name], path.stat()
            if (
                rec.get("source_bytes") != st.st_size
                or rec.get("source_mtime_ns") != st.st_mtime_ns
                and io.sha256_file(path) != rec.get("source_sha256")
            ):
                diff.append(name)
        return diff

    def prepare_data(self) -> None:
        legacy = io.is_complete(self.data) and (self.out / "models").is_dir()  # a run from before the marker
        self.corpus_dir(fetch_it=False)  # an unknown --corpus is refused before OUT is made
        claim_out(self.out, MARKER, "reproduce", legacy)
        src = self.corpus_dir()
        if io.is_complete(self.data):
            diff = self.data_changes(src)
            if not diff:
                return
            self.say(f"the corpus differs from the prepared data ({', '.join(diff)}): preparing it again")
        self.say(f"preparing {src}")
        prepare_corpus(src, self.data, char_level=self.char_level or None, overwrite=True)

    # 2. models -----------------------------------------------------------------------------
    def bm25_order(self) -> Path:
        work = self.out / "bm25"
        path = work / "batches.json"
        setup = bm25_setup(self.data, self.L)
        if path.exists() and (work / "setup.json").exists() and io.read_json(work / "setup.json") == setup:
            return path
        if work.exists():
            self.say("the training data changed since the BM25 batches were made: making them again")
            shutil.rmtree(work)
        self.say("BM25 batches for TrimeLM_ext")
        bm25_batches(self.data, self.L, path, work_dir=work)
        return path

    def run_dir(self, name: str) -> Path:
        """A model's run: one for every budget when the schedule allows, else one per budget."""
        base = self.out / "models" / name
        return base if self.continues or len(self.budgets) == 1 else base.with_name(f"{name}-{self.rc.max_update}u")

    def checkpoint(self, name: str) -> Path:
        """The model ``name`` as it was after this budget's updates (a copy without trainer state)."""
        return self.run_dir(name) / f"checkpoint_{self.rc.max_update}"

    def train_cfg(self, name: str) -> C.TrainConfig:
        extra = dict(self.models[name])
        if extra.get("predefined_batches") == "bm25":
            with self.clock("BM25 batches"):
                extra["predefined_batches"] = str(self.bm25_order())
        if extra.get("criterion", "ce") != "ce" and self.rc.ce_warmup_updates:
            extra["ce_warmup_updates"] = self.rc.ce_warmup_updates
        if extra.get("criterion") == "trime_ext" and self.rc.ext_memory_segments:
            extra.update(self.memory_batches(self.rc.ext_memory_segments))
        layers = {
            **self.train_layer,
            "data": str(self.data),
            "save_dir": str(self.run_dir(name)),
            "max_update": self.rc.max_update,
            "max_epoch": 0,
            "max_time": 0.0,
            "save_interval_updates": max(self.budgets[0] // 4, 1),
            **extra,
        }
        return C.build(C.TrainConfig, layers)

    def memory_batches(self, segments: int) -> dict:
        """max_tokens / update_freq that put ``segments`` segments in each forward pass (one step's
        memory) and keep the tokens of an update."""
        base = C.build(C.TrainConfig, self.train_layer)
        per_update = base.max_tokens * base.update_freq
        if per_update % (segments * self.L):
            raise ConfigError(
                f"ext_memory_segments {segments} x {self.L} tokens does not divide the {per_update} tokens of an update"
            )
        return {"max_tokens": segments * self.L, "update_freq": per_update // (segments * self.L)}

    def train(self, name: str) -> Path:
        """Train (or continue) ``name`` to this budget; returns its checkpoint at exactly this budget."""
        run, budget = self.run_dir(name), self.rc.max_update
        last, snap = run / "checkpoint_last", self.checkpoint(name)
        cfg = self.train_cfg(name)
        ignored = set(PATH_FIELDS) | {"save_interval_updates"} | ({"max_update"} if self.continues else set())
        fields = [f.name for f in dataclasses.fields(cfg) if f.name not in ignored]
        diff = run_differences(run, resolve_model_config(self.model_cfg, cfg), cfg, fields=fields)
        if diff:
            self.say(f"{name}: {', '.join(diff)} changed since it was trained: training it again")
            shutil.rmtree(run)
        if io.is_complete(snap):
            return snap
        done = io.read_meta(last).get("updates", 0) if io.is_complete(last) else 0
        if done > budget:
            self.say(f"{name}: has {done} updates and no copy at {budget}: training it again from the start")
            shutil.rmtree(run)
            done = 0
        if done < budget:
            self.say(f"training {name} to {budget} updates" + (f" (continuing from {done})" if done else ""))
            fit(self.model_cfg, cfg)
        keep_copy(last, snap)
        return snap

    def training_curves(self) -> dict[str, list[dict]]:
        """Each model's logged training records up to this budget (its log.jsonl): the token part's
        cross-entropy and the memory diagnostics (losses.DIAG_SUMS), for the report's training.png."""
        out = {}
        for name in self.models:
            log = self.run_dir(name) / "log.jsonl"
            rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            last = {r["update"]: r for r in rows if r.get("kind") == "train" and r["update"] <= self.rc.max_update}
            out[name] = [{k: r[k] for k in TRAINING_FIELDS if k in r} for _, r in sorted(last.items())]
        return out

    # 3. datastores -------------------------------------------------------------------------
    def datastore(self, name: str) -> tuple[Path, Path]:
        if name not in self.stores:
            with self.clock(f"datastore + index of {name}"):
                self.stores[name] = self._datastore(name)
        return self.stores[name]

    def _datastore(self, name: str) -> tuple[Path, Path]:
        d = self.stage / "dstore" / name
        cfg = C.DatastoreConfig(
            data=str(self.data),
            path=str(self.checkpoint(name)),
            out=str(d),
            context_window=self.rc.dstore_context,
            batch_size=8,
        )
        diff = build_mismatch(d, datastore_key(cfg))
        if diff:
            self.say(f"datastore of {name}: {', '.join(diff)} changed: building it again")
            shutil.rmtree(d)
        if not io.is_complete(d):
            self.say(f"datastore of {name} over the training set")
            build_datastore(cfg)
        index = d / "knn.index.ip"
        if not index.exists():
            self.say(f"faiss index of {name}")
        build_index(
            d,
            index,
            metric="ip",
            probe=self.rc.probe,
            n_lists=self.rc.n_lists or None,
            train_size=self.rc.index_train_size,
            overwrite=True,
        )
        return d, index

    # 4. evaluation -------------------------------------------------------------------------
    def eval_cfg(self, system: System, split: str, **kw) -> C.EvalConfig:
        layers = {
            **self.eval_layer,
            "data": str(self.data),
            "path": str(self.checkpoint(system.model)),
            "gen_subset": split,
            "max_eval_tokens": self.rc.eval_tokens,
            "mem_size": self.rc.long_mem_size,
            "k": self.rc.k,
            "probe": self.rc.probe,
            **C.backend_fields(self.rc),
            **system.flags,
        }
        if system.dstore:
            d, index = self.datastore(system.dstore)
            layers.update(dstore=str(d), indexfile=str(index))
        return C.build(C.EvalConfig, layers, kw)

    def tune(self, system: System) -> dict:
        """Best τ / λ / T on valid, by re-scoring cached neighbours (one model pass)."""
        if not system.tune:
            return {}
        path = self.stage / "evals" / f"{slug(system.name)}.tuned.json"
        cache = self.stage / "evals" / f"{slug(system.name)}.neighbors"
        cfg = self.eval_cfg(
            system, "valid", save_neighbors=str(cache), neighbors_top=0, max_eval_tokens=self.rc.tune_tokens
        )  # every memory entry kept, so re-scoring is exact
        grid = {
            "softmax_temp": self.rc.softmax_temps if "softmax_temp" in system.tune else [1.0],
            "lmbda": self.rc.lmbdas if "lmbda" in system.tune else [0.0],
            "interp_temp": self.rc.interp_temps if "interp_temp" in system.tune else [1.0],
        }
        key = plain({"inputs": eval_inputs(cfg), "grid": grid, "tune": list(system.tune)})
        if path.exists():
            done = io.read_json(path)
            if done.get("key") == key:
                return done["best"]
        if not (io.is_complete(cache) and io.read_meta(cache).get("inputs") == key["inputs"]):
            evaluate(cfg)
        rows = sweep(NeighborCache.load(cache), grid)
        best = min(rows, key=lambda r: r["loss"])
        best = {k: best[k] for k in ("softmax_temp", "lmbda", "interp_temp") if k in system.tune}
        io.write_json(path, {"best": best, "sweep": rows, "key": key})
        return best

    def score(self, system: System, split: str, best: dict, tag: str = "", **kw) -> dict:
        path = self.stage / "evals" / f"{slug(system.name)}{tag}.{split}.json"
        # the table's test scores keep their per-token log-probabilities: the orderings' paired bootstrap
        probs = path.with_suffix(".npy") if split == "test" and not tag else None
        if probs is not None:
            kw["output_word_probs"] = str(probs)
        cfg = self.eval_cfg(system, split, **best, **kw)
        key = eval_inputs(cfg)
        if path.exists() and (probs is None or probs.exists()):
            row = io.read_json(path)
            if row.get("key") == key:
                return {k: v for k, v in row.items() if k != "key"}
        res = evaluate(cfg)
        row = {"loss": res.loss, "ppl": res.ppl, "n_tokens": res.n_tokens, "settings": best}
        if probs is not None:
            row["word_probs"] = str(probs.relative_to(self.stage))
        io.write_json(path, {**row, "key": key})
        return row

    def curve(self, best: dict[str, dict]) -> dict:
        """Valid perplexity against long-term memory size: CE + cache vs TrimeLM_long (and its variants)."""
        out = {}
        for system in [SYSTEMS[1], SYSTEMS[5]] + [
            s for s in self.systems[len(SYSTEMS) :] if s.flags.get("use_long") and not s.dstore
        ]:
            pts = []
            for m in self.rc.curve_mem_sizes:
                flags = {"use_long": m > 0, "mem_size": m, "max_eval_tokens": self.rc.curve_tokens}
                row = self.score(system, "valid", best[system.name], tag=f".mem{m}", **flags)
                pts.append((m, row["ppl"]))
            out[system.name] = pts
        return out


def keep_copy(last: Path, snap: Path) -> None:
    """Copy a finished checkpoint to ``snap``, without the trainer state (it is evaluated, never resumed)."""
    meta = io.read_meta(last, "checkpoint")
    with io.atomic_dir(snap, overwrite=True, kind="checkpoint") as tmp:
        for f in last.iterdir():
            if f.name not in (TRAINER, io.META):
                shutil.copy2(f, tmp / f.name)
        io.write_meta(tmp, "checkpoint", **{k: v for k, v in meta.items() if k not in ("kind", "files", "created")})


def corpus_dir(corpus: str, out: Path, known, fetcher, what: str, fetch_it: bool = True) -> Path | None:
    """``corpus`` itself when it is a directory, else the known corpus of that name fetched into
    ``out/corpus`` (once: a complete fetch of the same name is reused; None without ``fetch_it``)."""
    if Path(corpus).is_dir():
        return Path(corpus)
    if corpus not in known:
        raise ConfigError(f"--corpus {corpus!r} is neither a directory nor a known {what} ({', '.join(known)})")
    if not fetch_it:
        return None
    src = out / "corpus"
    if not (io.is_complete(src) and io.read_meta(src).get("name") == corpus):
        print(f"| fetching {corpus}", flush=True)
        fetcher(corpus, src, overwrite=True)
    return src


def claim_out(out: Path, marker: str, kind: str, legacy: bool = False) -> None:
    """The output directory is this job's: new, empty, or marked by an earlier run of ``kind``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; choose a directory for the run")
    if out.is_dir() and any(out.iterdir()) and not ((out / marker).exists() or legacy):
        raise ConfigError(
            f"--out {out}: holds files that are not a trime {kind} run (no {marker}); choose another --out"
        )
    if not (out / marker).exists():
        io.write_json(out / marker, {"kind": kind})


def plain(x):
    """``x`` as it reads back from JSON (tuples become lists), for comparing with a stored key."""
    return json.loads(json.dumps(x, sort_keys=True))


def slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def estimate_minutes(p: Pipeline) -> float:
    """Minutes of the whole job on a 2-core CPU, from the preset's expected speeds."""
    cfg = C.build(C.TrainConfig, p.train_layer)
    updates = max(p.budgets) if p.continues else sum(p.budgets)
    train = len(p.models) * updates * cfg.max_tokens * cfg.update_freq / p.rc.train_tokens_per_s
    splits = read_data_meta(p.data)["splits"]
    n_train = splits["train"]["tokens"]
    n_eval = sum(min(splits[s]["tokens"], p.rc.eval_tokens or 1 << 62) for s in ("valid", "test"))
    ctx = C.build(C.EvalConfig, p.eval_layer).context_window
    blowup = p.L / max(p.L - ctx, 1)
    curves = 2 + sum(1 for s in p.systems[len(SYSTEMS) :] if s.flags.get("use_long") and not s.dstore)
    evals = len(p.systems) * 1.5 * n_eval * blowup + curves * p.rc.curve_tokens * blowup * len(p.rc.curve_mem_sizes)
    dstore = len({s.dstore for s in p.systems if s.dstore}) * n_train * p.L / max(p.L - p.rc.dstore_context, 1)
    return (train + len(p.budgets) * (evals + dstore) / p.rc.eval_tokens_per_s) / 60


def epochs_of(p: Pipeline, budget: int) -> float:
    cfg = C.build(C.TrainConfig, p.train_layer)
    return budget * cfg.max_tokens * cfg.update_freq / read_data_meta(p.data)["splits"]["train"]["tokens"]


SMALL_EPOCHS = 10  # more passes than this over the training text: the models mostly memorise it
SMALL_TEST_BLOCKS = 20  # fewer blocks of 256 test tokens than this: the bootstrap has little to resample


def plan_warnings(p: Pipeline) -> list[str]:
    """What the plan should warn of before the job starts: a corpus small for the preset's budget, and a
    test split too small for its orderings to be shown."""
    out = []
    budget = max(p.budgets)
    epochs = epochs_of(p, budget)
    if epochs > SMALL_EPOCHS:
        out.append(
            f"the corpus is small for this budget: {budget} updates are {epochs:.0f} epochs of its training text, "
            "so the models will mostly memorise it; pass a smaller --max-update or a larger corpus"
        )
    n_test = read_data_meta(p.data)["splits"]["test"]["tokens"]
    n_test = min(n_test, p.rc.eval_tokens) if p.rc.eval_tokens else n_test
    if n_test < SMALL_TEST_BLOCKS * 256:
        out.append(
            f"the test split has only {n_test} scored tokens ({-(-n_test // 256)} blocks of 256): an ordering "
            "needs a large difference to be shown, and closer ones will be reported as not shown"
        )
    return out


def run_budget(p: Pipeline, preset: str, corpus: str) -> dict:
    """Train every model to ``p``'s current budget, evaluate every system, write the report."""
    for name in p.models:
        with p.clock(f"train {name}"):
            p.train(name)
    results: dict = {
        "preset": preset,
        "corpus": corpus,
        "max_update": p.rc.max_update,
        "epochs": epochs_of(p, p.rc.max_update),
        "seed": C.build(C.TrainConfig, p.train_layer).seed,
        "config": {"model": C.to_dict(p.model_cfg), "reproduce": dataclasses.asdict(p.rc)},
        "systems": [],
    }
    best_of: dict[str, dict] = {}
    for system in p.systems:
        p.say(f"evaluating {system.name}")
        with p.clock("tune on valid (neighbour caches + sweeps)"):
            best = p.tune(system)
        best_of[system.name] = best
        with p.clock("evaluate valid + test"):
            valid, test = p.score(system, "valid", best), p.score(system, "test", best)
        results["systems"].append(
            {
                "name": system.name,
                "model": system.model,
                "memory": system.memory,
                "settings": best,
                "valid": valid,
                "test": test,
            }
        )
    with p.clock("memory-size curve"):
        results["memory_curve"] = p.curve(best_of)
    results["training"] = p.training_curves()
    results["minutes"] = (time.time() - p.t0) / 60
    results["stage_minutes"] = {k: v / 60 for k, v in p.clock.seconds.items()}
    write_report(results, p.stage)
    for line in p.clock.lines(time.time() - p.t0):
        p.say(line)
    return results


def reproduce(
    preset: str = "tiny",
    out: str | Path = "runs/reproduce",
    corpus: str = "shakespeare",
    char_level: bool = False,
    max_update: int | list[int] = 0,
    variants: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
    backend: dict | None = None,
) -> dict:
    """Run (or resume) the whole pipeline; returns the results dictionary also written to results.json.
    ``seed``: every model's training seed (None: the preset's). ``backend``: BackendConfig fields over the
    preset's, where the external memories are searched (the numbers do not depend on it).

    With several budgets (``max_update=[200, 500, 1000]``) every model is trained once, through the
    budgets in increasing order (a larger budget continues a smaller one when the learning-rate schedule
    does not depend on --max-update, which makes it equal to a run of that budget from scratch); each
    budget is evaluated in ``out/budget-N`` and the study (study.json / study.md / study.png, test
    perplexity against budget) is written after each. Returns the largest budget's results."""

    p = Pipeline(preset, Path(out), corpus, char_level, max_update, variants, seed, backend)
    with p.clock("prepare data"):
        p.prepare_data()
    budgets = ", ".join(map(str, p.budgets))
    stores = len({s.dstore for s in p.systems if s.dstore})
    p.say(
        f"plan: {len(p.models)} models x {budgets} updates ({epochs_of(p, max(p.budgets)):.1f} epochs at the "
        f"largest), {stores} datastores and {len(p.systems)} systems on "
        f"valid and test per budget; estimated {estimate_minutes(p):.0f} min on a 2-core CPU"
    )
    for warning in plan_warnings(p):
        p.say(f"warning: {warning}")
    done = []
    for budget in p.budgets:
        p.set_budget(budget)
        if len(p.budgets) > 1:
            p.say(f"budget {budget} updates ({epochs_of(p, budget):.1f} epochs)")
        done.append(run_budget(p, preset, corpus))
        if len(p.budgets) > 1:
            write_study(done, p.out)
    return done[-1]
