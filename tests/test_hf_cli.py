"""`--hf-model` / `--hf-tokenizer` through the CLI on a tiny random Llama: every command that takes a trime
checkpoint takes `--hf-model` too (prepare, eval, eval --save-neighbors + sweep, datastore, index, generate,
explain, train and resume), and the commands of docs/hugging-face.md run as written.

The perplexity trime evaluates equals the loss the model itself returns (``labels=``) on the same windows;
greedy generation without memory equals the model's own ``generate``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trime import config as C
from trime.checkpoint import source_fingerprint
from trime.cli import main
from trime.data.blocks import eval_windows
from trime.data.prepare import load_split, special_ids
from trime.evaluate import evaluate
from trime.generate.lm import generate
from trime.io import read_meta
from trime.memory.datastore import Datastore
from trime.model.hf import hf_fingerprint, hub_revision, load_hf

from tests.fixtures import make_corpus, synthetic_text

transformers = pytest.importorskip("transformers")

L, CTX = 16, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("hfcli")
    corpus = make_corpus(root / "corpus", n_lines=120)
    words = sorted(set(synthetic_text(300).split()) | {f"w{i}" for i in range(60)})
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    fast.save_pretrained(root / "tok")
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab) + 5,  # spare head rows, as many released models have
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    shutil.copytree(root / "model", root / "model_tok")  # the same model shipping its tokenizer, as hub models do
    fast.save_pretrained(root / "model_tok")
    assert main(["data", "prepare", str(corpus), "--out", str(root / "data"), "--hf-tokenizer", str(root / "tok")]) == 0
    return root


def test_prepare_and_eval_equal_the_models_own_loss(setup, capsys):
    root = setup
    data, model_dir = root / "data", root / "model"
    meta = read_meta(data, kind="data")
    assert meta["level"] == "hf" and special_ids(data) == (meta["pad"], meta["eos"]) == (1, 2)
    n = min(150, len(load_split(data, "valid")))
    res = evaluate(
        C.build(
            C.EvalConfig,
            {
                "data": str(data),
                "hf_model": str(model_dir),
                "tokens_per_sample": L,
                "context_window": CTX,
                "device": "cpu",
                "max_eval_tokens": n,
            },
        )
    )
    stream = load_split(data, "valid")[:n]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    total, count = 0.0, 0
    for s, e, c in eval_windows(stream, L, CTX, "none", 2).tolist():
        x = torch.tensor([[2 if i < 0 else int(stream[i]) for i in range(s - c - 1, e)]])  # eos before the split
        labels = x.clone()
        labels[:, : c + 1] = -100  # context positions are not scored
        with torch.no_grad():
            total += float(model(input_ids=x, labels=labels).loss) * (e - s)
        count += e - s
    assert res.n_tokens == count == n
    assert abs(-float(np.mean(res.log_probs.astype(np.float64))) - total / count) < 1e-5

    argv = [
        "eval",
        str(data),
        "--hf-model",
        str(model_dir),
        "--tokens-per-sample",
        str(L),
        "--context-window",
        str(CTX),
        "--device",
        "cpu",
        "--max-eval-tokens",
        str(n),
    ]
    assert main(argv) == 0
    assert f"Perplexity: {res.ppl:.2f}" in capsys.readouterr().out
    assert main([*argv, "--use-local", "--softmax-temp", "0.8"]) == 0
    assert "Perplexity: " in capsys.readouterr().out


def test_datastore_index_and_external_eval(setup, capsys):
    root = setup
    data, model_dir, ds = root / "data", root / "model", root / "dstore"
    argv = [
        "datastore",
        "build",
        str(data),
        "--hf-model",
        str(model_dir),
        "--out",
        str(ds),
        "--tokens-per-sample",
        str(L),
        "--gen-subset",
        "train",
        "--device",
        "cpu",
        "--amp",
        "none",
        "--key-dtype",
        "float32",
    ]
    assert main(argv) == 0
    store = Datastore.open(ds)
    train = load_split(data, "train")
    assert len(store) == len(train)
    bb = load_hf(model_dir)
    with torch.no_grad():
        q = bb(torch.tensor([[2, *train[: L - 1].tolist()]])).q[0]  # the first window: no context
    np.testing.assert_allclose(store.read_keys(0, L), q.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["index", "build", str(ds), "--dist", "ip"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(data),
                "--hf-model",
                str(model_dir),
                "--tokens-per-sample",
                str(L),
                "--device",
                "cpu",
                "--max-eval-tokens",
                "64",
                "--use-external",
                "--use-interp",
                "--lmbda",
                "0.25",
                "--k",
                "8",
                "--dstore-filename",
                str(ds),
                "--indexfile",
                str(ds / "knn.index.ip"),
            ]
        )
        == 0
    )
    assert "Perplexity: " in capsys.readouterr().out


def test_train_saves_resumes_and_evaluates(setup, capsys):
    root = setup
    data, run = root / "data", root / "run"
    argv = [
        "train",
        str(data),
        "--hf-model",
        str(root / "model"),
        "--criterion",
        "trime",
        "--tokens-per-sample",
        str(L),
        "--max-tokens",
        str(4 * L),
        "--max-update",
        "2",
        "--save-dir",
        str(run),
        "--device",
        "cpu",
        "--amp",
        "none",
        "--lr",
        "1e-3",
        "--max-valid-tokens",
        str(4 * L),
    ]
    assert main(argv) == 0
    meta = read_meta(run / "checkpoint_last", kind="checkpoint")
    assert meta["backbone"] == "hf" and meta["updates"] == 2 and meta["train"]["criterion"] == "trime"
    assert (run / "checkpoint_last" / "trainer.pt").is_file()
    assert main([*argv[:-8], "--max-update", "3", *argv[-6:]]) == 0
    assert "resuming" in capsys.readouterr().out
    assert read_meta(run / "checkpoint_last")["updates"] == 3
    assert (
        main(
            [
                "eval",
                str(data),
                "--path",
                str(run),
                "--tokens-per-sample",
                str(L),
                "--device",
                "cpu",
                "--max-eval-tokens",
                "64",
                "--use-local",
            ]
        )
        == 0
    )
    assert "Perplexity: " in capsys.readouterr().out


def test_one_line_errors(setup, capsys):
    root = setup
    for argv, words in (
        (["eval", str(root / "data"), "--hf-model", str(root / "nope")], "no such model directory"),
        (["eval", str(root / "data"), "--gguf-file", "x.gguf", "--path", str(root)], "--gguf-file needs --hf-model"),
        (
            ["data", "prepare", str(root / "corpus"), "--out", str(root / "d2"), "--hf-tokenizer", str(root / "no")],
            "no such tokenizer",
        ),
        (["generate", "--prompt", "w1"], "needs --path CHECKPOINT or --hf-model"),
        (["explain", str(root / "data"), "--gguf-file", "x.gguf"], "--gguf-file needs --hf-model"),
        (["generate", "--hf-model", str(root / "model"), "--prompt", "w1", "--device", "cpu"], "no tokenizer"),
    ):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(err) == 1 and err[0].startswith("trime: error:") and words in err[0], err  # transformers' bar aside


def _window(root, *extra) -> list[str]:
    return [str(root / "data"), "--tokens-per-sample", str(L), "--context-window", str(CTX), "--device", "cpu", *extra]


def test_eval_save_neighbors_then_sweep(setup, capsys):
    """The neighbour cache of an --hf-model evaluation is labelled with that model, and sweep re-scores it exactly."""
    root = setup
    cache = root / "nb"
    argv = ["eval", *_window(root, "--max-eval-tokens", "64", "--use-local", "--softmax-temp", "2")]
    assert main([*argv, "--hf-model", str(root / "model"), "--save-neighbors", str(cache), "--neighbors-top", "0"]) == 0
    ppl = capsys.readouterr().out.strip().splitlines()[-1].split("Perplexity: ")[1]
    meta = read_meta(cache, kind="neighbor_cache")
    assert meta["inputs"]["model"] == source_fingerprint(hf_model=str(root / "model")) and meta["rows"] == 64
    assert "hf_model" not in meta["inputs"]["settings"]  # the model is named by content, never by path
    assert main(["sweep", str(cache), "--softmax-temp", "1,2"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("|") and r.split("|")[1].strip() == "2"]
    assert rows and rows[0].split("|")[-2].strip() == ppl


def test_one_precision_for_keys_and_queries(setup, capsys):
    """Every scoring command defaults to float32; a datastore records its precision and a search in another
    is one line naming the flag to pass."""
    defaults = {cls: cls().amp for cls in (C.EvalConfig, C.DatastoreConfig, C.GenerateConfig, C.ExplainConfig)}
    assert set(defaults.values()) == {"none"}, defaults
    root = setup
    ds = root / "dstore-bf16"
    common = ["--hf-model", str(root / "model"), "--tokens-per-sample", str(L), "--device", "cpu"]
    assert main(["datastore", "build", str(root / "data"), *common, "--out", str(ds), "--gen-subset", "valid",
                 "--amp", "bf16"]) == 0  # fmt: skip
    assert read_meta(ds)["precision"] == "bf16"  # and the model is named as eval's neighbour cache names it
    assert read_meta(ds)["model_fingerprint"] == source_fingerprint(hf_model=str(root / "model"))
    assert main(["index", "build", str(ds), "--dist", "l2"]) == 0
    capsys.readouterr()
    ext = ["--use-interp", "--lmbda", "0.25", "--k", "8", "--dstore-filename", str(ds), "--indexfile",
           str(ds / "knn.index.l2")]  # fmt: skip
    argv = ["eval", str(root / "data"), *common, "--max-eval-tokens", "32", *ext]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trime: error:")]
    assert len(err) == 1 and "computed in bf16" in err[0] and "pass --amp bf16" in err[0], err
    assert main([*argv, "--amp", "bf16"]) == 0
    # resuming or reusing the build in another precision is refused, not mixed
    assert main(["datastore", "build", str(root / "data"), *common, "--out", str(ds), "--gen-subset", "valid"]) == 2
    assert "precision" in capsys.readouterr().err


def test_hub_fingerprint_is_pinned_to_the_cached_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    unpinned = hf_fingerprint("org/tiny")  # not in the cache: its name only
    repo = tmp_path / "models--org--tiny"
    prints = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert hub_revision("org/tiny") == commit
        prints.append(hf_fingerprint("org/tiny"))
    assert len({unpinned, *prints}) == 3
    assert source_fingerprint(hf_model="org/tiny") == prints[-1]


def _greedy_reference(model_dir, ids: list[int], eos: int, n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    x = torch.tensor([[eos, *ids]])  # trime's stream starts after an eos, as every prepared split does
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, x.shape[1] :].tolist()


def test_generate_greedy_equals_the_models_own_generate(setup, capsys):
    root = setup
    prompt = "w1 w2 w3 w1 w2"
    for model, data in ((root / "model", str(root / "data")), (root / "model_tok", "")):  # tokenizer: data's, model's
        cfg = C.GenerateConfig(hf_model=str(model), data=data, prompt=prompt, max_new_tokens=12, device="cpu")
        gen = generate(cfg)
        tok = transformers.AutoTokenizer.from_pretrained(root / "tok")
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert gen.hypotheses[0].tokens.tolist() == _greedy_reference(model, ids, 2, 12)
    argv = ["generate", "--hf-model", str(root / "model_tok"), "--prompt", prompt, "--device", "cpu"]
    assert main([*argv, "--max-new-tokens", "6", "--use-local", "--beam", "2"]) == 0
    assert capsys.readouterr().out.startswith(prompt)


def test_explain(setup, capsys):
    root = setup
    out = root / "report.html"
    argv = ["explain", *_window(root, "--max-eval-tokens", "24", "--use-local", "--out", str(out))]
    assert main([*argv, "--hf-model", str(root / "model"), "--json", str(root / "report.json")]) == 0
    report = json.loads((root / "report.json").read_text())
    assert report["summary"]["n_tokens"] == 24 and report["summary"]["level"] == "hf" and out.is_file()
    assert all(report["vocab"][str(t)] for t in report["text"])
    _page_shows_the_text(out, [report["vocab"][str(t)] for t in report["text"]])
    text = ["explain", "--text", "w1 w2 w3 w1 w2 w3", "--hf-model", str(root / "model_tok"), "--use-local"]
    assert main([*text, "--device", "cpu", "--out", str(out)]) == 0
    assert "tokens explained" in capsys.readouterr().out


def _page_shows_the_text(page, pieces):
    """The page shows a Hugging Face model's tokens as the text they decode to (each piece carries its own
    spaces), not as words joined by spaces; an end of line is its mark and a line break."""
    from tests.explain.test_explain import _driver

    d = _driver()
    try:
        d.get(page.resolve().as_uri())
        shown = d.execute_script("return document.getElementById('text').innerText")
    finally:
        d.quit()
    assert shown.rstrip() == "".join("\u21b5\n" if p == "\n" else p for p in pieces).rstrip()


def test_train_saves_the_tokenizer_and_resumes(setup, capsys):
    """A run from a model that ships its tokenizer saves it in every checkpoint: the checkpoint is a whole
    save_pretrained model, `trime generate --path RUN` needs no data, and the run resumes."""
    root = setup
    run = root / "run-tok"
    argv = ["train", str(root / "data"), "--hf-model", str(root / "model_tok"), "--tokens-per-sample", str(L),
            "--max-tokens", str(2 * L), "--save-dir", str(run), "--device", "cpu", "--lr", "1e-3",
            "--max-valid-tokens", str(2 * L)]  # fmt: skip
    assert main([*argv, "--max-update", "1"]) == 0
    assert (run / "checkpoint_last" / "tokenizer.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(run / "checkpoint_last")("w1 w2")["input_ids"]
    assert main([*argv, "--max-update", "2"]) == 0
    assert "resuming" in capsys.readouterr().out and read_meta(run / "checkpoint_last")["updates"] == 2
    assert all((c / "tokenizer.json").is_file() for c in run.glob("checkpoint_*"))
    assert not list((root / "run").glob("checkpoint_*/tokenizer.json"))  # a source without one: none saved
    assert main(["generate", "--path", str(run), "--prompt", "w1 w2", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2")


def test_the_pages_commands_run_as_written(setup, tmp_path, monkeypatch, capsys):
    """docs/hugging-face.md's first block, run in order as written, with three changes: MODEL is a tiny
    random Llama shipping its tokenizer, `trime data fetch` (the network) is replaced by a small corpus,
    and training stops after 2 updates."""
    from tests.test_docs import ROOT, page_commands

    page = ROOT / "docs" / "hugging-face.md"
    first = min(int(c.where.split(":")[1]) for c in page_commands(page))
    block = [c for c in page_commands(page) if int(c.where.split(":")[1]) < first + 40]
    doc_model = next(m.group(1) for m in [re.search(r"^MODEL=(\S+)", page.read_text(), re.M)] if m)
    cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    transformers.AutoTokenizer.from_pretrained(setup / "tok").save_pretrained(model)
    monkeypatch.chdir(tmp_path)
    ran = []
    for c in block:
        args = [str(model) if a == doc_model else a for a in c.args]
        if args[:2] == ["data", "fetch"]:
            make_corpus(Path(args[args.index("--out") + 1]), n_lines=300)
            continue
        if "--max-update" in args:
            args[args.index("--max-update") + 1] = "2"
        assert main(args) == 0, f"{c.where}: trime {' '.join(args)}\n{capsys.readouterr().err[-2000:]}"
        ran.append(" ".join(args[:2]) if args[0] in ("data", "datastore", "index") else args[0])
    assert set(ran) == {
        "data prepare",
        "eval",
        "sweep",
        "datastore build",
        "index build",
        "generate",
        "explain",
        "train",
    }
    assert ran.count("eval") == 4 and ran.count("generate") == 2, ran
