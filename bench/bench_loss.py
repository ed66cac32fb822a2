"""Cost of the TRIME criteria against plain cross-entropy, and memory of the chunked joint softmax.

    python bench/bench_loss.py            # about a minute on 2 CPU cores; uses CUDA when present

1. Step time (forward + backward) of one model on one batch of 4 segments × 512 tokens:
   trime (local memory, §2) and trime_long (the 4 segments as memory, §3.3) against ce.
   Goals: trime ≤ 1.03 × ce, trime_long ≤ 1.10 × ce. Each round runs the three criteria back to
   back (order alternating); the ratio is the median over rounds of criterion / ce of that round.
   On CPU the clock is the process's CPU time with one thread (on a shared machine wall time
   mostly measures the neighbours); on CUDA it is wall time after a synchronize. The memory
   statistics alone are also timed, as a fraction of the fastest ce step.
2. Peak memory of memory_stats (chunked, recomputing) against the dense (N, M) formulation for
   3,072 queries over a 12,288-token memory (the 247M trime_long shape of spec §13), forward and
   backward. Each formulation runs in a fresh subprocess. On CPU the number is the growth of the
   peak resident set (VmHWM of /proc/self/status, reset through /proc/self/clear_refs after the
   inputs are made) above the resident set at that point; on CUDA torch.cuda.max_memory_allocated
   above the memory allocated for the inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory_children, reset_peak_rss, status_kib  # noqa: E402

from trime.losses import compute_loss

B, L, V = 4, 512, 20000


def build_model(device):
    """The tiny.toml architecture (4 layers, d = 256, tied adaptive input/softmax), without dropout."""
    from trime.config import ModelConfig
    from trime.model.transformer import build_model as build

    cfg = ModelConfig(
        n_layers=4,
        d_model=256,
        d_ffn=1024,
        n_heads=4,
        dropout=0.0,
        vocab_size=V,
        max_positions=L,
        adaptive_input=True,
        adaptive_input_cutoff=[2000, 10000],
        adaptive_input_factor=4.0,
        adaptive_softmax_cutoff=[2000, 10000],
        adaptive_softmax_factor=4.0,
        tie_adaptive_weights=True,
        tie_adaptive_proj=True,
    )
    return build(cfg).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device) -> float:
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def step_times(device, reps: int) -> dict[str, list[float]]:
    """Forward+backward seconds per criterion for ``reps`` rounds; each round runs every criterion."""
    torch.manual_seed(0)
    model = build_model(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, V, (B, L), generator=g).to(device)  # (B, L)
    targets = torch.roll(tokens, -1, dims=1)  # (B, L)
    crits = ["ce", "trime", "trime_long"]
    times: dict[str, list[float]] = {c: [] for c in crits}
    for r in range(reps + 1):
        order = crits if r % 2 else crits[::-1]  # alternate the order: no criterion always runs first
        for c in order:
            _sync(device)
            t0 = _clock(device)
            res = compute_loss(c, model(tokens), targets, model.head)
            res.loss.backward()
            _sync(device)
            if r:  # the first round warms up
                times[c].append(_clock(device) - t0)
            model.zero_grad(set_to_none=True)
    times["memory: local"], times["memory: long"] = memory_part(device, model(tokens).q.detach(), targets, reps)
    return times


def memory_part(device, q, targets, reps: int) -> tuple[list[float], list[float]]:
    """Seconds of the memory statistics alone (forward + backward) for the local and long rules."""
    from trime.memory import joint, masks

    N = B * L
    q = q.reshape(N, -1).requires_grad_(True)  # (N, d)
    y = targets.reshape(N)
    rules = (masks.local(B, L, device=device), masks.long(N, N, 0, [0, N], device=device))
    out: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for vis, acc in zip(rules, out):
            _sync(device)
            t0 = _clock(device)
            lzc, lzpos = joint.memory_stats(q, q, y, y, vis, q.shape[-1] ** -0.5, 1024)
            torch.autograd.grad((lzc + torch.where(torch.isfinite(lzpos), lzpos, 0)).sum(), q)
            _sync(device)
            acc.append(_clock(device) - t0)
    return out


def memory_child(kind: str, device: str) -> dict[str, float]:
    """One forward+backward of the joint memory statistics; peak memory growth in MiB."""
    from trime.memory import joint, masks

    dev = torch.device(device)
    N, M, d = 3072, 12288, 256
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(M, d, generator=g).to(dev).requires_grad_(True)  # (M, d) the group's stream
    values = torch.randint(4, 2000, (M,), generator=g).to(dev)
    queries = keys[M - N :]  # the last rank's rows: queries are keys (§3.2)
    targets = values[M - N :]
    vis = masks.long(N, M, M - N, [0, M])
    tlp, tln = torch.full((N,), -5.0, device=dev), torch.full((N,), 8.0, device=dev)
    scale = 1 / math.sqrt(d)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    t0 = _clock(dev)
    if kind == "dense":
        stats = joint.dense_memory_stats(queries, keys, values, targets, vis, scale)
    else:
        stats = joint.memory_stats(queries, keys, values, targets, vis, scale, chunk=1024)
    loss = -joint.combine(tlp, tln, *stats).sum()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = status_kib("VmHWM") * 1024 - base
    seconds = _clock(dev) - t0
    return {"peak_mib": peak / 2**20, "seconds": seconds, "loss": loss.item()}


def memory(device: torch.device) -> dict[str, dict[str, float]]:
    return memory_children(__file__, ("chunked", "dense"), device, torch.get_num_threads())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed rounds (each runs every criterion once)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU clock is process time)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the rows for bench/run as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.device)))
        return
    device = torch.device(args.device)
    if args.json:
        print(json.dumps(rows(device, args.reps)))
        return
    clock = "wall" if device.type == "cuda" else "process CPU"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    t = step_times(device, args.reps)
    print(f"\nstep time ({clock} seconds), forward + backward, B={B} × L={L} tokens, {args.reps} rounds")
    print("ratio = median over rounds of (criterion / ce of the same round); range = lowest..highest round")
    print(f"{'criterion':<12}{'median s':>10}{'ratio':>8}{'range':>14}{'goal':>8}")
    for c, goal in (("ce", ""), ("trime", "≤ 1.03"), ("trime_long", "≤ 1.10")):
        ratios = [a / b for a, b in zip(t[c], t["ce"])]
        span = f"{min(ratios):.3f}..{max(ratios):.3f}"
        print(f"{c:<12}{statistics.median(t[c]):>10.3f}{statistics.median(ratios):>8.3f}{span:>14}{goal:>8}")
    fastest = min(t["ce"])
    for name in ("memory: local", "memory: long"):
        best = min(t[name])
        print(
            f"{name:<14} alone (fastest of {args.reps}): {best * 1e3:7.1f} ms"
            f" = {best / fastest:.3f} × the fastest ce step"
        )
    m = memory(device)
    what = "peak allocated growth" if device.type == "cuda" else "peak RSS growth"
    print(f"\njoint memory statistics, 3072 queries × 12288 keys, d=256, forward + backward ({what})")
    print(f"{'formulation':<12}{'MiB':>10}{'seconds':>10}")
    for k in ("chunked", "dense"):
        print(f"{k:<12}{m[k]['peak_mib']:>10.1f}{m[k]['seconds']:>10.3f}")
    print(
        f"dense / chunked memory: {m['dense']['peak_mib'] / max(m['chunked']['peak_mib'], 1e-9):.1f}×; "
        f"loss difference {abs(m['dense']['loss'] - m['chunked']['loss']):.2e}"
    )


def rows(device, reps: int) -> list[dict]:
    """The same measurements as bench/run rows (see bench/common.py)."""
    t = step_times(device, reps)
    out = []
    for c, goal in (("trime", "≤ 1.03"), ("trime_long", "≤ 1.10")):
        ratio = statistics.median(a / b for a, b in zip(t[c], t["ce"]))
        what = "4 segments of memory" if c == "trime_long" else "local memory"
        out.append(
            {
                "bench": "loss",
                "measure": f"{c} step time ({what}) vs ce",
                "value": statistics.median(t[c]),
                "baseline": statistics.median(t["ce"]),
                "ratio": ratio,
                "goal": goal,
                "unit": "s",
            }
        )
    m = memory(device)
    out.append(
        {
            "bench": "loss",
            "measure": "peak memory, chunked vs dense joint softmax (12k-token memory)",
            "value": m["chunked"]["peak_mib"],
            "baseline": m["dense"]["peak_mib"],
            "ratio": m["chunked"]["peak_mib"] / max(m["dense"]["peak_mib"], 1e-9),
            "goal": "≤ 0.25",
            "unit": "MiB",
        }
    )
    return out


if __name__ == "__main__":
    main()
