"""Cost of TRIME on a Hugging Face causal LM: eval with local memory, generation, training step, token part memory.

    python bench/bench_hf.py [--json]        # about a minute on 2 CPU cores; uses CUDA when present

One tiny random Llama-architecture model (4 layers, d = 256, V = 32k, built from a config, no hub), in one run:
1. scored tokens/s of evaluation with local memory (trime.evaluate.Scorer on an HFBackbone: base model,
   chunked LM-head token part on the scored rows, local memory) against the model's plain forward
   (``model(input_ids).logits``) over the same windows (goal ≥ 0.9×);
2. new tokens/s of greedy generation without memory (trime.generate.lm.LMDecoder, windows of L with
   context CTX, so the window slides every L − CTX tokens) with the model's own KV cache against
   re-running the window for every token (``--no-kv-cache``); best of the rounds, the order alternating.
   With V = 32k the LM head (run twice per step by LMDecoder._rows: for log p and for log Z) is most of
   a cached step on CPU, which keeps the ratio near 2 at this size;
3. one training step (forward + backward) with the TRIME loss against the CE loss, both through
   trime.losses on the same HFBackbone and batch (goal ≤ 1.05×); the model's own ``labels=`` loss step
   is shown as a second baseline. Rounds alternate the order; ratio = median over rounds. On CPU the
   clock is process CPU time with one thread (wall time on a shared machine mostly measures the
   neighbours); on CUDA wall time after a synchronize;
4. peak memory of the chunked token part (HFHead.target_logp, recomputing chunks in backward) against
   the full-logits one (a single chunk) for 2,048 rows on a 50k vocabulary, forward + backward into h
   and the head weight, each in a fresh subprocess: growth of the peak resident set (VmHWM) on CPU,
   of torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, memory_children, reset_peak_rss, row, status_kib

V, D, LAYERS, L, CTX = 32000, 256, 4, 256, 128


def build(device, vocab: int = V):
    """A randomly initialised tiny Llama-architecture causal LM wrapped as an HFBackbone."""
    import transformers

    from trime.model.hf import HFBackbone

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=688,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=L,
    )
    torch.manual_seed(0)
    return HFBackbone(transformers.AutoModelForCausalLM.from_config(cfg).to(device))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device) -> float:
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def eval_speed(bb, device, n_tokens: int, reps: int) -> tuple[float, float]:
    """(scored tok/s with local memory, scored tok/s of the plain forward) over the same windows; best of reps."""
    from trime import config as C
    from trime.data.batching import Batch
    from trime.evaluate import Scorer

    g = torch.Generator().manual_seed(1)
    n_win = max(1, n_tokens // (L - CTX))
    stream = torch.randint(1, V, (n_win, L + 1), generator=g).to(device)  # (windows, L + 1)
    inputs, labels = stream[:, :-1], stream[:, 1:]
    batch = 4
    cfg = C.build(C.EvalConfig, {"use_local": True, "device": str(device)})
    scorer = Scorer(bb.eval(), cfg, dim=bb.dim, pad=0)  # pad 0 never occurs in the stream
    n_scored = n_win * (L - CTX)
    best = {"local": float("inf"), "forward": float("inf")}
    for r in range(reps + 1):
        for kind in ("local", "forward") if r % 2 else ("forward", "local"):
            _sync(device)
            t0 = _clock(device)
            with torch.no_grad():
                for i in range(0, n_win, batch):
                    x, y = inputs[i : i + batch], labels[i : i + batch]
                    if kind == "local":
                        scorer.score(Batch(x, y, [CTX] * len(x), [L - CTX] * len(x)))
                    else:
                        bb.model(input_ids=x)  # computes the logits of every position
            _sync(device)
            if r:
                best[kind] = min(best[kind], _clock(device) - t0)
    return n_scored / best["local"], n_scored / best["forward"]


def generate_speed(bb, device, n_new: int, reps: int) -> tuple[float, float]:
    """(new tok/s with the KV cache, new tok/s re-running the window) of greedy generation without memory
    after a prompt of L / 4 tokens; best of reps (a round 0 of 8 tokens warms up)."""
    from trime import config as C
    from trime.generate.lm import LMDecoder, stream

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, V, (L // 4,), generator=g).tolist()
    best = {True: float("inf"), False: float("inf")}
    for r in range(reps + 1):
        for cached in (True, False) if r % 2 else (False, True):
            cfg = C.GenerateConfig(path="unused", context_window=CTX, device=str(device), amp="none",
                                   stop_at_eos=False, max_new_tokens=n_new if r else 8, kv_cache=cached)  # fmt: skip
            decoder = LMDecoder(bb.eval(), cfg, dim=bb.dim, pad=None, eos=2, window=L)
            _sync(device)
            t0 = _clock(device)
            n = sum(1 for _ in stream(decoder, prompt))
            _sync(device)
            if r:
                best[cached] = min(best[cached], (_clock(device) - t0) / n)
    return 1 / best[True], 1 / best[False]


def step_times(bb, device, reps: int, B: int = 4) -> dict[str, list[float]]:
    """Forward + backward seconds of each criterion for ``reps`` rounds on one batch of B × L tokens."""
    from trime.losses import LossSettings, compute_loss

    bb.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(2, V, (B, L + 1), generator=g).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def run(kind):
        if kind == "hf labels=":
            return bb.model(input_ids=x, labels=x).loss
        res = compute_loss(LossSettings(kind, pad=-1), bb(inputs), targets, bb.head)
        return res.loss / res.n_targets

    kinds = ["ce", "trime", "hf labels="]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(reps + 1):
        for k in kinds if r % 2 else kinds[::-1]:
            _sync(device)
            t0 = _clock(device)
            run(k).backward()
            _sync(device)
            if r:
                times[k].append(_clock(device) - t0)
            bb.zero_grad(set_to_none=True)
    return times


def memory_child(kind: str, device: str) -> dict[str, float]:
    """One forward + backward of the token part for 2,048 rows on a 50k vocabulary; peak growth in MiB."""
    from trime.model.hf import HFHead

    dev = torch.device(device)
    N, vocab = 2048, 50000
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the same head in both child processes: equal losses check the chunked path
    lm_head = torch.nn.Linear(D, vocab, bias=False).to(dev)
    h = torch.randn(N, D, generator=g).to(dev).requires_grad_(True)  # (N, d)
    y = torch.randint(0, vocab, (N,), generator=g).to(dev)
    head = HFHead(lm_head, chunk_rows=N if kind == "full" else None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    t0 = _clock(dev)
    tlp, log_z = head.target_logp(h, y)
    loss = -(tlp.sum() + 0.1 * log_z.sum())
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = status_kib("VmHWM") * 1024 - base
    return {"peak_mib": peak / 2**20, "seconds": _clock(dev) - t0, "loss": loss.item(), "chunk_rows": head.chunk_rows}


def memory(device: torch.device) -> dict[str, dict[str, float]]:
    return memory_children(__file__, ("chunked", "full"), device, torch.get_num_threads())


def rows(device: torch.device, reps: int, n_tokens: int, n_new: int) -> list[dict]:
    bb = build(device)
    local, forward = eval_speed(bb, device, n_tokens, reps)
    out = [
        row(
            "hf",
            "eval with local memory, scored tok/s (baseline: the model's plain forward)",
            local,
            forward,
            "≥ 0.9",
            "tok/s",
        )
    ]
    cached, rerun = generate_speed(bb, device, n_new, reps)
    out.append(
        row(
            "hf",
            "greedy generation new tok/s with the KV cache (baseline: re-running the window)",
            cached,
            rerun,
            "",
            "tok/s",
        )
    )
    t = step_times(bb, device, reps)
    ratio = statistics.median(a / b for a, b in zip(t["trime"], t["ce"]))
    out.append(
        row(
            "hf",
            "trime step time vs ce step (same model and batch)",
            statistics.median(t["trime"]),
            statistics.median(t["ce"]),
            "≤ 1.05",
            "s",
            ratio=ratio,
        )
    )
    ratio = statistics.median(a / b for a, b in zip(t["ce"], t["hf labels="]))
    out.append(
        row(
            "hf",
            "trime ce step vs the model's own labels= loss step",
            statistics.median(t["ce"]),
            statistics.median(t["hf labels="]),
            "",
            "s",
            ratio=ratio,
        )
    )
    m = memory(device)
    out.append(
        row(
            "hf",
            "peak memory, chunked vs full-logits token part (2048 rows, V = 50k)",
            m["chunked"]["peak_mib"],
            m["full"]["peak_mib"],
            "",
            "MiB",
        )
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed rounds")
    p.add_argument("--tokens", type=int, default=4096, help="scored tokens per evaluation pass")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per generation round")
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
    if importlib.util.find_spec("transformers") is None:
        print("bench_hf: transformers is not installed (pip install trime[hf]); nothing measured", file=sys.stderr)
        emit([], args.json)
        return
    if not args.json:
        print(
            f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
            f"Llama-architecture {LAYERS} layers, d = {D}, V = {V}, windows of {L} (context {CTX})"
        )
    emit(rows(device, args.reps, args.tokens, args.new_tokens), args.json)


if __name__ == "__main__":
    main()
