"""Generation with a Hugging Face backbone decodes incrementally with the model's own KV cache
(trime.model.hf.HFCache): the cached forward of each position equals the uncached forward of its whole
prefix, and cached generation picks the same tokens with the same log-probabilities as re-running the
window, with every memory and across a window slide. Tiny random models, built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trime import config as C
from trime.generate.lm import LMDecoder, beam_search, stream
from trime.memory.external import ExternalMemory
from trime.model.hf import HFBackbone

transformers = pytest.importorskip("transformers")

V, L, CTX = 40, 16, 8  # windows of 16 positions, blocks of 8 new ones
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                max_position_embeddings=64, sliding_window=6),
    "bloom": lambda: transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
}  # fmt: skip


def backbone(family: str) -> HFBackbone:
    torch.manual_seed(0)
    key = "final" if family == "bloom" else "last_ffn_input"  # Bloom's FFN input is not a child's input
    return HFBackbone(transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval(), key=key)


@pytest.fixture(scope="module")
def llama():
    return backbone("llama")


@pytest.mark.parametrize("family", CONFIGS)
def test_cached_forward_equals_the_full_forward(family):
    """Pieces run through one cache give h and q of the whole prefix at every position (rotary and learned
    positions; Gemma 2's sliding-window layers cache only the last 6 positions; Bloom's ALiBi takes no
    position ids), and reordering the cache's rows follows the rows of the batch."""
    model = backbone(family)
    tokens = torch.randint(3, V, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 20))]
        index = torch.tensor([1, 0, 1])
        cache.reorder(index)
        parts += [model(tokens[index, 20:30], cache)]
    h = torch.cat([p.h[:2] for p in parts[:3]] + [parts[3].h[1:]], 1)  # rows 0, 1 of the batch
    q = torch.cat([p.q[:2] for p in parts[:3]] + [parts[3].q[1:]], 1)
    torch.testing.assert_close(h, full.h[[0, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, full.q[[0, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[3].h[0], full.h[1, 20:], atol=1e-5, rtol=1e-5)
    assert cache.length() == 30


class _Exact:
    """An exact inner-product index over a few keys (a memory backend: ``search(x, k)``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (n, d), (n,)

    def search(self, x: torch.Tensor, k: int):
        scores, rows = (x.float() @ self.keys.T).topk(k, dim=1)  # (B, k)
        return scores, self.values[rows], rows


def external_memory(model: HFBackbone) -> ExternalMemory:
    """The model's own keys of a random text, each labelled with the token that follows it."""
    torch.manual_seed(1)
    text = torch.randint(3, V, (1, 65))
    with torch.no_grad():
        keys = model(text[:, :-1]).q[0].float()  # (64, d)
    return ExternalMemory(_Exact(keys, text[0, 1:]), k=6, meta={})


MEMORIES = {
    "none": {},
    "local_long": dict(use_local=True, use_long=True, mem_size=12),
    "external": dict(use_local=True, use_external=True, use_interp=True, lmbda=0.3, dstore="-", indexfile="-"),
}


def decode(model, kv_cache: bool, memory: str, beam: int) -> list[tuple[list[int], list[float]]]:
    """(tokens, per-token log p) of each hypothesis: greedy (beam 1) or beam search. The prompt of 5 tokens
    and 20 new ones cross two window slides (blocks end at positions 8, 16, 24)."""
    cfg = C.GenerateConfig(path="unused", context_window=CTX, device="cpu", amp="none", stop_at_eos=False,
                           max_new_tokens=20, beam=beam, kv_cache=kv_cache, **MEMORIES[memory])  # fmt: skip
    external = external_memory(model) if memory == "external" else None
    decoder = LMDecoder(model, cfg, dim=model.dim, pad=1, eos=2, window=L, external=external)
    assert decoder.cached == kv_cache
    prompt = [5, 9, 11, 7, 5]
    if beam == 1:
        steps = list(stream(decoder, prompt))
        return [([y for y, _ in steps], [lp for _, lp in steps])]
    return [(h.tokens.tolist(), h.positional_scores.tolist()) for h in beam_search(decoder, prompt)]


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("beam", [1, 3])
def test_cached_generation_equals_rerunning_the_window(llama, memory, beam):
    cached, uncached = decode(llama, True, memory, beam), decode(llama, False, memory, beam)
    assert len(cached) == len(uncached) == beam
    for (tokens, lps), (ref_tokens, ref_lps) in zip(cached, uncached):
        assert len(tokens) == 20 and tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=1e-5, rtol=0)


def test_gpt2_cached_beam_equals_uncached():
    """Learned absolute positions restart with each window as in the uncached run."""
    model = backbone("gpt2")
    cached, uncached = decode(model, True, "local_long", 2), decode(model, False, "local_long", 2)
    assert [t for t, _ in cached] == [t for t, _ in uncached]
    np.testing.assert_allclose([p for _, p in cached], [p for _, p in uncached], atol=1e-5, rtol=0)
