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
