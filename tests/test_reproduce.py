"""The main job at micro size: every artifact exists, every number is finite, a rerun resumes."""

import json
import math

from tests.fixtures import make_corpus
from trime.reproduce import SYSTEMS, reproduce


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

    stamp = (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime
    again = reproduce(preset="micro", out=out, corpus=str(corpus))  # everything is done: nothing reruns
    assert (out / "models" / "ce" / "checkpoint_last" / "meta.json").stat().st_mtime == stamp
    assert [s["test"]["ppl"] for s in again["systems"]] == [s["test"]["ppl"] for s in results["systems"]]
