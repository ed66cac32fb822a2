"""Translation training and decoding end to end on a tiny pair corpus (tests/assets/fairseq_pairs/raw)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trime import config as C
from trime.cli import main
from trime.data.pairs import prepare_pairs
from trime.generate.beam import BeamConfig
from trime.losses import MTLossSettings, MTObjective
from trime.model.encoder_decoder import MTModelConfig, build_mt_model
from trime.mt_generate import translate
from trime.translation import fit_translation

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
    with torch.no_grad():
        loss, n, nll, _ = MTObjective(model, MTLossSettings(criterion="ce", label_smoothing=eps), seed=1)(
            src, prev, tgt
        )
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
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("Generate valid with beam=2: BLEU|nrefs:1|") and "|tok:13a|" in out[-1]
    assert out[-2].startswith("| translated ") and "(base 2" in out[-2] and "Moses-detokenised with en rules" in out[-2]
    tags = ["S-", "T-", "H-", "D-", "P-"]
    assert [line[:2] for line in out if line[:2] in tags][:5] == tags
    # --score-reference: each sentence's mean teacher-forced log-prob (fairseq-generate's score)
    res = translate(C.TranslateConfig(data=str(pairs), path=str(run), gen_subset="valid", score_reference=True))
    direct = translate(C.TranslateConfig(data=str(pairs), path=str(run), gen_subset="valid"), BeamConfig(beam=2))
    assert res.bleu is None and direct.bleu is not None and res.n_sentences == direct.n_sentences
    assert all(line.split("\t")[1] != "nan" for line in res.lines if line.startswith("H-"))
    assert res.line().startswith("Loss (base 2): ") and "averaged over tokens" in res.line()
    # the loss is token-weighted, the mean score sentence-weighted (they differ when lengths do)
    pos = [[float(x) for x in line.split("\t")[1].split()] for line in res.lines if line.startswith("P-")]
    assert res.loss == pytest.approx(-sum(map(sum, pos)) / sum(map(len, pos)), abs=1e-3)
    assert res.mean_score == pytest.approx(sum(sum(p) / len(p) for p in pos) / len(pos), abs=1e-3)


def test_validation_bleu_leaves_the_model_training(pairs):
    """Beam search puts the model in eval mode; the BLEU metric puts it back, so that the epochs after a
    validation train with dropout (they did not)."""
    from trime.data.pairs import load_pair_dictionaries, load_pair_split
    from trime.mt_generate import valid_bleu

    src, tgt = load_pair_dictionaries(pairs)
    model = build_mt_model(MTModelConfig(src_vocab_size=len(src), tgt_vocab_size=len(tgt), **TINY)).train()
    name, score = valid_bleu(load_pair_split(pairs, "valid"), tgt, 2, "cpu")(model)
    assert name == "bleu" and score >= 0 and model.training


def test_mt_errors_are_one_line(pairs, tmp_path, capsys):
    assert main(["mt", "train", str(pairs), "--preset", "tiny", "--save-dir", str(tmp_path / "x")]) == 2
    assert "language-model recipe" in capsys.readouterr().err
    assert main(["mt", "generate", str(pairs), "--path", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


FAIRSEQ_MT = Path(__file__).parent / "assets" / "fairseq_mt"


@pytest.fixture(scope="module")
def fairseq_data(tmp_path_factory):
    """The fairseq fixture's test split prepared with its dictionaries (target language code "tgt")."""
    import shutil

    corpus = tmp_path_factory.mktemp("fsq") / "corpus"
    corpus.mkdir()
    shutil.copy(FAIRSEQ_MT / "test.src", corpus / "test.src")  # no train split: the dictionaries are given
    shutil.copy(FAIRSEQ_MT / "test.tgt", corpus / "test.tgt")
    return prepare_pairs(
        corpus, corpus.parent / "data", src_dict=FAIRSEQ_MT / "dict.src.txt", tgt_dict=FAIRSEQ_MT / "dict.tgt.txt"
    )


def _generate(capsys, data, *flags) -> tuple[dict[str, dict[int, str]], list[str]]:
    """`trime mt generate` on the fairseq model post_tied: ({tag: {i: text}}, summary lines)."""
    assert main(["mt", "generate", str(data), "--path", str(FAIRSEQ_MT / "post_tied.pt"), *flags]) == 0
    lines: dict[str, dict[int, str]] = {}
    summary = []
    for line in capsys.readouterr().out.splitlines():
        tag, _, rest = line.partition("-")
        if tag in ("S", "T", "H", "D", "P") and rest[:1].isdigit():
            i, _, text = rest.partition("\t")
            lines.setdefault(tag, {})[int(i)] = text.split("\t")[-1] if tag in ("H", "D") else text
        else:
            summary.append(line)
    return lines, summary


def test_d_lines_and_bleu_follow_the_target_language(fairseq_data, capsys):
    """D- lines are Moses-detokenised with the target language's rules (--moses-target-lang, else the data's
    "tgt", a code Moses has no rules for: left alone); sacreBLEU's tokeniser is the language's, shown in
    the signature; --scoring bleu is fairseq's BLEU4 over the H- and T- lines."""
    from sacremoses import MosesDetokenizer

    from trime.generate.text import fairseq_bleu4

    few = ("--beam", "2", "--max-sentences-total", "12")
    lines, summary = _generate(capsys, fairseq_data, *few)
    assert lines["D"] == lines["H"] and "D- lines not detokenised" in summary[-2] and "|tok:13a|" in summary[-1]
    lines, summary = _generate(capsys, fairseq_data, *few, "--moses-target-lang", "de", "--sacrebleu-tokenize", "intl")
    md = MosesDetokenizer(lang="de")
    assert lines["D"] == {i: md.detokenize(h.split()) for i, h in lines["H"].items()}
    assert "Moses-detokenised with de rules" in summary[-2] and "|tok:intl|" in summary[-1]
    lines, summary = _generate(capsys, fairseq_data, *few, "--moses-target-lang", "zh", "--scoring", "bleu")
    assert lines["D"] == lines["H"] and "fairseq's BLEU4 on H- against T- words" in summary[-2]
    want = fairseq_bleu4([lines["H"][i] for i in range(12)], [lines["T"][i] for i in range(12)])
    assert summary[-1] == f"Generate test with beam=2: {want}" and str(want).startswith("BLEU4 = ")
    # --remove-bpe alone is fairseq's subword_nmt; --remove-bpe SCHEME and --post-process name one
    for flags, scheme in (((), "subword_nmt"), (("--remove-bpe",), "subword_nmt"), (("--remove-bpe", "sentencepiece"),
                          "sentencepiece"), (("--post-process", "none"), "none")):  # fmt: skip
        _, summary = _generate(capsys, fairseq_data, *few, *flags)
        assert f"pieces joined by {scheme}," in summary[-2], flags


def test_japanese_target_needs_mecab_or_another_tokeniser(fairseq_data, capsys):
    """ja: sacreBLEU's ja-mecab, refused in one line naming the extra where MeCab is missing (before
    decoding); another tokeniser, or fairseq's BLEU4, scores it; D- lines are never Moses'."""
    from trime.errors import ConfigError
    from trime.generate.text import sacrebleu_scorer

    few = ("--beam", "2", "--max-sentences-total", "4", "--moses-target-lang", "ja")
    try:
        sacrebleu_scorer("ja-mecab")
        has_mecab = True
    except ConfigError:
        has_mecab = False
    if not has_mecab:
        assert main(["mt", "generate", str(fairseq_data), "--path", str(FAIRSEQ_MT / "post_tied.pt"), *few]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'pip install "sacrebleu[ja]"' in err[0] and "target language ja" in err[0]
    lines, summary = _generate(capsys, fairseq_data, *few, "--sacrebleu-tokenize", "char")
    assert lines["D"] == lines["H"] and "|tok:char|" in summary[-1]


def test_trime_mt_training_runs_and_ce_warmup_switches(pairs, tmp_path):
    """--criterion trime_mt trains through the same trainer; with --ce-warmup-epoch 1 epoch 1 is plain CE
    (train loss == ce), and --ce-warmup-released ignores the warm-up as the released code did."""
    import json

    def losses(run):
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(r["loss"], r["ce_loss"], r["use_ce"]) for r in rows if r["kind"] == "train"]

    kw = dict(criterion="trime_mt", temp=10.0, topk_mem=8, label_smoothing=0.0, max_update=3)
    warm = fit_translation(MTModelConfig(**TINY), _cfg(pairs, tmp_path / "warm", ce_warmup_epoch=1, **kw))
    assert all(u and abs(loss - ce) < 1e-9 for loss, ce, u in losses(warm))
    released = fit_translation(
        MTModelConfig(**TINY), _cfg(pairs, tmp_path / "rel", ce_warmup_epoch=1, ce_warmup_released=True, **kw)
    )
    assert all(not u and loss != ce for loss, ce, u in losses(released))
    rows = [json.loads(line) for line in (released / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["mem_share"] < 1 for r in rows if r["kind"] == "train")  # the TRIME losses' diagnostics


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_mt_datastore_and_decoding_with_memory(pairs, tmp_path):
    """The training-set datastore has one row per target token holding the teacher-forced h; decoding
    with it in knn mode at λ = 0 gives exactly the vanilla translations; trime modes run."""
    import numpy as np

    from trime.data.pairs import load_pair_split
    from trime.memory.datastore import Datastore
    from trime.memory.index import build_index

    run = fit_translation(MTModelConfig(**TINY), _cfg(pairs, tmp_path / "run", max_update=4, eval_bleu=False))
    ckpt = run / "checkpoint_last"
    from trime.datastore_build import build_mt_datastore

    ds_dir = build_mt_datastore(C.MTDatastoreConfig(data=str(pairs), path=str(ckpt), out=str(tmp_path / "ds"),
                                                    max_tokens=64, key_dtype="float32"))  # fmt: skip
    split = load_pair_split(pairs, "train")
    ds = Datastore.open(ds_dir)
    assert ds.rows == int(split.tgt_offsets[-1]) and ds.values.tolist() == split.tgt.tolist()
    # row r = the r-th target token: check sentence 3's keys against a direct teacher-forced forward
    from trime.checkpoint import load_model
    from trime.data.pair_batching import collate

    model, _, _ = load_model(ckpt, task="mt")
    b = collate(split, np.array([3]))
    with torch.no_grad():
        h = model(b.src_tokens, b.prev_output_tokens).h[0]  # (T, d)
    a, e = int(split.tgt_offsets[3]), int(split.tgt_offsets[4])
    keys = torch.from_numpy(ds.read_keys(a, e))
    torch.testing.assert_close(keys, h, atol=1e-5, rtol=1e-5)
    index = build_index(ds_dir, tmp_path / "ds" / "knn.index.ip", metric="ip")
    base = dict(data=str(pairs), path=str(ckpt), gen_subset="valid")
    vanilla = translate(C.TranslateConfig(**base), BeamConfig(beam=2))
    zero = translate(C.TranslateConfig(**base, dstore=str(ds_dir), indexfile=str(index), knn_mode="knn", lmbda=0.0,
                                       k=4), BeamConfig(beam=2))  # fmt: skip
    assert [x for x in zero.lines if x.startswith("H-")] == [x for x in vanilla.lines if x.startswith("H-")]
    for mode in ("trime", "trime_released"):
        res = translate(C.TranslateConfig(**base, dstore=str(ds_dir), indexfile=str(index), knn_mode=mode, k=4),
                        BeamConfig(beam=2))  # fmt: skip
        assert res.bleu is not None and res.n_sentences == vanilla.n_sentences


def test_bm25_pair_order_feeds_trime_mt_training(pairs, tmp_path, capsys):
    """`trime mt bm25` writes a permutation of the training pairs whose neighbours are BM25 hits far
    more often than chance; trime_mt trains on it (packed in its order); a file for other data is refused."""
    import json

    from trime.data import bm25
    from trime.data.pairs import load_pair_split
    from trime.translation import bm25_pair_order

    out = bm25_pair_order(pairs, tmp_path / "order.json")
    order = json.loads(out.read_text())
    n = len(load_pair_split(pairs, "train"))
    assert sorted(order) == list(range(n))
    hits = bm25.load_results(tmp_path / "order.work" / "results", n)
    shuffled = list(np.random.default_rng(0).permutation(n))
    assert bm25.link_share(order, hits) > 2 * bm25.link_share(shuffled, hits)
    kw = dict(criterion="trime_mt", temp=10.0, topk_mem=8, label_smoothing=0.0, max_update=2, eval_bleu=False)
    run = fit_translation(MTModelConfig(**TINY), _cfg(pairs, tmp_path / "run", predefined_batches=str(out), **kw))
    assert (run / "checkpoint_last" / "meta.json").is_file()
    (tmp_path / "short.json").write_text(json.dumps(order[:-1]))
    capsys.readouterr()
    args = [
        "mt",
        "train",
        str(pairs),
        "--save-dir",
        str(tmp_path / "r2"),
        "--predefined-batches",
        str(tmp_path / "short.json"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lists" in err[0] and "trime mt bm25" in err[0]


def test_sweep_from_cached_reference_neighbours_equals_the_combiners(pairs, tmp_path):
    """--save-neighbors caches teacher-forced rows; `trime sweep`'s scoring of them equals the decoding
    combiners applied to the same references: TrimeMT (paper form) at τ = T, kNN-MT at λ, T."""
    from trime.checkpoint import load_model
    from trime.data.pair_batching import collate
    from trime.data.pairs import load_pair_split
    from trime.datastore_build import build_mt_datastore
    from trime.generate.memory import MemoryCombiner
    from trime.memory.external import ExternalMemory
    from trime.memory.index import build_index
    from trime.memory.neighbors import NeighborCache, rescore_tokens

    run = fit_translation(MTModelConfig(**TINY), _cfg(pairs, tmp_path / "run", max_update=3, eval_bleu=False))
    ckpt = run / "checkpoint_last"
    ds = build_mt_datastore(C.MTDatastoreConfig(data=str(pairs), path=str(ckpt), out=str(tmp_path / "ds")))
    index = build_index(ds, tmp_path / "ds" / "knn.index.ip", metric="ip")
    cache = tmp_path / "nb"
    cfg = C.TranslateConfig(data=str(pairs), path=str(ckpt), gen_subset="valid", dstore=str(ds), indexfile=str(index),
                            k=6, save_neighbors=str(cache))  # fmt: skip
    assert "trime sweep" in translate(cfg).line()
    nb = NeighborCache.load(cache)
    model, mcfg, _ = load_model(ckpt, task="mt")
    split = load_pair_split(pairs, "valid")
    b = collate(split, np.arange(len(split)))
    with torch.no_grad():
        h = model(b.src_tokens, b.prev_output_tokens).h
    keep = b.target != 1
    h, y = h[keep], b.target[keep]
    order = torch.argsort(b.ids.repeat_interleave(keep.sum(1)), stable=True)  # collate sorted rows by length
    h, y = h[order], y[order]
    ext = ExternalMemory.open(
        str(ds), str(index), k=6, probe=8, dim=16, vocab_size=mcfg.tgt_vocab_size, keytype="final"
    )
    log_z = lambda x: model.head.target_logp(x, torch.zeros(len(x), dtype=torch.long))[1]  # noqa: E731
    for mode, kw, sweep_kw in (("trime", {"temp": 3.0}, {"softmax_temp": 3.0}),
                               ("knn", {"temp": 5.0, "lmbda": 0.3}, {"softmax_temp": 1.0, "lmbda": 0.3, "interp_temp": 5.0,
                                                                    "ext_in_joint": False})):  # fmt: skip
        comb = MemoryCombiner(ext.search, log_z, mode=mode, dim=16, **kw)
        with torch.no_grad():
            want = comb(-1, h, model.head.log_probs(h)).gather(1, y[:, None]).squeeze(1)
        got = rescore_tokens(nb, **sweep_kw)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
