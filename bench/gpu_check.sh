#!/usr/bin/env bash
# The GPU check (≤ 8 minutes on one GPU): parity with the CPU, faiss-gpu neighbours, and the speed of
# training (247M-shaped model, TRIME loss, bf16), evaluation with an external memory and MT decoding.
#
#     bench/gpu_check.sh [--cpu] [--json FILE]
#
# --cpu (or no GPU) runs the same checks on the CPU with tiny sizes (tests/test_gpu_check.py does).
# PYTHON picks the interpreter (default: python3). See bench/gpu_check.py for what each line means.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
