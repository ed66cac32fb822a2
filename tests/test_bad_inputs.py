"""A catalogue of bad inputs and bad reruns, each through ``trime.cli.main``.

Every case asserts the exit code, one line of error without a traceback, and that nothing was
written, lost or mixed (a snapshot of the directories involved is unchanged). Warnings and reruns
that must *succeed* (a copied run resumes, a changed --lr is logged) assert what happened instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from trime import config as C
from trime import io
from trime.checkpoint import save_checkpoint
from trime.cli import main
from trime.data.blocks import num_segments
from trime.data.pairs import load_pair_dictionaries, prepare_pairs
from trime.data.prepare import load_split, prepare_corpus
from trime.model.encoder_decoder import MTModelConfig, build_mt_model
from trime.train import fit
from trime.translation import pair_dictionary_files

from tests.fixtures import make_corpus, make_data, micro_checkpoint
from tests.test_cli import writing

MICRO = ("--preset", "micro", "--device", "cpu", "--amp", "none")


# --- helpers ----------------------------------------------------------------------------------


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
