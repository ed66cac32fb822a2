"""bench/gpu_check.sh runs: its CPU path (tiny sizes) passes every check it can make without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "check.json"
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [x for x in res.stdout.splitlines() if x.startswith("gpu_check: ")]
    assert [x.split(":")[1].strip() for x in lines] == ["device", "parity", "faiss-gpu", "train", "eval", "mt", "done"]
    got = json.loads(out.read_text())
    assert got["parity"]["ok"] and got["parity"]["loss_diff"] == 0.0
    assert got["faiss_gpu"]["skipped"] and got["train"]["tokens_per_s"] > 0 and 0 < got["train"]["mfu"] < 1
    assert got["eval"]["ratio"] > 0 and got["mt"]["ratio"] > 0
