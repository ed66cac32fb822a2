"""The main job at micro size: every artifact exists, the numbers equal the golden ones, a rerun resumes."""

import dataclasses
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import pytest

from trime import io
from trime.checkpoint import model_fingerprint
from trime.data.prepare import data_fingerprint, read_data_meta
from trime.errors import ConfigError
from trime.pipelines.reproduce import SYSTEMS, VARIANTS, Pipeline, StageClock, plan_warnings, reproduce, slug

from tests.fixtures import make_corpus


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_micro_pipeline(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_lines=300)
    out = tmp_path / "run"
    results = reproduce(preset="micro", out=out, corpus=str(corpus))
    for name in ("results.json", "results.md", "test_ppl.png", "memory_curve.png", "training.png", "bm25/batches.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for model in ("ce", "trime", "trime_long", "trime_ext"):
        assert (out / "models" / model / "checkpoint_last" / "meta.json").is_file()
    for store in ("ce", "trime_ext"):
        assert (out / "dstore" / store / "meta.json").is_file() and (out / "dstore" / store / "knn.index.ip").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in saved["systems"]] == [s.name for s in SYSTEMS]
    for s in saved["systems"]:
        for split in ("valid", "test"):
            assert math.isfinite(s[split]["ppl"]) and s[split]["ppl"] > 1 and s[split]["n_tokens"] > 0
    for pts in saved["memory_curve"].values():
        assert all(math.isfinite(p) for _, p in pts)
    verdicts = {"holds", "does NOT hold", "not shown"}
    assert set(saved["claims"]) and set(saved["claims"].values()) <= verdicts
    for o in saved["orderings"]:  # the micro test split is 2 blocks: too few for the bootstrap to say anything
        assert o["verdict"] == "not shown" and o["spread"].startswith("only 2 blocks of 256 test tokens")
    for s in saved["systems"]:
        assert len(np.load(out / s["test"]["word_probs"])) == s["test"]["n_tokens"]
    _check_golden(out, saved)
    stages = saved["stage_minutes"]  # the job's time per stage, printed at its end too
    for model in ("ce", "trime", "trime_long", "trime_ext"):
        assert f"train {model}" in stages
    assert {"prepare data", "BM25 batches", "datastore + index of ce", "evaluate valid + test"} <= set(stages)
    assert 0 < sum(stages.values()) <= saved["minutes"] + 1e-6

    stamp = (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime
    again = reproduce(preset="micro", out=out, corpus=str(corpus))  # everything is done: nothing reruns
    assert (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime == stamp
    assert [s["test"]["ppl"] for s in again["systems"]] == [s["test"]["ppl"] for s in results["systems"]]
    _check_stale_stages_are_redone(out, corpus, saved, tmp_path)


def _check_stale_stages_are_redone(out: Path, corpus: Path, saved: dict, tmp_path: Path) -> None:
    """Another --max-update retrains and so rebuilds the datastore and redoes every evaluation built
    on the model; another --corpus prepares the data again and retrains. (Stage by stage, to stay
    cheap: each stage is what reproduce() calls.)"""
    knn = SYSTEMS[2]
    old = {s["name"]: s for s in saved["systems"]}[knn.name]
    p = Pipeline("micro", out, str(corpus), False, 3)
    p.prepare_data()
    assert p.train("ce") and io.read_meta(out / "models" / "ce" / "checkpoint_last")["updates"] == 3
    new_model = model_fingerprint(out / "models" / "ce" / "checkpoint_last")
    p.datastore("ce")
    assert io.read_meta(out / "dstore" / "ce")["model_fingerprint"] == new_model
    assert p.tune(knn)  # the neighbour cache and the sweep are redone for the new model
    assert io.read_meta(out / "evals" / "knn_lm.neighbors")["inputs"]["model"] == new_model
    row = p.score(knn, "valid", old["settings"])
    assert row["ppl"] != old["valid"]["ppl"]
    assert json.loads((out / "evals" / "knn_lm.valid.json").read_text())["key"]["model"] == new_model

    other = make_corpus(tmp_path / "corpus2", n_lines=240)
    (other / "train.txt").write_text((other / "train.txt").read_text().replace("w1 ", "v1 "))
    p = Pipeline("micro", out, str(other), False, 3)
    p.prepare_data()
    assert read_data_meta(out / "data-bin")["splits"]["train"]["source_sha256"] == io.sha256_file(other / "train.txt")
    p.train("ce")
    base = p.score(SYSTEMS[0], "test", {})
    key = json.loads((out / "evals" / f"{slug(SYSTEMS[0].name)}.test.json").read_text())["key"]
    assert key["data"] == data_fingerprint(out / "data-bin", ["test"])
    assert base["ppl"] != {s["name"]: s for s in saved["systems"]}[SYSTEMS[0].name]["test"]["ppl"]


def test_training_settings_of_the_models(tmp_path):
    """--seed reaches every model; the [reproduce] table's CE warm-up reaches the TRIME models only, and
    ext_memory_segments gives TrimeLM_ext that many segments per forward pass with the update's tokens."""
    p = Pipeline("micro", tmp_path / "run", str(make_corpus(tmp_path / "corpus", n_lines=120)), False, 3, seed=5)
    p.prepare_data()
    p.rc = dataclasses.replace(p.rc, ce_warmup_updates=2, ext_memory_segments=2)
    ce, ext, long = p.train_cfg("ce"), p.train_cfg("trime_ext"), p.train_cfg("trime_long")
    assert ce.seed == ext.seed == long.seed == 5
    assert (ce.ce_warmup_updates, ext.ce_warmup_updates, long.ce_warmup_updates) == (0, 2, 2)
    assert (ext.max_tokens, ext.update_freq) == (2 * p.L, ce.max_tokens * ce.update_freq // (2 * p.L))
    assert (long.max_tokens, long.update_freq) == (ce.max_tokens, ce.update_freq)
    p.rc = dataclasses.replace(p.rc, ext_memory_segments=3)
    with pytest.raises(ConfigError, match="ext_memory_segments 3"):
        p.train_cfg("trime_ext")


def test_plan_warns_of_a_small_corpus(tmp_path):
    """The plan warns when the budget is many epochs of the corpus and when the test split is too small for
    its orderings to be shown; a budget of a fraction of an epoch on a larger test split warns of nothing."""
    p = Pipeline("micro", tmp_path / "run", str(make_corpus(tmp_path / "corpus", n_lines=120)), False, 400)
    p.prepare_data()
    warnings = plan_warnings(p)
    assert len(warnings) == 2
    assert "small for this budget: 400 updates are" in warnings[0] and "epochs" in warnings[0]
    assert "test split has only" in warnings[1]
    p.budgets = [1]
    p.rc = dataclasses.replace(p.rc, eval_tokens=0)
    with pytest.MonkeyPatch.context() as mp:  # a test split of 100k tokens
        mp.setattr(
            "trime.pipelines.reproduce.read_data_meta",
            lambda d: {"splits": {"train": {"tokens": 10**6}, "test": {"tokens": 10**5}}},
        )
        assert plan_warnings(p) == []


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_budget_study(tmp_path):
    """Two budgets and every variant: each model is trained once, through 3 then 6 updates, and its copy
    at 6 has the weights of a 6-update run from scratch; each budget is evaluated on its own; the study
    report lists every system at every budget; a rerun trains nothing."""
    corpus = make_corpus(tmp_path / "corpus", n_lines=300)
    out = tmp_path / "study"
    last = reproduce(preset="micro", out=out, corpus=str(corpus), max_update=[6, 3], variants=list(VARIANTS))
    assert last["max_update"] == 6 and last["epochs"] > 0
    names = [s.name for s in SYSTEMS] + [v[2].name for v in VARIANTS.values()]
    for budget in (3, 6):
        saved = json.loads((out / f"budget-{budget}" / "results.json").read_text())
        assert [s["name"] for s in saved["systems"]] == names and saved["max_update"] == budget
        assert (out / f"budget-{budget}" / "test_ppl.png").stat().st_size > 0
        assert "TrimeLM_long, shuffled groups" in saved["memory_curve"]
    for name in ("study.json", "study.md", "study.png"):
        assert (out / name).stat().st_size > 0, name
    study = json.loads((out / "study.json").read_text())
    assert [b["max_update"] for b in study["budgets"]] == [3, 6]
    md = (out / "study.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "| TrimeLM_long < TrimeLM |" in md

    models = ["ce", "trime_long_shuffled", "trime_ext", "trime_ext_random"]
    fresh = Pipeline("micro", tmp_path / "fresh", str(corpus), False, 6, list(VARIANTS))
    fresh.prepare_data()
    for name in models:
        a = io.read_meta(out / "models" / name / "checkpoint_6")
        b = io.read_meta(fresh.train(name))
        assert a["updates"] == b["updates"] == 6 and a["weights_sha256"] == b["weights_sha256"], name
        assert io.read_meta(out / "models" / name / "checkpoint_3")["updates"] == 3
        assert not (out / "models" / name / "checkpoint_3" / "trainer.pt").exists()

    stamp = (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime
    again = reproduce(preset="micro", out=out, corpus=str(corpus), max_update=[3, 6], variants=list(VARIANTS))
    assert (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime == stamp
    assert [s["test"]["ppl"] for s in again["systems"]] == [s["test"]["ppl"] for s in last["systems"]]


GOLDEN = Path(__file__).parent / "assets" / "golden_micro.json"

# What the golden numbers pin, and how tightly (issue #21). Measured between a 2-core AMD EPYC
# (AVX512-BF16, no AMX) and an Intel Xeon with AMX, same wheels:
# - torch's CPU kernels give the same training losses, memory-free, local and long-term perplexities
#   to ~1e-7 relative: pinned at DETERMINISTIC.
# - The systems with external memory search an IVF-PQ index. faiss trains its k-means centroids and
#   PQ codebooks with the CPU's own SIMD distance kernels, so last-bit differences move centroids and
#   with them the neighbours: valid perplexity moved 0.4% (kNN-LM), and kNN-LM's tuned T flipped
#   1 -> 4 on a 0.3% near-tie. Their perplexities are pinned at FAISS_CPU, and their tuned setting is
#   judged by the perplexity it gives: the golden setting must score, in this run's own sweep, within
#   NEAR_TIE of the best setting. Systems without external memory must pick the golden setting itself.
DETERMINISTIC = 1e-5
FAISS_CPU = 0.02
NEAR_TIE = 0.01


def _check_golden(out: Path, saved: dict) -> None:
    """Training losses, tuned settings and perplexities of the micro job (CPU, fixed seeds) equal the
    ones in tests/assets/golden_micro.json, within what differs between CPUs (above): a refactor that
    changes a number fails here. ``TRIME_WRITE_GOLDEN=1`` writes the file from this run instead."""
    if os.environ.get("TRIME_WRITE_GOLDEN") == "1":
        _write_golden(out, saved)
    golden = json.loads(GOLDEN.read_text())
    for model, rows in golden["train"].items():
        log = [json.loads(line) for line in (out / "models" / model / "log.jsonl").read_text().splitlines()]
        assert [[r["kind"], r["update"]] for r in log] == [r[:2] for r in rows], model
        assert [r["loss"] for r in log] == pytest.approx([r[2] for r in rows], rel=DETERMINISTIC), model
    for system in SYSTEMS:
        s = {r["name"]: r for r in saved["systems"]}[system.name]
        want = golden["systems"][system.name]
        rel = FAISS_CPU if system.dstore else DETERMINISTIC
        if system.dstore and s["settings"] != want["settings"]:
            sweep_rows = io.read_json(out / "evals" / f"{slug(system.name)}.tuned.json")["sweep"]
            best = min(r["ppl"] for r in sweep_rows)
            at_golden = [r["ppl"] for r in sweep_rows if all(r[k] == v for k, v in want["settings"].items())]
            assert len(at_golden) == 1 and at_golden[0] <= best * (1 + NEAR_TIE), (system.name, s["settings"])
        else:
            assert s["settings"] == want["settings"], system.name
        got = (s["valid"]["ppl"], s["test"]["ppl"])
        assert got == pytest.approx((want["valid"], want["test"]), rel=rel), system.name
    for name, pts in saved["memory_curve"].items():
        want = golden["memory_curve"][name]
        assert [m for m, _ in pts] == [m for m, _ in want], name
        assert [p for _, p in pts] == pytest.approx([p for _, p in want], rel=DETERMINISTIC), name


def _write_golden(out: Path, saved: dict) -> None:
    train = {}
    for model in ("ce", "trime", "trime_long", "trime_ext"):
        log = [json.loads(line) for line in (out / "models" / model / "log.jsonl").read_text().splitlines()]
        train[model] = [[r["kind"], r["update"], r["loss"]] for r in log]
    systems = {
        s["name"]: {"settings": s["settings"], "valid": s["valid"]["ppl"], "test": s["test"]["ppl"]}
        for s in saved["systems"]
        if s["name"] in {x.name for x in SYSTEMS}
    }
    golden = {"made_on": _cpu_name(), "memory_curve": saved["memory_curve"]}
    GOLDEN.write_text(json.dumps({**golden, "systems": systems, "train": train}, indent=1) + "\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def test_stage_clock_counts_nested_stages_once(monkeypatch):
    """A stage entered inside another is charged to the inner one only; the stages add up."""
    now = [0.0]
    monkeypatch.setattr("trime.pipelines.reproduce.time.time", lambda: now[0])
    clock = StageClock()
    with clock("tune"):
        now[0] += 10
        with clock("datastore"):
            now[0] += 100
        now[0] += 5
    now[0] += 1000  # outside every stage: not charged
    with clock("tune"):
        now[0] += 2
    assert clock.seconds == {"tune": 17.0, "datastore": 100.0}
    assert clock.lines(1117.0)[-1].strip() == "18.6 min  total"
