"""`trime train --hf-model M --lora-rank R`: only the LoRA adapters change, checkpoints hold only the adapter,
a resumed run reloads it, and evaluation (base + adapter, merged) gives the loss of the model that trained."""

from __future__ import annotations

import pytest
import torch

from trime import config as C
from trime import hf_cache, train
from trime.checkpoint import load_model
from trime.data.hf_text import prepare_hf_corpus
from trime.data.prepare import load_split, special_ids
from trime.errors import CheckpointError, ConfigError
from trime.io import read_meta, write_json
from trime.losses import LossSettings, compute_loss
from trime.model.hf import load_hf

from tests.fixtures import make_corpus, write_llama_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gguf")

L = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    gguf = write_llama_gguf(root / "tiny.gguf", transformers.AutoModelForCausalLM.from_config(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hf_cache.CACHE_ENV, str(root / "cache"))
        data = prepare_hf_corpus(make_corpus(root / "corpus", n_lines=60), root / "data", str(gguf))
    return root, gguf, data


def _cfg(root, gguf, data, **kw):
    base = {
        "data": str(data), "hf_model": str(gguf), "lora_rank": 4, "criterion": "trime", "tokens_per_sample": L,
        "max_tokens": 4 * L, "max_update": 3, "save_dir": str(root / "run"), "device": "cpu", "amp": "none",
        "lr": 1e-2, "lr_scheduler": "fixed", "max_valid_tokens": 4 * L,
    }  # fmt: skip
    return C.build(C.TrainConfig, {**base, **kw})


def test_lora_trains_only_adapters_and_reloads(setup, monkeypatch, capsys):
    root, gguf, data = setup
    monkeypatch.setenv(hf_cache.CACHE_ENV, str(root / "cache"))
    built = []
    real = train._hf_backbone
    monkeypatch.setattr(train, "_hf_backbone", lambda *a: built.append(real(*a)) or built[-1])
    run = train.fit(C.ModelConfig(), _cfg(root, gguf, data))
    trained = built[0]

    # only the adapters changed; every adapter's B left zero
    base = dict(load_hf(gguf).model.named_parameters())
    n_lora = 0
    for name, p in trained.model.named_parameters():
        if "lora_" in name:
            n_lora += 1
            assert p.requires_grad
            if "lora_B" in name:
                assert p.abs().sum() > 0, name
        else:
            assert not p.requires_grad
            torch.testing.assert_close(p, base[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)
    assert n_lora == 2 * 7 * 2  # A and B of q, k, v, o, gate, up, down in 2 layers (peft's all-linear)

    # the checkpoint holds the adapter only, and names its base
    ckpt = run / "checkpoint_last"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "meta.json"} <= files
    assert not any(f.startswith("model") for f in files)
    meta = read_meta(ckpt)
    assert meta["base"]["source"] == str(gguf.resolve()) and meta["updates"] == 3

    # evaluation reloads base + adapter (merged): the same loss as the model that trained
    reloaded, model_cfg, _ = load_model(run)
    pad, _ = special_ids(data)
    tokens = torch.as_tensor(load_split(data, "valid")[: 2 * L + 1].astype("int64"))
    inputs, targets = tokens[:-1].view(2, L), tokens[1:].view(2, L)
    settings = LossSettings("trime", pad=pad)
    with torch.no_grad():
        want = compute_loss(settings, trained.eval()(inputs), targets, trained.head).loss
        got = compute_loss(settings, reloaded(inputs), targets, reloaded.head).loss
        plain = compute_loss(settings, load_hf(gguf)(inputs), targets, reloaded.head).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert abs(float(plain - want)) > 1e-3  # the adapter does change the model
    assert model_cfg.vocab_size == 300 and "lora" not in type(reloaded.model).__module__

    # a resumed run loads the adapter weights back
    capsys.readouterr()
    train.fit(C.ModelConfig(), _cfg(root, gguf, data, max_update=4))
    assert "resuming" in capsys.readouterr().out and read_meta(ckpt)["updates"] == 4

    # a base model that is not the one trained is one line
    meta = read_meta(ckpt)
    meta["base"]["fingerprint"] = "0" * 16
    write_json(ckpt / "meta.json", meta)
    with pytest.raises(CheckpointError, match="has changed since the adapter was trained") as e:
        load_model(ckpt)
    assert "\n" not in str(e.value)


def test_lora_errors_are_one_line(setup, tmp_path):
    root, gguf, data = setup
    with pytest.raises(ConfigError, match="--lora-rank adapts a Hugging Face model"):
        C.build(C.TrainConfig, {"data": str(data), "lora_rank": 4})
    for targets, words in ((["lm_head"], "LM head"), (["no_such_module"], "--lora-targets")):
        cfg = _cfg(root, gguf, data, lora_targets=targets, save_dir=str(tmp_path / "r"))
        with pytest.raises(ConfigError, match=words) as e:
            train.fit(C.ModelConfig(), cfg)
        assert "\n" not in str(e.value)
