"""The training loop: the loss goes down, checkpoints are complete, and kill-and-resume is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trime import config as C
from trime.train import fit

from tests.fixtures import make_data


class Kill(Exception):
    pass


def configs(data, save_dir, **train):
    preset = C.load_preset("micro")
    model = C.build(C.ModelConfig, preset["model"])
    base = {**preset["train"], "data": str(data), "save_dir": str(save_dir), "device": "cpu", "amp": "none"}
    return model, C.build(C.TrainConfig, base, train)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train"))


def test_training_lowers_the_loss(data, tmp_path):
    model, cfg = configs(data, tmp_path / "run", max_epoch=3)
    run = fit(model, cfg)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if x["kind"] == "train"]
    valid = [x["loss"] for x in lines if x["kind"] == "valid"]
    assert len(valid) == 3 and valid[-1] < valid[0]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5
    for name in ("checkpoint_best", "checkpoint_last"):
        assert {p.name for p in (run / name).iterdir()} >= {"model.safetensors", "config.json", "dict.txt", "meta.json"}


@pytest.mark.parametrize("criterion", ["ce", "trime"])
def test_kill_and_resume_gives_the_same_state(data, tmp_path, criterion):
    kw = dict(max_update=9, save_interval_updates=3, criterion=criterion, update_freq=2)
    model, cfg = configs(data, tmp_path / "straight", **kw)
    fit(model, cfg)

    def kill_at_7(progress):
        if progress.updates == 7:
            raise Kill

    model, cfg = configs(data, tmp_path / "killed", **kw)
    with pytest.raises(Kill):
        fit(model, cfg, on_step=kill_at_7)
    fit(model, cfg)  # resumes from update 6

    a = load_file(str(tmp_path / "straight" / "checkpoint_last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint_last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    sa = torch.load(tmp_path / "straight" / "checkpoint_last" / "trainer.pt", weights_only=True)
    sb = torch.load(tmp_path / "killed" / "checkpoint_last" / "trainer.pt", weights_only=True)
    assert sa["progress"]["updates"] == sb["progress"]["updates"] == 9
    assert sa["progress"]["batches_done"] == sb["progress"]["batches_done"]


def test_resume_refuses_another_model(data, tmp_path):
    model, cfg = configs(data, tmp_path / "run", max_update=1)
    fit(model, cfg)
    bigger = C.build(C.ModelConfig, C.to_dict(model), {"n_layers": 3})
    with pytest.raises(C.ConfigError, match="another model"):
        fit(bigger, cfg)


def test_ce_warmup_switches_after_its_epochs(data, tmp_path):
    model, cfg = configs(data, tmp_path / "run", max_epoch=3, criterion="trime", ce_warmup_epoch=2)
    run = fit(model, cfg)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert {(x["epoch"], x["use_ce"]) for x in train} == {(1, True), (2, True), (3, False)}
    assert all(x["loss"] == x["ce_loss"] for x in train if x["use_ce"])
    assert all(x["loss"] != x["ce_loss"] for x in train if not x["use_ce"])


def test_ce_warmup_in_updates(data, tmp_path):
    """--ce-warmup-updates N: plain CE for updates 1..N, the criterion after; memory diagnostics are
    logged from the first TRIME update on, within their ranges."""
    model, cfg = configs(data, tmp_path / "run", max_update=6, criterion="trime_ext", ce_warmup_updates=4)
    run = fit(model, cfg)
    train = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert [(x["update"], x["use_ce"]) for x in train] == [(u, u <= 4) for u in range(1, 7)]
    for x in train:
        assert ("mem_share" in x) == (not x["use_ce"])
        if "mem_share" in x:
            assert 0 < x["mem_share"] < 1 and -1 <= x["mem_cos"] <= 1 and x["key_norm"] > 0
            assert x["mem_score_mean"] <= x["mem_score_max"]


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_torchrun_two_processes_long_memory(data, tmp_path):
    """`torchrun -m trime train` with 2 gloo ranks gathering long memory (spec §3.2), adaptive softmax
    (whose rare tail clusters may get no gradient in a step)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "trime",
        "train",
        str(data),
        "--preset",
        "micro",
        "--criterion",
        "trime_long",
        "--keep-order",
        "--train-mem-size",
        "256",
        "--max-update",
        "3",
        "--device",
        "cpu",
        "--adaptive-input",
        "--adaptive-input-cutoff",
        "20,40",
        "--adaptive-softmax-cutoff",
        "20,40",
        "--tie-adaptive-weights",
        "--no-share-decoder-input-output-embed",
        "--save-dir",
        str(tmp_path / "run"),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lines if x["kind"] == "train"] == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "checkpoint_last" / "trainer.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG state is kept for resuming
