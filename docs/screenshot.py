"""A headless-Chromium screenshot of a `trime explain` page with one token clicked (the docs' pictures).

    python3 docs/screenshot.py PAGE PNG SELECTOR [--height H] [--scroll ID]

SELECTOR is the CSS selector of the token to click; ``--scroll ID`` first scrolls the box of that id so
that the token sits 120 px below its top. Needs chromium, chromium-driver and selenium; the PNG is
reduced to 128 colours when Pillow is there (a third of the size, no visible difference).
"""

import argparse
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page")
    ap.add_argument("png")
    ap.add_argument("selector")
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--scroll", default="")
    a = ap.parse_args()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    size = f"--window-size=1400,{a.height}"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", size, "--hide-scrollbars"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        d.get(Path(a.page).resolve().as_uri())
        time.sleep(0.5)
        el = d.find_element(By.CSS_SELECTOR, a.selector)
        if a.scroll:
            d.execute_script(
                "const b = document.getElementById(arguments[1]);"
                "b.scrollTop += arguments[0].getBoundingClientRect().top - b.getBoundingClientRect().top - 120;",
                el,
                a.scroll,
            )
        el.click()
        time.sleep(0.3)
        d.save_screenshot(a.png)
    finally:
        d.quit()
    try:
        from PIL import Image

        Image.open(a.png).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(a.png, optimize=True)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
