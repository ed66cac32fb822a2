"""The main job at micro size: every artifact exists, the numbers equal the golden ones, a rerun resumes."""

import json
import math
from pathlib import Path

import pytest

from trime.pipelines.reproduce import SYSTEMS, reproduce

from tests.fixtures import make_corpus


def test_micro_pipeline(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_lines=300)
    out = tmp_path / "run"
    results = reproduce(preset="micro", out=out, corpus=str(corpus))
    for name in ("results.json", "results.md", "test_ppl.png", "memory_curve.png", "bm25/batches.json"):
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
    assert set(saved["claims"]) and all(isinstance(v, bool) for v in saved["claims"].values())
    _check_golden(out, saved)

    stamp = (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime
    again = reproduce(preset="micro", out=out, corpus=str(corpus))  # everything is done: nothing reruns
    assert (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime == stamp
    assert [s["test"]["ppl"] for s in again["systems"]] == [s["test"]["ppl"] for s in results["systems"]]


GOLDEN = Path(__file__).parent / "assets" / "golden_micro.json"


def _check_golden(out: Path, saved: dict) -> None:
    """Training losses, tuned settings and perplexities of the micro job (CPU, fixed seeds) equal the
    ones in tests/assets/golden_micro.json, written by the code before the module-layout change:
    a refactor that changes a number fails here."""
    golden = json.loads(GOLDEN.read_text())
    for model, rows in golden["train"].items():
        log = [json.loads(line) for line in (out / "models" / model / "log.jsonl").read_text().splitlines()]
        assert [[r["kind"], r["update"]] for r in log] == [r[:2] for r in rows], model
        assert [r["loss"] for r in log] == pytest.approx([r[2] for r in rows], rel=1e-5), model
    for s in saved["systems"]:
        want = golden["systems"][s["name"]]
        assert s["settings"] == want["settings"], s["name"]
        assert (s["valid"]["ppl"], s["test"]["ppl"]) == pytest.approx((want["valid"], want["test"]), rel=1e-5), s[
            "name"
        ]
    for name, pts in saved["memory_curve"].items():
        want = golden["memory_curve"][name]
        assert [m for m, _ in pts] == [m for m, _ in want], name
        assert [p for _, p in pts] == pytest.approx([p for _, p in want], rel=1e-5), name
