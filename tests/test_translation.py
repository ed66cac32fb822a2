"""Translation training and decoding end to end on a tiny pair corpus (tests/assets/fairseq_pairs/raw)."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trime import config as C
from trime.cli import main
from trime.data.pairs import prepare_pairs
from trime.generate.beam import BeamConfig
from trime.model.encoder_decoder import MTModelConfig, build_mt_model
from trime.translation import MTObjective, fit_translation, translate

RAW = Path(__file__).parent / "assets" / "fairseq_pairs" / "raw"
TINY = dict(
    encoder_layers=1, decoder_layers=1, encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=32,
    decoder_ffn_embed_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "data"
    return prepare_pairs(RAW, out, source_lang="es", target_lang="en", bpe_merges=100, allow_empty=True)


def _cfg(data, save_dir, **kw):
    return C.MTTrainConfig(
        data=str(data), save_dir=str(save_dir), max_tokens=256, lr=3e-3, warmup_updates=2, amp="none",
        log_interval=1, eval_bleu_sentences=8, **kw,
    )  # fmt: skip


def test_label_smoothed_loss_equals_fairseqs_formula():
    torch.manual_seed(0)
    cfg = MTModelConfig(src_vocab_size=11, tgt_vocab_size=9, **TINY)
    model = build_mt_model(cfg).eval()
    src = torch.tensor([[1, 5, 6, 2], [4, 7, 8, 2]])  # left-padded
    prev = torch.tensor([[2, 4, 5], [2, 6, 1]])
    tgt = torch.tensor([[4, 5, 2], [6, 2, 1]])  # right-padded
    eps = 0.1
    loss, n, nll = MTObjective(model, eps, seed=1)(src, prev, tgt)
    with torch.no_grad():
        lp = model.head.log_probs(model(src, prev).h.reshape(-1, 16)).double()  # (B·T, V)
    want_loss = want_nll = 0.0
    for r, y in enumerate(tgt.flatten().tolist()):
        if y == 1:
            continue  # pad targets are not scored
        V = lp.shape[1]
        want_nll += -float(lp[r, y])
        want_loss += (1 - eps - eps / (V - 1)) * -float(lp[r, y]) + eps / (V - 1) * -float(lp[r].sum())
    assert int(n) == 5
    assert math.isclose(float(loss), want_loss, rel_tol=1e-5) and math.isclose(float(nll), want_nll, rel_tol=1e-5)


def test_training_lowers_the_loss_and_resumes_exactly(pairs, tmp_path):
    model_cfg = MTModelConfig(**TINY)
    run = fit_translation(model_cfg, _cfg(pairs, tmp_path / "straight", max_update=8, save_interval_updates=4))
    log = [line for line in (run / "log.jsonl").read_text().splitlines() if '"train"' in line]
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in log]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # killed after update 4 (its checkpoint_last), then resumed: the same weights as the straight run
    fit_translation(model_cfg, _cfg(pairs, tmp_path / "killed", max_update=4, save_interval_updates=4))
    fit_translation(model_cfg, _cfg(pairs, tmp_path / "killed", max_update=8, save_interval_updates=4))
    a = load_file(str(run / "checkpoint_last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint_last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_and_score_reference_from_the_command_line(pairs, tmp_path, capsys):
    model_cfg = MTModelConfig(**TINY)
    run = fit_translation(model_cfg, _cfg(pairs, tmp_path / "run", max_epoch=1))
    assert (run / "checkpoint_best" / "dict.es.txt").is_file() and (run / "checkpoint_best" / "dict.en.txt").is_file()
    assert main(["mt", "generate", str(pairs), "--path", str(run), "--gen-subset", "valid", "--beam", "2"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("| ") and "BLEU = " in out and "H-0\t" in out
    # --score-reference: each sentence's mean teacher-forced log-prob (fairseq-generate's score)
    res = translate(C.TranslateConfig(data=str(pairs), path=str(run), gen_subset="valid", score_reference=True))
    direct = translate(C.TranslateConfig(data=str(pairs), path=str(run), gen_subset="valid"), BeamConfig(beam=2))
    assert res.bleu is None and direct.bleu is not None and res.n_sentences == direct.n_sentences
    assert all(line.split("\t")[1] != "nan" for line in res.lines if line.startswith("H-"))


def test_mt_errors_are_one_line(pairs, tmp_path, capsys):
    assert main(["mt", "train", str(pairs), "--preset", "tiny", "--save-dir", str(tmp_path / "x")]) == 2
    assert "language-model recipe" in capsys.readouterr().err
    assert main(["mt", "generate", str(pairs), "--path", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
