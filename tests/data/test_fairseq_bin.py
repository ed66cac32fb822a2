"""fairseq data-bins read in place (trime.data.fairseq_bin) and sentencepiece in prepare (trime.data.spm).

The data-bins under tests/assets/fairseq_databin were written by the real fairseq-preprocess
(tools/make_fairseq_databin_fixtures.sh); the ids they must read as are fairseq's own: fairseq_mt/test.ids.json,
fairseq/word/test.ids.npy, fairseq_databin/spm/ids.json (fairseq's reader on the very files); the lines
fairseq-generate printed with a model trained on the spm data-bin are fairseq_databin/spm/generate.*.txt
(tools/make_fairseq_spm_mt_fixtures.sh).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from trime import config as C
from trime.cli import main
from trime.data.fairseq_bin import read_indexed
from trime.data.pairs import load_pair_dictionaries, load_pair_split, prepare_pairs, read_pairs_meta
from trime.data.prepare import load_split, prepare, read_data_meta
from trime.errors import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BIN = ASSETS / "fairseq_databin"
SPM = BIN / "spm"


def test_reads_exactly_the_ids_fairseq_wrote():
    mt = load_pair_split(BIN / "mt", "test")
    want = json.loads((ASSETS / "fairseq_mt" / "test.ids.json").read_text())
    assert [mt.source(i).tolist() for i in range(len(mt))] == want["src"]
    assert [mt.target(i).tolist() for i in range(len(mt))] == want["tgt"]
    assert mt.src.dtype == np.uint16 and isinstance(mt.src, np.memmap)  # fairseq's dtype, in place
    lm = load_split(BIN / "lm", "test")
    assert np.array_equal(lm, np.load(ASSETS / "fairseq" / "word" / "test.ids.npy")) and isinstance(lm, np.memmap)
    want = json.loads((SPM / "ids.json").read_text())
    for split in ("valid", "test"):
        got = load_pair_split(SPM / "bin", split)
        assert [got.source(i).tolist() for i in range(len(got))] == want[f"{split}.en"]
        assert [got.target(i).tolist() for i in range(len(got))] == want[f"{split}.el"]


def test_meta_comes_from_the_files():
    meta = read_pairs_meta(BIN / "mt")
    assert meta["langs"] == {"source": "src", "target": "tgt"} and list(meta["splits"]) == ["test"]
    assert meta["splits"]["test"]["pairs"] == 40 and meta["vocab_size"] == {"src": 396 + 4, "tgt": 388 + 4}
    lm = read_data_meta(BIN / "lm")
    assert lm["level"] == "word" and lm["splits"]["test"]["lines"] == 400 and lm["vocab_size"] == 836 + 4
    with pytest.raises(DataError, match="language-model data-bin"):
        read_pairs_meta(BIN / "lm")
    with pytest.raises(DataError, match="translation pairs, not language-model"):
        read_data_meta(BIN / "mt")
    with pytest.raises(DataError, match=r"no 'train' split \(has: test\)"):
        load_pair_split(BIN / "mt", "train")


def test_sentencepiece_prepare_equals_fairseq_preprocess(tmp_path):
    """`trime data prepare --sentencepiece-model` of the raw text gives fairseq-preprocess's dictionaries and ids
    (of the same model's pieces), and the same split fingerprints, so either form serves the other's datastores."""
    out = prepare_pairs(
        SPM / "raw", tmp_path / "d", source_lang="en", target_lang="el", sentencepiece_model=SPM / "sentencepiece.model"
    )
    for mine, theirs in zip(load_pair_dictionaries(out), load_pair_dictionaries(SPM / "bin")):
        assert mine.symbols == theirs.symbols and mine.counts == theirs.counts
    a, b = read_pairs_meta(out), read_pairs_meta(SPM / "bin")
    for split in ("train", "valid", "test"):
        x, y = load_pair_split(out, split), load_pair_split(SPM / "bin", split)
        for field in ("src", "src_offsets", "tgt", "tgt_offsets"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), (split, field)
        for lang in ("en", "el"):
            assert a["splits"][split][lang]["fingerprint"] == b["splits"][split][lang]["fingerprint"]
    assert (out / "sentencepiece.model").read_bytes() == (SPM / "sentencepiece.model").read_bytes()
    assert a["text"]["sentencepiece"]["pieces"] == 300


def test_sentencepiece_vocab_trains_a_model_saved_with_the_data(tmp_path):
    out = prepare_pairs(SPM / "raw", tmp_path / "a", source_lang="en", target_lang="el", sentencepiece_vocab=200)
    assert read_pairs_meta(out)["text"]["sentencepiece"]["source"] == "trained"
    again = prepare_pairs(  # the saved model and dictionaries encode the text the same way, without train
        SPM / "raw", tmp_path / "b", source_lang="en", target_lang="el", sentencepiece_model=out / "sentencepiece.model",
        src_dict=out / "dict.en.txt", tgt_dict=out / "dict.el.txt",
    )  # fmt: skip
    assert np.array_equal(load_pair_split(out, "test").tgt, load_pair_split(again, "test").tgt)
    lm = prepare({"train": SPM / "raw" / "train.el", "test": SPM / "raw" / "test.el"}, tmp_path / "lm",
                 sentencepiece_vocab=150)  # fmt: skip
    meta = read_data_meta(lm)
    assert meta["sentencepiece"]["pieces"] == 150 and (lm / "sentencepiece.model").is_file()
    assert meta["splits"]["test"]["unk"] == 0 and meta["splits"]["test"]["tokens"] > meta["splits"]["test"]["lines"]


def _two_pairs(tmp_path: Path) -> Path:
    """The mt data-bin plus a copy of it named de-en (a directory holding two language pairs)."""
    d = tmp_path / "bin"
    shutil.copytree(BIN / "mt", d)
    for side, lang in (("src", "de"), ("tgt", "en")):
        shutil.copy(d / f"dict.{side}.txt", d / f"dict.{lang}.txt")
        for ext in ("bin", "idx"):
            shutil.copy(d / f"test.src-tgt.{side}.{ext}", d / f"test.de-en.{lang}.{ext}")
    return d


def test_languages_from_the_file_names(tmp_path):
    d = _two_pairs(tmp_path)
    with pytest.raises(DataError, match=r"several pairs \(de-en, src-tgt\): pass --source-lang/--target-lang"):
        read_pairs_meta(d)
    assert read_pairs_meta(d, source_lang="de")["langs"] == {"source": "de", "target": "en"}
    flipped = load_pair_split(d, "test", source_lang="en", target_lang="de")  # fairseq also reads de-en for en->de
    assert np.array_equal(flipped.src, load_pair_split(BIN / "mt", "test").tgt)
    with pytest.raises(DataError, match=r"no fr-en files in this fairseq data-bin \(its pairs: de-en, src-tgt\)"):
        read_pairs_meta(d, source_lang="fr", target_lang="en")
    (d / "dict.en.txt").unlink()
    with pytest.raises(DataError, match=r"no dict.en.txt in this fairseq data-bin \(has: dict.de.txt, dict.src"):
        read_pairs_meta(d, source_lang="de")


def test_a_trime_directory_refuses_other_languages(tmp_path):
    out = prepare_pairs(SPM / "raw", tmp_path / "d", source_lang="en", target_lang="el", src_dict=SPM / "bin" /
                        "dict.en.txt", tgt_dict=SPM / "bin" / "dict.el.txt", sentencepiece_model=SPM /
                        "sentencepiece.model")  # fmt: skip
    assert read_pairs_meta(out, source_lang="en")["langs"]["target"] == "el"
    with pytest.raises(DataError, match="prepared for en->el, not el->en"):
        read_pairs_meta(out, source_lang="el", target_lang="en")


def test_index_layout_and_damage(tmp_path):
    """The .idx header fairseq's MMapIndexedDataset writes (magic, version, dtype code, count, sizes, pointers);
    a damaged or foreign file is one DataError line."""
    ds = read_indexed(BIN / "mt" / "test.src-tgt.src")
    raw = (BIN / "mt" / "test.src-tgt.src.idx").read_bytes()
    assert (
        raw[:9] == b"MMIDIDX\x00\x00" and raw[17] == 8 and int.from_bytes(raw[18:26], "little") == len(ds.offsets) - 1
    )
    assert np.array_equal(np.frombuffer(raw[26 : 26 + 4 * 40], "<i4"), np.diff(ds.offsets))
    cases = {
        "legacy": (b"TNTIDX\x00\x00" + raw[8:], None, "legacy lazy/cached format"),
        "magic": (b"X" + raw[1:], None, "not a fairseq mmap index"),
        "short-bin": (raw, 10, "its .idx describes 312 tokens"),
        "truncated": (raw[:100], None, "truncated"),
    }
    for name, (idx, cut, words) in cases.items():
        prefix = tmp_path / name
        Path(f"{prefix}.idx").write_bytes(idx)
        data = (BIN / "mt" / "test.src-tgt.src.bin").read_bytes()
        Path(f"{prefix}.bin").write_bytes(data[:cut] if cut else data)
        with pytest.raises(DataError, match=words):
            read_indexed(prefix)


def _hyps(lines: list[str]) -> dict[int, tuple[str, float]]:
    out = {}
    for line in lines:
        if line.startswith("H-"):
            key, score, text = line.split("\t")
            out[int(key[2:])] = (text, float(score))
    return out


def test_generate_and_score_reference_on_a_data_bin_equal_fairseq(tmp_path, capsys):
    """`trime mt generate DATA-BIN --path X.pt` prints what it prints on trime's own prepare of the same test
    text (S/T/H/D lines, BLEU): fairseq-generate's hypotheses and scores (beam 5); with --score-reference,
    fairseq's teacher-forced scores. A test split and the dictionaries are all it needs."""
    mt = ASSETS / "fairseq_mt"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for side in ("src", "tgt"):
        shutil.copy(mt / f"test.{side}", corpus)
    own = prepare_pairs(corpus, tmp_path / "own", src_dict=mt / "dict.src.txt", tgt_dict=mt / "dict.tgt.txt")
    want = json.loads((mt / "generate.json").read_text())["post_tied"]
    for flags, setting in ((["--beam", "5"], "beam5"), (["--score-reference"], "score_reference")):
        outs = []
        for data in (BIN / "mt", own):
            assert (
                main(["mt", "generate", str(data), "--path", str(mt / "post_tied.pt"), "--device", "cpu", *flags]) == 0
            )
            timing = r" in [0-9.]+ s| \([0-9.]+ sentences/s\)"  # the only words that may differ
            outs.append([re.sub(timing, "", ln) for ln in capsys.readouterr().out.splitlines()])
        assert outs[0] == outs[1]
        got = _hyps(outs[0])
        symbols = load_pair_dictionaries(BIN / "mt")[1].symbols
        assert len(got) == 40
        for i, nbest in want[setting]["hypos"].items():
            assert got[int(i)][0] == " ".join(symbols[t] for t in nbest[0]["tokens"][:-1]), i
            assert got[int(i)][1] == pytest.approx(nbest[0]["score"], abs=1e-4), i


def _tagged(lines) -> dict[tuple[str, int], list[str]]:
    """fairseq-generate's S-/T-/H-/D-/P- lines by (letter, sentence id), each the text after the first tab."""
    out: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        m = re.fullmatch(r"([STHDP])-(\d+)\t(.*)", line)
        if m:
            out.setdefault((m[1], int(m[2])), []).append(m[3])
    return out


@pytest.mark.parametrize("setting", ["beam5", "score_reference"])
def test_sentencepiece_data_bin_generate_equals_fairseq_on_a_greek_target(setting, capsys):
    """A fairseq model trained on the en->el data-bin (tools/make_fairseq_spm_mt_fixtures.sh) and what
    fairseq-generate printed with it (--post-process sentencepiece --tokenizer moses, target el; --beam 5
    --nbest 2, or --score-reference): `trime mt generate` on the same data-bin and .pt gives the same H- lines
    (text; score within 1e-4), D- lines (Moses with el's rules: the same text), P- lines (as
    tests/generate/test_beam.py's: 4 decimals, within 1e-4, nearly all identical).

    S- and T- lines: fairseq-generate's --tokenizer moses also detokenises the source and the reference
    (decode_fn on both, with the target language's rules), trime prints them as words, as H- lines are; so
    fairseq's are trime's Moses-detokenised with el rules."""
    from trime.generate.text import detokenize

    flags = ["--beam", "5", "--nbest", "2"] if setting == "beam5" else ["--score-reference"]
    argv = ["mt", "generate", str(SPM / "bin"), "--path", str(SPM / "model.pt"), "--device", "cpu"]
    assert main([*argv, "--post-process", "sentencepiece", *flags]) == 0
    out = capsys.readouterr().out
    about = "target el: pieces joined by sentencepiece, D- lines Moses-detokenised with el rules"
    assert (about in out) == (setting == "beam5")  # the summary of --score-reference is eval_lm's
    got = _tagged(out.splitlines())
    want = _tagged((SPM / f"generate.{setting}.txt").read_text(encoding="utf-8").splitlines())
    assert sorted(got) == sorted(want) and len({i for _, i in want}) == 20
    same = total = 0
    for (tag, i), lines in want.items():
        mine = got[tag, i]
        assert len(mine) == len(lines) == (2 if tag in "HDP" and setting == "beam5" else 1), (tag, i)
        for a, b in zip(mine, lines):
            if tag in "ST":
                assert detokenize([a], "el") == [b], (tag, i)
            elif tag in "HD":
                (score_a, text_a), (score_b, text_b) = a.split("\t"), b.split("\t")
                assert text_a == text_b and float(score_a) == pytest.approx(float(score_b), abs=1e-4), (tag, i)
            else:
                pa, pb = a.split(" "), b.split(" ")
                assert all(re.fullmatch(r"-?\d+\.\d{4}", x) for x in pa) and len(pa) == len(pb), i
                assert max(abs(float(x) - float(y)) for x, y in zip(pa, pb)) < 1e-4 + 1e-6, i
                same += sum(x == y for x, y in zip(pa, pb))
                total += len(pa)
    assert same >= 0.97 * total, (same, total)  # measured: 567/573 (beam5), 405/406 (score_reference)


def test_mt_datastore_and_training_take_a_data_bin(tmp_path, capsys):
    """`trime mt datastore` on a data-bin stores the rows it stores on trime's own form of the same ids, and
    labels them with the same split fingerprint; `trime mt train` trains on one."""
    from trime.datastore_build import build_mt_datastore
    from trime.memory.datastore import Datastore
    from trime.model.encoder_decoder import MTModelConfig
    from trime.translation import fit_translation

    own = prepare_pairs(SPM / "raw", tmp_path / "own", source_lang="en", target_lang="el",
                        sentencepiece_model=SPM / "sentencepiece.model")  # fmt: skip
    tiny = dict(encoder_layers=1, decoder_layers=1, encoder_embed_dim=16, decoder_embed_dim=16,
                encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32, encoder_attention_heads=2,
                decoder_attention_heads=2, dropout=0.0)  # fmt: skip
    train = C.MTTrainConfig(data=str(SPM / "bin"), save_dir=str(tmp_path / "run"), max_tokens=256, max_update=2,
                            warmup_updates=1, amp="none", eval_bleu=False, device="cpu")  # fmt: skip
    run = fit_translation(MTModelConfig(**tiny), train)
    stores = {}
    for name, data in (("bin", SPM / "bin"), ("own", own)):
        cfg = C.MTDatastoreConfig(data=str(data), path=str(run / "checkpoint_last"), out=str(tmp_path / f"ds-{name}"),
                                  subset="test", device="cpu")  # fmt: skip
        stores[name] = Datastore.open(build_mt_datastore(cfg))
    a, b = stores["bin"], stores["own"]
    assert a.meta["split_fingerprint"] == b.meta["split_fingerprint"]
    assert len(a) == len(b) and a.values.equal(b.values)
    assert np.array_equal(a.read_keys(0, len(a)), b.read_keys(0, len(b)))
    # data prepared with sentencepiece is decoded back into words by default (--post-process auto)
    from trime.cli import main

    flags = ["--path", str(run / "checkpoint_last"), "--device", "cpu", "--beam", "1", "--max-sentences-total", "3"]
    assert main(["mt", "generate", str(own), *flags]) == 0
    out = capsys.readouterr().out
    assert "pieces joined by sentencepiece," in out
    assert all("\u2581" not in line for line in out.splitlines() if line[:2] in ("H-", "D-", "T-"))


def test_lm_eval_and_datastore_on_a_data_bin_equal_its_prepared_form(tmp_path, capsys):
    """`trime eval` of a fairseq LM on the LM data-bin prints what it prints on trime's prepare of the same text,
    and `trime datastore build` stores the same rows under the same split fingerprint."""
    from trime.memory.datastore import Datastore

    pt = ASSETS / "fairseq" / "wt103_style.pt"
    own = prepare({"test": ASSETS / "fairseq" / "word" / "test.txt"}, tmp_path / "own",
                  dictionary=ASSETS / "fairseq" / "word" / "dict.txt")  # fmt: skip
    lines, stores = [], []
    for name, data in (("bin", BIN / "lm"), ("own", own)):
        args = ["--path", str(pt), "--device", "cpu", "--gen-subset", "test"]
        assert main(["eval", str(data), *args]) == 0
        lines.append([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("|", "Loss"))])
        assert main(["datastore", "build", str(data), *args, "--out", str(tmp_path / f"ds-{name}")]) == 0
        capsys.readouterr()
        stores.append(Datastore.open(tmp_path / f"ds-{name}"))
    assert lines[0] == lines[1] and lines[0]
    a, b = stores
    assert a.meta["split_fingerprint"] == b.meta["split_fingerprint"] and a.values.equal(b.values)
    assert np.array_equal(a.read_keys(0, len(a)), b.read_keys(0, len(b)))
