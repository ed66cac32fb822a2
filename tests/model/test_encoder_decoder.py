"""The fairseq-compatible encoder-decoder: incremental decoding, shapes, norms, ties, and fairseq import.

Fixtures: tests/assets/fairseq_mt (tools/make_fairseq_mt_fixtures.sh), real fairseq 0.12 checkpoints.
The reference for the imported models' numbers is fairseq-generate --score-reference (tests/generate/test_beam.py);
here the importer's structure and refusals are checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from trime.errors import CheckpointError, ConfigError
from trime.model.encoder_decoder import MTModelConfig, TransformerMT, mt_preset
from trime.model.fairseq_import import model_options, read_checkpoint
from trime.model.fairseq_mt_import import load_fairseq_mt, load_fairseq_mt_checkpoint
from trime.model.transformer import count_parameters

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fairseq_mt"
MODELS = ("post_tied", "pre_untied", "trime_style", "shared_all")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**kw) -> MTModelConfig:
    base = {
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_embed_dim": 16,
        "decoder_embed_dim": 16,
        "encoder_ffn_embed_dim": 32,
        "decoder_ffn_embed_dim": 32,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "src_vocab_size": 20,
        "tgt_vocab_size": 24,
        "dropout": 0.0,
    }
    return MTModelConfig(**{**base, **kw})


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 20, (3, 7), generator=g)
    src[:, -1] = 2
    src[0, :3] = 1  # left padding, as fairseq's source side
    prev = torch.randint(4, 24, (3, 6), generator=g)
    prev[:, 0] = 2
    return src, prev


@pytest.mark.parametrize("enc_pre,dec_pre,final", [(False, False, True), (False, True, True), (True, True, False)])
def test_incremental_decoding_equals_full_forward(enc_pre, dec_pre, final):
    torch.manual_seed(0)
    model = TransformerMT(
        _tiny(encoder_normalize_before=enc_pre, decoder_normalize_before=dec_pre, decoder_final_norm=final)
    ).eval()
    src, prev = _batch()
    with torch.no_grad():
        full = model(src, prev).h  # (B, T, d)
        G = 3  # rows per sentence, as a beam of 3
        cache = model.start_cache(model.encode(src), group=G, capacity=2)  # capacity 2: the cache must grow
        rows = prev.repeat_interleave(G, 0)  # (B·G, T)
        steps = torch.stack([model.decode_step(rows[:, t], cache) for t in range(prev.shape[1])], 1)
    assert steps.shape == (9, 6, 16)
    for g in range(G):
        torch.testing.assert_close(steps.view(3, G, 6, 16)[:, g], full, atol=1e-5, rtol=1e-5)


def test_reorder_cache_follows_rows_and_drops_sentences():
    torch.manual_seed(1)
    model = TransformerMT(_tiny()).eval()
    src, prev = _batch(1)
    G = 2
    with torch.no_grad():
        full = model(src, prev).h
        cache = model.start_cache(model.encode(src), group=G)
        rows = prev.repeat_interleave(G, 0)
        for t in range(3):
            model.decode_step(rows[:, t], cache)
        # swap the two rows of sentence 0, drop sentence 1, keep sentence 2's row 1 twice
        order = torch.tensor([1, 0, 5, 5])
        cache.reorder(order)
        rows = rows[order]
        out = torch.stack([model.decode_step(rows[:, t], cache) for t in range(3, 6)], 1)  # (4, 3, d)
    torch.testing.assert_close(out[:2], full[0:1, 3:].expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], full[2:3, 3:].expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="another sentence"):
        cache.reorder(torch.tensor([0, 2, 1, 3]))


def test_outputs_shapes_ties_and_norms():
    torch.manual_seed(0)
    src, prev = _batch()
    tied = TransformerMT(_tiny())
    out = tied(src, prev)
    assert out.h.shape == (3, 6, 16) and out.q is out.h
    assert tied.head.output_weight() is tied.decoder.embed_tokens.weight
    assert "decoder.output_projection.weight" not in tied.state_dict()
    assert tied.decoder.layer_norm is not None and tied.encoder.layer_norm is None  # spec §3 flags
    untied = TransformerMT(_tiny(share_decoder_input_output_embed=False, decoder_normalize_before=False))
    assert untied.state_dict()["decoder.output_projection.weight"].shape == (24, 16)
    assert untied.decoder.layer_norm is None  # post-norm decoder: no final LayerNorm
    shared = TransformerMT(_tiny(share_all_embeddings=True, tgt_vocab_size=20))
    assert shared.encoder.embed_tokens is shared.decoder.embed_tokens
    logp, log_z = tied.head.target_logp(out.h.reshape(-1, 16), prev.reshape(-1))
    assert logp.shape == log_z.shape == (18,) and bool((logp <= 0).all())
    assert float(tied.decoder.embed_tokens.weight[1].detach().abs().sum()) == 0.0  # pad row zero
    with pytest.raises(ConfigError, match="joined"):
        _tiny(share_all_embeddings=True)


def test_presets_build_with_expected_sizes():
    with torch.device("meta"):
        iwslt = TransformerMT(mt_preset("transformer_iwslt_de_en", src_vocab_size=8848, tgt_vocab_size=6632))
        cpu = TransformerMT(mt_preset("mt_cpu", src_vocab_size=8000, tgt_vocab_size=8000))
    n = count_parameters(iwslt)
    assert 39e6 < n < 40e6, n  # MT spec §3: about 39–40 M
    assert len(cpu.encoder.layers) == len(cpu.decoder.layers) == 3
    with pytest.raises(ConfigError, match="unknown preset"):
        mt_preset("nope")
    with pytest.raises(ConfigError, match="not a translation preset"):
        mt_preset("tiny")


def test_padding_does_not_change_encoder_outputs():
    torch.manual_seed(2)
    model = TransformerMT(_tiny()).eval()
    src, prev = _batch(2)
    with torch.no_grad():
        h_batch = model(src, prev).h[0]
        h_alone = model(src[:1, 3:], prev[:1]).h[0]  # sentence 0 without its left padding
    torch.testing.assert_close(h_batch, h_alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_fairseq_checkpoints_import(name):
    weights, cfg, meta = load_fairseq_mt_checkpoint(ASSETS / f"{name}.pt")
    assert meta["generation"] == "cfg" and meta["stored_dtypes"] == ["float16"]
    assert cfg.encoder_layers == cfg.decoder_layers == 2 and cfg.decoder_embed_dim == 32
    assert cfg.decoder_normalize_before == (name != "post_tied")
    assert cfg.encoder_normalize_before == (name == "shared_all")
    # fairseq turns share_decoder_input_output_embed on itself under --share-all-embeddings
    assert cfg.share_decoder_input_output_embed == (name != "pre_untied")
    assert cfg.share_all_embeddings == (name == "shared_all")
    model = TransformerMT(cfg)
    model.load_state_dict(weights, strict=True)
    sub = "joined/" if name == "shared_all" else ""
    n_src = 4 + len((ASSETS / f"{sub}dict.src.txt").read_text().splitlines())
    n_tgt = 4 + len((ASSETS / f"{sub}dict.tgt.txt").read_text().splitlines())
    assert (cfg.src_vocab_size, cfg.tgt_vocab_size) == (n_src, n_tgt)
    load_fairseq_mt(ASSETS / f"{name}.pt", src_dict_size=n_src, tgt_dict_size=n_tgt)
    with pytest.raises(CheckpointError, match="target dictionary has"):
        load_fairseq_mt(ASSETS / f"{name}.pt", src_dict_size=n_src, tgt_dict_size=n_tgt + 8)


def test_args_generation_loads_the_same_model(tmp_path):
    """The older generation (fairseq < 0.10, the TRIME release): options in an argparse.Namespace ``args``."""
    state = read_checkpoint(ASSETS / "pre_untied.pt")
    opts, _, _ = model_options(state)
    old = {"args": argparse.Namespace(**opts), "cfg": None, "model": state["model"]}
    torch.save(old, tmp_path / "args.pt")
    w_cfg, cfg_a, _ = load_fairseq_mt_checkpoint(ASSETS / "pre_untied.pt")
    w_args, cfg_b, meta = load_fairseq_mt_checkpoint(tmp_path / "args.pt")
    assert meta["generation"] == "args"
    assert cfg_a == cfg_b
    assert w_cfg.keys() == w_args.keys() and all(torch.equal(w_cfg[k], w_args[k]) for k in w_cfg)


def _resave(tmp_path: Path, name: str, edit) -> Path:
    state = torch.load(ASSETS / f"{name}.pt", map_location="cpu", weights_only=False)
    edit(state)
    out = tmp_path / "edited.pt"
    torch.save(state, out)
    return out


class _Payload:  # a pickled class: never unpickled without trust
    pass


def test_refusals(tmp_path):
    bad = _resave(tmp_path, "pre_untied", lambda s: s.update(extra=_Payload()))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_fairseq_mt_checkpoint(bad)

    def arch_mismatch(s):
        s["cfg"]["model"].decoder_layers = 3  # fairseq 0.12 keeps a Namespace there

    with pytest.raises(CheckpointError, match="missing"):
        load_fairseq_mt_checkpoint(_resave(tmp_path, "pre_untied", arch_mismatch))

    def learned_pos(s):
        s["cfg"]["model"].decoder_learned_pos = True

    with pytest.raises(CheckpointError, match="decoder_learned_pos"):
        load_fairseq_mt_checkpoint(_resave(tmp_path, "pre_untied", learned_pos))

    def narrow_output(s):
        s["cfg"]["model"].decoder_output_dim = 8

    with pytest.raises(CheckpointError, match="decoder_input_dim/decoder_output_dim"):
        load_fairseq_mt_checkpoint(_resave(tmp_path, "pre_untied", narrow_output))

    def untie(s):
        w = s["model"]["decoder.embed_tokens.weight"]
        s["model"]["decoder.output_projection.weight"] = w.clone() + 1

    with pytest.raises(CheckpointError, match="tied weights"):
        load_fairseq_mt_checkpoint(_resave(tmp_path, "post_tied", untie))
    lm = Path(__file__).resolve().parents[1] / "assets" / "fairseq" / "final_norm.pt"
    with pytest.raises(CheckpointError, match="not an encoder-decoder"):
        load_fairseq_mt_checkpoint(lm)


def test_fixture_files_are_consistent():
    ids = json.loads((ASSETS / "test.ids.json").read_text())
    assert len(ids["src"]) == len(ids["tgt"]) == 40
    assert all(s[-1] == 2 for s in ids["src"] + ids["tgt"])
