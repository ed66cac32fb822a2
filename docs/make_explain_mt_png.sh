#!/usr/bin/env bash
# The commands behind docs/explain_mt.png: `trime explain` on a translation model, the main translation job's
# Transformer (CE) with its training-set datastore as kNN-MT memory (k, λ and T as the job tuned them on
# valid), on one test sentence's beam hypothesis, and a headless-Chromium screenshot with a target token
# clicked (docs/screenshot.py). Needs chromium, chromium-driver and selenium; runs `trime mt reproduce`
# first when RUN does not hold one (about an hour on 2 CPU cores).
set -euo pipefail
RUN=${1:-runs/mt-reproduce}
OUT=${2:-/tmp/trime-explain-mt}
SENTENCE=${3:-363}  # the test pair explained
TOKEN=${4:-5}  # the target token clicked in the screenshot
mkdir -p "$OUT"
[ -f "$RUN/results.json" ] || trime mt reproduce --out "$RUN"
read -r K L T M < <(python3 -c "
import json; r = json.load(open('$RUN/results.json'))
s, c = next(x for x in r['systems'] if x['name'] == '+ kNN-MT')['settings'], r['config']['reproduce']
print(c['knn_k'], s['lmbda'], s['knn_temp'], c['knn_metric'])")
trime explain "$RUN/data-bin" --path "$RUN/models/vanilla/checkpoint_best" --gen-subset test --sentence "$SENTENCE" \
    --beam 5 --use-interp --dstore-filename "$RUN/dstore/vanilla" --indexfile "$RUN/dstore/vanilla/knn.index.$M" \
    --k "$K" --probe 32 --lmbda "$L" --interp-temp "$T" --out "$OUT/report.html" --json "$OUT/report.json"
python3 "$(dirname "$0")/screenshot.py" "$OUT/report.html" "$OUT/explain_mt.png" "#tgt .t[data-i=\"$TOKEN\"]" \
    --height 1000
echo "screenshot in $OUT/explain_mt.png"
