"""Presets, precedence (default < preset < flag) and one-line errors."""

import dataclasses
import importlib
import inspect
import pkgutil
import sys
import types
import typing

import pytest

import trime
from trime import config as C
from trime.cli import build_parser
from trime.errors import ConfigError
from trime.generate.beam import BeamConfig
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
    assert "--simulate-ranks" not in mt  # translation training has no simulated ranks (MTTrainConfig has no field)


# --- every config checks its domains by construction ---------------------------------------------

BOUNDS = ("ge", "gt", "lt", "le")


def config_classes() -> list[type]:
    """Every Config subclass anywhere in trime (each module imported, so a new one is found wherever it is
    written), beside every dataclass of trime.config."""
    for m in pkgutil.walk_packages(trime.__path__, "trime."):
        if m.name not in OPTIONAL_MODULES:
            importlib.import_module(m.name)
    found, todo = set(), [C.Config]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("trime.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    own = {c for _, c in inspect.getmembers(C, dataclasses.is_dataclass) if c.__module__ == C.__name__}
    assert {MTModelConfig, BeamConfig, C.EvalConfig, C.Bm25BatchesConfig} <= found | own
    return sorted(found | own, key=lambda c: c.__name__)


OPTIONAL_MODULES = {"trime.__main__"}  # runs the CLI when imported


def outside(field: dataclasses.Field, kind: str, bound: float, t: type):
    """A value just outside ``field``'s bound (a one-item list for a list field)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):  # X | None
        t = next(a for a in typing.get_args(t) if a is not type(None))
    item = typing.get_args(t)[0] if typing.get_origin(t) is list else t
    step = 1 if item is int else 0.5
    bad = {"ge": bound - step, "gt": bound, "lt": bound, "le": bound + step}[kind]
    bad = item(bad)
    return [bad] if typing.get_origin(t) is list else bad


def bounded_fields() -> list:
    out = []
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for kind in BOUNDS:
                if f.metadata.get(kind) is not None:
                    out.append(pytest.param(cls, f, kind, hints[f.name], id=f"{cls.__name__}.{f.name}.{kind}"))
    return out


def test_every_config_is_a_checked_config():
    """Each is a Config, so building it runs check_domains and every class's check, and its defaults pass."""
    for cls in config_classes():
        assert issubclass(cls, C.Config), cls
        cls()
    with_options = {  # a dataclass anywhere in trime whose fields are opt()s (domains, flags) is one of them
        c
        for m in list(sys.modules.values())
        if m.__name__.startswith("trime.")
        for _, c in inspect.getmembers(m, lambda c: isinstance(c, type) and dataclasses.is_dataclass(c))
        if any("help" in f.metadata for f in dataclasses.fields(c))
    }
    assert with_options <= set(config_classes())


@pytest.mark.parametrize("cls, field, kind, t", bounded_fields())
def test_every_bounded_field_refuses_a_value_outside_its_domain(cls, field, kind, t):
    bad = outside(field, kind, field.metadata[kind], t)
    with pytest.raises(ConfigError, match=f"^{C.flag_name(field)} must be .*got"):
        cls(**{field.name: bad})


def test_every_field_with_choices_refuses_another_value():
    for cls in config_classes():
        for f in dataclasses.fields(cls):
            if f.metadata.get("choices"):
                with pytest.raises(ConfigError, match=f"^{C.flag_name(f)} must be one of"):
                    cls(**{f.name: "no-such-choice"})


def test_a_redefined_field_keeps_a_domain():
    """A subclass that redefines a field (another default or help) must not drop the base's bound."""
    for cls in config_classes():
        for base in cls.__mro__[1:]:
            if not dataclasses.is_dataclass(base):
                continue
            theirs = {f.name: f for f in dataclasses.fields(base)}
            for f in dataclasses.fields(cls):
                if f.name in theirs and any(theirs[f.name].metadata.get(k) is not None for k in BOUNDS):
                    assert any(f.metadata.get(k) is not None for k in BOUNDS), f"{cls.__name__}.{f.name}"


def test_a_config_cannot_skip_its_checks():
    with pytest.raises(TypeError, match="check"):

        class Careless(C.TrainConfig):
            def __post_init__(self) -> None:  # would skip check_domains and TrainConfig's rules
                pass

    @dataclasses.dataclass
    class Stricter(C.MTTrainConfig):
        def check(self) -> None:
            if self.max_epoch > 9:
                raise ConfigError("--max-epoch at most 9 here")

    with pytest.raises(ConfigError, match="--lr must be > 0"):
        Stricter(lr=-1)  # the domains still hold
    with pytest.raises(ConfigError, match="--device"):
        Stricter(device="gpu")  # and the base's rules (RunConfig.check)
    with pytest.raises(ConfigError, match="at most 9"):
        Stricter(max_epoch=10)


def test_translation_training_has_no_language_model_fields():
    """Composed from RunConfig, not inherited from TrainConfig: nothing for the CLI to hide."""
    lm_only = {f.name for f in dataclasses.fields(C.TrainConfig)} - {f.name for f in dataclasses.fields(C.RunConfig)}
    assert {"tokens_per_sample", "keep_order", "simulate_ranks", "hf_model"} <= lm_only
    assert {f.name for f in dataclasses.fields(C.MTTrainConfig)} & lm_only == {"criterion"}  # each task's own
