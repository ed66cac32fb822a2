"""The command line: a whole micro workflow, and one clear line with exit code 2 for bad input."""

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trime.cli import build_parser

from tests.fixtures import make_corpus, make_data, micro_checkpoint


def trime(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trime", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(proc, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trime: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert words in lines[0], lines[0]


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_micro_workflow_end_to_end(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_lines=200)
    assert trime("data", "prepare", corpus, "--out", tmp_path / "data").returncode == 0
    p = trime(
        "train",
        tmp_path / "data",
        "--preset",
        "micro",
        "--criterion",
        "trime",
        "--max-update",
        "4",
        "--save-dir",
        tmp_path / "run",
    )
    assert p.returncode == 0, p.stderr
    p = trime(
        "eval",
        tmp_path / "data",
        "--path",
        tmp_path / "run",
        "--context-window",
        "16",
        "--use-local",
        "--softmax-temp",
        "1.1",
        "--gen-subset",
        "test",
    )
    assert p.returncode == 0, p.stderr
    assert "Loss (base 2): " in p.stdout and ", Perplexity: " in p.stdout


def test_missing_corpus(tmp_path):
    assert_user_error(trime("data", "prepare", tmp_path / "nope", "--out", tmp_path / "d"), "nope")


def test_unknown_corpus_name(tmp_path):
    assert_user_error(trime("data", "fetch", "wikitext-2000", "--out", tmp_path / "x"), "wikitext-2000")


def test_non_utf8_word_level(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_lines=20)
    (corpus / "train.txt").write_bytes(b"caf\xe9 au lait\n")
    assert_user_error(trime("data", "prepare", corpus, "--out", tmp_path / "d"), "UTF-8")
    assert not (tmp_path / "d").exists()


def test_train_without_data(tmp_path):
    assert_user_error(trime("train", tmp_path / "nodata", "--preset", "micro", "--save-dir", tmp_path / "r"), "nodata")


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_checkpoint_without_config(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_lines=30)
    assert trime("data", "prepare", corpus, "--out", tmp_path / "d").returncode == 0
    (tmp_path / "ckpt").mkdir()
    assert_user_error(trime("eval", tmp_path / "d", "--path", tmp_path / "ckpt"), "ckpt")


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--max-tokens", "100"], "--max-tokens"),
        (["--shuffle-groups"], "--keep-order"),
        (["--simulate-ranks", "3"], "--simulate-ranks 3 must divide the 4 segments"),
    ],
)
def test_bad_flag_combinations(tmp_path, flags, words):
    assert_user_error(trime("train", tmp_path, "--preset", "micro", *flags), words)


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_bm25_batches_feed_trime_ext(tmp_path):
    import json

    corpus = make_corpus(tmp_path / "corpus", n_lines=200)
    assert trime("data", "prepare", corpus, "--out", tmp_path / "data").returncode == 0
    p = trime("bm25", "batches", tmp_path / "data", "--tokens-per-sample", "32", "--out", tmp_path / "b.json")
    assert p.returncode == 0, p.stderr
    order = json.loads((tmp_path / "b.json").read_text())
    assert sorted(order) == list(range(len(order)))
    p = trime(
        "train",
        tmp_path / "data",
        "--preset",
        "micro",
        "--criterion",
        "trime_ext",
        "--predefined-batches",
        tmp_path / "b.json",
        "--max-update",
        "2",
        "--save-dir",
        tmp_path / "run",
    )
    assert p.returncode == 0, p.stderr
    (tmp_path / "short.json").write_text(json.dumps(order[:-1]))
    p = trime(
        "train",
        tmp_path / "data",
        "--preset",
        "micro",
        "--criterion",
        "trime_ext",
        "--predefined-batches",
        tmp_path / "short.json",
        "--max-update",
        "2",
        "--save-dir",
        tmp_path / "run2",
    )
    assert_user_error(p, "short.json")


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_prepare_translation_pairs(tmp_path):
    """`trime data prepare` of a pair corpus equals the library's prepare_pairs (itself checked against
    fairseq-preprocess in tests/data/test_pairs.py); a missing target side is one clear line."""
    from pathlib import Path

    from trime.data.pairs import load_pair_split, prepare_pairs

    raw = Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"
    flags = ["--source-lang", "es", "--target-lang", "en", "--bpe-merges", "200", "--allow-empty"]
    p = trime("data", "prepare", raw, "--out", tmp_path / "cli", *flags)
    assert p.returncode == 0, p.stderr
    lib = prepare_pairs(raw, tmp_path / "lib", source_lang="es", target_lang="en", bpe_merges=200, allow_empty=True)
    for side in ("es", "en"):
        assert (tmp_path / "cli" / f"dict.{side}.txt").read_text() == (lib / f"dict.{side}.txt").read_text()
    a, b = load_pair_split(tmp_path / "cli", "train"), load_pair_split(lib, "train")
    assert a.src.tolist() == b.src.tolist() and a.tgt.tolist() == b.tgt.tolist()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.es").write_text("hola\n")
    assert_user_error(trime("data", "prepare", bad, "--out", tmp_path / "x", *flags), "no parallel")


# --- every output flag of every command: a user's file there is refused and left as it was ---------------

OUTPUT_FLAG = re.compile(r"--(out|output-.*|json|results-path|save-dir|save-neighbors|work-dir)")


def output_flags() -> list[str]:
    """'COMMAND --FLAG' of every flag of the CLI that names a place to write, read from the parser itself
    (so a new command or flag is walked, or fails below for want of a case in :func:`writing`)."""
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{command} {name}".strip())
            found.update(f"{command} {o}" for o in action.option_strings if OUTPUT_FLAG.fullmatch(o))

    walk(build_parser(), "")
    return sorted(found)


def writing(flag: str, f: dict, out: Path) -> tuple:
    """A command that writes ``out`` through ``flag`` and is otherwise valid, reading the fixtures ``f``
    (data, ckpt, pairs, mt_ckpt, bm25: a finished `bm25 batches` work directory; for the directory outputs
    also corpus, dstore, mt_dstore)."""
    cpu, micro, mt_micro = ("--device", "cpu"), ("--preset", "micro"), ("--preset", "mt_micro")
    mt_gen = ("mt", "generate", f["pairs"], "--path", f["mt_ckpt"], *cpu, "--gen-subset", "valid")
    mt_gen += ("--max-sentences-total", "3", "--beam", "2", "--max-len-b", "4")
    bm25_work = ("--tokens-per-sample", "32", "--out", out.with_suffix(".json"))
    commands = {
        "data fetch --out": ("data", "fetch", "shakespeare"),
        "data prepare --out": ("data", "prepare", f.get("corpus")),
        "train --save-dir": ("train", f["data"], *micro, *cpu),
        "eval --output-word-probs": ("eval", f["data"], "--path", f["ckpt"], *cpu, "--max-eval-tokens", "40"),
        "eval --save-neighbors": ("eval", f["data"], "--path", f["ckpt"], *cpu, "--use-local"),
        "explain --out": ("explain", "--path", f["ckpt"], "--text", "w1 w2 w1", *cpu),
        "explain --json": ("explain", "--path", f["ckpt"], "--text", "w1 w2", *cpu, "--out", out.with_suffix(".html")),
        "datastore build --out": ("datastore", "build", f["data"], "--path", f["ckpt"], *cpu),
        "datastore add --out": ("datastore", "add", f["data"], "--path", f["ckpt"], *cpu, "--gen-subset", "valid"),
        "index build --out": ("index", "build", f.get("dstore")),
        "index add --out": ("index", "add", f.get("dstore")),
        "bm25 batches --out": ("bm25", "batches", f["data"], "--tokens-per-sample", "32"),
        "bm25 batches --work-dir": ("bm25", "batches", f["data"], *bm25_work),
        "bm25 segments --out": ("bm25", "segments", f["data"], "--tokens-per-sample", "32"),
        "bm25 index --out": ("bm25", "index", f["bm25"] / "segments.jsonl"),
        "bm25 search --out": ("bm25", "search", f["bm25"] / "index", f["bm25"] / "segments.jsonl"),
        "bm25 chain --out": ("bm25", "chain", f["bm25"] / "results", "--index", f["bm25"] / "index"),
        "convert --out": ("convert", Path(__file__).parent / "assets" / "fairseq" / "wt103_style.pt"),
        "mt train --save-dir": ("mt", "train", f["pairs"], *mt_micro, *cpu),
        "mt datastore --out": ("mt", "datastore", f["pairs"], "--path", f["mt_ckpt"], *cpu),
        "mt bm25 --out": ("mt", "bm25", f["pairs"]),
        "mt bm25 --work-dir": ("mt", "bm25", f["pairs"], "--out", out.with_suffix(".json")),
        "mt generate --results-path": mt_gen,
        "mt generate --save-neighbors": (*mt_gen, *f.get("mt_memory", ())),
        "mt reproduce --out": ("mt", "reproduce", *mt_micro),
        "reproduce --out": ("reproduce", *micro),
    }
    assert flag in commands, f"{flag}: add a command that writes through it to tests/test_cli.py::writing"
    return tuple(map(str, commands[flag] + (flag.split()[-1], out)))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Everything the commands of :func:`writing` read: tiny data, models, datastores and BM25 work."""
    from trime.checkpoint import save_checkpoint
    from trime.cli import main
    from trime.data.pairs import load_pair_dictionaries, pair_dictionary_files, prepare_pairs
    from trime.model.encoder_decoder import MTModelConfig, build_mt_model

    root = tmp_path_factory.mktemp("made")
    data = make_data(root, n_lines=200)
    ckpt = micro_checkpoint(root, data)
    raw = Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"
    pairs = prepare_pairs(raw, root / "pairs", source_lang="es", target_lang="en", bpe_merges=100, allow_empty=True)
    src, tgt = load_pair_dictionaries(pairs)
    widths = dict(encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32)
    cfg = MTModelConfig(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        src_vocab_size=len(src), tgt_vocab_size=len(tgt), **widths)  # fmt: skip
    torch.manual_seed(0)
    mt_ckpt = save_checkpoint(root / "mt", build_mt_model(cfg), cfg, pair_dictionary_files(pairs))
    cpu = ["--device", "cpu"]
    for argv in (
        ["datastore", "build", data, "--path", ckpt, "--out", root / "dstore", *cpu],
        ["mt", "datastore", pairs, "--path", mt_ckpt, "--out", root / "mt_dstore", "--gen-subset", "valid", *cpu],
        ["index", "build", root / "mt_dstore", "--dist", "ip"],
        ["bm25", "batches", data, "--tokens-per-sample", "32", "--out", root / "order.json"],
    ):
        assert main(list(map(str, argv))) == 0, argv
    mt_memory = ("--dstore-filename", root / "mt_dstore", "--indexfile", root / "mt_dstore" / "knn.index.ip")
    return {"data": data, "ckpt": ckpt, "pairs": pairs, "mt_ckpt": mt_ckpt, "bm25": root / "order.work",
            "corpus": root / "corpus", "dstore": root / "dstore", "mt_memory": mt_memory}  # fmt: skip


@pytest.mark.slow  # the fixture makes a datastore, an index and BM25 work; each case then takes < 1 s
@pytest.mark.parametrize("flag", output_flags())
def test_every_output_flag_refuses_a_users_file(capsys, made, tmp_path, flag):
    """The user's file at the output path: exit 2, one line, the file byte for byte as it was, nothing beside it."""
    from trime.cli import main

    out = tmp_path / "mine.txt"
    out.write_bytes(b"my notes: not a trime artifact\n")
    code = main(list(writing(flag, made, out)))
    err = capsys.readouterr().err
    assert_user_error(SimpleNamespace(returncode=code, stderr=err), str(out))
    assert out.read_bytes() == b"my notes: not a trime artifact\n"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]  # no temporary, partial or sibling file left


def configs_of(argv: list[str]) -> dict[str, object]:
    """{config class name: config} that `trime ARGV` builds from its flags (no preset), by the COMMANDS table."""
    from trime import config as C
    from trime.cli import COMMANDS

    ns = build_parser().parse_args(argv)
    (classes,) = [configs for _, _, func, *configs in COMMANDS if func is ns.func]
    return {cls.__name__: C.build(cls, C.overrides_from_args(ns, cls)) for cls in classes}


@pytest.mark.parametrize(
    "command, expected",
    [
        ("data fetch bible-es-en --out data/bible", {"FetchConfig": {"name": "bible-es-en", "out": "data/bible"}}),
        ("data fetch iwslt14 --local a.tgz b.tgz", {"FetchConfig": {"local": ["a.tgz", "b.tgz"], "out": ""}}),
        (
            "data prepare data/bible --out data-bin/bible --moses --bpe-merges 10000",
            {"PrepareConfig": {"src": "data/bible", "char_level": None}, "PairPrepareConfig": {"moses": True, "bpe_merges": 10000}},
        ),
        (
            "data prepare --train a.txt --valid b.txt --test c.txt --out data-bin/mine --char-level",
            {"PrepareConfig": {"src": "", "train": "a.txt", "test": "c.txt", "char_level": True, "overwrite": False}},
        ),
        (
            "bm25 batches data-bin/shakespeare --tokens-per-sample 256 --out runs/bm25.json",
            {"Bm25BatchesConfig": {"data": "data-bin/shakespeare", "top_k": 20, "num_shards": 1, "threads": 0, "seed": 1}},
        ),
        ("bm25 search I S --out R --shard-id 0 --num-shards 2", {"Bm25QueryConfig": {"index": "I", "segments": "S", "shard_id": 0}}),
        ("bm25 chain R --index I --out o.json", {"Bm25ChainConfig": {"results": "R", "seed": 1}}),
        ("convert best.pt --dict d.txt --out ckpt", {"ConvertConfig": {"checkpoint": "best.pt", "dict": "d.txt", "trust_checkpoint": False}}),
        ("mt bm25 data-bin/bible --out bible-bm25.json", {"MTBm25Config": {"top_k": 20, "work_dir": "", "seed": 1}}),
        ("mt reproduce", {"MTReproduceJobConfig": {"preset": "mt_cpu", "out": "runs/mt-reproduce", "corpus": "bible-es-en", "max_epoch": 0}}),
        (
            "reproduce --max-update 200,400,800 --variants all --out runs/study",
            {"ReproduceJobConfig": {"preset": "tiny", "max_update": [200, 400, 800], "variants": ["all"], "seed": None}},
        ),
        ("reproduce", {"ReproduceJobConfig": {"corpus": "shakespeare", "max_update": [0], "char_level": False}}),
        (
            "generate --path runs/t --prompt P --max-new-tokens 40 --beam 5 --use-local",
            {"GenerateConfig": {"path": "runs/t", "beam": 5, "use_local": True, "context_window": -1, "data": ""}},
        ),
        (
            "explain data-bin/shakespeare --path runs/t --gen-subset valid --max-eval-tokens 2000",
            {"ExplainConfig": {"data": "data-bin/shakespeare", "max_eval_tokens": 2000, "out": "report.html"}},
        ),
        ("eval D --path C --use-local --softmax-temp 4", {"EvalConfig": {"data": "D", "softmax_temp": 4.0, "amp": "none"}}),
        ("index build dstore --dist ip", {"IndexConfig": {"dstore": "dstore", "metric": "ip", "out": ""}}),
        ("sweep nb --softmax-temp 5,10 --k 8,16", {"SweepConfig": {"cache": "nb", "softmax_temp": [5.0, 10.0], "k": [8, 16]}}),
    ],
)  # fmt: skip
def test_readme_commands_build_the_same_configs(command, expected):
    """The commands the README shows, parsed by the parser made from the config tables: positionals, flags
    and defaults as the hand-written parser had them."""
    built = configs_of(command.split())
    for name, fields in expected.items():
        assert {k: getattr(built[name], k) for k in fields} == fields


def test_generate_and_explain_show_only_their_own_fields():
    """Composed of the pieces of evaluation (no skip-list): generation has no split, explain no eval outputs;
    all three take a Hugging Face model as they take a checkpoint."""
    from trime import config as C

    gen = {f.name for f in dataclasses.fields(C.GenerateConfig)}
    assert gen.isdisjoint({"gen_subset", "batch_size", "output_word_probs", "save_neighbors"})
    assert {f.name for f in dataclasses.fields(C.MemoryConfig)} <= gen
    explain = {f.name for f in dataclasses.fields(C.ExplainConfig)}
    assert explain.isdisjoint({"output_word_probs", "save_neighbors", "neighbors_top"})
    eval_ = {f.name for f in dataclasses.fields(C.EvalConfig)}
    assert eval_ - explain == {"output_word_probs", "save_neighbors", "neighbors_top"}
    assert all({"path", "hf_model", "gguf_file"} <= fields for fields in (gen, explain, eval_))
