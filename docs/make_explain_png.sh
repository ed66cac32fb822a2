#!/usr/bin/env bash
# The commands behind docs/explain.png: a small TRIME model on the shakespeare corpus, its training-set
# datastore, `trime explain` on the start of the valid split, and a headless-Chromium screenshot.
# CPU only; about half an hour on 2 busy cores. Needs chromium, chromium-driver and selenium.
set -euo pipefail
W=${1:-/tmp/trime-explain-demo}
mkdir -p "$W"
trime data fetch shakespeare --out "$W/corpus"
trime data prepare "$W/corpus" --out "$W/data-bin"
trime train "$W/data-bin" --preset tiny --criterion trime --decoder-layers 2 --decoder-embed-dim 128 \
    --decoder-ffn-embed-dim 512 --max-positions 128 --tokens-per-sample 128 --max-tokens 2048 --lr 2e-3 \
    --warmup-updates 50 --dropout 0.0 --adaptive-softmax-dropout 0 --max-time 16 --save-interval-updates 50 \
    --save-dir "$W/run" --amp none
trime datastore build "$W/data-bin" --path "$W/run" --gen-subset train --context-window 64 --out "$W/dstore" \
    --amp none
trime index build "$W/dstore" --train-size 50000
trime explain "$W/data-bin" --path "$W/run" --gen-subset valid --max-eval-tokens 2000 --context-window 64 \
    --use-local --use-long --mem-size 512 --use-external --dstore-filename "$W/dstore" \
    --indexfile "$W/dstore/knn.index.ip" --k 64 --use-interp --lmbda 0.2 --dstore-data "$W/data-bin" \
    --out "$W/report.html" --json "$W/report.json"
python3 - "$W/report.html" "$W/report.json" "$W/explain.png" <<'EOF'
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
echo "screenshot in $W/explain.png"
