"""The translation job at micro size: every artifact, the tuning, the table; a rerun resumes; a stale
model is trained again and everything built on it is redone."""

import dataclasses
import math
from pathlib import Path

import pytest

from trime import io
from trime.checkpoint import model_fingerprint
from trime.cli import main
from trime.pipelines.mt_reproduce import SYSTEMS, MTPipeline, mt_reproduce, plan

RAW = Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"


def _corpus(root: Path) -> Path:
    """The test pairs without their empty lines (the job prepares without --allow-empty)."""
    root.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        es, en = ((RAW / f"{split}.{lang}").read_text().splitlines() for lang in ("es", "en"))
        keep = [(a, b) for a, b in zip(es, en) if a.strip() and b.strip()]
        (root / f"{split}.es").write_text("".join(a + "\n" for a, _ in keep))
        (root / f"{split}.en").write_text("".join(b + "\n" for _, b in keep))
    return root


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_micro_translation_job(tmp_path):
    corpus, out = _corpus(tmp_path / "corpus"), tmp_path / "run"
    res = mt_reproduce("mt_micro", out, str(corpus), source_lang="es", target_lang="en")
    for name in ("results.json", "results.md", "bleu.png", "bm25/order.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "dstore" / "vanilla" / "knn.index.l2").is_file() and (
        out / "dstore" / "trime_mt" / "knn.index.ip"
    ).is_file()
    assert [s["name"] for s in res["systems"]] == [s.name for s in SYSTEMS]
    for s in res["systems"]:
        for split in ("valid", "test"):
            assert math.isfinite(s[split]["bleu"]) and s[split]["n_sentences"] == 12
            assert s[split]["bleu_line"].startswith("BLEU = ")
    rows = {s["name"]: s for s in res["systems"]}
    # tuned on valid by the references' perplexity: the chosen setting is the sweep's best, from the preset's grid
    knn = io.read_json(out / "evals" / "knn_mt.tuned.json")
    assert len(knn["sweep"]) == 4 and min(r["loss"] for r in knn["sweep"]) == min(
        r["loss"]
        for r in knn["sweep"]
        if (r["lmbda"], r["interp_temp"]) == (knn["best"]["lmbda"], knn["best"]["knn_temp"])
    )
    assert rows["+ kNN-MT"]["settings"] == knn["best"] and knn["best"]["lmbda"] in (0.1, 0.3)
    assert set(rows["TrimeMT + external"]["settings"]) == {"knn_temp"}
    assert rows["TrimeMT + external (released form)"]["settings"] == rows["TrimeMT + external"]["settings"]
    # micro models do not translate (BLEU under the floor): every ordering is reported as not shown
    assert set(res["claims"]) and all(v == "not shown" for v in res["claims"].values())
    assert all("floor" in o["why"] or o["why"] == "a tie" for o in res["orderings"])
    hyps = (out / "evals" / "trimemt_external.test.out").read_text().splitlines()
    assert sum(line.startswith("H-") for line in hyps) == 12
    md = (out / "results.md").read_text()
    assert all(f"| {s.name} |" in md for s in SYSTEMS) and "Claims of the paper" in md

    updates = {m: io.read_meta(out / "models" / m / "checkpoint_last")["updates"] for m in ("vanilla", "trime_mt")}
    assert updates == {"vanilla": res["updates"], "trime_mt": res["updates"]}  # the same budget, in updates
    assert set(res["epochs"]) == {"vanilla", "trime_mt"} and "Both models trained" in md

    stamps = {p: p.stat().st_mtime for p in (out / "evals").glob("*.json")}
    again = mt_reproduce("mt_micro", out, str(corpus), source_lang="es", target_lang="en")  # nothing is redone
    assert {p: p.stat().st_mtime for p in (out / "evals").glob("*.json")} == stamps
    assert [s["test"]["bleu"] for s in again["systems"]] == [s["test"]["bleu"] for s in res["systems"]]

    p = MTPipeline("mt_micro", out, str(corpus), max_epoch=1, langs=("es", "en"))  # a smaller budget
    p.prepare_data()
    best = p.train("vanilla")
    assert io.read_meta(out / "models" / "vanilla" / "checkpoint_last")["epoch"] == 2  # one epoch, from scratch
    d, _ = p.datastore("vanilla")
    assert io.read_meta(d)["model_fingerprint"] == model_fingerprint(best)
    row = p.score(SYSTEMS[0], "test", {})
    key = io.read_json(out / "evals" / "transformer_ce.test.json")["key"]
    assert key["inputs"]["model"] == model_fingerprint(best) and row["n_sentences"] == 12


def test_the_plan_of_a_small_corpus(tmp_path):
    """Both models get the same updates: max_epoch epochs of the vanilla batches, raised to min_update for a
    small corpus (with a warning), or max_update; the plan shows each model's epochs and the estimate."""
    p = MTPipeline("mt_micro", tmp_path / "run", str(_corpus(tmp_path / "corpus")), langs=("es", "en"))
    p.prepare_data()
    per_epoch = p.updates_per_epoch("vanilla")
    assert p.budget() == p.rc.max_epoch * per_epoch and p.train_cfg("trime_mt").max_update == p.budget()
    lines = plan(p)
    assert lines[0].startswith(f"plan: vanilla and TrimeMT x {p.budget()} updates each") and "estimated" in lines[0]
    assert any("test sentences" in line for line in lines)  # 12 test sentences: a warning
    p.rc = dataclasses.replace(p.rc, min_update=50 * per_epoch)
    assert p.budget() == 50 * per_epoch
    assert any(line.startswith("warning: the corpus is small for this preset") for line in plan(p))
    p.rc = dataclasses.replace(p.rc, max_update=7)
    assert p.budget() == p.train_cfg("vanilla").max_update == 7


def test_mt_reproduce_refuses_a_foreign_out_and_a_language_model_preset(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    args = ["mt", "reproduce", "--corpus", str(corpus), "--source-lang", "es", "--target-lang", "en"]
    assert main([*args, "--preset", "mt_micro", "--out", str(tmp_path / "busy")]) == 2
    assert main([*args, "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a trime mt-reproduce run" in err[0] and "language-model recipe" in err[1]
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad", ["nope", "--max-epoch=-1", "--max-update=-2"])
def test_mt_reproduce_bad_corpus_or_budget_is_one_line(tmp_path, capsys, bad):
    args = ["mt", "reproduce", "--preset", "mt_micro", "--out", str(tmp_path / "o")]
    args += ["--corpus", bad] if bad == "nope" else ["--corpus", "bible-es-en", bad]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trime")
