"""Hugging Face causal LMs as TRIME backbones, against the models themselves and brute force.

Tiny random models of four families (GPT-2, Llama, Qwen2, Gemma 2 with logit soft-capping), built from
configs, saved with save_pretrained and loaded back from the directory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trime import config as C
from trime.errors import CheckpointError, ConfigError, DataError, TrimeError
from trime.losses import LossSettings, compute_loss
from trime.model.hf import (
    HFBackbone,
    HFHead,
    load_hf,
    load_hf_checkpoint,
    save_hf_checkpoint,
)

from tests.reference import joint_log_prob as ref_joint

transformers = pytest.importorskip("transformers")

V, D = 61, 32
SMALL = {
    "vocab_size": V,
    "hidden_size": D,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V,
        n_embd=D,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0),
}
# The FFN input and final norm of each family, by the names its modeling file uses (tests only).
KNOWN = {
    "gpt2": ("transformer.h.1.ln_2", "transformer.ln_f"),
    "llama": ("model.layers.1.post_attention_layernorm", "model.norm"),
    "qwen2": ("model.layers.1.post_attention_layernorm", "model.norm"),
    "gemma2": ("model.layers.1.pre_feedforward_layernorm", "model.norm"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for i, (family, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(make())
        with torch.no_grad():  # random norm gains and biases, so that no norm is the identity by chance
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


def tokens(B: int, T: int, seed: int = 0, low: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, V, (B, T), generator=g)


def capture(model, name: str) -> tuple[list, object]:
    """A forward hook on the module called ``name`` that records its output."""
    seen: list = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out))
    return seen, handle


# (a) the model's own loss equals −mean log p_tok under the HF head (full and chunked)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_head_matches_model_loss(model_dirs, family):
    bb = load_hf(model_dirs[family])
    x = tokens(2, 12, seed=1)
    with torch.no_grad():
        hf_loss = float(bb.model(input_ids=x, labels=x).loss)
        out = bb(x)
        h, y = out.h[:, :-1].reshape(-1, D), x[:, 1:].reshape(-1)  # (22, d), (22,)
        full, lz_full = bb.head.target_logp(h, y)
        bb.head.chunk_rows = 5
        chunked, lz_chunked = bb.head.target_logp(h, y)
    assert abs(-float(full.mean()) - hf_loss) < 1e-5
    assert abs(-float(chunked.mean()) - hf_loss) < 1e-5
    torch.testing.assert_close(lz_chunked, lz_full)
    assert bb.cfg.d_model == bb.dim == D and bb.cfg.vocab_size == bb.vocab_size == V
    assert bb.cfg.max_positions == 64


# (b) q is the last block's normalised FFN input and h the final norm's output, hooked by hand
@pytest.mark.parametrize("family", list(CONFIGS))
def test_keys_equal_hooked_activations(model_dirs, family):
    bb = load_hf(model_dirs[family])
    ffn_in, final = KNOWN[family]
    assert bb.ffn_name.startswith(ffn_in.rsplit(".", 1)[0])  # found in the last block
    q_seen, h1 = capture(bb.model, ffn_in)
    h_seen, h2 = capture(bb.model, final)
    x = tokens(3, 7, seed=2)
    with torch.no_grad():
        out = bb(x)
    h1.remove()
    h2.remove()
    assert out.q.shape == out.h.shape == (3, 7, D)
    torch.testing.assert_close(out.q, q_seen[-1], rtol=0, atol=0)
    torch.testing.assert_close(out.h, h_seen[-1], rtol=0, atol=0)
    assert not torch.allclose(out.q, out.h)


def _reference_token_part(weight, bias, softcap, h, y):
    logits = torch.nn.functional.linear(h, weight, bias).double()  # (N, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1), torch.logsumexp(logits, -1)


# (c) chunked target_logp equals the full log-softmax in value and in gradient (h, weight, bias)
@pytest.mark.parametrize("kind", ["softcap", "bias"])
def test_chunked_token_part_value_and_grad(kind):
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(D, V, bias=kind == "bias")
    head = HFHead(lm_head, softcap=2.5 if kind == "softcap" else None, chunk_rows=3)
    N = 10
    h = torch.randn(N, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    a, b = torch.randn(N), torch.randn(N)  # weights of both outputs, so both gradients matter
    tlp, lz = head.target_logp(h, y)
    (a * tlp + b * lz).sum().backward()
    got = [h.grad.clone()] + [p.grad.clone() for p in lm_head.parameters()]
    h.grad = None
    lm_head.zero_grad()
    rtlp, rlz = _reference_token_part(lm_head.weight, lm_head.bias, head.softcap, h, y)
    (a.double() * rtlp + b.double() * rlz).sum().backward()
    want = [h.grad] + [p.grad for p in lm_head.parameters()]
    torch.testing.assert_close(tlp.double(), rtlp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lz.double(), rlz.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        head.log_probs(h).double().gather(1, y[:, None]).squeeze(1), rtlp.detach(), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():  # decoding's one-matmul form: the same log-probs, and log Z as target_logp's
        both, log_z = head.log_probs_and_log_z(h)
        torch.testing.assert_close(both, head.log_probs(h), rtol=0, atol=0)
        torch.testing.assert_close(log_z, head.target_logp(h, y)[1], rtol=1e-6, atol=1e-6)


def test_chunked_token_part_under_autocast():
    """Under bf16 autocast the chunked path (recomputing in backward) equals one chunk to bf16 precision."""
    torch.manual_seed(1)
    lm_head = torch.nn.Linear(D, V, bias=False)
    h = torch.randn(10, D, requires_grad=True)
    y = torch.randint(0, V, (10,))
    grads, values = [], []
    for rows in (3, 10):
        head = HFHead(lm_head, softcap=2.0, chunk_rows=rows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tlp, lz = head.target_logp(h, y)
        values.append(tlp.detach())
        grads.append(torch.autograd.grad((tlp - 0.5 * lz).sum(), (h, lm_head.weight)))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-2)  # bf16 rounding


# (d) SGD on the TRIME loss of an HF backbone lowers it
def test_trime_step_lowers_loss(model_dirs):
    torch.manual_seed(0)
    bb = load_hf(model_dirs["llama"]).train()
    bb.head.chunk_rows = 16  # exercise the recomputing path in backward
    x = tokens(2, 16, seed=3)
    x[:, 8:] = x[:, :8]  # a repeated half: local memory can help
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.SGD(bb.parameters(), lr=0.1)
    losses = []
    for _ in range(4):
        res = compute_loss(LossSettings("trime", pad=-1), bb(inputs), targets, bb.head)
        opt.zero_grad()
        (res.loss / res.n_targets).backward()
        losses.append(res.loss.item() / res.n_targets)
        opt.step()
    assert int(res.n_targets) == targets.numel()
    assert losses[-1] < losses[0] - 0.05, losses


# (e) evaluation with local memory (trime.evaluate.Scorer on make_batch windows) equals brute force
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_local_memory_scoring_matches_brute_force(model_dirs, family):
    from trime.data.batching import make_batch
    from trime.evaluate import Scorer

    bb = load_hf(model_dirs[family])
    temp, pad, eos = 0.7, 0, 1
    stream = tokens(1, 40, seed=4, low=1)[0].numpy()  # ids ≥ 1: pad (0) never occurs
    windows = np.array([[0, 9, 0], [9, 17, 5], [17, 30, 3]])  # (start, end, n_ctx); rows 1-2 are right-padded
    batch = make_batch(stream, windows, pad=pad, eos=eos)
    for use_local in (False, True):
        cfg = C.build(C.EvalConfig, {"use_local": use_local, "softmax_temp": temp, "device": "cpu"})
        got = Scorer(bb, cfg, dim=D, pad=pad).score(batch)
        want = []
        for start, end, n_ctx in windows.tolist():
            pos = range(start - n_ctx, end)
            inputs = torch.tensor([[eos if i == 0 else int(stream[i - 1]) for i in pos]])  # (1, T)
            labels = [int(stream[i]) for i in pos]
            q_seen, hook = capture(bb.model, KNOWN[family][0])
            with torch.no_grad():
                logits = bb.model(input_ids=inputs).logits[0].double()  # (T, V): the model's own
            hook.remove()
            q = q_seen[-1][0].double()  # (T, d)
            logp, log_z = logits.log_softmax(-1), torch.logsumexp(logits, -1)
            for i in range(n_ctx, len(labels)):
                y = labels[i]
                scores = [
                    float(q[i] @ q[j]) / math.sqrt(D) / temp if use_local and j < i else -math.inf
                    for j in range(len(labels))
                ]
                want += ref_joint([logp[i, y]], [log_z[i]], [scores], labels, [y])
        np.testing.assert_allclose(got.double().numpy(), np.array(want), rtol=0, atol=2e-5)


# (f) data prepared with a HF tokenizer: the format of `trime data prepare`, plus eos and pad
def _word_tokenizer(root: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    fast.save_pretrained(root / "tok")
    return root / "tok"


def test_hf_text_prepare_round_trip(tmp_path):
    from trime.data.hf_text import choose_pad, prepare_hf, prepare_hf_corpus
    from trime.data.prepare import check_vocabulary, load_split, prepare_corpus
    from trime.io import read_meta

    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    tok_dir = _word_tokenizer(tmp_path, words)
    ids = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"train": "the cat sat\n\non the mat\r\n", "valid": "a dog sat\n", "test": "the dog\nzebra cat"}
    for split, text in texts.items():
        (corpus / f"{split}.txt").write_bytes(text.encode())
    out = prepare_hf_corpus(corpus, tmp_path / "bin", str(tok_dir))
    meta = read_meta(out, kind="data")
    assert (meta["level"], meta["eos"], meta["pad"], meta["vocab_size"]) == ("hf", 2, 1, 10)
    assert meta["tokenizer"]["source"] == str(tok_dir) and len(meta["tokenizer"]["sha256"]) == 64
    for split, text in texts.items():
        lines = text.replace("\r\n", "\n").split("\n")
        lines = lines[:-1] if lines[-1] == "" else lines
        want = [t for line in lines for t in [ids.get(w, 0) for w in line.split()] + [2]]
        np.testing.assert_array_equal(load_split(out, split), np.array(want, dtype=np.int32))
        assert meta["splits"][split]["lines"] == len(lines)
    assert meta["splits"]["test"]["unk"] == 1 and meta["splits"]["train"]["unk"] == 0
    check_vocabulary(out, 12)  # a head with spare rows fits
    with pytest.raises(DataError, match="only 9"):
        check_vocabulary(out, 9)
    fairseq_style = read_meta(prepare_corpus(corpus, tmp_path / "word"), kind="data")
    assert set(meta["splits"]["train"]) == set(fairseq_style["splits"]["train"])
    assert set(fairseq_style) - {"dictionary"} <= set(meta)

    # the tokenizer's pad id occurs (a literal <pad>): pad becomes the smallest id that never occurs
    (tmp_path / "padded.txt").write_text("the <pad> cat <unk>\nsat on\n")
    meta = read_meta(prepare_hf({"train": tmp_path / "padded.txt"}, tmp_path / "bin2", str(tok_dir)))
    stream = load_split(tmp_path / "bin2", "train")
    assert 1 in stream and 0 in stream and meta["pad"] == 7  # ids 0-6 occur; 7 ("mat") does not
    assert choose_pad(None, np.array([3, 0, 1])) == 1 and choose_pad(2, np.array([3, 0, 0])) == 2
    with pytest.raises(DataError, match="no id is free"):
        choose_pad(0, np.array([1, 1]))


# (g) one-line errors; checkpoint save and load
def test_errors_are_one_line(tmp_path, model_dirs):
    from trime.data.hf_text import load_tokenizer

    (tmp_path / "empty").mkdir()
    for bad, err in ((tmp_path / "missing", CheckpointError), (tmp_path / "empty", CheckpointError)):
        with pytest.raises(err) as e:
            load_hf(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(DataError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TrimeError, match="GGUF"):
        load_hf(model_dirs["llama"], gguf_file="nope.gguf")

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    model.model.layers[-1].mlp = torch.nn.Identity()  # a block with no weighted FFN
    with pytest.raises(ConfigError, match="feed-forward sublayer") as e:
        HFBackbone(model)
    assert "\n" not in str(e.value)
    out = HFBackbone(model, key="final")(tokens(1, 4))  # the final hidden state still works as the key
    assert torch.equal(out.q, out.h)
    model.config.num_hidden_layers = 3
    with pytest.raises(ConfigError, match="decoder blocks"):
        HFBackbone(model)


def test_checkpoint_round_trip(tmp_path, model_dirs):
    bb = load_hf(model_dirs["gpt2"])
    with torch.no_grad():
        bb.model.transformer.ln_f.weight.mul_(1.5)  # "fine-tuned"
    ckpt = save_hf_checkpoint(tmp_path / "ckpt", bb, step=3)
    assert not [p for p in ckpt.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    again, meta = load_hf_checkpoint(ckpt)
    assert meta["backbone"] == "hf" and meta["step"] == 3 and meta["d_model"] == D
    x = tokens(1, 6)
    with torch.no_grad():
        a, b = bb(x), again(x)
    torch.testing.assert_close(a.h, b.h)
    torch.testing.assert_close(a.q, b.q)
    with pytest.raises(CheckpointError, match="not a Hugging Face trime checkpoint|incomplete"):
        load_hf_checkpoint(model_dirs["gpt2"])
