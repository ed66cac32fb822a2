#!/usr/bin/env bash
# The commands behind docs/explain.png: `trime explain` with the main job's TrimeLM_ext (local + long-term
# + external memory + kNN-LM, with the τ, λ and T the main job tuned on valid), on the first 2,000 valid
# tokens of the shakespeare corpus, and a headless-Chromium screenshot. Needs chromium,
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
python3 - "$OUT/report.html" "$OUT/report.json" "$OUT/explain.png" <<'EOF'
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

page, data, png = sys.argv[1:]
toks = json.load(open(data))["tokens"]
# in the dialogue after the cast list: the token memory helped most among those with several kinds of entries
pick = max(range(300, 900), key=lambda i: (len({e["m"] for e in toks[i]["mem"]}), toks[i]["lp"] - toks[i]["lp0"]))
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--hide-scrollbars"):
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
d.get("file://" + page)
time.sleep(0.5)
el = d.find_element(By.CSS_SELECTOR, f'#text .t[data-i="{pick}"]')
d.execute_script(
    "const b = document.getElementById('text');"
    "b.scrollTop += arguments[0].getBoundingClientRect().top - b.getBoundingClientRect().top - 120;",
    el,
)
el.click()
time.sleep(0.3)
d.save_screenshot(png)
d.quit()
try:  # 128 colours: a third of the size, no visible difference
    from PIL import Image

    Image.open(png).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(png, optimize=True)
except ImportError:
    pass
EOF
echo "screenshot in $OUT/explain.png"
