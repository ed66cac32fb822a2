"""Start-up time of a command given a GGUF file: loading it through its cache entry vs de-quantising the file.

    python bench/bench_hf_start.py [--gguf FILE] [--json]     # about a minute on 2 CPU cores

Each measure is a fresh process that imports trime and loads the model (trime.model.hf.load_hf: the
transformers model, the probe forward, the backbone), as every `trime` command given `--hf-model X.gguf`
does. Baseline: ``TRIME_CACHE=off`` (transformers de-quantises the GGUF file); measured: the same load
read from the file's cache entry (trime.hf_cache), converted once before the timed rounds. Rounds
alternate the order; each value is the median wall time over rounds of the whole process, of its
first load_hf, and of a second load_hf in the same process (transformers' lazy imports done: the load
alone). One CPU thread. Without --gguf, a random Llama-architecture model
(4 layers, d = 256, V = 32k, matrices in Q8_0) is written to a temporary GGUF file first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures writes the GGUF file


def write_gguf(path: Path, layers: int = 4, d: int = 256, vocab: int = 32000) -> Path:
    import torch
    import transformers

    from tests.fixtures import write_llama_gguf

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=768, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return write_llama_gguf(path, transformers.AutoModelForCausalLM.from_config(cfg))


def child(gguf: str) -> dict[str, float]:
    """In a fresh process: seconds to import trime's loader, of load_hf, and of load_hf again (the
    model classes transformers imports on first use are then imported: the load itself)."""
    t0 = time.perf_counter()
    from trime.model.hf import load_hf

    t1 = time.perf_counter()
    load_hf(gguf)
    t2 = time.perf_counter()
    load_hf(gguf)
    return {"import": t1 - t0, "load": t2 - t1, "again": time.perf_counter() - t2}


def run_child(gguf: Path, cache: str) -> dict[str, float]:
    env = {**os.environ, "TRIME_CACHE": cache, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, __file__, "--child", str(gguf)], env=env, capture_output=True, text=True, check=True
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {**out, "process": time.perf_counter() - t, "stderr": len(res.stderr)}


def rows(gguf: Path, cache_dir: Path, reps: int) -> list[dict]:
    first = run_child(gguf, str(cache_dir))  # converts the file into its cache entry
    times: dict[str, list[dict]] = {"cached": [], "direct": []}
    for r in range(reps):
        for kind in ("cached", "direct") if r % 2 else ("direct", "cached"):
            times[kind].append(run_child(gguf, str(cache_dir) if kind == "cached" else "off"))

    def med(kind, key):
        return statistics.median(t[key] for t in times[kind])

    size = gguf.stat().st_size / 2**20
    out = [
        row("hf_start", f"process start to loaded model, {gguf.name} ({size:.0f} MiB), cached vs GGUF file",
            med("cached", "process"), med("direct", "process"), "≤ 0.5", "s"),
        row("hf_start", "load_hf, first in the process (with transformers' lazy imports), cached vs GGUF file",
            med("cached", "load"), med("direct", "load"), "", "s"),
        row("hf_start", "load_hf again in the same process (the load alone), cached vs GGUF file",
            med("cached", "again"), med("direct", "again"), "", "s"),
        row("hf_start", "first load: conversion into the cache vs GGUF file", first["load"], med("direct", "load"),
            "", "s"),
    ]  # fmt: skip
    noise = sum(t["stderr"] for ts in times.values() for t in ts) + first["stderr"]
    out.append(row("hf_start", "bytes the loads wrote to stderr (quiet by default)", noise, None, "0", "B"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default="", help="a GGUF file to measure (default: a random 4-layer model)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds of each kind")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the rows for bench/run as JSON")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "gguf")):
        print(
            "bench_hf_start: transformers and gguf are needed (pip install trime[hf]); nothing measured",
            file=sys.stderr,
        )
        emit([], args.json)
        return
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(args.gguf) if args.gguf else write_gguf(Path(tmp) / "random-4x256.gguf")
        if not args.json:
            print(f"{gguf}: {gguf.stat().st_size / 2**20:.1f} MiB, one thread, {args.reps} rounds")
        emit(rows(gguf, Path(tmp) / "cache", args.reps), args.json)


if __name__ == "__main__":
    main()
