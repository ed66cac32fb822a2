"""The GPU check: parity with the CPU, faiss-gpu neighbours, and speed of training, evaluation with an
external memory and MT decoding. Run through bench/gpu_check.sh (≤ 8 minutes on one GPU).

    bench/gpu_check.sh [--cpu] [--json FILE]

On a CUDA machine:
1. parity: the micro preset trained 8 updates with the TRIME loss (fp32) on the CPU and on the GPU,
   every logged loss equal to 1e-3; the CPU-trained checkpoint's evaluation perplexity (local memory)
   on both devices equal to 1e-3 (relative);
2. faiss-gpu: an IVF-PQ index searched on the CPU and on the GPU returns the same neighbours
   (share of equal ids ≥ 0.99; ties may swap); skipped, and said so, without faiss-gpu;
3. training: tokens/s and MFU of the 247M-shaped model (configs/wt103_247m_trime.toml: 16 × 1024,
   adaptive input/softmax, L = 3072) with the TRIME loss under bf16 autocast, forward + backward +
   AdamW; MFU = 6·(parameters)·tokens/s + attention (6·layers·L·d per token) over the card's dense
   bf16 peak (the table below, else a measured bf16 matmul);
4. evaluation: scored tokens/s of the tiny preset's model with an external IVF-PQ memory (k = 64)
   against memory-free evaluation, same run;
5. MT: beam-5 decoding sentences/s with kNN-MT against vanilla (mt_cpu preset), same run.

``--cpu`` (or no GPU) runs every step on the CPU with tiny sizes (the micro and mt_micro presets, flat
indexes: too few keys to train IVF-PQ), parity comparing the CPU with
itself: what tests/test_gpu_check.py runs so the script is known to work. Prints one line per
check; exits 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_corpus

from trime import config as C

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def say(name: str, text: str) -> None:
    print(f"gpu_check: {name}: {text}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def parity(root: Path, dev: torch.device) -> dict:
    """Train the micro preset on the CPU and on ``dev``; evaluate the CPU run on both."""
    from trime.evaluate import evaluate
    from trime.train import fit

    data = synthetic_corpus(root, 6_000, 1_000, vocab=300)
    preset = C.load_preset("micro")
    logs, ppl = {}, {}
    for side in ("cpu", str(dev)):
        cfg = C.build(C.TrainConfig, preset["train"], {"data": str(data), "save_dir": str(root / f"run-{side}"),
                      "max_update": 8, "max_time": 0.0, "criterion": "trime", "device": side, "amp": "none",
                      "save_interval_updates": 0, "seed": 1})  # fmt: skip
        run = fit(C.build(C.ModelConfig, preset["model"]), cfg)
        lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        logs[side] = [x["loss"] for x in lines if x.get("kind") == "train"]
    for side in ("cpu", str(dev)):
        ecfg = C.build(C.EvalConfig, {"data": str(data), "path": str(root / "run-cpu"), "device": side, "amp": "none",
                                      "context_window": 16, "use_local": True, "max_eval_tokens": 1000})  # fmt: skip
        ppl[side] = evaluate(ecfg).ppl
    a, b = logs["cpu"], logs[str(dev)]
    loss_diff = max(abs(x - y) for x, y in zip(a, b)) if a and len(a) == len(b) else math.inf
    ppl_diff = abs(ppl["cpu"] - ppl[str(dev)]) / ppl["cpu"]
    ok = loss_diff <= 1e-3 and ppl_diff <= 1e-3
    say("parity", f"{'ok' if ok else 'FAILED'}: {len(a)} losses, max |cpu − {dev}| {loss_diff:.2e}; eval ppl "
        f"{ppl['cpu']:.4f} (cpu) vs {ppl[str(dev)]:.4f} ({dev}), relative {ppl_diff:.2e} (tolerance 1e-3)")  # fmt: skip
    return {"ok": ok, "loss_diff": loss_diff, "ppl_rel_diff": ppl_diff}


def faiss_gpu(small: bool) -> dict:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        say("faiss-gpu", "skipped (this faiss has no GPU support, or sees no GPU)")
        return {"skipped": True}
    rng = np.random.default_rng(0)
    R, d, n = (20_000, 64, 200) if small else (500_000, 256, 5_000)
    keys = rng.standard_normal((R, d)).astype(np.float32)
    queries = rng.standard_normal((n, d)).astype(np.float32)
    cpu = faiss.index_factory(d, f"IVF{256 if small else 2048},PQ{16 if small else 64}", faiss.METRIC_INNER_PRODUCT)
    cpu.train(keys)
    cpu.add(keys)
    faiss.extract_index_ivf(cpu).nprobe = 16
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    gpu.nprobe = 16
    _, a = cpu.search(queries, 64)
    _, b = gpu.search(queries, 64)
    same = float(np.mean([len(np.intersect1d(x, y)) / 64 for x, y in zip(a, b)]))
    say("faiss-gpu", f"{'ok' if same >= 0.99 else 'FAILED'}: {100 * same:.2f}% of the CPU index's neighbours")
    return {"skipped": False, "ok": same >= 0.99, "same": same}


def peak_bf16(dev: torch.device) -> tuple[float, str]:
    """(dense bf16 FLOP/s, where the number comes from)."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, flops in PEAK_BF16.items():
            if key in name:
                return flops, f"{name} spec sheet"
    n = 1024 if dev.type == "cpu" else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    a @ a
    sync(dev)
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    sync(dev)
    return 3 * 2 * n**3 / (time.perf_counter() - t), "a measured bf16 matmul"


def training(dev: torch.device, small: bool) -> dict:
    """Tokens/s and MFU of forward + TRIME loss + backward + AdamW under bf16 autocast."""
    from trime.device import autocast
    from trime.losses import compute_loss
    from trime.model.transformer import build_model

    preset = C.load_preset("micro" if small else "wt103_247m_trime")
    over = {"dropout": 0.0} | ({"vocab_size": 300} if small else {"vocab_size": 267_744})
    cfg = C.build(C.ModelConfig, preset["model"], over)
    L = 32 if small else 3072
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(4, cfg.vocab_size, (1, L), device=dev)
    targets = torch.roll(tokens, -1, 1)
    steps, warm = (3, 1) if small else (10, 3)
    for i in range(warm + steps):
        if i == warm:
            sync(dev)
            t = time.perf_counter()
        with autocast(dev, torch.bfloat16):
            loss = compute_loss("trime", model(tokens), targets, model.head).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    rate = steps * L / (time.perf_counter() - t)
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * params + 6 * cfg.n_layers * L * cfg.d_model
    peak, source = peak_bf16(dev)
    mfu = rate * flops_per_token / peak
    say("train", f"{cfg.n_layers}×{cfg.d_model}, {params / 1e6:.1f}M parameters, L = {L}, TRIME loss, bf16: "
        f"{rate:.0f} tokens/s, MFU {100 * mfu:.1f}% (peak {peak / 1e12:.3g} TFLOP/s, {source})")  # fmt: skip
    return {"tokens_per_s": rate, "mfu": mfu, "params": params}


def evaluation(root: Path, dev: torch.device, small: bool) -> dict:
    """Scored tokens/s with an external IVF-PQ memory (k = 64) against memory-free, same model and run."""
    from bench_eval import setup

    from trime.datastore_build import build_datastore
    from trime.evaluate import evaluate
    from trime.memory.index import build_index

    preset = C.load_preset("micro" if small else "tiny")
    n_train, n_eval = (8_000, 500) if small else (1_000_000, 50_000)
    data, ckpt = setup(root, preset, n_train, n_eval)
    L = preset["model"]["max_positions"]
    build_datastore(C.DatastoreConfig(data=str(data), path=str(ckpt), out=str(root / "ds"), context_window=L // 2,
                                      device=str(dev), amp="none"))  # fmt: skip
    ivf = {} if small else {"n_lists": 1024}  # tiny sizes: a flat index (too few keys to train IVF-PQ)
    index = build_index(root / "ds", root / "ds" / "knn.index.ip", metric="ip", **ivf)
    base = {"data": str(data), "path": str(ckpt), "device": str(dev), "amp": "none", "context_window": L // 2,
            "batch_size": 8, "max_eval_tokens": n_eval}  # fmt: skip
    ext = {"use_external": True, "dstore": str(root / "ds"), "indexfile": str(index), "k": 64}
    evaluate(C.build(C.EvalConfig, base, {"max_eval_tokens": 500}))  # warm-up
    rates = {}
    for name, flags in (("memory-free", {}), ("external", ext)):
        sync(dev)
        t = time.perf_counter()
        n = evaluate(C.build(C.EvalConfig, base, flags)).n_tokens
        sync(dev)
        rates[name] = n / (time.perf_counter() - t)
    ratio = rates["external"] / rates["memory-free"]
    kind = "flat" if small else "IVF-PQ"
    say("eval", f"{preset['model']['arch']} model, external {kind} k = 64: {rates['external']:.0f} tokens/s, {ratio:.2f}× memory-free "
        f"({rates['memory-free']:.0f} tokens/s)")  # fmt: skip
    return {"tokens_per_s": rates, "ratio": ratio}


def mt_decoding(root: Path, dev: torch.device, small: bool) -> dict:
    from bench_mt_memory import checkpoint, corpus

    from trime.checkpoint import load_model, model_fingerprint
    from trime.data.pairs import load_pair_split
    from trime.datastore_build import build_mt_datastore
    from trime.generate.beam import BeamConfig
    from trime.memory.index import build_index
    from trime.mt_generate import decode, memory_combiner

    data = corpus(root, 300 if small else 20_000)
    ckpt = checkpoint(root, data, "mt_micro" if small else "mt_cpu")
    model, mcfg, _ = load_model(ckpt, task="mt", device=dev)
    ds = build_mt_datastore(C.MTDatastoreConfig(data=str(data), path=str(ckpt), out=str(root / "mtds"),
                                                device=str(dev)))  # fmt: skip
    rows = int(np.load(Path(ds) / "vals.npy", mmap_mode="r").shape[0])
    ivf = {} if small else {"n_lists": 64, "train_size": rows}
    index = build_index(ds, root / "mtds" / "knn.index.l2", metric="l2", **ivf)
    valid, n = load_pair_split(data, "valid"), 8 if small else 256
    ids, beam = np.arange(n), BeamConfig(beam=5, max_len_a=1.2, max_len_b=10)
    cfg = C.TranslateConfig(data=str(data), path=str(ckpt), dstore=str(ds), indexfile=str(index), knn_mode="knn",
                            k=16, lmbda=0.3, knn_temp=10.0, probe=8, device=str(dev))  # fmt: skip
    combiner = memory_combiner(cfg, model, mcfg, model_fingerprint(ckpt))
    decode(model, valid, ids[:4], beam, device=dev)  # warm-up
    rates = {}
    for name, kw in (("vanilla", {}), ("kNN-MT", {"combiner": combiner})):
        sync(dev)
        t = time.perf_counter()
        decode(model, valid, ids, beam, device=dev, **kw)
        sync(dev)
        rates[name] = n / (time.perf_counter() - t)
    ratio = rates["kNN-MT"] / rates["vanilla"]
    say("mt", f"beam 5, kNN-MT k = 16: {rates['kNN-MT']:.1f} sentences/s, {ratio:.2f}× vanilla "
        f"({rates['vanilla']:.1f} sentences/s)")  # fmt: skip
    return {"sentences_per_s": rates, "ratio": ratio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU path with tiny sizes (what the test runs)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    small = dev.type == "cpu"
    say("device", f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU (tiny sizes)'}, "
        f"torch {torch.__version__}")  # fmt: skip
    t0, out = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, step in (
            ("parity", lambda r: parity(r, dev)),
            ("faiss_gpu", lambda r: faiss_gpu(small)),
            ("train", lambda r: training(dev, small)),
            ("eval", lambda r: evaluation(r, dev, small)),
            ("mt", lambda r: mt_decoding(r, dev, small)),
        ):
            (root / name).mkdir()
            out[name] = step(root / name)
    failed = [k for k, v in out.items() if v.get("ok") is False]
    say("done", f"{time.perf_counter() - t0:.0f} s, {'FAILED: ' + ', '.join(failed) if failed else 'all checks ok'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(dev), **out}, indent=1, default=float))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
