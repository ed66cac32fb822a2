"""Beam search and reference scoring: against fairseq-generate, against exhaustive search, combiners, lengths.

fairseq's outputs (tests/assets/fairseq_mt/generate.json, tools/make_fairseq_mt_fixtures.sh) were printed by
fairseq-generate from the very checkpoint files loaded here: base-2 sentence scores at full precision,
positional scores rounded to 4 decimals. The batches are rebuilt from the printed order (--batch-size 8,
so consecutive groups of 8), because max_len depends on the batch's padded source width (settings with
max_len_a = 0 run as one batch of 40).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from trime.config import TranslateConfig
from trime.data.pairs import prepare_pairs
from trime.errors import ConfigError
from trime.generate import BeamConfig, beam_search, max_length, score_reference, vanilla
from trime.model.encoder_decoder import MTModelConfig, TransformerMT
from trime.model.fairseq_mt_import import load_fairseq_mt
from trime.mt_generate import translate

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fairseq_mt"
MODELS = ("post_tied", "pre_untied", "trime_style", "shared_all")
SETTINGS = {  # tools/make_fairseq_mt_fixtures.sh
    "beam5": BeamConfig(beam=5, lenpen=1.0, nbest=2),
    "iwslt": BeamConfig(beam=4, lenpen=0.6, max_len_a=1.2, max_len_b=10),
    "tight": BeamConfig(beam=3, lenpen=1.5, min_len=6, max_len_a=0, max_len_b=8),
    "greedy": BeamConfig(beam=1),
}
LN2 = math.log(2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PAD, EOS = 1, 2


@functools.cache
def _fairseq() -> dict:
    return json.loads((ASSETS / "generate.json").read_text())


@functools.cache
def _model(name: str) -> TransformerMT:
    model, _ = load_fairseq_mt(ASSETS / f"{name}.pt")
    return model


def _ids(name: str) -> dict:
    sub = "joined/" if name == "shared_all" else ""
    return json.loads((ASSETS / f"{sub}test.ids.json").read_text())


def _collate(seqs: list[list[int]], left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s) :] = torch.tensor(s)
        else:
            out[i, : len(s)] = torch.tensor(s)
    return out


def _batches(name: str, setting: str, cfg: BeamConfig | None = None):
    """fairseq's batches (groups of 8 in printed order); one batch of all 40 when max_len does not depend
    on the batch (max_len_a = 0): each sentence's search is otherwise independent of its batch-mates."""
    order = _fairseq()[name][setting]["order"]
    assert sorted(order) == list(range(40))
    size = 40 if cfg is not None and cfg.max_len_a == 0 else 8
    for i in range(0, len(order), size):
        yield order[i : i + size]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", MODELS)
def test_beam_search_equals_fairseq_generate(name, setting):
    ids, model, cfg = _ids(name), _model(name), SETTINGS[setting]
    want = _fairseq()[name][setting]["hypos"]
    for batch in _batches(name, setting, cfg):
        got = beam_search(model, _collate([ids["src"][i] for i in batch], left=True), cfg)
        for sid, hyps in zip(batch, got):
            ref = want[str(sid)]
            assert len(hyps) == len(ref) == cfg.nbest
            for h, r in zip(hyps, ref):
                assert h.tokens.tolist() == r["tokens"], sid
                assert abs(h.score / LN2 - r["score"]) < 1e-4, sid
                pos = (h.positional_scores / LN2).tolist()
                assert len(pos) == len(r["positional"])
                assert max(abs(a - b) for a, b in zip(pos, r["positional"])) < 1e-4 + 5e-5  # printed %.4f


@pytest.mark.parametrize("name", MODELS)
def test_score_reference_equals_fairseq(name):
    ids, model = _ids(name), _model(name)
    want = _fairseq()[name]["score_reference"]["hypos"]
    for batch in _batches(name, "score_reference"):
        src = _collate([ids["src"][i] for i in batch], left=True)
        tgt = _collate([ids["tgt"][i] for i in batch], left=False)
        for sid, h in zip(batch, score_reference(model, src, tgt)):
            r = want[str(sid)][0]
            assert h.tokens.tolist() == r["tokens"] == ids["tgt"][sid]
            assert abs(h.score / LN2 - r["score"]) < 1e-4
            pos = (h.positional_scores / LN2).tolist()
            assert len(pos) == len(r["positional"])
            assert max(abs(a - b) for a, b in zip(pos, r["positional"])) < 1e-4 + 5e-5


def test_fixture_covers_the_length_rules():
    """The fixture tests min/max length only if those rules bind some of fairseq's outputs: in "tight"
    (min_len 6, max_len 8) hypotheses sit at both bounds, and without a min length many are shorter."""
    for name in MODELS:
        tight = [len(h["tokens"]) for hyps in _fairseq()[name]["tight"]["hypos"].values() for h in hyps]
        free = [len(h["tokens"]) for hyps in _fairseq()[name]["beam5"]["hypos"].values() for h in hyps]
        assert min(tight) == 7 and max(tight) == 9, name  # eos included
        assert min(free) < 7, name


# ---- exhaustive search on a tiny random model --------------------------------------------------------------


def _random_model(V: int = 40, seed: int = 0) -> TransformerMT:
    torch.manual_seed(seed)
    cfg = MTModelConfig(
        encoder_layers=1,
        decoder_layers=2,
        encoder_embed_dim=16,
        decoder_embed_dim=16,
        encoder_ffn_embed_dim=32,
        decoder_ffn_embed_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        src_vocab_size=12,
        tgt_vocab_size=V,
        dropout=0.0,
    )
    model = TransformerMT(cfg).eval()
    with torch.no_grad():  # sharper distributions than the init's near-uniform ones
        model.decoder.embed_tokens.weight.mul_(6.0)
    return model


ALLOWED = (EOS, 4, 5, 6)


def _only_allowed(step: int, h: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """A combiner that leaves 3 words and eos: every other token gets -inf."""
    out = torch.full_like(logp, -math.inf)
    out[:, list(ALLOWED)] = logp[:, list(ALLOWED)]
    return out


@torch.no_grad()
def _exhaustive(model, src: torch.Tensor, max_len: int, min_len: int, lenpen: float) -> list[tuple[float, list]]:
    """Every y_1..y_n eos with min_len <= n <= max_len over the allowed words, scored by a teacher-forced
    forward pass (no cache; all sequences in one right-padded batch): (normalised score, tokens), best first."""
    words = [t for t in ALLOWED if t != EOS]
    seqs = [list(p) + [EOS] for n in range(min_len, max_len + 1) for p in itertools.product(words, repeat=n)]
    tgt = _collate(seqs, left=False)  # (M, T)
    prev = _collate([[EOS] + s[:-1] for s in seqs], left=False)
    logp = model.head.log_probs(model(src.expand(len(seqs), -1), prev).h.flatten(0, 1))  # (M·T, V)
    logp = _only_allowed(0, None, logp).gather(1, tgt.view(-1, 1)).view(tgt.shape)  # (M, T)
    scores = logp.masked_fill(tgt.eq(PAD), 0.0).sum(1)  # (M,)
    out = [(float(scores[i]) / len(s) ** lenpen, s) for i, s in enumerate(seqs)]
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("lenpen,min_len,seed", [(1.0, 1, 0), (0.6, 1, 1), (2.0, 2, 2), (0.0, 1, 3)])
def test_wide_beam_equals_exhaustive_search(lenpen, min_len, seed):
    """V = 40 with all but 3 words masked by the combiner, max length 3: the beam (39 = V - 1, fairseq's cap)
    holds every live prefix (at most 27) and all 2K candidates, so it must find every complete hypothesis
    with its exact score: its n-best list is the exhaustive ranking."""
    model = _random_model(seed=seed)
    src = torch.tensor([[5, 7, 9, 11, EOS]])
    cfg = BeamConfig(beam=39, lenpen=lenpen, min_len=min_len, max_len_a=0, max_len_b=3, nbest=10)
    assert max_length(cfg, src.shape[1], model.max_decoder_positions()) == 3
    got = beam_search(model, src, cfg, _only_allowed)[0]
    want = _exhaustive(model, src, 3, min_len, lenpen)[:10]
    assert [h.tokens.tolist() for h in got] == [w[1] for w in want]
    for h, (score, _) in zip(got, want):
        assert abs(h.score - score) < 1e-5


def test_greedy_equals_argmax_loop():
    """Beam 1 = at each step the argmax of the model's distribution (eos forced at max length)."""
    model = _random_model(V=30, seed=4)
    src = torch.tensor([[1, 1, 5, 6, EOS], [4, 8, 9, 10, EOS]])  # left-padded batch of 2
    cfg = BeamConfig(beam=1, max_len_a=0, max_len_b=6)
    got = beam_search(model, src, cfg)
    L = 6
    for b in range(2):
        seq = [EOS]
        with torch.no_grad():
            for step in range(L + 1):
                logp = model.head.log_probs(model(src[b : b + 1], torch.tensor([seq])).h[0, -1:])[0]  # (V,)
                logp[PAD] = -math.inf
                if step < cfg.min_len:
                    logp[EOS] = -math.inf
                seq.append(EOS if step == L else int(logp.argmax()))
                if seq[-1] == EOS:
                    break
        assert got[b][0].tokens.tolist() == seq[1:]


# ---- combiners and length rules ------------------------------------------------------------------------------


def test_identity_combiner_changes_nothing_and_sees_each_step():
    model = _random_model(V=30, seed=5)
    src = torch.tensor([[1, 4, 5, 6, EOS], [7, 8, 9, 10, EOS]])
    cfg = BeamConfig(beam=4, lenpen=0.6, max_len_a=1.2, max_len_b=3, nbest=4)
    calls = []

    def identity(step, h, logp):
        calls.append((step, tuple(h.shape), tuple(logp.shape)))
        return logp.clone()

    a, b = beam_search(model, src, cfg), beam_search(model, src, cfg, identity)
    assert [[(h.tokens.tolist(), h.score) for h in s] for s in a] == [
        [(h.tokens.tolist(), h.score) for h in s] for s in b
    ]
    assert [c[0] for c in calls] == list(range(len(calls))) and calls[0] == (0, (8, 16), (8, 30))
    tgt = torch.tensor([[4, 5, EOS], [6, EOS, PAD]])
    r1, r2 = score_reference(model, src, tgt), score_reference(model, src, tgt, identity)
    assert [x.score for x in r1] == [x.score for x in r2]
    assert calls[-1][0] == -1 and calls[-1][1] == (5, 16)  # teacher-forced: the 5 non-pad target positions


def test_a_combiner_can_ban_a_token():
    model = _random_model(V=30, seed=6)
    src = torch.tensor([[4, 5, 6, EOS]])
    cfg = BeamConfig(beam=5, max_len_a=0, max_len_b=5, nbest=5)
    best = int(beam_search(model, src, cfg)[0][0].tokens[0])

    def ban(step, h, logp):
        logp = logp.clone()
        logp[:, best] = -math.inf
        return logp

    assert all(best not in h.tokens.tolist() for h in beam_search(model, src, cfg, ban)[0])


def test_length_rules_and_scores():
    model = _random_model(V=30, seed=7)
    src = torch.tensor([[1, 1, 4, 5, 6, EOS], [4, 5, 6, 7, 8, EOS]])  # padded width S = 6
    for cfg in (
        BeamConfig(beam=3, max_len_a=0.5, max_len_b=1, min_len=4, nbest=3, lenpen=1.3),
        BeamConfig(beam=2, max_len_a=0, max_len_b=2, nbest=2, lenpen=0.0),
    ):
        L = max_length(cfg, 6, model.max_decoder_positions())
        for hyps in beam_search(model, src, cfg):
            assert len(hyps) == cfg.nbest
            assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
            for h in hyps:
                n = len(h.tokens)
                assert cfg.min_len + 1 <= n <= L + 1 and h.tokens[-1] == EOS and EOS not in h.tokens[:-1].tolist()
                assert PAD not in h.tokens.tolist()
                assert abs(h.score - float(h.positional_scores.sum()) / n**cfg.lenpen) < 1e-5
    assert max_length(BeamConfig(max_len_a=1.2, max_len_b=10), 11, 1024) == int(1.2 * 11 + 10)
    assert max_length(BeamConfig(max_len_b=5000), 3, 1024) == 1023
    with pytest.raises(ConfigError, match="exceeds the max length"):
        beam_search(model, src, BeamConfig(beam=2, min_len=5, max_len_a=0, max_len_b=3))
    with pytest.raises(ConfigError, match="nbest"):
        BeamConfig(beam=2, nbest=3)


@pytest.mark.parametrize("mode", ["knn", "trime", "trime_released"])
def test_memory_decoding_with_log_z_from_the_logits_is_unchanged(mode):
    """TrimeMT takes log Z_t from the logits of the step's log-probabilities (one output projection): the
    hypotheses, scores and positional scores equal the combiner computing log Z_t itself, bit for bit."""
    from trime.generate.memory import MemoryCombiner

    model = _random_model(V=30, seed=8)
    g = torch.Generator().manual_seed(0)
    keys, vals = torch.randn(60, 16, generator=g) * 2, torch.randint(4, 30, (60,), generator=g)

    def search(h):  # exact L2 top-5 over 60 keys: (similarities, tokens)
        top = torch.cdist(h, keys).square().neg().topk(5, dim=1)
        return top.values, vals[top.indices]

    own = []

    def log_z(h):
        own.append(len(h))
        return model.head.target_logp(h, torch.zeros(len(h), dtype=torch.long))[1]

    comb = MemoryCombiner(search, log_z, mode=mode, lmbda=0.4, temp=3.0, dim=16)
    src = torch.tensor([[1, 4, 5, 6, EOS], [7, 8, 9, 10, EOS]])
    cfg = BeamConfig(beam=4, lenpen=0.6, max_len_a=1.2, max_len_b=3, nbest=4)
    fast = beam_search(model, src, cfg, comb)
    assert not own  # no second output projection
    slow = beam_search(model, src, cfg, lambda step, h, logp: comb(step, h, logp))
    assert bool(own) == (mode != "knn")
    for a, b in zip(fast, slow):
        assert [(h.tokens.tolist(), h.score) for h in a] == [(h.tokens.tolist(), h.score) for h in b]
        assert all(torch.equal(x.positional_scores, y.positional_scores) for x, y in zip(a, b))


def test_vanilla_is_the_identity():
    logp = torch.randn(3, 7).log_softmax(-1)
    assert vanilla(0, torch.zeros(3, 4), logp) is logp


# ---- fairseq-generate's P- lines and summary, through `trime mt generate`'s translate -----------------------

P_SETTINGS = ("beam5", "tight", "greedy", "score_reference")  # max_len_a = 0: batches do not matter


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The fixture's test split as pairs directories with fairseq's dictionaries: {"": separate, "joined/": joined}."""
    root = tmp_path_factory.mktemp("fairseq_mt")
    corpus = root / "corpus"
    corpus.mkdir()
    for split in ("train", "test"):  # prepare_pairs needs a train split
        for lang in ("src", "tgt"):
            shutil.copy(ASSETS / f"test.{lang}", corpus / f"{split}.{lang}")
    dicts = {sub: {f"{k}_dict": ASSETS / f"{sub}dict.{k}.txt" for k in ("src", "tgt")} for sub in ("", "joined/")}
    return {sub: prepare_pairs(corpus, root / f"data{sub[:-1]}", **d) for sub, d in dicts.items()}


@pytest.mark.parametrize("name", MODELS)
def test_p_lines_equal_fairseq_generate(name, prepared):
    """Every hypothesis' P- line (nbest 2 in beam5) is fairseq-generate's: base-2 positional scores, eos
    included, 4 decimals (float32 division by ln 2, as fairseq), the same text but where the two float32
    values straddle a rounding boundary (then one unit in the last digit); with --score-reference too.
    The summary's loss is the token-weighted mean of the P- scores, its mean score the sentence-weighted
    mean of the H- scores."""
    data = prepared["joined/" if name == "shared_all" else ""]
    same = total = 0
    for setting in P_SETTINGS:
        ref = setting == "score_reference"
        cfg = TranslateConfig(data=str(data), path=str(ASSETS / f"{name}.pt"), score_reference=ref, device="cpu")
        res = translate(cfg, None if ref else SETTINGS[setting])
        got: dict[int, list[str]] = {}
        for line in res.lines:
            if line.startswith("P-"):
                key, pos = line.split("\t")
                got.setdefault(int(key[2:]), []).append(pos)
        want = _fairseq()[name][setting]["hypos"]
        assert sorted(got) == sorted(map(int, want)), setting
        for i, hyps in want.items():
            assert len(got[int(i)]) == len(hyps), (setting, i)
            for line, h in zip(got[int(i)], hyps):
                printed = line.split(" ")
                assert all(re.fullmatch(r"-?\d+\.\d{4}", x) for x in printed) and len(printed) == len(h["positional"])
                # equal but where the two float32 values straddle a rounding boundary (a few in a thousand)
                assert max(abs(float(a) - b) for a, b in zip(printed, h["positional"])) < 1e-4 + 1e-6, (setting, i)
                same += sum(a == f"{b:.4f}" for a, b in zip(printed, h["positional"]))
                total += len(printed)
        best = [hyps[0] for hyps in want.values()]
        n_tokens = sum(len(h["positional"]) for h in best)
        assert res.n_tokens == n_tokens
        assert res.loss == pytest.approx(-sum(sum(h["positional"]) for h in best) / n_tokens, abs=1e-4)
        assert res.mean_score == pytest.approx(sum(h["score"] for h in best) / len(best), abs=1e-5)
        if ref:
            assert res.bleu is None and res.line().startswith(f"Loss (base 2): {res.loss:.4f}, Perplexity: ")
        else:
            assert res.line().splitlines()[-1].startswith(f"Generate test with beam={SETTINGS[setting].beam}: BLEU|")
    assert same >= 0.97 * total, (same, total)  # measured: 98.8% to 99.6% per model
