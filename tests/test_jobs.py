"""The one job opener (trime.jobs) and the checks every scoring command gets from it."""

import numpy as np
import pytest

from trime import config as C
from trime.cli import main
from trime.data.blocks import eval_windows
from trime.data.prepare import load_split, prepare_corpus
from trime.errors import CheckpointError, DataError
from trime.jobs import open_model

from tests.fixtures import make_data, micro_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    data = make_data(root, n_lines=120)
    other = root / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):  # a corpus with words the model's dictionary does not have
        (other / f"{split}.txt").write_text("".join(f"zebra{i % 7} yak{i % 5}\n" for i in range(40)))
    return data, micro_checkpoint(root, data), prepare_corpus(other, root / "other-bin")


def test_the_job_of_an_evaluation_config(setup):
    data, ckpt, _ = setup
    cfg = C.build(C.EvalConfig, {"data": str(data), "path": str(ckpt), "device": "cpu", "context_window": 8})
    job = open_model(cfg, data=cfg.data)
    tokens = job.split("valid", 100)
    assert np.array_equal(tokens, load_split(data, "valid")[:100])
    assert job.window == job.model_cfg.max_positions and job.pad_eos == (1, 2)
    assert np.array_equal(job.windows(tokens), eval_windows(tokens, job.window, 8, "none", 2))
    assert job.external() is None and job.dim == job.model_cfg.d_model and len(job.fingerprint) == 16


def test_data_of_another_dictionary_is_refused_by_every_scoring_command(setup, tmp_path, capsys):
    data, ckpt, other = setup
    cfg = C.build(C.EvalConfig, {"data": str(other), "path": str(ckpt), "device": "cpu"})
    with pytest.raises(DataError, match="differs from the model's dictionary"):
        open_model(cfg, data=cfg.data)
    commands = [
        ["eval", other, "--path", ckpt],
        ["datastore", "build", other, "--path", ckpt, "--out", tmp_path / "ds"],  # it wrote a datastore before
        ["explain", other, "--path", ckpt, "--out", tmp_path / "r.html"],
        ["generate", "--data", other, "--path", ckpt, "--prompt", "zebra1"],
    ]
    for argv in commands:
        capsys.readouterr()
        assert main([*map(str, argv), "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "differs from the model's dictionary" in err[0], argv
    assert not (tmp_path / "ds").exists() and not (tmp_path / "r.html").exists()


def test_damaged_weights_are_one_line(setup, tmp_path, capsys):
    import shutil

    data, ckpt, _ = setup
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-16] ^= 0x01  # one bit of a weight: safetensors still reads the file
    weights.write_bytes(bytes(raw))
    cfg = C.build(C.EvalConfig, {"data": str(data), "path": str(bad), "device": "cpu"})
    with pytest.raises(CheckpointError, match="its sha256 is not the one the checkpoint recorded"):
        open_model(cfg)
    assert main(["eval", str(data), "--path", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged or truncated" in err[0]
