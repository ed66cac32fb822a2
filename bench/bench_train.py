"""Training throughput of a small preset: `trime train` against a bare PyTorch loop, same run, and
the fraction of the machine's matmul peak that it reaches.

    python bench/bench_train.py [--preset tiny] [--updates 12] [--amp auto] [--json]

The bare loop runs the same model on the same batches with the same optimizer and autocast, but
with nothing of trime's loop (no logging, accumulation bookkeeping, clipping or checkpoints):
the ratio is what the training loop costs on top of forward + backward + step. Both use the CE
criterion; bench_loss.py measures the TRIME criteria against CE.

Fraction of the matmul peak measured in the same run (the training's dtype: bf16 under autocast):
achieved = model FLOPs per token × trime's tokens/s, where the FLOPs are those of the matmuls a token
passes through, forward and backward (6 per weight: every Transformer weight and the adaptive head
for every token; an adaptive input band's projection and a tail cluster's two matrices for the tokens
in them, the shares counted on the benchmark's batches) plus causal attention (6·layers·L·d);
peak = the best rate of a 2048 × 2048 × 2048 torch.mm in that dtype, same threads, best of before and
after training. A model of small matrices cannot reach that peak, so the run also measures the
ceiling of its own shapes: every matmul of one training step (recorded: op, shapes, dtype) run
alone, total FLOPs over total seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row, synthetic_corpus

from trime import config as C


def bare_loop(model_cfg, cfg, data: Path, updates: int, warm: int) -> tuple[float, dict]:
    """Tokens/s of forward + CE + backward + AdamW on the trainer's first batches, and the measures of
    the model's FLOPs (flops_per_token, the matmul ceiling of its shapes)."""
    from trime.data.batching import epoch_batches, make_batch
    from trime.data.blocks import num_segments, segment_windows
    from trime.data.prepare import load_split
    from trime.device import autocast, autocast_dtype, tune_cpu_allocator
    from trime.model.transformer import build_model
    from trime.optim import build_optimizer

    device = torch.device("cpu")
    tune_cpu_allocator()  # as trime's CPU jobs do (trime.device.pick_device)
    amp = autocast_dtype(cfg.amp, device)
    tokens = load_split(data, "train")
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).train()
    opt = build_optimizer(model.parameters(), cfg)
    L, B = cfg.tokens_per_sample, cfg.max_tokens // cfg.tokens_per_sample
    batches = epoch_batches(num_segments(len(tokens), L), B, 1, seed=cfg.seed)
    t0, n = 0.0, 0
    shapes = {}
    for i, ids in enumerate(batches[: warm + updates]):
        if i == warm:
            t0, n = time.perf_counter(), 0
        b = make_batch(tokens, segment_windows(ids, len(tokens), L), pad=1, eos=2, width=L, device=device)
        inputs, targets = b.inputs, b.targets
        if i == 0:
            shapes["flops_per_token"] = flops_per_token(model_cfg, L, inputs, targets)
            shapes["ceiling"] = shape_ceiling(step_matmuls(model, inputs, targets, amp))
        with autocast(device, amp):
            out = model(inputs)
            logp, _ = model.head.target_logp(out.h.reshape(-1, out.h.shape[-1]), targets.reshape(-1))
        loss = -logp.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += targets.numel()
    return n / (time.perf_counter() - t0), shapes


def matmul_rate(a: torch.Tensor, b: torch.Tensor, seconds: float = 0.5) -> float:
    """FLOP/s of ``a @ b`` (best of 3 timings of repeated calls, about ``seconds`` in all)."""
    a @ b
    t = time.perf_counter()
    a @ b
    reps = max(1, int(seconds / 3 / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * a.numel() * b.shape[-1] / best  # (…, i, k) @ (…, k, j): 2·…·i·k·j


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of a large (n × n) @ (n × n) matmul in ``dtype`` on the CPU with this process's threads."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    return matmul_rate(a, b, seconds=1.0)


def flops_per_token(cfg, L: int, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Matmul FLOPs of one training token, forward + backward (module docstring); the adaptive bands' and
    clusters' shares are those of ``inputs`` / ``targets``."""
    from trime.model.adaptive import band_width, full_cutoffs

    d, V = cfg.d_model, cfg.vocab_size
    weights = cfg.n_layers * (4 * d * d + 2 * d * cfg.d_ffn)  # q, k, v, out, fc1, fc2
    if cfg.adaptive_input:
        cut = [0] + full_cutoffs(cfg.adaptive_input_cutoff, V)
        for b in range(len(cut) - 1):
            share = ((inputs >= cut[b]) & (inputs < cut[b + 1])).float().mean().item()
            weights += share * band_width(d, cfg.adaptive_input_factor, b) * d
    if cfg.adaptive_softmax_cutoff:
        cut = full_cutoffs(cfg.adaptive_softmax_cutoff, V)
        weights += d * (cut[0] + len(cut) - 1)  # the head: shortlist and cluster logits
        for c in range(len(cut) - 1):
            share = ((targets >= cut[c]) & (targets < cut[c + 1])).float().mean().item()
            w = band_width(d, cfg.adaptive_softmax_factor, c + 1)
            weights += share * (d * w + w * (cut[c + 1] - cut[c]))
    else:
        weights += d * V
    return 6 * weights + 6 * cfg.n_layers * L * d


def step_matmuls(model, inputs, targets, amp) -> Counter:
    """The matmuls (op, operand shapes, dtype) of one forward + CE + backward, with their counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trime.device import autocast

    ops = {torch.ops.aten.mm.default: "mm", torch.ops.aten.addmm.default: "addmm", torch.ops.aten.bmm.default: "bmm"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                a, b = args[-2:]  # addmm's bias comes first
                self.seen[ops[func], tuple(a.shape), tuple(b.shape), a.dtype] += 1
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        with autocast(torch.device("cpu"), amp):
            out = model(inputs)
            logp, _ = model.head.target_logp(out.h.reshape(-1, out.h.shape[-1]), targets.reshape(-1))
        (-logp.sum()).backward()
    model.zero_grad(set_to_none=True)
    return rec.seen


def shape_ceiling(matmuls: Counter) -> float:
    """FLOP/s of the step's matmuls each run alone: total FLOPs over total seconds."""
    g = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for (_, sa, sb, dtype), count in matmuls.items():
        a, b = torch.randn(sa, generator=g).to(dtype), torch.randn(sb, generator=g).to(dtype)
        f = 2 * a.numel() * b.shape[-1]
        flops += count * f
        seconds += count * f / matmul_rate(a, b, seconds=0.1)
    return flops / seconds


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
    ap.add_argument("--amp", default=None, help="autocast dtype (default: the preset's; auto: bf16 where supported)")
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
            **({"amp": a.amp} if a.amp else {}),
        }
        cfg = C.build(C.TrainConfig, layers)
        from trime.data.prepare import load_dictionary

        vocab = {"vocab_size": len(load_dictionary(data))}
        from trime.device import autocast_dtype

        dtype = autocast_dtype(cfg.amp, torch.device("cpu")) or torch.float32
        peak = matmul_peak(dtype)
        bare, flops = bare_loop(C.build(C.ModelConfig, C.to_dict(model_cfg), vocab), cfg, data, a.updates, warm)
        ours = trime_loop(model_cfg, cfg, warm)
        peak = max(peak, matmul_peak(dtype))
    shape = f"{a.preset}: {model_cfg.n_layers}x{model_cfg.d_model}, {cfg.max_tokens} tok/batch, amp {cfg.amp}"
    achieved, ceiling = ours * flops["flops_per_token"], flops["ceiling"]
    name = str(dtype).removeprefix("torch.")
    rows = [
        row("train", f"trime train tokens/s ({shape})", ours, bare, "≥ 0.95 of the bare loop", "tok/s"),
        row(
            "train", f"fraction of the {name} matmul peak measured in the same run", achieved, peak, "≥ 0.75", "FLOP/s"
        ),
        row(
            "train",
            f"fraction of what the step's own {name} matmul shapes reach alone",
            achieved,
            ceiling,
            "",
            "FLOP/s",
        ),
        row("train", "model FLOPs per token (matmuls, forward + backward)", flops["flops_per_token"] / 1e6, unit="M"),
    ]
    emit(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
