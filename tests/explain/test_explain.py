"""The neighbour report: its numbers are evaluation's, and the page works in a real (headless) browser."""

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from trime import config as C
from trime.cli import main
from trime.data.dictionary import Dictionary
from trime.data.prepare import load_split
from trime.datastore_build import build_datastore
from trime.errors import DataError
from trime.evaluate import evaluate
from trime.explain.report import explain, explain_tokens, token_strings
from trime.memory.datastore import Datastore
from trime.memory.index import build_index

from tests.fixtures import make_data, micro_checkpoint

N = 150  # valid tokens explained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_data(root, n_lines=120)
    ckpt = micro_checkpoint(root, data)
    ds = C.DatastoreConfig(
        data=str(data), path=str(ckpt), out=str(root / "dstore"), context_window=8, key_dtype="float32", device="cpu"
    )
    dstore = build_datastore(ds)
    index = build_index(dstore, root / "dstore" / "knn.index.ip", metric="ip")
    return root, data, ckpt, dstore, index


MEMORY = dict(use_local=True, use_long=True, mem_size=24, use_external=True, use_interp=True, lmbda=0.25, k=8)


def flags(setup, **kw):
    root, data, ckpt, dstore, index = setup
    base = dict(path=str(ckpt), context_window=16, device="cpu", max_eval_tokens=N)
    if kw.get("use_external") or kw.get("use_interp"):
        base.update(dstore=str(dstore), indexfile=str(index))
    return {**base, **kw}


@pytest.fixture(scope="module")
def report(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = C.ExplainConfig(
        data=str(setup[1]),
        out=str(out / "report.html"),
        json=str(out / "report.json"),
        dstore_data=str(setup[1]),
        **flags(setup, **MEMORY),
    )
    explain(cfg)
    return json.loads((out / "report.json").read_text()), out / "report.html"


def test_json_numbers_are_evaluations(setup, report):
    rep, _ = report
    toks = rep["tokens"]
    with_mem = evaluate(C.EvalConfig(data=str(setup[1]), **flags(setup, **MEMORY)))
    without = evaluate(C.EvalConfig(data=str(setup[1]), **flags(setup)))
    assert len(toks) == with_mem.n_tokens == N
    np.testing.assert_allclose([t["lp"] for t in toks], with_mem.log_probs, atol=2e-5)
    np.testing.assert_allclose([t["lp0"] for t in toks], without.log_probs, atol=2e-5)
    assert rep["summary"]["ppl"] == pytest.approx(with_mem.ppl, rel=1e-4)
    assert rep["summary"]["ppl0"] == pytest.approx(without.ppl, rel=1e-4)
    # p(y) = output-layer part + memory part; the listed entries are among the memory part
    p = np.exp([t["lp"] for t in toks])
    np.testing.assert_allclose([t["p_tok"] + t["p_mem"] for t in toks], p, rtol=1e-3, atol=1e-6)
    text = load_split(setup[1], "valid")
    values = Datastore.open(setup[3]).values.numpy()
    kinds = set()
    for i, t in enumerate(toks):
        assert t["tok"] == int(text[i])
        ws = [e["w"] for e in t["mem"]]
        assert ws == sorted(ws, reverse=True) and sum(ws) <= t["p_mem"] + 1e-5
        for e in t["mem"]:  # every listed entry stores the target: local/long at a stream position, ext a row
            kinds.add(e["m"])
            if e["m"] == "ext":
                assert values[e["pos"]] == t["tok"]
            else:
                assert int(text[e["pos"]]) == t["tok"] and e["pos"] < i
                assert e["m"] == "local" or e["pos"] < i // 16 * 16  # long: an earlier block
        alt = [a[1] for a in t["alt"]]
        assert alt == sorted(alt, reverse=True) and alt[0] >= math.exp(t["lp"]) - 1e-4
        assert t["tok"] not in [a[0] for a in t["alt"]] or any(
            a[0] == t["tok"] and abs(a[1] - math.exp(t["lp"])) < 1e-4 for a in t["alt"]
        )
    assert kinds == {"local", "long", "ext"}
    page = report[1].read_text()  # one self-contained file: nothing is fetched
    assert "<link" not in page and "<script src" not in page and "http://" not in page and "https://" not in page
    assert rep["notes"] == [] and rep["snippets"]  # external rows map back to the datastore's split


@pytest.mark.parametrize(
    "memory",
    [dict(use_external=True, k=8), dict(use_interp=True, lmbda=0.25, k=8), dict(use_local=True),
     dict(use_local=True, use_external=True, k=8)],
    ids=["external", "interp", "local", "local+external"],
)  # fmt: skip
def test_every_memory_alone_is_its_evaluation(setup, memory):
    """Each memory without the others (explain once failed with the external memory alone: it counted the
    window's tokens as local entries)."""
    rep = explain_tokens(C.ExplainConfig(data=str(setup[1]), **flags(setup, **memory)))
    got = evaluate(C.EvalConfig(data=str(setup[1]), **flags(setup, **memory)))
    np.testing.assert_allclose([t["lp"] for t in rep["tokens"]], got.log_probs, atol=2e-5)


def test_text_mode_and_datastores_without_positions(setup, tmp_path):
    root, data, ckpt, dstore, index = setup
    cfg = dict(text="w1 w2 w3 w1 w2\nw3 w1", out=str(tmp_path / "r.html"), **flags(setup, **MEMORY))
    del cfg["max_eval_tokens"]
    rep = explain(C.ExplainConfig(**cfg))
    assert rep["summary"]["n_tokens"] == 9  # two lines, each ended by </s>
    assert "--dstore-data" in rep["notes"][0] and rep["snippets"] == {}
    # a datastore built before splits were recorded: the report still works and says how to fix it
    old = tmp_path / "old-dstore"
    shutil.copytree(dstore, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["split"], meta["split_fingerprint"]
    (old / "meta.json").write_text(json.dumps(meta))
    rep = explain(C.ExplainConfig(**{**cfg, "dstore": str(old), "dstore_data": str(data)}))
    assert "Rebuild it with `trime datastore build`" in rep["notes"][0]
    assert "Rebuild it with" in Path(cfg["out"]).read_text()  # the page carries the note
    # the wrong data directory for the datastore's split is a one-line user error
    other = make_data(tmp_path / "other", n_lines=60)
    with pytest.raises(DataError, match="not the one the datastore"):
        explain(C.ExplainConfig(**{**cfg, "dstore_data": str(other)}))
    argv = ["explain", "--path", str(ckpt), "--text", "w1 w2", "--out", str(tmp_path / "c.html"), "--device", "cpu"]
    assert main(argv) == 0 and (tmp_path / "c.html").stat().st_size > 1000
    assert main(["explain", "--path", str(ckpt), "--out", str(tmp_path / "d.html")]) == 2  # no data, no text


# ------------------------------------------------------------------------------------------------
# In a browser


def _driver():
    """A headless Chromium through Selenium and the system chromedriver, or a skip with the reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _open(page: Path):
    """A headless Chromium showing ``page``, once its script has drawn it (body data-ready)."""
    from selenium.webdriver.common.by import By

    d = _driver()
    try:
        d.get(page.resolve().as_uri())
        for _ in range(50):
            if d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1":
                break
            time.sleep(0.1)
    except Exception:
        d.quit()
        raise
    return d


def fmtp(p: float) -> str:
    """The page's number format (JS: toFixed(3) from 0.01 on, else toExponential(1))."""
    if p >= 0.01:
        return f"{p:.3f}"
    m, e = f"{p:.1e}".split("e")
    return f"{m}e{'+' if int(e) >= 0 else '-'}{abs(int(e))}"


def test_page_in_headless_chromium(report, tmp_path):
    from selenium.webdriver.common.by import By

    rep, page = report
    d = _open(page)
    try:
        assert d.find_element(By.ID, "ppl").text == f"{rep['summary']['ppl']:.2f}"
        assert d.find_element(By.ID, "ppl0").text == f"{rep['summary']['ppl0']:.2f}"
        spans = d.find_elements(By.CSS_SELECTOR, "#text .t")
        assert len(spans) == len(rep["tokens"])
        shown = {k: "↵" if w == "\n" else w for k, w in rep["vocab"].items()}  # </s> is drawn as ↵
        assert [s.text for s in spans[:5]] == [shown[str(t["tok"])] for t in rep["tokens"][:5]]
        # click the token with the most kinds of memory entries and check the panel against the JSON
        i = max(range(len(rep["tokens"])), key=lambda j: (len({e["m"] for e in rep["tokens"][j]["mem"]}), j))
        t = rep["tokens"][i]
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", spans[i])
        spans[i].click()
        assert d.find_element(By.ID, "p-mem").text == fmtp(math.exp(t["lp"]))
        assert d.find_element(By.ID, "p-nomem").text == fmtp(math.exp(t["lp0"]))
        rows = d.find_elements(By.CSS_SELECTOR, "#neighbours tr[data-kind]")
        assert [r.get_attribute("data-kind") for r in rows] == [e["m"] for e in t["mem"]]
        assert [r.find_element(By.CSS_SELECTOR, "td.w").text for r in rows] == [fmtp(e["w"]) for e in t["mem"]]
        assert [r.find_element(By.CSS_SELECTOR, "td.s").text for r in rows] == [f"{e['s']:.2f}" for e in t["mem"]]
        alts = d.find_elements(By.CSS_SELECTOR, "#alts tr td:first-child")
        assert [a.text for a in alts] == [shown[str(a[0])] for a in t["alt"]]
        ext = [r for r in rows if r.get_attribute("data-kind") == "ext"]
        assert ext and "row" in ext[0].text and "…" in ext[0].text  # the datastore text around the neighbour
        assert d.get_log("browser") == []  # no script errors
        shot = tmp_path / "explain.png"
        d.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("TRIME_TEST_ARTIFACTS"):
            Path(os.environ["TRIME_TEST_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(os.environ["TRIME_TEST_ARTIFACTS"]) / "explain.png")
    finally:
        d.quit()


def test_byte_level_tokens_are_shown_as_characters():
    d = Dictionary()
    for b in (65, 195, 9):
        d.add_symbol(str(b))
    shown = token_strings(d)
    assert [shown[d.index(x)] for x in ("65", "195", "9")] == ["A", "\\xc3", "\\x09"] and shown[d.eos] == "\n"
