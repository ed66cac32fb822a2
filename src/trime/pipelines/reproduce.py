"""The main job: the paper's whole pipeline on one corpus, resumable, in one command.

    trime reproduce [--preset tiny] [--corpus shakespeare] [--out runs/reproduce]

1. fetch and prepare the corpus;
2. train, with the same budget (model, steps, tokens per step): a CE model, TrimeLM (``trime``),
   TrimeLM_long (``trime_long``, consecutive segments) and TrimeLM_ext (``trime_ext`` on BM25 batches);
3. build the training-set datastore and index for the CE model and for TrimeLM_ext;
4. evaluate every system of the paper's table on valid and test, with τ, λ and T tuned on valid
   from cached neighbours (``trime sweep``'s machinery), then applied to test;
5. print the table, write results.json / results.md and two PNG plots.

Every stage is skipped when its finished artifact exists, so a rerun after a kill resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trime import config as C
from trime import io
from trime.data.bm25 import bm25_batches
from trime.data.fetch import CORPORA, fetch
from trime.data.prepare import prepare_corpus, read_data_meta
from trime.datastore_build import build_datastore
from trime.errors import ConfigError
from trime.evaluate import evaluate
from trime.memory.index import build_index
from trime.memory.neighbors import NeighborCache, sweep
from trime.pipelines.report import write_report
from trime.train import fit


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
    "trime_ext": {"criterion": "trime_ext"},
}


class Pipeline:
    def __init__(self, preset: str, out: Path, corpus: str, char_level: bool, max_update: int):
        p = C.load_preset(preset)
        self.preset, self.out, self.corpus, self.char_level = preset, out, corpus, char_level
        self.model_cfg = C.build(C.ModelConfig, p.get("model", {}), source=preset)
        self.train_layer = p.get("train", {})
        self.eval_layer = p.get("eval", {})
        self.rc = C.build(
            C.ReproduceConfig, p.get("reproduce", {}), {"max_update": max_update} if max_update else {}, source=preset
        )
        self.L = C.build(C.TrainConfig, self.train_layer).tokens_per_sample
        self.data = out / "data-bin"
        self.stores: dict[str, tuple[Path, Path]] = {}  # checked once per run, not per evaluation
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        print(f"| [{(time.time() - self.t0) / 60:5.1f} min] {msg}", flush=True)

    # 1. data -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if io.is_complete(self.data):
            return
        src = Path(self.corpus)
        if not src.is_dir():
            if self.corpus not in CORPORA:
                raise ConfigError(
                    f"--corpus {self.corpus!r} is neither a directory nor a known corpus ({', '.join(CORPORA)})"
                )
            src = self.out / "corpus"
            if not io.is_complete(src):
                fetch(self.corpus, src)
        self.say(f"preparing {src}")
        prepare_corpus(src, self.data, char_level=self.char_level or None)

    # 2. models -----------------------------------------------------------------------------
    def bm25_order(self) -> Path:
        path = self.out / "bm25" / "batches.json"
        if not path.exists():
            self.say("BM25 batches for TrimeLM_ext")
            bm25_batches(self.data, self.L, path, work_dir=self.out / "bm25")
        return path

    def run_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def train(self, name: str) -> Path:
        run = self.run_dir(name)
        last = run / "checkpoint_last"
        if io.is_complete(last) and io.read_meta(last).get("updates", 0) >= self.rc.max_update:
            return last
        extra = dict(MODEL_FLAGS[name])
        if name == "trime_ext":
            extra["predefined_batches"] = str(self.bm25_order())
        layers = {
            **self.train_layer,
            "data": str(self.data),
            "save_dir": str(run),
            "max_update": self.rc.max_update,
            "max_epoch": 0,
            "max_time": 0.0,
            "save_interval_updates": max(self.rc.max_update // 4, 1),
            **extra,
        }
        self.say(f"training {name} for {self.rc.max_update} updates")
        fit(self.model_cfg, C.build(C.TrainConfig, layers))
        return last

    # 3. datastores -------------------------------------------------------------------------
    def datastore(self, name: str) -> tuple[Path, Path]:
        if name in self.stores:
            return self.stores[name]
        d = self.out / "dstore" / name
        if not io.is_complete(d):
            self.say(f"datastore of {name} over the training set")
            cfg = C.DatastoreConfig(
                data=str(self.data),
                path=str(self.run_dir(name) / "checkpoint_last"),
                out=str(d),
                context_window=self.rc.dstore_context,
                batch_size=8,
            )
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
        )
        self.stores[name] = d, index
        return d, index

    # 4. evaluation -------------------------------------------------------------------------
    def eval_cfg(self, system: System, split: str, **kw) -> C.EvalConfig:
        layers = {
            **self.eval_layer,
            "data": str(self.data),
            "path": str(self.run_dir(system.model) / "checkpoint_last"),
            "gen_subset": split,
            "max_eval_tokens": self.rc.eval_tokens,
            "mem_size": self.rc.long_mem_size,
            "k": self.rc.k,
            "probe": self.rc.probe,
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
        path = self.out / "evals" / f"{slug(system.name)}.tuned.json"
        if path.exists():
            return json.loads(path.read_text())["best"]
        cache = self.out / "evals" / f"{slug(system.name)}.neighbors"
        if not io.is_complete(cache):  # every memory entry kept, so re-scoring is exact
            evaluate(
                self.eval_cfg(
                    system, "valid", save_neighbors=str(cache), neighbors_top=0, max_eval_tokens=self.rc.tune_tokens
                )
            )
        grid = {
            "softmax_temp": self.rc.softmax_temps if "softmax_temp" in system.tune else [1.0],
            "lmbda": self.rc.lmbdas if "lmbda" in system.tune else [0.0],
            "interp_temp": self.rc.interp_temps if "interp_temp" in system.tune else [1.0],
        }
        rows = sweep(NeighborCache.load(cache), grid)
        best = min(rows, key=lambda r: r["loss"])
        best = {k: best[k] for k in ("softmax_temp", "lmbda", "interp_temp") if k in system.tune}
        io.write_json(path, {"best": best, "sweep": rows})
        return best

    def score(self, system: System, split: str, best: dict, tag: str = "", **kw) -> dict:
        path = self.out / "evals" / f"{slug(system.name)}{tag}.{split}.json"
        if path.exists():
            return json.loads(path.read_text())
        res = evaluate(self.eval_cfg(system, split, **best, **kw))
        row = {"loss": res.loss, "ppl": res.ppl, "n_tokens": res.n_tokens, "settings": best}
        io.write_json(path, row)
        return row

    def curve(self, best: dict[str, dict]) -> dict:
        """Valid perplexity against long-term memory size: CE + cache vs TrimeLM_long."""
        out = {}
        for system in (SYSTEMS[1], SYSTEMS[5]):
            pts = []
            for m in self.rc.curve_mem_sizes:
                flags = {"use_long": m > 0, "mem_size": m, "max_eval_tokens": self.rc.curve_tokens}
                row = self.score(system, "valid", best[system.name], tag=f".mem{m}", **flags)
                pts.append((m, row["ppl"]))
            out[system.name] = pts
        return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def estimate_minutes(p: Pipeline) -> float:
    cfg = C.build(C.TrainConfig, p.train_layer)
    train = 4 * p.rc.max_update * cfg.max_tokens / p.rc.train_tokens_per_s
    splits = read_data_meta(p.data)["splits"]
    n_train = splits["train"]["tokens"]
    n_eval = sum(min(splits[s]["tokens"], p.rc.eval_tokens or 1 << 62) for s in ("valid", "test"))
    ctx = C.build(C.EvalConfig, p.eval_layer).context_window
    blowup = p.L / max(p.L - ctx, 1)
    evals = len(SYSTEMS) * 1.5 * n_eval * blowup + 2 * p.rc.curve_tokens * blowup * len(p.rc.curve_mem_sizes)
    dstore = 2 * n_train * p.L / max(p.L - p.rc.dstore_context, 1)
    return (train + (evals + dstore) / p.rc.eval_tokens_per_s) / 60


def reproduce(
    preset: str = "tiny",
    out: str | Path = "runs/reproduce",
    corpus: str = "shakespeare",
    char_level: bool = False,
    max_update: int = 0,
) -> dict:
    """Run (or resume) the whole pipeline; returns the results dictionary also written to results.json."""

    p = Pipeline(preset, Path(out), corpus, char_level, max_update)
    p.prepare_data()
    p.say(
        f"plan: 4 models x {p.rc.max_update} updates, 2 datastores, {len(SYSTEMS)} systems on valid and test; "
        f"estimated {estimate_minutes(p):.0f} min on a 2-core CPU"
    )
    for name in MODEL_FLAGS:
        p.train(name)
    results: dict = {
        "preset": preset,
        "corpus": corpus,
        "config": {"model": C.to_dict(p.model_cfg), "reproduce": dataclasses.asdict(p.rc)},
        "systems": [],
    }
    best_of: dict[str, dict] = {}
    for system in SYSTEMS:
        p.say(f"evaluating {system.name}")
        best = p.tune(system)
        best_of[system.name] = best
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
    results["memory_curve"] = p.curve(best_of)
    results["minutes"] = (time.time() - p.t0) / 60
    write_report(results, p.out)
    return results
