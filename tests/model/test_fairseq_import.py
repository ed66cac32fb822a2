"""fairseq import against real fairseq artifacts (tests/assets/fairseq, made by tools/make_fairseq_fixtures.sh).

The reference is fairseq itself: fairseq-eval-lm's perplexity and every token's log-probability on
the committed test split, fairseq-preprocess's dict.txt and ids. fairseq is not installed here.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import gzip
import importlib
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from trime.checkpoint import convert
from trime.data.blocks import eval_windows
from trime.errors import CheckpointError
from trime.model.attention import fuse_in_proj
from trime.model.fairseq_import import load_fairseq_checkpoint, model_options, read_checkpoint
from trime.model.transformer import TransformerLM

from reference import window

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fairseq"
FAIRSEQ = json.loads((ASSETS / "fairseq_eval.json").read_text())
WORD_MODELS = ("wt103_style", "final_norm", "150m_style")


@functools.cache
def _loaded(name: str):
    weights, cfg, meta = load_fairseq_checkpoint(ASSETS / f"{name}.pt")
    model = TransformerLM(cfg)
    model.load_state_dict(weights, strict=True)
    return model.eval(), cfg, meta


PAD = 1  # fairseq dictionary id


def _ids(name: str) -> np.ndarray:
    level = "char" if name.startswith("enwik8") else "word"
    return np.load(ASSETS / level / "test.ids.npy")


@torch.no_grad()
def _score(model: TransformerLM, tokens: np.ndarray, L: int, ctx: int, mode: str) -> tuple[np.ndarray, int]:
    """Natural-log probability of every token over fairseq-eval-lm's windows (all windows in one
    right-padded batch: causal attention keeps each window's scores as if it ran alone)."""
    rows = eval_windows(tokens, L, ctx, mode)
    inputs = torch.full((len(rows), L), PAD, dtype=torch.long)  # (W, L)
    targets = torch.full((len(rows), L), PAD, dtype=torch.long)  # (W, L)
    for w, (start, end, n_ctx) in enumerate(rows.tolist()):
        inp, tgt = window(tokens, start, end, n_ctx)
        inputs[w, : len(inp)], targets[w, : len(tgt)] = torch.from_numpy(inp), torch.from_numpy(tgt)
    scored = targets != PAD  # (W, L) the context's targets are pad; row-major order = stream order
    logp, _ = model.head.target_logp(model(inputs).h[scored], targets[scored])
    return logp.double().numpy(), len(rows)


def test_configs_come_from_the_checkpoints():
    wt, fn, m150, char = (_loaded(n)[1] for n in (*WORD_MODELS, "enwik8_style"))
    assert (wt.final_norm, fn.final_norm, m150.final_norm, char.final_norm) == (False, True, True, True)
    assert wt.adaptive_input_cutoff == wt.adaptive_softmax_cutoff == [100, 307] and wt.vocab_size == 840
    assert (wt.n_layers, wt.d_model, wt.d_ffn, wt.n_heads, wt.max_positions) == (2, 32, 64, 4, 64)
    assert (wt.adaptive_input_factor, wt.adaptive_softmax_dropout, wt.tie_adaptive_proj) == (4.0, 0.1, True)
    assert (m150.d_model, m150.adaptive_softmax_factor, m150.tie_adaptive_weights, m150.tie_adaptive_proj) == (
        16,
        1.0,
        True,
        False,
    )
    assert char.adaptive_softmax_cutoff == [char.vocab_size] == [72]
    meta = _loaded("wt103_style")[2]
    assert meta["generation"] == "cfg" and meta["stored_dtypes"] == ["float16"] and meta["tokens_per_sample"] == 64
    assert meta["num_updates"] == 80 and meta["add_bos_token"] is False


@torch.no_grad()
def test_fixture_hits_the_tail_quirk_ids():
    """Spec §5.2: ids cutoff+1 (101, 308) occur in the scored split, and the original's quirk moves
    exactly those tokens away from fairseq-eval-lm's (correct) log-probabilities, upwards."""
    ids = torch.from_numpy(_ids("wt103_style").astype(np.int64))
    assert (ids == 101).sum() > 0 and (ids == 308).sum() > 0
    model = _loaded("wt103_style")[0]
    inputs = torch.cat([torch.tensor([2]), ids[:-1]])[: 64 * (len(ids) // 64)].view(-1, 64)  # (S, 64)
    h, y = model(inputs).h.reshape(-1, 32), ids[: inputs.numel()]
    right, _ = model.head.target_logp(h, y)
    quirk, _ = model.head.target_logp(h, y, tail_quirk=True)
    hit = (y == 101) | (y == 308)
    assert torch.equal(right[~hit], quirk[~hit]) and bool((quirk[hit] > right[hit]).all())


CASES = [(n, m) for n in WORD_MODELS for m in ("none", "complete")] + [("enwik8_style", "none")]


@pytest.mark.parametrize("name,mode", CASES)
def test_reproduces_fairseq_eval_lm(name, mode):
    """Same windows, same log-probabilities (1e-4) and the printed loss/perplexity (0.01) of fairseq-eval-lm."""
    ref = FAIRSEQ[name][mode]
    model = _loaded(name)[0]
    logp, n_windows = _score(model, _ids(name), ref["tokens_per_sample"], ref["context_window"], mode)
    assert (len(logp), n_windows) == (ref["n_scored"], ref["n_windows"])
    if ref["logp_file"]:
        np.testing.assert_allclose(logp, np.load(ASSETS / ref["logp_file"]), rtol=0, atol=1e-4)
    loss = -logp.sum() / len(logp) / math.log(2)
    assert abs(loss - ref["loss_base2"]) <= 6e-5
    assert abs(round(2**loss, 2) - ref["perplexity"]) <= 0.01 + 1e-9
    assert abs(-logp.sum() - ref["nll_nats"]) <= 1e-5 * ref["nll_nats"]


def _args_checkpoint(tmp_path: Path, *, fused: bool = False, **changes) -> Path:
    """The wt103_style weights as the TRIME fork (fairseq ≈ 0.9) saves them: an argparse ``args``,
    float32, old buffers, numpy training statistics; ``fused``: pre-0.8 in_proj_weight layout."""
    state = read_checkpoint(ASSETS / "wt103_style.pt")
    opts = {k: v for k, v in model_options(state)[0].items() if not k.startswith("_")}
    opts.update(
        arch="transformer_lm_wiki103",
        activation_dropout=0.0,
        relu_dropout=0.1,
        max_target_positions=64,
        task="language_modeling",
    )
    for k in ("tie_adaptive_weights", "tie_adaptive_proj", "adaptive_input", "no_decoder_final_norm"):
        opts.pop(k)  # transformer_lm_wiki103's defaults (spec §1) must fill these
    opts.update(changes)
    model = collections.OrderedDict((k, v.float()) for k, v in state["model"].items())
    model["decoder.embed_positions._float_tensor"] = torch.zeros(1)
    if fused:
        for i in range(2):
            model.update(fuse_in_proj(model, f"decoder.layers.{i}.self_attn."))
    old = {
        "args": argparse.Namespace(**opts),
        "model": model,
        "extra_state": {"val_loss": np.float64(5.62), "train_iterator": {"epoch": 6}},
        "optimizer_history": [{"num_updates": 80, "best_loss": np.float32(5.6)}],
    }
    path = tmp_path / "checkpoint_best.pt"
    torch.save(old, path)
    return path


@pytest.mark.parametrize("fused", [False, True])
def test_args_generation_loads_the_same_model(tmp_path, fused):
    weights, cfg, meta = load_fairseq_checkpoint(_args_checkpoint(tmp_path, fused=fused))
    ref_weights, ref_cfg, _ = load_fairseq_checkpoint(ASSETS / "wt103_style.pt")
    assert meta["generation"] == "args" and meta["stored_dtypes"] == ["float32"]
    assert cfg.arch == "transformer_lm_wiki103"
    assert {**vars(cfg), "arch": ""} == {**vars(ref_cfg), "arch": ""}
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_dictconfig_generation_needs_no_omegaconf():
    """A cfg pickled as omegaconf DictConfig (with a ${task.tokens_per_sample} interpolation) loads
    through inert stand-ins to the same options as the plain-container cfg."""
    dc = model_options(read_checkpoint(ASSETS / "dictconfig_cfg.pt"))
    plain = model_options(read_checkpoint(ASSETS / "wt103_style.pt"))
    assert dc[2] == "cfg" and dc[0] == plain[0] and dc[1] == plain[1]
    assert dc[0]["tokens_per_sample"] == 64


class _Shell:
    def __init__(self, call):
        self.call = call

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("how", ["os.system", "subprocess.run"])
def test_payload_beyond_the_allow_list_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "ran"
    call = (os.system, (f"touch {marker}",)) if how == "os.system" else (subprocess.run, (["touch", str(marker)],))
    path = tmp_path / "evil.pt"
    torch.save({"args": None, "cfg": {"model": {}}, "model": {}, "extra_state": _Shell(call)}, path)
    with pytest.raises(CheckpointError, match=r"refused to unpickle \S+\.(system|run) .*--trust-checkpoint"):
        load_fairseq_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # control: trusting the file does run the payload
        load_fairseq_checkpoint(path, trust=True)
    assert marker.exists()


def test_trust_loads_a_benign_object_beyond_the_allow_list(tmp_path):
    state = torch.load(ASSETS / "wt103_style.pt", weights_only=False)  # our own fixture: trusted
    state["extra_state"]["saved_at"] = datetime.datetime(2022, 5, 1)
    path = tmp_path / "with_datetime.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"datetime\.datetime.*--trust-checkpoint"):
        load_fairseq_checkpoint(path)
    weights, _, _ = load_fairseq_checkpoint(path, trust=True)
    assert weights.keys() == _loaded("wt103_style")[0].state_dict().keys()


def test_bad_checkpoints_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_fairseq_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_fairseq_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="decoder_learned_pos"):
        load_fairseq_checkpoint(_args_checkpoint(tmp_path, decoder_learned_pos=True))
    with pytest.raises(CheckpointError, match="decoder_input_dim/decoder_output_dim"):
        load_fairseq_checkpoint(_args_checkpoint(tmp_path, decoder_output_dim=8))
    with pytest.raises(CheckpointError, match="missing"):
        load_fairseq_checkpoint(_args_checkpoint(tmp_path, decoder_layers=3))
    state = read_checkpoint(ASSETS / "wt103_style.pt")
    state["model"]["decoder.adaptive_softmax.head.word_proj.weight"] = torch.zeros(100, 32)
    torch.save(state, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match="tied weights"):
        load_fairseq_checkpoint(tmp_path / "untied.pt")


def test_convert_writes_a_trime_checkpoint(tmp_path):
    from trime.checkpoint import load_model
    from trime.io import read_meta

    out = convert(ASSETS / "final_norm.pt", tmp_path / "ckpt", dict_path=ASSETS / "word" / "dict.txt")
    meta = read_meta(out, kind="checkpoint")
    assert meta["fairseq"]["generation"] == "cfg" and meta["vocab_size"] == 840
    model, cfg, _ = load_model(out)
    assert cfg == _loaded("final_norm")[1]
    tokens = torch.from_numpy(_ids("final_norm")[:40].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).h, _loaded("final_norm")[0](tokens).h, rtol=0, atol=0)


def test_convert_refuses_a_dictionary_of_another_size(tmp_path):
    with pytest.raises(CheckpointError, match="72 symbols.*840"):
        convert(ASSETS / "wt103_style.pt", tmp_path / "ckpt", dict_path=ASSETS / "char" / "dict.txt")
    with pytest.raises(CheckpointError, match="no dictionary"):
        convert(ASSETS / "wt103_style.pt", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("level", ["word", "char"])
def test_prepare_reproduces_fairseq_preprocess(tmp_path, level):
    """trime's dictionary and binarisation give fairseq-preprocess's dict.txt and ids exactly."""
    prepare = importlib.import_module("trime.data.prepare")
    if level == "word":
        train = tmp_path / "train.txt"
        train.write_bytes(gzip.decompress((ASSETS / "word" / "train.txt.gz").read_bytes()))
        splits = {"train": train, "test": ASSETS / "word" / "test.txt"}
    else:
        splits = {s: ASSETS / "char" / f"{s}.raw" for s in ("train", "test")}
    out = prepare.prepare(splits, tmp_path / "data", char_level=level == "char")
    assert (out / "dict.txt").read_text() == (ASSETS / level / "dict.txt").read_text()
    np.testing.assert_array_equal(np.load(out / "test.npy"), np.load(ASSETS / level / "test.ids.npy"))


@pytest.fixture(scope="module")
def word_data(tmp_path_factory):
    prepare = importlib.import_module("trime.data.prepare")
    tmp = tmp_path_factory.mktemp("fairseq_word")
    (tmp / "train.txt").write_bytes(gzip.decompress((ASSETS / "word" / "train.txt.gz").read_bytes()))
    return prepare.prepare({"train": tmp / "train.txt", "test": ASSETS / "word" / "test.txt"}, tmp / "data")


@pytest.mark.parametrize("mode", ["none", "complete"])
def test_trime_eval_prints_fairseq_eval_lm_line(tmp_path, word_data, mode):
    """End to end: `trime eval` on the fairseq .pt and on its converted directory prints fairseq's line."""
    evaluate = importlib.import_module("trime.evaluate")
    from trime.config import EvalConfig

    ref = FAIRSEQ["wt103_style"][mode]
    ckpt = convert(ASSETS / "wt103_style.pt", tmp_path / "ckpt", dict_path=ASSETS / "word" / "dict.txt")
    for path in (ASSETS / "wt103_style.pt", ckpt):
        cfg = EvalConfig(
            data=str(word_data),
            path=str(path),
            gen_subset="test",
            context_window=48,
            sample_break_mode=mode,
            batch_size=64,
            device="cpu",
        )
        result = evaluate.evaluate(cfg)
        assert result.n_tokens == ref["n_scored"] and result.line() == ref["printed"]
