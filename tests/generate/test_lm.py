"""Generation with memories: each step's distribution is evaluation's (trime.evaluate) for the same text."""

import math

import numpy as np
import pytest
import torch

from trime import config as C
from trime.checkpoint import load_model
from trime.cli import main
from trime.data.batching import make_batch
from trime.data.blocks import eval_windows
from trime.data.dictionary import Dictionary
from trime.data.prepare import load_dictionary, load_split, prepare
from trime.datastore_build import build_datastore
from trime.evaluate import evaluate
from trime.generate.lm import (
    ByteCodec,
    LMDecoder,
    WordCodec,
    beam_search,
    is_byte_dictionary,
    open_decoder,
    stream,
)
from trime.memory.index import build_index
from trime.memory.scoring import MemoryRows, Setting, StepRows, log_probs, vocab_log_probs

from tests.fixtures import make_data, micro_checkpoint
from tests.reference import full_vocab_probs
from tests.reference import joint_log_prob as ref_joint

L, CTX = 32, 16  # the micro preset's window; blocks of 16 new positions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    data = make_data(root, n_lines=120)
    ckpt = micro_checkpoint(root, data)
    ds = C.DatastoreConfig(
        data=str(data), path=str(ckpt), out=str(root / "dstore"), context_window=8, key_dtype="float32", device="cpu"
    )
    dstore = build_datastore(ds)
    index = build_index(dstore, root / "dstore" / "knn.index.ip", metric="ip")
    return root, data, ckpt, dstore, index


def gen_cfg(setup, **kw) -> C.GenerateConfig:
    _, data, ckpt, dstore, index = setup
    base = dict(path=str(ckpt), context_window=CTX, device="cpu", amp="none", stop_at_eos=False, max_new_tokens=40)
    if kw.get("use_external") or kw.get("use_interp"):
        base.update(dstore=str(dstore), indexfile=str(index), k=8)
    return C.GenerateConfig(**{**base, **kw})


MEMORY = dict(use_local=True, use_long=True, mem_size=24, use_external=True, use_interp=True, lmbda=0.3)


def eval_stream(setup, tokens, tmp_path, **flags) -> np.ndarray:
    """`trime eval`'s per-token log-probabilities of a token stream, through a prepared split."""
    _, data, ckpt, dstore, index = setup
    d = load_dictionary(data)
    (tmp_path / "valid.txt").write_text(WordCodec(d).decode(list(tokens)) + "\n")
    out = prepare({"valid": tmp_path / "valid.txt"}, tmp_path / "bin", dictionary=data / "dict.txt")
    assert load_split(out, "valid")[: len(tokens)].tolist() == list(tokens)  # the text round-trips
    cfg = C.EvalConfig(
        data=str(out), path=str(ckpt), context_window=CTX, device="cpu", output_word_probs=str(tmp_path / "lp.npy")
    )
    if flags.get("use_external") or flags.get("use_interp"):
        flags = {**flags, "dstore": str(dstore), "indexfile": str(index), "k": 8}
    res = evaluate(C.build(C.EvalConfig, C.to_dict(cfg), flags))
    return res.log_probs[: len(tokens)]


def prompt_ids(setup, n=5):
    return [int(t) for t in load_split(setup[1], "valid")[:n]]


def test_kv_cache_equals_full_forward(setup):
    model, _, _ = load_model(setup[2])
    tokens = torch.from_numpy(load_split(setup[1], "train")[:30].astype(np.int64))[None]  # (1, 30)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 20), (20, 30))]
    h = torch.cat([p.h for p in parts], 1)
    q = torch.cat([p.q for p in parts], 1)
    torch.testing.assert_close(h, full.h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, full.q, atol=1e-5, rtol=1e-5)
    assert cache.length() == 30


@pytest.mark.parametrize("ext_in_joint", [False, True])
def test_vocab_log_probs_is_scoring_log_probs_for_every_token(ext_in_joint):
    g = torch.Generator().manual_seed(0)
    B, V, m, k, d = 2, 11, 7, 5, 16
    tok_logp = torch.randn(B, V, generator=g).log_softmax(1)
    rows = StepRows(
        tok_logp,
        torch.randn(B, generator=g),
        torch.randn(B, m, generator=g).masked_fill(torch.rand(B, m, generator=g) < 0.2, -math.inf),
        torch.randint(0, V, (B, m), generator=g),
        torch.randn(B, k, generator=g).sort(1, descending=True).values * 3,
        torch.randint(0, V, (B, k), generator=g),
    )
    settings = [Setting(0.7, 0.0, 1.0, None, ext_in_joint), Setting(1.3, 0.3, 2.0, 3, ext_in_joint)]
    for s in settings:
        got = vocab_log_probs(rows, s, d)  # (B, V)
        assert torch.allclose(got.exp().sum(1), torch.ones(B), atol=1e-5)  # a distribution
        for b in range(B):
            y = torch.arange(V)
            mr = MemoryRows.build(
                tok_logp[b],
                rows.tok_log_z[b].expand(V),
                y,
                rows.mem_scores[b].expand(V, m),
                rows.mem_values[b],
                rows.ext_scores[b].expand(V, k),
                rows.ext_values[b].expand(V, k),
            )
            torch.testing.assert_close(got[b], log_probs(mr, [s], d)[0], atol=1e-5, rtol=1e-5)
    # and the λ = 0, local-only case against the brute-force joint softmax of tests/reference.py
    s = Setting(0.7)
    ref = ref_joint(
        tok_logp[0],
        rows.tok_log_z[0].expand(V),
        (rows.mem_scores[0] / 0.7).expand(V, m),
        rows.mem_values[0],
        torch.arange(V),
    )
    flat = StepRows(*(getattr(rows, f)[:1] for f in ("tok_logp", "tok_log_z", "mem_scores", "mem_values")),
                    torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.long))  # fmt: skip
    np.testing.assert_allclose(vocab_log_probs(flat, s, d)[0].numpy(), ref, atol=1e-5)


def test_greedy_without_memory_is_repeated_argmax_of_eval(setup, tmp_path):
    cfg = gen_cfg(setup)
    decoder, _ = open_decoder(cfg)
    prompt = prompt_ids(setup)
    out = list(stream(decoder, prompt))
    assert len(out) == 40  # crosses two window slides (blocks of 16)
    tokens = prompt + [y for y, _ in out]
    # the evaluation windows' full distributions, by a plain forward of each window
    model, mcfg, _ = load_model(setup[2])
    arr = np.asarray(tokens, dtype=np.int32)
    for s, e, c in eval_windows(arr, L, CTX):
        batch = make_batch(arr, [(s, e, c)], pad=1, eos=2)
        with torch.no_grad():
            lp = model.head.log_probs(model(batch.inputs).h[0, c:])  # (e − s, V)
        lp[:, 1] = -math.inf  # <pad> is never generated
        for i in range(max(s, len(prompt)), e):
            assert int(lp[i - s].argmax()) == tokens[i]
    np.testing.assert_allclose([lp for _, lp in out], eval_stream(setup, tokens, tmp_path)[len(prompt) :], atol=1e-4)


@pytest.mark.parametrize(
    "flags",
    [dict(use_local=True), dict(use_local=True, use_long=True, mem_size=24), MEMORY, dict(use_external=True)],
    ids=["local", "local+long", "all+interp", "external"],
)
def test_each_step_is_evaluations_joint_probability(setup, tmp_path, flags):
    """Teacher-forced over a text that crosses window slides, every position's log p of the true
    next token equals `trime eval`'s for the same stream, and each step is a distribution."""
    cfg = gen_cfg(setup, **flags)
    decoder, _ = open_decoder(cfg)
    text = [int(t) for t in load_split(setup[1], "valid")[:60]]
    P0 = 21  # the prompt ends inside a block; the FIFO is filled from earlier blocks
    state, got = decoder.start(text[:P0]), []
    for n in range(P0, len(text)):
        lp = decoder.log_probs(state)[0]
        assert abs(float(vocab_log_probs(state.rows, decoder.setting, 32).exp().sum()) - 1) < 1e-5
        got.append(float(lp[text[n]]))
        if n + 1 < len(text):
            state = decoder.advance(state, torch.tensor([text[n]]))
    want = eval_stream(setup, text, tmp_path, **flags)[P0:]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_full_distribution_matches_brute_force_with_local_and_long_memory(setup):
    """One step's whole distribution against tests/reference.py's loops over a plain forward."""
    cfg = gen_cfg(setup, use_local=True, use_long=True, mem_size=24, softmax_temp=0.8)
    decoder, _ = open_decoder(cfg)
    text = [int(t) for t in load_split(setup[1], "valid")[:40]]
    n = 37  # block [32, 48) with 16 positions of context: the FIFO holds positions 8..31
    lp = decoder.log_probs(decoder.start(text[:n]))[0]
    model, mcfg, _ = load_model(setup[2])
    arr = np.asarray(text + [2], dtype=np.int32)
    fifo_k, fifo_v = [], []
    for s, e, c in ((0, 16, 0), (16, 32, 16)):
        with torch.no_grad():
            q = model(make_batch(arr, [(s, e, c)], pad=1, eos=2).inputs).q[0, c:]
        fifo_k.append(q)
        fifo_v += text[s:e]
    with torch.no_grad():
        out = model(make_batch(arr, [(32, 40, 16)], pad=1, eos=2).inputs)
    i = n - 16  # window position of the query
    keys = torch.cat([out.q[0, :i], torch.cat(fifo_k)[-24:]])
    values = text[16:n] + fifo_v[-24:]
    ref = full_vocab_probs(
        model.head, out.h[0, i], out.q[0, i], keys, values, [True] * len(values), 1 / math.sqrt(32) / 0.8
    )
    ref = torch.tensor(ref)
    ref[1] = 0.0
    torch.testing.assert_close(lp.exp(), ref.float(), atol=1e-5, rtol=1e-4)


def test_kv_cached_generation_equals_uncached(setup):
    outs = []
    for kv in (True, False):
        decoder, _ = open_decoder(gen_cfg(setup, kv_cache=kv, **MEMORY))
        outs.append(list(stream(decoder, prompt_ids(setup))))
    assert [y for y, _ in outs[0]] == [y for y, _ in outs[1]]
    np.testing.assert_allclose([p for _, p in outs[0]], [p for _, p in outs[1]], atol=1e-5)


def test_sampling_with_a_seed_is_reproducible(setup):
    def sample(**kw):
        decoder, _ = open_decoder(gen_cfg(setup, sampling=True, use_local=True, **kw))
        return [y for y, _ in stream(decoder, prompt_ids(setup))]

    a, b = sample(seed=3), sample(seed=3)
    assert a == b
    assert sample(seed=4) != a  # 40 draws from a near-uniform random model
    decoder, _ = open_decoder(gen_cfg(setup, use_local=True))
    greedy = [y for y, _ in stream(decoder, prompt_ids(setup))]
    assert sample(seed=5, sampling_topk=1) == greedy
    assert sample(seed=6, sampling_topp=1e-6) == greedy  # the smallest nucleus is the top token


def test_beam_search(setup):
    decoder, _ = open_decoder(gen_cfg(setup, beam=1, max_new_tokens=20, **MEMORY))
    greedy_decoder, _ = open_decoder(gen_cfg(setup, max_new_tokens=20, **MEMORY))
    greedy = list(stream(greedy_decoder, prompt_ids(setup)))
    (one,) = beam_search(decoder, prompt_ids(setup))
    assert one.tokens.tolist() == [y for y, _ in greedy]
    decoder, _ = open_decoder(gen_cfg(setup, beam=4, max_new_tokens=20, **MEMORY))
    hyps = beam_search(decoder, prompt_ids(setup))
    assert len(hyps) == 4 and len({tuple(h.tokens.tolist()) for h in hyps}) == 4
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    # every hypothesis's per-token log p is the decoder's distribution of its own prefix
    best = hyps[0]
    state = decoder.start(prompt_ids(setup))
    for j, y in enumerate(best.tokens.tolist()):
        assert abs(float(decoder.log_probs(state)[0, y]) - float(best.positional_scores[j])) < 1e-4
        state = decoder.advance(state, torch.tensor([y]))
    assert best.score == pytest.approx(float(best.positional_scores.sum()) / len(best.tokens))


def test_stop_at_eos_and_word_codec(setup):
    d = load_dictionary(setup[1])
    codec = WordCodec(d)
    ids = codec.encode("w1 w2\nw3 nope")
    assert ids == [d.index("w1"), d.index("w2"), d.eos, d.index("w3"), d.unk]
    assert codec.decode(ids) == "w1 w2\nw3 <unk>"
    decoder, _ = open_decoder(gen_cfg(setup, stop_at_eos=True, max_new_tokens=200))
    out = [y for y, _ in stream(decoder, prompt_ids(setup))]
    assert (out[-1] == d.eos) == (len(out) < 200) and d.eos not in out[:-1]


def test_cli_streams_detokenised_text(setup, capsys):
    ckpt = setup[2]
    rc = main(["generate", "--path", str(ckpt), "--prompt", "w1 w2", "--max-new-tokens", "6", "--no-stop-at-eos",
               "--use-local", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    words = out.split()
    assert words[:2] == ["w1", "w2"] and len(words) == 2 + 6 - (out.count("\n") - 1)  # each </s> is a newline
    assert main(["generate", "--path", str(ckpt), "--use-long", "--prompt", "x"]) == 2  # a user error, one line


def test_byte_codec_round_trips_utf8():
    d = Dictionary()
    for b in range(256):
        if b != 10:
            d.add_symbol(str(b))
    assert is_byte_dictionary(d)
    codec = ByteCodec(d)
    ids = codec.encode("né\nx")
    assert ids == [d.index("110"), d.index("195"), d.index("169"), d.eos, d.index("120")]
    assert codec.decode(ids) == "né\nx"
    codec.reset()
    assert [codec.piece(t) for t in ids] == ["n", "", "é", "\n", "x"]  # a character appears once whole


def test_a_hugging_face_backbone_is_a_decoder_of_the_same_search():
    """LMDecoder over HFBackbone (a tiny random Llama, local memory, a window slide) in generate.search:
    greedy picks each step's argmax, and the batched beam's hypotheses carry the decoder's log-probabilities."""
    transformers = pytest.importorskip("transformers")
    from trime.model.hf import HFBackbone

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = HFBackbone(transformers.AutoModelForCausalLM.from_config(cfg).eval())

    def decoder(**kw):
        gcfg = C.GenerateConfig(path="unused", context_window=8, device="cpu", amp="none", stop_at_eos=False,
                                max_new_tokens=12, use_local=True, **kw)  # fmt: skip
        return LMDecoder(model, gcfg, dim=model.dim, pad=1, eos=2, window=16)

    prompt, greedy = [5, 9, 11], decoder()
    state = greedy.start(prompt)
    for y, lp in stream(greedy, prompt):
        dist = greedy.log_probs(state)[0]
        assert y == int(dist.argmax()) and abs(float(dist[y]) - lp) < 1e-6
        state = greedy.advance(state, torch.tensor([y]))
    beam = decoder(beam=3)
    hyps = beam_search(beam, prompt)
    assert len(hyps) == 3 and all(len(h.tokens) == 12 for h in hyps)
    assert hyps[0].score >= hyps[1].score >= hyps[2].score
    for h in hyps:
        state = beam.start(prompt)
        for j, y in enumerate(h.tokens.tolist()):
            assert abs(float(beam.log_probs(state)[0, y]) - float(h.positional_scores[j])) < 1e-4
            state = beam.advance(state, torch.tensor([y]))
