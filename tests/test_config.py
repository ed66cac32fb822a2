"""Presets, precedence (default < preset < flag) and one-line errors."""

import pytest

from trime import config as C
from trime.cli import build_parser
from trime.errors import ConfigError
from trime.model.encoder_decoder import MTModelConfig


def test_every_preset_loads_into_configs():
    for path in sorted(C.CONFIG_DIR.glob("*.toml")):
        preset = C.load_preset(path.stem)
        mt = preset["_source"]["task"] == "translation"
        C.build(MTModelConfig if mt else C.ModelConfig, preset.get("model", {}), source=str(path))
        if "train" in preset:
            C.build(C.MTTrainConfig if mt else C.TrainConfig, preset["train"], source=str(path))
        if "eval" in preset:
            C.build(C.EvalConfig, preset["eval"], source=str(path))
        if "reproduce" in preset:
            C.build(C.MTReproduceConfig if mt else C.ReproduceConfig, preset["reproduce"], source=str(path))


def test_flag_beats_preset_beats_default():
    ns = build_parser().parse_args(["train", "DATA", "--preset", "micro", "--lr", "0.5", "--decoder-layers", "3"])
    preset = C.load_preset("micro")
    cfg = C.build(C.TrainConfig, preset["train"], {"data": "DATA"}, C.overrides_from_args(ns, C.TrainConfig))
    model = C.build(C.ModelConfig, preset["model"], C.overrides_from_args(ns, C.ModelConfig))
    assert cfg.lr == 0.5 and cfg.tokens_per_sample == 32 and cfg.clip_norm == 0.0
    assert model.n_layers == 3 and model.d_model == 32


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError, match="learning_rate.*bad.toml"):
        C.build(C.TrainConfig, C.load_preset(str(bad))["train"], source=str(bad))


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="tiny"):
        C.load_preset("no-such-preset")


def test_cross_field_rules():
    with pytest.raises(ConfigError):
        C.TrainConfig(tokens_per_sample=100, max_tokens=150)
    with pytest.raises(ConfigError, match="--keep-order"):
        C.TrainConfig(shuffle_groups=True)  # it shuffles the runs of --keep-order
    assert C.TrainConfig(criterion="trime_ext").predefined_batches == ""  # random batches: a named variant
    with pytest.raises(ConfigError, match="--simulate-ranks 3 must divide the 4 segments"):
        C.TrainConfig(tokens_per_sample=32, max_tokens=128, simulate_ranks=3)
    with pytest.raises(ConfigError, match="--simulate-ranks"):
        C.TrainConfig(simulate_ranks=0)
    with pytest.raises(ConfigError):
        C.EvalConfig(use_long=True, mem_size=10)
    with pytest.raises(ConfigError):
        C.ModelConfig(d_model=30, n_heads=4)


def test_list_flags_parse():
    ns = build_parser().parse_args(
        ["train", "D", "--adaptive-softmax-cutoff", "20000,60000", "--adam-betas", "0.9,0.98"]
    )
    assert C.overrides_from_args(ns, C.ModelConfig)["adaptive_softmax_cutoff"] == [20000, 60000]
    assert C.overrides_from_args(ns, C.TrainConfig)["adam_betas"] == [0.9, 0.98]


def test_simulate_ranks_is_a_language_model_train_flag(capsys):
    parser = build_parser()
    ns = parser.parse_args(["train", "D", "--simulate-ranks", "4"])
    assert C.overrides_from_args(ns, C.TrainConfig)["simulate_ranks"] == 4
    for args in (["train", "--help"], ["mt", "train", "--help"]):
        with pytest.raises(SystemExit):
            parser.parse_args(args)
    lm, mt = capsys.readouterr().out.split("usage:")[1:]
    assert "--simulate-ranks" in lm and "one cross-sentence coin per rank" in " ".join(lm.split())
    assert "--simulate-ranks" not in mt  # translation training has no simulated ranks (cli.MT_SKIP)
