"""`trime explain` on a translation model: its numbers are the decoding combiner's, its hypothesis is
`trime mt generate`'s, its neighbours are training pairs, and the page shows them in a real browser.

A real fairseq translation model (tests/assets/fairseq_mt) with a datastore over the 40 pairs it comes with."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from trime import config as C
from trime.cli import main
from trime.data.pairs import load_pair_split, prepare_pairs
from trime.datastore_build import build_mt_datastore
from trime.errors import ConfigError, DataError
from trime.explain.report import explain
from trime.memory.datastore import Datastore
from trime.memory.index import build_index
from trime.mt_generate import translate
from trime.train import LN2

from tests.explain.test_explain import _open, fmtp
from tests.fixtures import make_data

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fairseq_mt"
MODEL = str(ASSETS / "post_tied.pt")
SENTENCE = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_mt")
    corpus = root / "corpus"
    corpus.mkdir()
    for split in ("train", "test"):  # the test pairs twice: prepare_pairs needs a train split
        shutil.copy(ASSETS / "test.src", corpus / f"{split}.src")
        shutil.copy(ASSETS / "test.tgt", corpus / f"{split}.tgt")
    data = prepare_pairs(corpus, root / "data", src_dict=ASSETS / "dict.src.txt", tgt_dict=ASSETS / "dict.tgt.txt")
    ds = build_mt_datastore(
        C.MTDatastoreConfig(data=str(data), path=MODEL, out=str(root / "ds"), key_dtype="float32", device="cpu")
    )
    index = build_index(ds, root / "ds" / "knn.index.ip", metric="ip")
    return root, data, ds, index


def _cfg(setup, out: Path, **kw) -> C.ExplainConfig:
    root, data, ds, index = setup
    base = dict(data=str(data), path=MODEL, gen_subset="test", sentence=SENTENCE, device="cpu",
                out=str(out / "mt.html"), json=str(out / "mt.json"))  # fmt: skip
    if kw.get("use_interp") or kw.get("use_external"):
        base.update(dstore=str(ds), indexfile=str(index), k=8)
    return C.ExplainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def knn_report(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("knn")
    explain(_cfg(setup, out, use_interp=True, lmbda=0.4, interp_temp=10.0))
    return json.loads((out / "mt.json").read_text()), out / "mt.html"


def test_reference_numbers_are_knn_mts(setup, knn_report):
    """Teacher-forced reference: p = (1 − λ)·p_model + λ·Σ_{v_j = y} softmax(a/T)_j from the listed
    neighbours, p without memory is `trime mt generate --score-reference`'s, every neighbour is a training
    pair's target position holding its token."""
    root, data, ds, index = setup
    rep, _ = knn_report
    split = load_pair_split(data, "test")
    assert rep["src"] == split.source(SENTENCE).tolist() and rep["tgt"] == rep["ref"] == split.target(SENTENCE).tolist()
    toks = rep["tokens"]
    assert [t["tok"] for t in toks] == rep["tgt"] and rep["summary"]["mode"] == "knn"
    lam, temp = 0.4, 10.0
    for t in toks:
        a = np.array([e["a"] for e in t["nb"]])
        w = np.exp(a / temp - (a / temp).max())
        w /= w.sum()
        knn = sum(wj for wj, e in zip(w, t["nb"]) if e["v"] == t["tok"])
        assert math.exp(t["lp"]) == pytest.approx((1 - lam) * math.exp(t["lp0"]) + lam * knn, rel=1e-3, abs=1e-6)
        assert t["p_tok"] + t["p_mem"] == pytest.approx(math.exp(t["lp"]), rel=1e-4, abs=1e-6)
        np.testing.assert_allclose([e["w"] for e in t["nb"]], lam * w, rtol=1e-3, atol=1e-6)
    ref = translate(C.TranslateConfig(data=str(data), path=MODEL, score_reference=True, device="cpu"))
    h_line = next(x for x in ref.lines if x.startswith(f"H-{SENTENCE}\t"))
    assert float(h_line.split("\t")[1]) == pytest.approx(np.mean([t["lp0"] for t in toks]) / LN2, abs=1e-4)
    values, train = Datastore.open(ds).values.numpy(), load_pair_split(data, "train")
    for t in toks:
        assert [e["a"] for e in t["nb"]] == sorted((e["a"] for e in t["nb"]), reverse=True) and len(t["nb"]) == 8
        for e in t["nb"]:
            assert values[e["row"]] == e["v"] == train.target(e["sent"])[e["pos"]]
            pair = [train.source(e["sent"]).tolist(), train.target(e["sent"]).tolist()]
            assert rep["sentences"][str(e["sent"])] == pair
    assert rep["notes"] == [] and rep["summary"]["metric"] == "ip"
    g = rep["grid"]  # the page's k, λ, T controls: the combiner at other settings, the run's own among them
    assert g["k"] == [1, 2, 4, 8] and lam in g["lmbda"] and temp in g["T"] and 0.0 in g["lmbda"]
    at = g["lp"][g["k"].index(8)][g["lmbda"].index(lam)][g["T"].index(temp)]
    np.testing.assert_allclose(at, [t["lp"] for t in toks], atol=2e-5)
    np.testing.assert_allclose(g["lp"][0][g["lmbda"].index(0.0)][0], [t["lp0"] for t in toks], atol=2e-5)
    assert toks[0]["nb"][0]["sent"] == SENTENCE  # the pair itself is in the datastore: its own entry comes first


def test_beam_hypothesis_is_mt_generates(setup, tmp_path):
    """--beam 5 with TrimeMT memory: the hypothesis and the translation without memory are `trime mt generate`'s,
    the joint softmax's parts add up to p."""
    root, data, ds, index = setup
    rep = explain(_cfg(setup, tmp_path, use_external=True, softmax_temp=1.0, beam=5))
    words = rep["tgt_vocab"]
    base = dict(data=str(data), path=MODEL, max_sentences_total=SENTENCE + 1, device="cpu")
    memory = dict(dstore=str(ds), indexfile=str(index), knn_mode="trime", k=8, knn_temp=1.0)
    for ids, cfg in [(rep["tgt"], C.TranslateConfig(**base, **memory)), (rep["baseline"], C.TranslateConfig(**base))]:
        h_line = next(x for x in translate(cfg).lines if x.startswith(f"H-{SENTENCE}\t"))
        assert h_line.split("\t")[2] == " ".join(words[str(t)] for t in ids[:-1])
    assert rep["summary"]["target"] == "beam hypothesis (beam 5)" and rep["summary"]["mode"] == "trime"
    for t in rep["tokens"]:
        assert t["p_tok"] + t["p_mem"] == pytest.approx(math.exp(t["lp"]), rel=1e-4, abs=1e-6)
        assert 0 < t["share"] < 1 and sum(e["w"] for e in t["nb"]) == pytest.approx(t["share"], rel=1e-3)
    released = explain(_cfg(setup, tmp_path, use_external=True, released=True))
    assert released["summary"]["mode"] == "trime_released"
    for t in released["tokens"]:  # (1 − λ)·p + p_knn: the neighbours' weights sum to 1
        assert sum(e["w"] for e in t["nb"]) == pytest.approx(1, rel=1e-3)
        assert t["p_tok"] + t["p_mem"] == pytest.approx(math.exp(t["lp"]), rel=1e-4, abs=1e-6)


def test_without_memory_and_user_errors(setup, tmp_path, capsys):
    root, data, ds, index = setup
    rep = explain(_cfg(setup, tmp_path))
    assert rep["summary"]["mode"] == "" and all(t["nb"] == [] and t["lp"] == t["lp0"] for t in rep["tokens"])
    argv = ["explain", str(data), "--path", MODEL, "--gen-subset", "test", "--device", "cpu", "--out"]
    assert main([*argv, str(tmp_path / "a.html"), "--sentence", "1"]) == 0
    assert "tokens explained" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "b.html"), "--sentence", "40"]) == 2
    assert "has 40 pairs" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "c.html"), "--use-local"]) == 2
    assert "--use-local" in capsys.readouterr().err
    # DATA whose train split is not the datastore's: a note, or the datastore's pairs with --dstore-data
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = {x: (ASSETS / f"test.{x}").read_text().splitlines(keepends=True) for x in ("src", "tgt")}
    for x in ("src", "tgt"):
        (corpus / f"train.{x}").write_text("".join(lines[x][:20]))
        (corpus / f"test.{x}").write_text("".join(lines[x]))
    dicts = dict(src_dict=ASSETS / "dict.src.txt", tgt_dict=ASSETS / "dict.tgt.txt")
    other = prepare_pairs(corpus, tmp_path / "other", **dicts)
    memory = dict(data=str(other), use_interp=True, lmbda=0.2)
    rep = explain(_cfg(setup, tmp_path, **memory))
    assert "--dstore-data" in rep["notes"][0] and rep["sentences"] == {} and rep["tokens"][0]["nb"]
    rep = explain(_cfg(setup, tmp_path, **memory, dstore_data=str(data)))
    assert rep["notes"] == [] and rep["sentences"]
    with pytest.raises(DataError, match="not the one the datastore"):
        explain(_cfg(setup, tmp_path, **memory, dstore_data=str(other)))
    lm_data = make_data(tmp_path / "lm", n_lines=20)
    with pytest.raises(ConfigError, match="pairs directory"):
        explain(C.ExplainConfig(data=str(lm_data), path=MODEL, sentence=3, out=str(tmp_path / "d.html")))


def test_page_in_headless_chromium(knn_report):
    """What a person sees: the source, the target tokens, and after a click the token's p and its neighbours'
    training pairs (source and target sentence, the stored position highlighted)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rep, page = knn_report
    src_w, tgt_w = rep["src_vocab"], rep["tgt_vocab"]
    d = _open(page)
    try:
        assert d.find_element(By.ID, "src").text == " ".join(src_w[str(t)] for t in rep["src"])
        chips = d.find_elements(By.CSS_SELECTOR, "#tgt .t")
        assert [c.text for c in chips] == [tgt_w[str(t)] for t in rep["tgt"]]
        i = max(range(len(chips)), key=lambda j: sum(e["v"] == rep["tokens"][j]["tok"] for e in rep["tokens"][j]["nb"]))
        t = rep["tokens"][i]
        chips[i].click()
        assert d.find_element(By.ID, "p-mem").text == fmtp(math.exp(t["lp"]))
        assert d.find_element(By.ID, "p-nomem").text == fmtp(math.exp(t["lp0"]))
        rows = d.find_elements(By.CSS_SELECTOR, "#neighbours tr[data-v]")
        assert len(rows) == len(t["nb"])
        for row, e in zip(rows, t["nb"]):
            src, tgt = rep["sentences"][str(e["sent"])]
            assert row.find_element(By.CSS_SELECTOR, "td.val").text == tgt_w[str(e["v"])]
            assert row.find_element(By.CSS_SELECTOR, "td.w").text == fmtp(e["w"])
            assert row.find_element(By.CSS_SELECTOR, ".pair .src").text == " ".join(src_w[str(x)] for x in src)
            assert row.find_element(By.CSS_SELECTOR, ".pair .tg").text == " ".join(tgt_w[str(x)] for x in tgt)
            assert row.find_element(By.CSS_SELECTOR, ".pair b").text == tgt_w[str(tgt[e["pos"]])]
            assert ("vote" in row.get_attribute("class")) == (e["v"] == t["tok"])
        d.find_element(By.ID, "only").click()  # only the neighbours that voted for the token
        votes = d.find_elements(By.CSS_SELECTOR, "#neighbours tr[data-v]")
        assert len(votes) == sum(e["v"] == t["tok"] for e in t["nb"]) > 0
        # rescoring at k = 2, λ = 0.9: p with memory is the grid's, the neighbours after the second are greyed
        g = rep["grid"]
        Select(d.find_element(By.ID, "ctl-k")).select_by_visible_text("2")
        Select(d.find_element(By.ID, "ctl-l")).select_by_visible_text("0.9")
        want = g["lp"][g["k"].index(2)][g["lmbda"].index(0.9)][g["T"].index(10.0)]
        assert d.find_element(By.ID, "p-mem").text == fmtp(math.exp(want[i]))
        assert d.find_element(By.ID, "lp").text == f"{sum(want):.2f}"
        d.find_element(By.ID, "only").click()
        rows = d.find_elements(By.CSS_SELECTOR, "#neighbours tr[data-v]")
        assert [r.get_attribute("class") == "beyond" for r in rows] == [j >= 2 for j in range(len(t["nb"]))]
        assert d.get_log("browser") == []  # no script errors
    finally:
        d.quit()
