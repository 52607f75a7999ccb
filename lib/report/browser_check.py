"""Open the built report in headless Chromium as a reader would: start at the index,
follow every internal link, and fail on a page that does not load, a broken link, or an
image that did not render (``naturalWidth == 0``). Saves a full-page screenshot per page.

Usage: ``python -m lib.report.browser_check --site _site --screenshots build/screenshots``
Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).
"""
from __future__ import annotations

import argparse
import shutil
import sys
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


JS_PAGE_FACTS = """
const imgs = Array.from(document.images).map(i => ({src: i.currentSrc.slice(0, 120), ok: i.complete && i.naturalWidth > 0}));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
return {title: document.title, imgs: imgs, links: links, text: document.body ? document.body.innerText.length : 0,
        height: document.body ? document.body.scrollHeight : 0};
"""


def check_site(site: Path, screenshots: Path | None = None, driver=None) -> dict:
    """Crawl the site from ``index.html``; returns a report and raises ``AssertionError`` listing every problem."""
    site = Path(site).resolve()
    index = site / "index.html"
    if not index.exists():
        raise FileNotFoundError(f"{index} does not exist: build the report first (make report)")
    own = driver is None
    driver = driver or make_driver()
    problems, visited, queue, pages = [], set(), [index], {}
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
            facts = driver.execute_script(JS_PAGE_FACTS)
            rel = str(page.relative_to(site))
            bad_imgs = [i["src"] for i in facts["imgs"] if not i["ok"]]
            pages[rel] = {"title": facts["title"], "images": len(facts["imgs"]), "broken_images": len(bad_imgs)}
            for src in bad_imgs:
                problems.append(f"{rel}: image did not render: {src}")
            if facts["text"] < 50:
                problems.append(f"{rel}: page is (nearly) empty")
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                driver.set_window_size(1280, max(900, min(int(facts["height"]), 12000)))
                driver.save_screenshot(str(screenshots / (rel.replace("/", "__").removesuffix(".html") + ".png")))
                driver.set_window_size(1280, 900)
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
    print(f"{len(report['pages'])} pages checked, no broken links or images"
          + (f"; screenshots in {args.screenshots}" if args.screenshots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
