"""The decoder-only LM: fairseq positions, a brute-force forward, causality, padding, q capture (spec §0, §1)."""

from __future__ import annotations

import math

import pytest
import torch

from trime.config import ModelConfig
from trime.errors import ConfigError
from trime.model.transformer import LMOutput, build_model, count_parameters, make_positions, sinusoidal_embedding

PAD = 1


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=16, d_ffn=32, n_heads=2, vocab_size=40, dropout=0.0)
    return ModelConfig(**{**base, **kw})


ADAPTIVE = dict(
    adaptive_input=True,
    adaptive_input_cutoff=[10, 20],
    adaptive_softmax_cutoff=[10, 20],
    adaptive_input_factor=2.0,
    adaptive_softmax_factor=2.0,
    tie_adaptive_weights=True,
    tie_adaptive_proj=True,
)


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw)).eval()


# ----------------------------------------------------------------------------------------------
# fairseq sinusoidal positions, by loops


def ref_positions(tokens: list[list[int]], dim: int, pad: int) -> list[list[list[float]]]:
    half = dim // 2
    out = []
    for row in tokens:
        seen, emb_row = 0, []
        for t in row:
            if t == pad:
                emb_row.append([0.0] * dim)
                continue
            seen += 1
            p = pad + seen  # fairseq make_positions: first real token at pad+1 = 2
            freqs = [math.exp(-k * math.log(10000) / (half - 1)) for k in range(half)]
            vec = [math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs]
            emb_row.append(vec + [0.0] * (dim % 2))
        out.append(emb_row)
    return out


@pytest.mark.parametrize("dim", [16, 15])
def test_sinusoidal_positions_match_fairseq_formula(dim):
    tokens = torch.tensor([[5, 6, 7, 8, 9, 1, 1], [2, 3, 4, 5, 6, 7, 8], [4, 1, 9, 9, 1, 1, 1]])
    pos = make_positions(tokens, PAD)
    assert pos[0].tolist() == [2, 3, 4, 5, 6, 1, 1]
    assert pos[2].tolist() == [2, 1, 3, 4, 1, 1, 1]  # only non-pad tokens count
    emb = sinusoidal_embedding(pos, dim, PAD)
    assert emb.shape == (3, 7, dim) and emb.dtype == torch.float32
    ref = torch.tensor(ref_positions(tokens.tolist(), dim, PAD), dtype=torch.float64)
    torch.testing.assert_close(emb.double(), ref, atol=2e-6, rtol=0)
    assert emb[0, 5:].abs().sum() == 0 and emb[2, 1].abs().sum() == 0
    if dim % 2:
        assert emb[..., -1].abs().sum() == 0
    assert emb[1, 0, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)  # position 2, frequency 1


# ----------------------------------------------------------------------------------------------
# A brute-force forward written from spec §1 (explicit masks, q scaled by hd^-0.5, per-token lookup)


def _ln(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * ln.weight.double() + ln.bias.double()


def _lin(x, m):
    y = x @ m.weight.double().t()
    return y + m.bias.double() if m.bias is not None else y


def _embed(model, tokens):
    d, rows = model.cfg.d_model, []
    for t in tokens.flatten().tolist():
        if model.cfg.adaptive_input:
            cut = [0] + model.embed_tokens.cutoff
            b = max(i for i in range(len(cut) - 1) if t >= cut[i])
            emb, proj = model.embed_tokens.embeddings[b]
            rows.append(proj.weight.double() @ emb.weight.double()[t - cut[b]])
        else:
            rows.append(model.embed_tokens.weight.double()[t])
    return torch.stack(rows).view(*tokens.shape, d)


def ref_forward(model, tokens):
    cfg, (B, T) = model.cfg, tokens.shape
    H, d = cfg.n_heads, cfg.d_model
    hd = d // H
    x = (math.sqrt(d) if cfg.scale_embedding else 1.0) * _embed(model, tokens)
    x = x + torch.tensor(ref_positions(tokens.tolist(), d, PAD), dtype=torch.float64)
    causal = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    keypad = torch.where(tokens.eq(PAD), -math.inf, 0.0).double()[:, None, None, :]  # fairseq's key-padding mask
    for layer in model.layers:
        a = _ln(x, layer.self_attn_layer_norm)
        at = layer.self_attn
        q = (_lin(a, at.q_proj) * hd**-0.5).view(B, T, H, hd).transpose(1, 2)
        k = _lin(a, at.k_proj).view(B, T, H, hd).transpose(1, 2)
        v = _lin(a, at.v_proj).view(B, T, H, hd).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) + causal + keypad, dim=-1)
        x = x + _lin((w @ v).transpose(1, 2).reshape(B, T, d), at.out_proj)
        u = _ln(x, layer.final_layer_norm)
        x = x + _lin(torch.relu(_lin(u, layer.fc1)), layer.fc2)
    h = _ln(x, model.layer_norm) if cfg.final_norm else x
    return h, u


@pytest.mark.parametrize("kw", [{}, ADAPTIVE, dict(final_norm=False, scale_embedding=False)])
def test_forward_matches_bruteforce(kw):
    model = _model(**kw)
    tokens = torch.tensor([[2, 5, 13, 30, 7, 1, 1], [4, 9, 11, 22, 39, 0, 3]])
    out = model(tokens)
    assert isinstance(out, LMOutput) and out.h.shape == out.q.shape == (2, 7, 16)
    h_ref, q_ref = ref_forward(model, tokens)
    real = tokens.ne(PAD)  # pad positions are unspecified (fairseq masks pad keys, we do not)
    torch.testing.assert_close(out.h.double()[real], h_ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.q.double()[real], q_ref[real], atol=1e-5, rtol=0)


def test_causality():
    model = _model(**ADAPTIVE)
    torch.manual_seed(1)
    tokens = torch.randint(2, 40, (2, 9))
    base = model(tokens)
    for t in (0, 4, 8):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 7) % 38 + 2
        out = model(changed)
        torch.testing.assert_close(out.h[:, :t], base.h[:, :t], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.q[:, :t], base.q[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(out.h[:, t], base.h[:, t])


def test_right_padding_keeps_earlier_outputs():
    model = _model()
    tokens = torch.tensor([[3, 8, 12, 5, 9, 20]])
    padded = torch.tensor([[3, 8, 12, 5, 1, 1, 1, 1]])
    a, b = model(tokens[:, :4]), model(padded)
    torch.testing.assert_close(b.h[:, :4], a.h, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.q[:, :4], a.q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("final_norm", [True, False])
def test_q_is_last_ffn_input_and_h_the_final_output(final_norm):
    model = _model(final_norm=final_norm)
    seen = {}
    last = model.layers[-1]
    hooks = [
        last.final_layer_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
        last.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o[0])),
    ]
    if final_norm:
        hooks.append(model.layer_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o)))
    out = model(torch.tensor([[4, 5, 6, 7, 8]]))
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(out.q, seen["q"], atol=0, rtol=0)
    torch.testing.assert_close(out.h, seen["h" if final_norm else "x"], atol=0, rtol=0)
    assert (model.layer_norm is None) == (not final_norm)


def test_dropout_only_in_training():
    tokens = torch.tensor([[2, 5, 13, 30, 7, 9], [4, 9, 11, 22, 39, 0]])
    model = _model(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    ev = model(tokens).h
    torch.testing.assert_close(model.train()(tokens).h, ev)  # no dropout: train == eval
    model = _model(dropout=0.3, attention_dropout=0.1, activation_dropout=0.1)
    ev = model(tokens).h
    torch.testing.assert_close(model(tokens).h, ev)  # eval is deterministic
    assert not torch.allclose(model.train()(tokens).h, ev)


def test_state_dict_names_mirror_fairseq():
    plain = set(_model().state_dict())
    assert {
        "embed_tokens.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.1.self_attn.out_proj.bias",
        "layers.0.self_attn_layer_norm.weight",
        "layers.1.fc1.weight",
        "layers.1.fc2.bias",
        "layers.1.final_layer_norm.bias",
        "layer_norm.weight",
    } <= plain
    assert not any(k.startswith("output_projection") for k in plain)  # tied: stored once, as embed_tokens
    untied = set(_model(share_input_output_embed=False).state_dict())
    assert untied - plain == {"output_projection.weight"}
    adaptive = set(_model(**ADAPTIVE).state_dict())
    assert {k for k in adaptive if not k.startswith("layers.")} == {
        *(f"embed_tokens.embeddings.{b}.{i}.weight" for b in range(3) for i in range(2)),
        "layer_norm.weight",
        "layer_norm.bias",
        "adaptive_softmax.head.class_proj.weight",
    }
    loose = set(_model(**{**ADAPTIVE, "tie_adaptive_proj": False}).state_dict())
    assert loose - adaptive == {"adaptive_softmax.tail.0.0.weight", "adaptive_softmax.tail.1.0.weight"}


def test_meta_device_and_bf16_autocast():
    with torch.device("meta"):
        meta = build_model(tiny_cfg(**ADAPTIVE))
    assert all(p.is_meta for p in meta.parameters())
    model = _model(**ADAPTIVE)
    assert count_parameters(meta) == count_parameters(model)
    tokens = torch.randint(2, 40, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
        tlp, log_z = model.head.target_logp(out.h.reshape(-1, 16), tokens.flatten())
    assert out.h.dtype == out.q.dtype == tlp.dtype == torch.float32
    torch.testing.assert_close(out.h, model(tokens).h, atol=0.1, rtol=0.05)


def test_config_errors():
    with pytest.raises(ConfigError):
        build_model(tiny_cfg(vocab_size=0))
    with pytest.raises(ConfigError):
        build_model(tiny_cfg(adaptive_input=True, adaptive_input_cutoff=[10]))  # nothing to share
    with pytest.raises(ConfigError):
        build_model(tiny_cfg(adaptive_softmax_cutoff=[60]))  # cutoff beyond V
