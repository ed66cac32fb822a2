"""The command line: a whole micro workflow, and one clear line with exit code 2 for bad input."""

import subprocess
import sys

import pytest

from tests.fixtures import make_corpus


def trime(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trime", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(proc, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trime: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert words in lines[0], lines[0]


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_micro_workflow_end_to_end(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_lines=200)
    assert trime("data", "prepare", corpus, "--out", tmp_path / "data").returncode == 0
    p = trime(
        "train",
        tmp_path / "data",
        "--preset",
        "micro",
        "--criterion",
        "trime",
        "--max-update",
        "4",
        "--save-dir",
        tmp_path / "run",
    )
    assert p.returncode == 0, p.stderr
    p = trime(
        "eval",
        tmp_path / "data",
        "--path",
        tmp_path / "run",
        "--context-window",
        "16",
        "--use-local",
        "--softmax-temp",
        "1.1",
        "--gen-subset",
        "test",
    )
    assert p.returncode == 0, p.stderr
    assert "Loss (base 2): " in p.stdout and ", Perplexity: " in p.stdout


def test_missing_corpus(tmp_path):
    assert_user_error(trime("data", "prepare", tmp_path / "nope", "--out", tmp_path / "d"), "nope")


def test_unknown_corpus_name(tmp_path):
    assert_user_error(trime("data", "fetch", "wikitext-2000", "--out", tmp_path / "x"), "wikitext-2000")


def test_non_utf8_word_level(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_lines=20)
    (corpus / "train.txt").write_bytes(b"caf\xe9 au lait\n")
    assert_user_error(trime("data", "prepare", corpus, "--out", tmp_path / "d"), "UTF-8")
    assert not (tmp_path / "d").exists()


def test_train_without_data(tmp_path):
    assert_user_error(trime("train", tmp_path / "nodata", "--preset", "micro", "--save-dir", tmp_path / "r"), "nodata")


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_checkpoint_without_config(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_lines=30)
    assert trime("data", "prepare", corpus, "--out", tmp_path / "d").returncode == 0
    (tmp_path / "ckpt").mkdir()
    assert_user_error(trime("eval", tmp_path / "d", "--path", tmp_path / "ckpt"), "ckpt")


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--max-tokens", "100"], "--max-tokens"),
        (["--shuffle-groups"], "--keep-order"),
        (["--simulate-ranks", "3"], "--simulate-ranks 3 must divide the 4 segments"),
    ],
)
def test_bad_flag_combinations(tmp_path, flags, words):
    assert_user_error(trime("train", tmp_path, "--preset", "micro", *flags), words)


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_bm25_batches_feed_trime_ext(tmp_path):
    import json

    corpus = make_corpus(tmp_path / "corpus", n_lines=200)
    assert trime("data", "prepare", corpus, "--out", tmp_path / "data").returncode == 0
    p = trime("bm25", "batches", tmp_path / "data", "--tokens-per-sample", "32", "--out", tmp_path / "b.json")
    assert p.returncode == 0, p.stderr
    order = json.loads((tmp_path / "b.json").read_text())
    assert sorted(order) == list(range(len(order)))
    p = trime(
        "train",
        tmp_path / "data",
        "--preset",
        "micro",
        "--criterion",
        "trime_ext",
        "--predefined-batches",
        tmp_path / "b.json",
        "--max-update",
        "2",
        "--save-dir",
        tmp_path / "run",
    )
    assert p.returncode == 0, p.stderr
    (tmp_path / "short.json").write_text(json.dumps(order[:-1]))
    p = trime(
        "train",
        tmp_path / "data",
        "--preset",
        "micro",
        "--criterion",
        "trime_ext",
        "--predefined-batches",
        tmp_path / "short.json",
        "--max-update",
        "2",
        "--save-dir",
        tmp_path / "run2",
    )
    assert_user_error(p, "short.json")


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_prepare_translation_pairs(tmp_path):
    """`trime data prepare` of a pair corpus equals the library's prepare_pairs (itself checked against
    fairseq-preprocess in tests/data/test_pairs.py); a missing target side is one clear line."""
    from pathlib import Path

    from trime.data.pairs import load_pair_split, prepare_pairs

    raw = Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"
    flags = ["--source-lang", "es", "--target-lang", "en", "--bpe-merges", "200", "--allow-empty"]
    p = trime("data", "prepare", raw, "--out", tmp_path / "cli", *flags)
    assert p.returncode == 0, p.stderr
    lib = prepare_pairs(raw, tmp_path / "lib", source_lang="es", target_lang="en", bpe_merges=200, allow_empty=True)
    for side in ("es", "en"):
        assert (tmp_path / "cli" / f"dict.{side}.txt").read_text() == (lib / f"dict.{side}.txt").read_text()
    a, b = load_pair_split(tmp_path / "cli", "train"), load_pair_split(lib, "train")
    assert a.src.tolist() == b.src.tolist() and a.tgt.tolist() == b.tgt.tolist()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.es").write_text("hola\n")
    assert_user_error(trime("data", "prepare", bad, "--out", tmp_path / "x", *flags), "no parallel")
