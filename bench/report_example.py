"""The docs' example of `tera-plan show --html`: tiny-moe on 8 H100 (search, top 3).

  python bench/report_example.py [--out-dir docs] [--model M --cluster C --gpus N
                                  --global-batch B --seq-len S] [--no-screenshot]

Writes <out-dir>/report-example.html and, where Chromium is installed, the screenshot
<out-dir>/report-example.png of the whole page (taken at a tall window, the empty
background below the page trimmed). Prints the page size and any console message, and
exits 1 if the page logs one or the screenshot is blank. Other problems are accepted
for checking size and readability, e.g. deepseek-v3 on 2,048 H800:

  python bench/report_example.py --out-dir /tmp/ds --model deepseek-v3 --cluster hgx-h800 \
      --gpus 2048 --global-batch 15360 --seq-len 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.image import imread, imsave

from tera.planner.report import render_html
from tera.planner.report.browser import find_chromium, ink, load
from tera.planner.solve import search

WIDTH, TALL = 1100, 6000  # px; the page is trimmed to its content afterwards
MARGIN = 24  # px of background kept under the page


def trim_bottom(png: Path) -> int:
    """Cut the rows of plain background below the page; returns the height kept."""
    image = imread(png)
    background = image[-1, 0]
    rows = np.nonzero(np.any(np.abs(image - background) > 1e-3, axis=(1, 2)))[0]
    height = min(len(image), (rows[-1] + 1 if len(rows) else 0) + MARGIN)
    imsave(png, image[:height])
    return height


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parents[1] / "docs")
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--cluster", default="dgx-h100")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-screenshot", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    result = search(
        args.model, args.cluster, args.global_batch, args.seq_len, gpus=args.gpus, top=3
    )
    plan = result.to_plan()
    searched = time.perf_counter() - start
    page = render_html(plan)
    rendered = time.perf_counter() - start - searched
    args.out_dir.mkdir(parents=True, exist_ok=True)
    html = args.out_dir / "report-example.html"
    html.write_text(page, encoding="utf-8")
    print(
        f"{html}: {len(page.encode()) / 2**20:.2f} MiB; search {searched:.1f} s, "
        f"render {rendered:.1f} s; layout {plan.layout}"
    )
    if args.no_screenshot:
        return 0
    if find_chromium() is None:
        print("no chromium: screenshot skipped")
        return 0
    png = args.out_dir / "report-example.png"
    loaded = load(html, png, WIDTH, TALL)
    height = trim_bottom(png)
    shown = ink(png)
    print(f"{png}: {WIDTH} x {height} px, {shown.share:.1%} inked, {shown.colours} colours")
    for message in loaded.console:
        print(f"console: {message}")
    return 1 if loaded.console or shown.blank() else 0


if __name__ == "__main__":
    sys.exit(main())
