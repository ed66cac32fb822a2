"""Generation speed with memories, as ratios of memory-free generation with the KV cache.

    python bench/bench_generate.py [--preset tiny] [--new-tokens 256] [--json]

All on one randomly initialised model of the preset and one synthetic corpus, in one run: greedy
generation of N tokens (no stop at </s>) after a prompt from the valid split, with the preset's
window and half of it as context (so the window slides every L/2 tokens), measured as new tokens/s:
1. memory-free with the KV cache: the baseline; memory-free without the cache (recomputes the window
   every step) for comparison;
2. local + long-term memory (M = 4 windows), ratio to the baseline;
3. external memory (k = 64 from a flat index over the training tokens, then from an IVF-PQ index of
   256 lists), ratio to the baseline;
4. all three with kNN-LM interpolation, ratio to the baseline.

Decoding one token at a time is a chain of small operations: by default the benchmark runs torch
with one intra-op thread. On a busy shared CPU, torch's default (one thread per core) made the same
memory-free generation 60× slower here (3 against 217 tok/s on 2 cores under load).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row, synthetic_corpus, timed

from trime import config as C


def setup(root: Path, preset: dict, n_train: int, n_valid: int):
    from trime.checkpoint import save_checkpoint
    from trime.data.prepare import load_dictionary
    from trime.model.transformer import build_model

    data = synthetic_corpus(root, n_train, n_valid)
    cfg = C.build(C.ModelConfig, preset["model"], {"vocab_size": len(load_dictionary(data)), "dropout": 0.0})
    torch.manual_seed(0)
    return data, save_checkpoint(root / "ckpt", build_model(cfg), cfg, data / "dict.txt")


def generate_tokens(cfg, prompt: list[int]) -> int:
    from trime.generate.lm import open_decoder, stream

    decoder, _ = open_decoder(cfg)
    return sum(1 for _ in stream(decoder, prompt))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per measurement")
    ap.add_argument("--train-tokens", type=int, default=100_000, help="datastore size")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default; see the docstring)"
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from trime.data.prepare import load_split
    from trime.datastore_build import build_datastore
    from trime.memory.index import build_index

    preset = C.load_preset(a.preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, ckpt = setup(root, preset, a.train_tokens, 4000)
        L = preset["model"]["max_positions"]
        prompt = [int(t) for t in load_split(data, "valid")[: L // 4]]
        base = {
            "path": str(ckpt),
            "device": "cpu",
            "amp": "none",
            "context_window": L // 2,
            "max_new_tokens": a.new_tokens,
            "stop_at_eos": False,
        }
        build_datastore(
            C.DatastoreConfig(
                data=str(data),
                path=str(ckpt),
                out=str(root / "dstore"),
                context_window=L // 2,
                device="cpu",
                amp="none",
            )
        )
        index = build_index(root / "dstore", root / "dstore" / "knn.index.ip", metric="ip")
        ivf = build_index(root / "dstore", root / "dstore" / "ivfpq.index.ip", metric="ip", n_lists=256)
        ext = {"dstore": str(root / "dstore"), "indexfile": str(index), "k": 64}
        generate_tokens(C.build(C.GenerateConfig, base, {"max_new_tokens": 16}), prompt)  # warm-up
        n, t_base = timed(generate_tokens, C.build(C.GenerateConfig, base), prompt)
        rows.append(row("generate", "memory-free tok/s with KV cache (the baseline)", n / t_base, unit="tok/s"))
        n, t = timed(generate_tokens, C.build(C.GenerateConfig, base, {"kv_cache": False}), prompt)
        rows.append(row("generate", "memory-free tok/s without KV cache (ratio)", n / t, n / t_base, unit="tok/s"))
        for name, flags in (
            ("local + long (M = 4 windows)", {"use_local": True, "use_long": True, "mem_size": 4 * L}),
            ("external (exact, k = 64)", {"use_external": True, **ext}),
            ("external (IVF-PQ, k = 64)", {"use_external": True, **ext, "indexfile": str(ivf)}),
            (
                "local + long + external + interp",
                {"use_local": True, "use_long": True, "mem_size": 4 * L, "use_external": True, "use_interp": True}
                | {"lmbda": 0.2, **ext},
            ),
        ):
            n, t = timed(generate_tokens, C.build(C.GenerateConfig, base, flags), prompt)
            rows.append(row("generate", f"{name} tok/s (ratio to the baseline)", n / t, n / t_base, unit="tok/s"))
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
