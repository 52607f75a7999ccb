"""lib.report.browser_check drives real headless Chromium over a small site on disk."""
import base64
import io
import shutil

import pytest

from lib.report import browser_check

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser"))),
    reason="Debian chromium + chromium-driver not installed (.ci/run installs them)")


def _png_data_uri():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _page(title, body):
    return f"<html><head><title>{title}</title></head><body><p>{'text ' * 20}</p>{body}</body></html>"


@pytest.fixture(scope="module")
def driver():
    d = browser_check.make_driver()
    yield d
    d.quit()


def test_good_site_passes_and_screenshots(tmp_path, driver):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(_page("Home", f'<a href="a.html">A</a><img src="{_png_data_uri()}">'))
    (site / "a.html").write_text(_page("A", '<a href="index.html#top">home</a><a href="https://example.org">ext</a>'))
    shots = tmp_path / "shots"
    report = browser_check.check_site(site, shots, driver=driver)
    assert set(report["pages"]) == {"index.html", "a.html"}
    assert report["pages"]["index.html"]["images"] == 1
    assert (shots / "index.png").stat().st_size > 1000


def test_broken_link_and_missing_image_fail(tmp_path, driver):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(_page("Home", '<a href="missing.html">gone</a><img src="figures/nope.png">'))
    with pytest.raises(AssertionError) as err:
        browser_check.check_site(site, None, driver=driver)
    msg = str(err.value)
    assert "broken link: missing.html" in msg and "image did not render" in msg and "nope.png" in msg


def test_missing_site_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.html"):
        browser_check.check_site(tmp_path / "nowhere")
