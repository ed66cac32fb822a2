"""Training throughput of a small preset: `trime train` against a bare PyTorch loop, same run.

    python bench/bench_train.py [--preset tiny] [--updates 12] [--json]

The bare loop runs the same model on the same batches with the same optimizer and autocast, but
with nothing of trime's loop (no logging, accumulation bookkeeping, clipping or checkpoints):
the ratio is what the training loop costs on top of forward + backward + step. Both use the CE
criterion; bench_loss.py measures the TRIME criteria against CE.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row, synthetic_corpus

from trime import config as C


def bare_loop(model_cfg, cfg, data: Path, updates: int, warm: int) -> float:
    """Tokens/s of forward + CE + backward + AdamW on the trainer's first batches."""
    from trime.data.batching import epoch_batches, make_batch
    from trime.data.blocks import num_segments, segment_windows
    from trime.data.prepare import load_split
    from trime.device import autocast, autocast_dtype
    from trime.model.transformer import build_model

    device = torch.device("cpu")
    amp = autocast_dtype(cfg.amp, device)
    tokens = load_split(data, "train")
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    L, B = cfg.tokens_per_sample, cfg.max_tokens // cfg.tokens_per_sample
    batches = epoch_batches(num_segments(len(tokens), L), B, 1, seed=cfg.seed)
    t0, n = 0.0, 0
    for i, ids in enumerate(batches[: warm + updates]):
        if i == warm:
            t0, n = time.perf_counter(), 0
        b = make_batch(tokens, segment_windows(ids, len(tokens), L), pad=1, eos=2, width=L, device=device)
        inputs, targets = b.inputs, b.targets
        with autocast(device, amp):
            out = model(inputs)
            logp, _ = model.head.target_logp(out.h.reshape(-1, out.h.shape[-1]), targets.reshape(-1))
        loss = -logp.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += targets.numel()
    return n / (time.perf_counter() - t0)


def trime_loop(model_cfg, cfg, warm: int) -> float:
    from trime.train import fit

    run = fit(model_cfg, cfg)
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [x for x in logs if x["kind"] == "train"][warm:]
    return sum(x["tokens_per_s"] for x in steps) / len(steps)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--updates", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        preset = C.load_preset(a.preset)
        data = synthetic_corpus(root, 400_000, 20_000)
        model_cfg = C.build(C.ModelConfig, preset["model"])
        warm = 2
        layers = {
            **preset["train"],
            "data": str(data),
            "save_dir": str(root / "run"),
            "max_update": a.updates + warm,
            "max_time": 0.0,
            "log_interval": 1,
            "save_interval_updates": 0,
            "criterion": "ce",
            "clip_norm": 0.0,
            "device": "cpu",
        }
        cfg = C.build(C.TrainConfig, layers)
        from trime.data.prepare import load_dictionary

        vocab = {"vocab_size": len(load_dictionary(data))}
        bare = bare_loop(C.build(C.ModelConfig, C.to_dict(model_cfg), vocab), cfg, data, a.updates, warm)
        ours = trime_loop(model_cfg, cfg, warm)
    shape = f"{a.preset}: {model_cfg.n_layers}x{model_cfg.d_model}, {cfg.max_tokens} tok/batch, amp {cfg.amp}"
    rows = [row("train", f"trime train tokens/s ({shape})", ours, bare, "≥ 0.95 of the bare loop", "tok/s")]
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
