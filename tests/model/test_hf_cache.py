"""A GGUF file converted once into its cache entry (trime.hf_cache): the same model and tokenizer as the file,
no half entry after a killed conversion, a damaged entry rebuilt, and loads that print nothing by default."""

from __future__ import annotations

import os

import pytest
import torch

from trime import hf_cache
from trime.data.hf_text import load_tokenizer
from trime.model.hf import load_hf

from tests.fixtures import write_llama_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

V = 300


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny random Llama (the original, for reference) and its GGUF file."""
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return model, write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(hf_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(hf_cache.VERBOSE_ENV, raising=False)
    return tmp_path / "cache" / "hf"


def _logits(backbone, x):
    with torch.no_grad():
        return backbone.model(input_ids=x).logits


def _entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_cached_load_equals_the_gguf_file_and_prints_nothing(gguf_file, cache, monkeypatch, capfd):
    model, path = gguf_file
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    first = load_hf(path)  # converts
    (entry,) = [cache / n for n in _entries(cache)]
    assert entry.name == hf_cache.fingerprint(path) and hf_cache.problem(entry, entry.name) is None
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= {p.name for p in entry.iterdir()}
    mtime = (entry / "model.safetensors").stat().st_mtime_ns
    again = load_hf(path)  # reads the entry
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime
    tok = load_tokenizer(path)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    monkeypatch.setenv(hf_cache.CACHE_ENV, "off")
    direct = load_hf(path)
    direct_tok = load_tokenizer(path)
    assert _entries(cache) == [entry.name]
    torch.testing.assert_close(_logits(again, x), _logits(direct, x), rtol=0, atol=0)
    torch.testing.assert_close(_logits(first, x), _logits(direct, x), rtol=0, atol=0)
    with torch.no_grad():  # and the file is the model it was written from, up to Q8_0 rounding
        torch.testing.assert_close(_logits(direct, x), model(input_ids=x).logits, rtol=0, atol=0.05)
    assert again.source == (str(path), None) and again.ffn_name == "model.layers.1.mlp"
    text = "the cat and w12 then"
    assert tok(text)["input_ids"] == direct_tok(text)["input_ids"] and len(tok) == len(direct_tok)
    assert type(tok).__name__ == type(direct_tok).__name__


def test_verbose_shows_the_loaders_output(gguf_file, cache, monkeypatch, capfd):
    monkeypatch.setenv(hf_cache.VERBOSE_ENV, "1")
    load_hf(gguf_file[1])
    assert "GGUF" in capfd.readouterr().err  # transformers' de-quantising progress bar


def test_killed_conversion_leaves_no_entry(gguf_file, cache, monkeypatch):
    import trime.model.hf as hf

    def killed(tf, directory, gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "_convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        load_hf(gguf_file[1])
    assert _entries(cache) == []
    fp = hf_cache.fingerprint(gguf_file[1])
    stale = cache / f".{fp}.partial-{2**22 + 1}"  # a killed process's leftover (no such pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    monkeypatch.setenv(hf_cache.CACHE_ENV, str(cache.parent))
    load_hf(gguf_file[1])
    assert _entries(cache) == [fp]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no meta"])
def test_damaged_entry_is_rebuilt_with_one_line(gguf_file, cache, capfd, damage):
    load_hf(gguf_file[1])
    entry = cache / hf_cache.fingerprint(gguf_file[1])
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[-5] ^= 0xFF
        weights.write_bytes(data)
    else:
        (entry / "meta.json").unlink()
    capfd.readouterr()
    load_hf(gguf_file[1])
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and str(entry) in err and "converting tiny.gguf again" in err
    assert hf_cache.problem(entry, entry.name) is None


def test_unwritable_cache_falls_back_to_the_file(gguf_file, tmp_path, monkeypatch, capfd):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv(hf_cache.CACHE_ENV, str(tmp_path / "file"))
    bb = load_hf(gguf_file[1])
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "cannot write the GGUF cache" in err
    assert bb.ffn_name == "model.layers.1.mlp"
    assert os.listdir(tmp_path) == ["file"]


def test_commands_print_no_loader_output_unless_verbose(gguf_file, cache, tmp_path, monkeypatch, capfd):
    from trime.cli import main

    from tests.fixtures import make_corpus

    gguf = str(gguf_file[1])
    corpus = make_corpus(tmp_path / "corpus", n_lines=30)
    assert main(["data", "prepare", str(corpus), "--out", str(tmp_path / "data"), "--hf-tokenizer", gguf]) == 0
    monkeypatch.setenv(hf_cache.VERBOSE_ENV, "")  # restored after the test: main(--verbose) sets it
    argv = ["eval", str(tmp_path / "data"), "--hf-model", gguf, "--tokens-per-sample", "16", "--max-eval-tokens", "32"]
    assert main([*argv, "--device", "cpu"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "Perplexity" in out
    assert main([*argv, "--device", "cpu", "--verbose"]) == 0
    assert "read from the cache entry" in capfd.readouterr().err


def test_a_gguf_file_is_hashed_once_per_command(gguf_file, cache, tmp_path, monkeypatch):
    """The cache key and the model's fingerprint are one sha256 of the GGUF file, read once per process while the
    file stays the same; a changed file is hashed again."""
    import hashlib

    from trime import io
    from trime.checkpoint import model_fingerprint

    f = tmp_path / "m.gguf"
    f.write_bytes(gguf_file[1].read_bytes())
    monkeypatch.setattr(io, "_HASHED", {})
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(io.hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    load_hf(str(f))
    assert hf_cache.fingerprint(f) == model_fingerprint(f) == real(f.read_bytes()).hexdigest()[:16]
    entry = [p for p in (cache / hf_cache.fingerprint(f)).iterdir() if p.name != "meta.json"]
    assert len(reads) == 1 + len(entry)  # the GGUF file once, and each file of its entry checked when loaded
    with open(f, "ab") as fh:
        fh.write(b"\0")
    assert model_fingerprint(f) == real(f.read_bytes()).hexdigest()[:16]
