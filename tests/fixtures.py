"""Tiny deterministic corpora and prepared data for tests (offline, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_text(n_lines: int = 300, seed: int = 0, vocab: int = 60) -> str:
    """Zipf-ish words with repeated phrases, so that earlier context (memory) helps prediction."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    lines, recent = [], []
    for _ in range(n_lines):
        if recent and rng.random() < 0.4:
            line = recent[int(rng.integers(len(recent)))]  # repeat an earlier line
        else:
            line = " ".join(rng.choice(words, size=int(rng.integers(3, 12)), p=p))
        lines.append(line)
        recent = (recent + [line])[-20:]
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, n_lines: int = 300) -> Path:
    """A corpus directory with train/valid/test.txt."""
    root.mkdir(parents=True, exist_ok=True)
    for split, seed, n in (("train", 0, n_lines), ("valid", 1, n_lines // 6), ("test", 2, n_lines // 6)):
        (root / f"{split}.txt").write_text(synthetic_text(n, seed))
    return root


def make_data(root: Path, n_lines: int = 300) -> Path:
    """Prepared data (dict.txt, {train,valid,test}.npy, meta.json) under root/data-bin."""
    from trime.data.prepare import prepare_corpus

    corpus = make_corpus(root / "corpus", n_lines)
    return prepare_corpus(corpus, root / "data-bin")


def micro_checkpoint(root: Path, data: Path, seed: int = 0, **model) -> Path:
    """A randomly initialised micro-preset model of the data's vocabulary, saved as a checkpoint."""
    import torch

    from trime import config as C
    from trime.checkpoint import save_checkpoint
    from trime.data.prepare import load_dictionary
    from trime.model.transformer import build_model

    torch.manual_seed(seed)
    cfg = C.build(C.ModelConfig, C.load_preset("micro")["model"], {"vocab_size": len(load_dictionary(data)), **model})
    return save_checkpoint(root / "ckpt", build_model(cfg), cfg, data / "dict.txt")


# Names of a Llama's tensors in a GGUF file (llama.cpp's), per transformers parameter name suffix.
_GGUF_LLAMA = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def write_llama_gguf(path: Path, model, merges=("t h", "th e", "a n", "an d", "w 1")) -> Path:
    """Write a transformers Llama as a GGUF file: matrices in Q8_0 (rows a multiple of 32), the rest in float32,
    and a byte-level
    BPE tokenizer of 256 bytes + ``merges`` + <s>, </s>, <|endoftext|> (vocab_size must leave room for them).
    q/k rows are stored in llama.cpp's rotary order (transformers undoes it when it loads the file)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    n_head, n_kv, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(V)
    byte = bytes_to_unicode()
    tokens = [byte[i] for i in range(256)] + [m.replace(" ", "") for m in merges]
    tokens += [f"<extra{i}>" for i in range(V - 3 - len(tokens))] + ["<s>", "</s>", "<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (V - 3) + [3, 3, 2])  # normal, then control, control, unknown
    w.add_token_merges(list(merges))
    w.add_bos_token_id(V - 3)
    w.add_eos_token_id(V - 2)
    w.add_unk_token_id(V - 1)  # GPT-2's unknown token: transformers adds it when the file has none
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{a}": f"blk.{i}.{b}" for a, b in _GGUF_LLAMA.items()})
    for name, t in model.state_dict().items():
        x = t.detach().float().numpy()
        heads = n_head if "q_proj" in name else n_kv if "k_proj" in name else 0
        if heads:  # (heads, 2, d_head / 2, d) -> (heads, d_head / 2, 2, d): interleaved rotary halves
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(x.shape)
        target = names[name.removesuffix(".weight")] + ".weight"
        if x.ndim == 2 and x.shape[1] % 32 == 0:  # Q8_0 blocks of 32 along a row
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(target, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(target, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
