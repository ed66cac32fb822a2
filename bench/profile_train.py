"""Where a `trime train` step spends its time: torch.profiler over a few updates of a preset, by op.

    python bench/profile_train.py [--preset tiny] [--criterion ce] [--amp auto] [--runs 3] [--top 25]

Each run trains a fresh model on a synthetic corpus (bench/common.py) and profiles updates 3-6 (after
two updates of warm-up); times are per update, self CPU time (an op's own time, not its children's),
the median over runs. Ops are grouped so that the shares answer "what keeps the step off the matmul
peak": matmuls, casts, softmax pieces, attention kernels, layer norm, dropout, the optimizer, the rest
of the elementwise work, and the step's time outside every op (Python, dispatch, data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_corpus

from trime import config as C

WAIT, WARM, ACTIVE = 2, 1, 4  # profiler schedule, in updates
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm"),
    "casts": ("aten::copy_", "aten::_to_copy", "aten::to"),
    "softmax, log-softmax, logsumexp": (
        "aten::exp",
        "aten::exp_",
        "aten::sub",
        "aten::sub_",
        "aten::amax",
        "aten::logsumexp",
        "aten::log_",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
    ),  # fmt: skip
    "attention kernels (SDPA)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "dropout masks": ("aten::random_", "aten::ge"),
    "optimizer, clipping": ("aten::_fused_adamw_", "aten::_foreach_mul_", "aten::linalg_vector_norm"),
}


def group_of(op: str) -> str:
    if op.startswith("ProfilerStep"):
        return "outside ops (Python, dispatch, data)"
    for name, ops in GROUPS.items():
        if op in ops:
            return name
    return "other ops (elementwise, indexing, reductions)"


def one_run(preset: str, criterion: str, amp: str, data: Path, root: Path) -> tuple[dict[str, float], float]:
    """Self CPU ms per update by op, and tokens/s of the profiled updates."""
    from trime.train import fit

    p = C.load_preset(preset)
    model_cfg = C.build(C.ModelConfig, p["model"])
    cfg = C.build(
        C.TrainConfig,
        p["train"],
        {"data": str(data), "save_dir": str(root), "max_update": WAIT + WARM + ACTIVE + 1, "max_time": 0.0},
        {"log_interval": 1, "save_interval_updates": 0, "criterion": criterion, "device": "cpu", "amp": amp},
        {"ce_warmup_updates": 0, "keep_order": criterion == "trime_long"},
    )
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=WAIT, warmup=WARM, active=ACTIVE))
    prof.start()
    run = fit(model_cfg, cfg, on_step=lambda _: prof.step())
    prof.stop()
    ms = {e.key: e.self_cpu_time_total / ACTIVE / 1e3 for e in prof.key_averages()}
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in logs if x["kind"] == "train"][WAIT + WARM : WAIT + WARM + ACTIVE]
    return ms, statistics.median(rates)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--criterion", default="ce")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    runs, rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_corpus(Path(tmp), 400_000, 20_000)
        for r in range(a.runs):
            ms, rate = one_run(a.preset, a.criterion, a.amp, data, Path(tmp) / f"run{r}")
            runs.append(ms)
            rates.append(rate)
    ops = {k: statistics.median(m.get(k, 0.0) for m in runs) for k in set().union(*runs)}
    total = sum(ops.values())
    groups = defaultdict(float)
    for k, v in ops.items():
        groups[group_of(k)] += v
    print(f"{a.preset}, criterion {a.criterion}, amp {a.amp}, {torch.get_num_threads()} threads: "
          f"{statistics.median(rates):.0f} tokens/s, {total:.1f} ms of self CPU time per update "
          f"(medians of {a.runs} runs)")  # fmt: skip
    print("\n| group | ms/update | share |\n|---|---:|---:|")
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {100 * v / total:.1f}% |")
    print("\n| op | ms/update | share |\n|---|---:|---:|")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"| {k} | {v:.1f} | {100 * v / total:.1f}% |")


if __name__ == "__main__":
    main()
