"""The paper's three model presets build (on the meta device) with the expected sizes (spec §1, §9)."""

from __future__ import annotations

import pytest
import torch

from trime.config import ModelConfig, build, load_preset
from trime.model.transformer import build_model, count_parameters

WT103_V, ENWIK8_V = 267_744, 208


def expected_count(L, d, f, V, cutoffs, factor, tie_proj, final_norm) -> int:
    """Parameters of a tied adaptive-input/adaptive-softmax fairseq transformer_lm, from the formula."""
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # attention, FFN, two LayerNorms
    bounds = [0] + cutoffs + ([V] if cutoffs[-1] < V else [])
    widths = [int(d // factor**b) for b in range(len(bounds) - 1)]
    emb = sum((hi - lo) * w + w * d for lo, hi, w in zip(bounds, bounds[1:], widths))
    n_clusters = len(widths) - 1
    head = n_clusters * d + (0 if tie_proj else sum(w * d for w in widths[1:]))
    return L * layer + emb + head + (2 * d if final_norm else 0)


PRESETS = [
    # name, V, exact count by hand, formula arguments, ballpark (millions)
    ("transformer_lm_wiki103", WT103_V, 246_933_504, (16, 1024, 4096, [20000, 60000], 4.0, True, False), 247),
    ("transformer_lm_wiki103_150M", WT103_V, 149_020_220, (16, 410, 2100, [20000, 60000], 1.0, False, True), 150),
    ("transformer_lm_enwik8", ENWIK8_V, 38_198_272, (12, 512, 2048, [208], 1.0, False, True), 38),
]


@pytest.mark.parametrize("name,V,exact,args,millions", PRESETS)
def test_preset_parameter_counts(name, V, exact, args, millions):
    preset = load_preset(name)
    assert set(preset) - {"_source"} == {"model"}
    cfg = build(ModelConfig, preset["model"], {"vocab_size": V})
    assert cfg.arch == name
    with torch.device("meta"):
        model = build_model(cfg)
    n = count_parameters(model)
    print(f"{name}: V={V} parameters={n:,}")
    L, d, f, cut, factor, tie_proj, final_norm = args
    assert n == expected_count(L, d, f, V, cut, factor, tie_proj, final_norm) == exact
    assert abs(n / 1e6 - millions) < 1.5


def test_preset_details():
    p247, p150, p38 = (build(ModelConfig, load_preset(n)["model"], {"vocab_size": v}) for n, v, *_ in PRESETS)
    assert (p247.n_heads, p247.final_norm, p247.adaptive_softmax_dropout, p247.max_positions) == (8, False, 0.2, 3072)
    assert (p150.n_heads, p150.final_norm, p150.tie_adaptive_proj, p150.max_positions) == (10, True, False, 150)
    assert (p38.n_heads, p38.d_model, p38.max_positions) == (8, 512, 512)
    for cfg in (p247, p150, p38):
        assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == (0.3, 0.1, 0.1)
    with torch.device("meta"):
        m247, m38 = build_model(p247), build_model(p38)
    sm = m247.head
    assert sm.cutoff == [20000, 60000, WT103_V] and [t[2].weight.shape for t in sm.tail] == [(40000, 256), (207744, 64)]
    assert sm.head.class_proj.weight.shape == (2, 1024)  # head size 20,002 = 20,000 words + 2 clusters
    # enwik8: 204 bytes + 4 specials = 208 = the cutoff, so no tail cluster: a tied softmax over 208 symbols
    assert m38.head.n_clusters == 0 and len(m38.head.tail) == 0 and m38.head.cutoff == [208]
    assert m38.head.head.word_proj.weight is m38.embed_tokens.embeddings[0][0].weight
