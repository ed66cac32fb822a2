"""Evaluation speed with each memory, datastore build cost, searches per token, sweep cost.

    python bench/bench_eval.py [--preset tiny] [--tokens 8000] [--json]

All on one randomly initialised model of the preset and one synthetic corpus, in one run:
1. scored tokens/s of `trime eval` without memory against a bare forward pass over the same
   windows (the baseline), then with local, long (M = 4 windows) and external memory, exact and
   IVF-PQ (256 lists, probe 8) (ratios to vanilla);
2. `trime datastore build` time against a bare forward pass over the same training tokens
   (goal ≤ 1.1×);
3. faiss query rows per scored token with external memory and interpolation together (goal 1:
   one search serves both);
4. a 100-setting `trime sweep` from cached neighbours against one full evaluation (goal ≤ 5%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row, synthetic_corpus, timed

from trime import config as C


def bare_forward(ckpt: Path, data: Path, split: str, L: int, ctx: int, batch: int, n_tokens: int) -> float:
    """Seconds of the model's forward pass alone over the evaluation windows of a split."""
    from trime.checkpoint import load_model
    from trime.data.batching import make_batch
    from trime.data.blocks import eval_windows
    from trime.data.prepare import load_split

    model, _, _ = load_model(ckpt)
    tokens = load_split(data, split)[:n_tokens] if n_tokens else load_split(data, split)
    t = time.perf_counter()
    with torch.no_grad():
        windows = eval_windows(tokens, L, ctx)
        for i in range(0, len(windows), batch):
            model(make_batch(tokens, windows[i : i + batch], pad=1, eos=2).inputs)
    return time.perf_counter() - t


def setup(root: Path, preset: dict, n_train: int, n_valid: int):
    from trime.checkpoint import save_checkpoint
    from trime.data.prepare import load_dictionary
    from trime.model.transformer import build_model

    data = synthetic_corpus(root, n_train, n_valid)
    cfg = C.build(C.ModelConfig, preset["model"], {"vocab_size": len(load_dictionary(data)), "dropout": 0.0})
    torch.manual_seed(0)
    return data, save_checkpoint(root / "ckpt", build_model(cfg), cfg, data / "dict.txt")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=8000, help="valid tokens scored per evaluation")
    ap.add_argument("--train-tokens", type=int, default=100_000, help="datastore size")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from trime.datastore_build import build_datastore
    from trime.evaluate import evaluate
    from trime.memory import index as index_mod
    from trime.memory.index import build_index
    from trime.memory.neighbors import NeighborCache, sweep

    preset = C.load_preset(a.preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, ckpt = setup(root, preset, a.train_tokens, a.tokens)
        L = preset["model"]["max_positions"]
        ctx = L // 2
        base = {
            "data": str(data),
            "path": str(ckpt),
            "device": "cpu",
            "amp": "none",
            "context_window": ctx,
            "batch_size": 8,
            "max_eval_tokens": a.tokens,
        }
        evaluate(C.build(C.EvalConfig, base, {"max_eval_tokens": 500}))  # warm-up: allocator, kernels
        fwd = bare_forward(ckpt, data, "valid", L, ctx, 8, a.tokens)
        res, t_vanilla = timed(evaluate, C.build(C.EvalConfig, base))
        n = res.n_tokens
        rows.append(row("eval", "vanilla scored tok/s (baseline: bare forward)", n / t_vanilla, n / fwd, unit="tok/s"))
        ds_cfg = C.DatastoreConfig(
            data=str(data),
            path=str(ckpt),
            out=str(root / "dstore"),
            context_window=ctx,
            batch_size=8,
            device="cpu",
            amp="none",
        )
        _, t_ds = timed(build_datastore, ds_cfg)
        t_ds_fwd = bare_forward(ckpt, data, "train", L, ctx, 8, 0)
        rows.append(row("datastore", "build seconds (baseline: bare forward)", t_ds, t_ds_fwd, "≤ 1.1", "s"))
        index = build_index(root / "dstore", root / "dstore" / "knn.index.ip", metric="ip")
        ivf = build_index(root / "dstore", root / "dstore" / "ivfpq.index.ip", metric="ip", n_lists=256)
        ext = {"dstore": str(root / "dstore"), "indexfile": str(index), "k": 64}
        for name, flags, goal in (
            ("local", {"use_local": True}, ""),
            ("long (M = 4 windows)", {"use_local": True, "use_long": True, "mem_size": 4 * L}, ""),
            ("external (exact, k = 64)", {"use_external": True, **ext}, ""),
            ("external (IVF-PQ, k = 64)", {"use_external": True, **ext, "indexfile": str(ivf)}, "≥ 0.7"),
        ):
            _, t = timed(evaluate, C.build(C.EvalConfig, base, flags))
            rows.append(row("eval", f"{name} scored tok/s (ratio to vanilla)", n / t, n / t_vanilla, goal, "tok/s"))
        counted = {"rows": 0}
        real = index_mod.Index.search

        def counting(self, queries, k):
            counted["rows"] += int(queries.shape[0])
            return real(self, queries, k)

        index_mod.Index.search = counting
        full_flags = {
            "use_local": True,
            "use_long": True,
            "mem_size": 4 * L,
            "use_external": True,
            "use_interp": True,
            "lmbda": 0.2,
            **ext,
        }
        try:
            _, t_full = timed(evaluate, C.build(C.EvalConfig, base, full_flags, {"save_neighbors": str(root / "nb")}))
        finally:
            index_mod.Index.search = real
        rows.append(row("eval", "faiss query rows per scored token (ext + interp)", counted["rows"] / n, goal="1"))
        grid = {
            "softmax_temp": [0.8, 0.9, 1.0, 1.1, 1.2],
            "lmbda": [0.05, 0.1, 0.2, 0.3, 0.4],
            "interp_temp": [1, 2, 4, 8],
        }
        cache, t_load = timed(NeighborCache.load, root / "nb")
        _, t_sweep = timed(sweep, cache, grid)
        rows.append(
            row(
                "sweep",
                "100 settings, seconds (baseline: one full evaluation)",
                t_load + t_sweep,
                t_full,
                "≤ 0.05",
                "s",
            )
        )
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
