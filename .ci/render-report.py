"""Render a `robust report` page in headless chromium as a person would see it, and check it.

    python .ci/render-report.py [PAGE.html] [--width 1280] [--screenshot FILE.png]

Without PAGE, a tiny run is trained and reported in a temporary folder first. The page is copied to a
temporary folder with a small script added that, once everything has loaded, records whether every
<img> decoded (complete, natural size > 0) and whether anything reaches past the viewport's width;
chromium's --dump-dom prints the page after it ran, and this script reads the verdict from it. Chromium
also runs with networking off (a proxy that does not exist), so an external resource could not load.
The screenshot, when asked for, goes where --screenshot says (keep it out of the repository).
Exit 0 when every figure loaded and nothing overflows, 1 otherwise, 2 when chromium is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECK = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const images = [...document.images];
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const wide = [...document.body.querySelectorAll("*")].filter(e => {
    if (e.closest(".scroll") && !e.classList.contains("scroll")) return false;  // inside a scrolling box
    return e.getBoundingClientRect().right > width + 1;
  }).map(e => e.tagName + (e.id ? "#" + e.id : ""));
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({images: images.length, broken, wide, scrollWidth: document.documentElement.scrollWidth, width});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def tiny_report(folder: Path) -> Path:
    """Train a two-epoch width-4 run on 64 Fashion-MNIST images, evaluate it, report it."""
    robust = [sys.executable, "-m", "robust.cli"]
    run = folder / "run"
    subprocess.run(robust + ["train", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "2", "--batch-size", "32",
                             "--limit", "64", "--steps", "1", "--eps", "0.1", "--val-split", "0.1", "--val-limit", "32",
                             "--val-steps", "1", "--precision", "fp32", "--quiet", "--out", str(run)], check=True)
    subprocess.run(robust + ["eval", str(run), "--attack", "pgd2,fgsm", "--limit", "64", "--eps-sweep", "0,0.05,0.1",
                             "--json", f"{run}/", "--quiet"], check=True)
    page = folder / "report.html"
    subprocess.run(robust + ["report", str(run), "-o", str(page)], check=True)
    return page


def render(page: Path, width: int, screenshot: str | None) -> dict:
    browser = chromium()
    if browser is None:
        print("chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        checked = Path(tmp) / "page.html"
        checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                 f"--window-size={width},900", "--virtual-time-budget=5000", f"--user-data-dir={tmp}/profile"]
        dom = subprocess.run(flags + ["--dump-dom", checked.as_uri()], check=False, capture_output=True, text=True, timeout=120).stdout
        if screenshot:
            subprocess.run(flags + [f"--screenshot={Path(screenshot).resolve()}", checked.as_uri()],
                           check=False, capture_output=True, timeout=120)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.DOTALL)
    if not found:
        print("the check script left no verdict (the page did not finish loading)", file=sys.stderr)
        sys.exit(1)
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", help="the report to check  [default: report a tiny run first]")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    parser.add_argument("--screenshot", default=None, help="also write a screenshot here (outside the repository)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(args.page) if args.page else tiny_report(Path(tmp))
        verdict = render(page, args.width, args.screenshot)
    print(json.dumps(verdict))
    ok = verdict["images"] > 0 and not verdict["broken"] and not verdict["wide"] and verdict["scrollWidth"] <= verdict["width"]
    print(f"{'ok' if ok else 'FAILED'}: {verdict['images']} images, {len(verdict['broken'])} not loaded, "
          f"{len(verdict['wide'])} elements past the {verdict['width']}px viewport")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
