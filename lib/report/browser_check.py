"""Open the built report in headless Chromium as a reader would: start at the index,
follow every internal link, and fail on a page that does not load, a broken link, an
image that did not render (``naturalWidth == 0``), raw ``$$`` math left in the text after
MathJax ran, anything loaded from a network, known log noise in the outputs (TensorFlow
start-up lines, kernel chatter, machine paths), and a file or folder others cannot read.
Saves a full-page screenshot per page (the whole page, not the window).

Usage: ``python -m lib.report.browser_check --site _site --screenshots build/screenshots``
Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver",)


def _find(cands, name):
    for c in cands:
        if Path(c).exists():
            return c
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (looked in {', '.join(cands)} and PATH); "
                            f"install Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")


def make_driver(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _find(CHROMIUM_CANDIDATES, "chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}", "--allow-file-access-from-files"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(_find(DRIVER_CANDIDATES, "chromedriver")), options=opts)


# What a reader must never see on a page: TensorFlow/absl start-up lines, kernel chatter, warnings that
# print where the kit or a temporary folder lives on the building machine.
LOG_NOISE = {
    "TensorFlow start-up (oneDNN)": r"oneDNN custom operations are on",
    "TensorFlow start-up (CPU features)": r"This TensorFlow binary is optimized",
    "TensorFlow start-up (cuDNN/cuFFT/cuBLAS)": r"Unable to register cu(DNN|FFT|BLAS) factory",
    "absl log start-up": r"WARNING: All log messages before absl::InitializeLog",
    "TensorFlow C++ log line": r"^[EWI]\d{4} [\d:.]+\s+\d+ \w+\.cc:\d+\]",
    "kernel chatter": r"Kernel is running over TCP without encryption|KeyboardInterrupt caught in kernel",
    "HDF5 legacy warning": r"This file format is considered legacy",
    "machine path (site-packages)": r"/(site|dist)-packages/",
    "machine path (kernel temporary folder)": r"/tmp/ipykernel_\d+|/var/folders/|\\AppData\\Local\\Temp",
}
_NOISE = [(label, re.compile(rx, re.M)) for label, rx in LOG_NOISE.items()]


def _machine_paths() -> list[tuple[str, re.Pattern]]:
    """This machine's own folders (the checkout, the home folder): a page that prints them leaks where
    it was built and means nothing to a reader elsewhere."""
    from lib import config

    out = []
    for label, p in (("the checkout", config.ROOT), ("the home folder", Path.home())):
        p = str(p).rstrip("/")
        if len(p) > 1:
            out.append((f"machine path ({label})", re.compile(re.escape(p + "/"))))
    return out

# the page's text outside code, after MathJax (if any) has typeset it
JS_WAIT_MATH = """
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.Hub && MathJax.Hub.Queue) { MathJax.Hub.Queue(() => done(true)); } else { done(false); }
"""
JS_PROSE = """
const out = [];
const walk = document.createTreeWalker(document.body || document.documentElement, NodeFilter.SHOW_TEXT, {acceptNode: n =>
  n.parentElement && n.parentElement.closest('pre, code, script, style, textarea, .input_area')
    ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
while (walk.nextNode()) out.push(walk.currentNode.nodeValue);
return out.join(' ');
"""
JS_OUTPUTS = """
return Array.from(document.querySelectorAll('.output_area, .cell-output, .output_subarea'))
  .map(e => e.innerText).join('\\n');
"""
JS_NETWORK = """
const urls = performance.getEntriesByType('resource').map(e => e.name);
document.querySelectorAll('script[src], link[href][rel~=stylesheet], link[href][rel~=preload], img[src], iframe[src], '
  + 'video[src], audio[src], source[src], object[data]').forEach(e => urls.push(e.src || e.href || e.data));
return urls.filter(u => /^(https?|wss?|ftp):/i.test(u));
"""

JS_PAGE_FACTS = """
const imgs = Array.from(document.images).map(i => ({src: i.currentSrc.slice(0, 120), ok: i.complete && i.naturalWidth > 0}));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
return {title: document.title, imgs: imgs, links: links, text: document.body ? document.body.innerText.length : 0,
        height: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0),
        width: Math.max(document.documentElement.scrollWidth, document.body ? document.body.scrollWidth : 0)};
"""
MAX_SHOT_HEIGHT = 60000  # px; a longer page is cut there (and says so)


def unreadable_files(site: Path) -> list[str]:
    """Files others cannot read and folders others cannot enter (a web server or a colleague could not)."""
    bad = []
    for p in [site, *sorted(site.rglob("*"))]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        need = (stat.S_IROTH | stat.S_IXOTH) if p.is_dir() else stat.S_IROTH
        if mode & need != need:
            bad.append(f"{p.relative_to(site.parent)} has mode {oct(mode)}: others cannot "
                       f"{'enter it' if p.is_dir() else 'read it'} (expected 0755 folders, 0644 files)")
    return bad


def page_problems(driver, rel: str) -> list[str]:
    """Raw math, network loads and log noise on the page open in ``driver``."""
    problems = []
    try:
        driver.set_script_timeout(30)
        driver.execute_async_script(JS_WAIT_MATH)
    except Exception as err:  # a MathJax that never finishes is itself a finding
        problems.append(f"{rel}: MathJax did not finish typesetting ({type(err).__name__})")
    prose = driver.execute_script(JS_PROSE)
    for m in re.finditer(r"\$\$", prose):
        snippet = prose[max(0, m.start() - 30):m.end() + 40].replace("\n", " ")
        problems.append(f"{rel}: raw math left in the text: ...{snippet}...")
        break
    for url in sorted(set(driver.execute_script(JS_NETWORK))):
        problems.append(f"{rel}: loads from the network: {url[:120]}")
    outputs = driver.execute_script(JS_OUTPUTS) or ""
    text = outputs + "\n" + prose
    for label, rx in _NOISE + _machine_paths():
        m = rx.search(text)
        if m:
            line = text[text.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0][:120]
            problems.append(f"{rel}: log noise ({label}): {line!r}")
    return problems


def full_screenshot(driver, path: Path, width: int, height: int) -> None:
    """The whole page in one PNG (Chrome DevTools ``captureBeyondViewport``), not just the window."""
    height = min(max(int(height), 1), MAX_SHOT_HEIGHT)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": max(int(width), 1), "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def check_site(site: Path, screenshots: Path | None = None, driver=None) -> dict:
    """Crawl the site from ``index.html``; returns a report and raises ``AssertionError`` listing every problem."""
    site = Path(site).resolve()
    index = site / "index.html"
    if not index.exists():
        raise FileNotFoundError(f"{index} does not exist: build the report first (make report)")
    own = driver is None
    driver = driver or make_driver()
    problems, visited, queue, pages = unreadable_files(site), set(), [index], {}
    try:
        while queue:
            page = queue.pop(0)
            if page in visited:
                continue
            visited.add(page)
            if not page.exists():
                problems.append(f"broken link: {page.relative_to(site)} does not exist")
                continue
            driver.get(page.as_uri())
            rel = str(page.relative_to(site))
            found = page_problems(driver, rel)  # waits for MathJax first: the page as a reader sees it
            facts = driver.execute_script(JS_PAGE_FACTS)
            for _ in range(10):  # under load Chromium can answer before the first layout; look again
                if facts["text"] >= 50:
                    break
                time.sleep(0.3)
                facts = driver.execute_script(JS_PAGE_FACTS)
            bad_imgs = [i["src"] for i in facts["imgs"] if not i["ok"]]
            pages[rel] = {"title": facts["title"], "images": len(facts["imgs"]), "broken_images": len(bad_imgs)}
            for src in bad_imgs:
                problems.append(f"{rel}: image did not render: {src}")
            if facts["text"] < 50:
                problems.append(f"{rel}: page is (nearly) empty")
            problems += found
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                facts = driver.execute_script(JS_PAGE_FACTS)  # after MathJax: the final height
                shot = screenshots / (rel.replace("/", "__").removesuffix(".html") + ".png")
                full_screenshot(driver, shot, facts["width"], facts["height"])
                pages[rel]["screenshot_height"] = min(int(facts["height"]), MAX_SHOT_HEIGHT)
            for href in facts["links"]:
                url, _frag = urldefrag(href)
                parsed = urlparse(url)
                if parsed.scheme != "file":
                    continue  # external links are not followed (no network here)
                target = Path(unquote(parsed.path))
                if target.is_dir():
                    target = target / "index.html"
                if site in target.parents or target == site:
                    if target.suffix == ".html" or not target.suffix:
                        queue.append(target)
                    elif not target.exists():
                        problems.append(f"{rel}: broken link to {target.relative_to(site)}")
                else:
                    problems.append(f"{rel}: link leaves the site: {target}")
    finally:
        if own:
            driver.quit()
    report = {"pages": pages, "problems": problems}
    if problems:
        raise AssertionError("report check failed:\n  " + "\n  ".join(problems))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report.browser_check", description=__doc__.splitlines()[0])
    ap.add_argument("--site", default="_site", type=Path)
    ap.add_argument("--screenshots", default=None, type=Path)
    args = ap.parse_args(argv)
    try:
        report = check_site(args.site, args.screenshots)
    except (AssertionError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    for page, facts in report["pages"].items():
        print(f"ok  {page:40s} {facts['images']:3d} images  {facts['title']}")
    print(f"{len(report['pages'])} pages checked: no broken links or images, no raw math, nothing from the network, "
          "no log noise, every file readable"
          + (f"; screenshots in {args.screenshots}" if args.screenshots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
