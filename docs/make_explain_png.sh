#!/usr/bin/env bash
# The commands behind docs/explain.png: `trime explain` with the main job's TrimeLM_ext (local + long-term
# + external memory + kNN-LM, with the τ, λ and T the main job tuned on valid), on the first 2,000 valid
# tokens of the shakespeare corpus, and a headless-Chromium screenshot (docs/screenshot.py). Needs chromium,
# chromium-driver and selenium; runs the main job first when RUN does not hold one (about 20 min).
set -euo pipefail
RUN=${1:-runs/reproduce}
OUT=${2:-/tmp/trime-explain}
mkdir -p "$OUT"
[ -f "$RUN/results.json" ] || trime reproduce --preset tiny --out "$RUN"
read -r T L I < <(python3 -c "
import json; r = json.load(open('$RUN/results.json'))
s = next(x for x in r['systems'] if x['name'] == 'TrimeLM_ext')['settings']
print(s['softmax_temp'], s['lmbda'], s['interp_temp'])")
trime explain "$RUN/data-bin" --path "$RUN/models/trime_ext/checkpoint_last" --gen-subset valid \
    --max-eval-tokens 2000 --context-window 128 --use-local --use-long --mem-size 4096 \
    --use-external --dstore-filename "$RUN/dstore/trime_ext" --indexfile "$RUN/dstore/trime_ext/knn.index.ip" \
    --k 64 --use-interp --softmax-temp "$T" --lmbda "$L" --interp-temp "$I" --dstore-data "$RUN/data-bin" \
    --out "$OUT/report.html" --json "$OUT/report.json"
# in the dialogue after the cast list: the token memory helped most among those with several kinds of entries
PICK=$(python3 -c "
import json; toks = json.load(open('$OUT/report.json'))['tokens']
print(max(range(300, 900), key=lambda i: (len({e['m'] for e in toks[i]['mem']}), toks[i]['lp'] - toks[i]['lp0'])))")
python3 "$(dirname "$0")/screenshot.py" "$OUT/report.html" "$OUT/explain.png" "#text .t[data-i=\"$PICK\"]" --scroll text
echo "screenshot in $OUT/explain.png"
