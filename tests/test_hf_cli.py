"""`--hf-model` / `--hf-tokenizer` through the CLI on a tiny random Llama: prepare, eval, datastore, index, train.

The perplexity trime evaluates equals the loss the model itself returns (``labels=``) on the same windows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trime import config as C
from trime.cli import main
from trime.data.blocks import eval_windows
from trime.data.prepare import load_split, special_ids
from trime.evaluate import evaluate
from trime.io import read_meta
from trime.memory.datastore import Datastore
from trime.model.hf import load_hf

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
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("trime: error:") and words in err[0], err
