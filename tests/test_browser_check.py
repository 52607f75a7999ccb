"""lib.report.browser_check drives real headless Chromium over a small site on disk."""
import base64
import io
import shutil

import pytest

from lib import config
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


def _mathjax_page(math):
    from lib.report import site as site_mod

    return (f"<html><head><title>M</title>{site_mod.MATHJAX_CONFIG}{site_mod.MATHJAX_SCRIPT}</head><body>"
            f"<p>{'text ' * 20}</p><p>{math}</p><pre>cost = $$5 (code may say $$)</pre></body></html>")


def _site_with_mathjax(tmp_path):
    from lib.report import site as site_mod

    site = tmp_path / "site"
    shutil.copytree(site_mod.mathjax_source(), site / site_mod.MATHJAX_DIR)
    return site


def test_good_site_passes_and_screenshots_whole_pages(tmp_path, driver):
    site = _site_with_mathjax(tmp_path)
    (site / "index.html").write_text(_page("Home", f'<a href="a.html">A</a><img src="{_png_data_uri()}">'
                                                   '<div style="height:5000px">tall</div><a href="m.html">math</a>'))
    (site / "a.html").write_text(_page("A", '<a href="index.html#top">home</a><a href="https://example.org">ext</a>'))
    (site / "m.html").write_text(_mathjax_page(r"$$\alpha_k = \frac{1}{hw}\sum_{i,j} A_{ijk}$$ and $x^2$"))
    shots = tmp_path / "shots"
    report = browser_check.check_site(site, shots, driver=driver)
    assert set(report["pages"]) == {"index.html", "a.html", "m.html"}
    assert report["pages"]["index.html"]["images"] == 1
    from PIL import Image

    with Image.open(shots / "index.png") as im:  # the whole page, far taller than the 900 px window
        assert im.size[0] > 1200 and im.size[1] > 5000
    assert (shots / "m.png").stat().st_size > 1000


def test_raw_math_fails(tmp_path, driver):
    """``$$`` that no MathJax typeset (the nbconvert basic template's old failure) is named with its text."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(_page("Home", r"<p>$$\alpha_k = \frac{1}{hw}$$</p>"))
    with pytest.raises(AssertionError, match=r"index.html: raw math left in the text: .*alpha_k"):
        browser_check.check_site(site, None, driver=driver)


def test_network_load_fails(tmp_path, driver):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(_page("Home", '<script src="http://127.0.0.1:9/mathjax.js"></script>'))
    with pytest.raises(AssertionError, match=r"loads from the network: http://127.0.0.1:9/mathjax.js"):
        browser_check.check_site(site, None, driver=driver)


@pytest.mark.parametrize("line, label", [
    ("2026-12-01 09:00:00.1: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on.", "oneDNN"),
    ("E0000 00:00:1764579600.123456    4242 node_def_util.cc:680] Error in the kernel", "C\\+\\+ log line"),
    ("/work/x/.venv/lib/python3.11/site-packages/keras/src/a.py:1: UserWarning: hi", "site-packages"),
    ("[IPKernelApp] WARNING | Kernel is running over TCP without encryption", "kernel chatter"),
    (f"UserWarning: using the stand-in at {config.ROOT}/.cache/synthetic", "the checkout"),
])
def test_log_noise_in_outputs_fails(tmp_path, driver, line, label):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(_page("Home", f'<div class="output_area"><pre>{line}</pre></div>'))
    with pytest.raises(AssertionError, match=f"index.html: log noise \\(.*{label}"):
        browser_check.check_site(site, None, driver=driver)


def test_unreadable_file_fails(tmp_path, driver):
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text(_page("Home", ""))
    (site / "sub" / "x.png").write_bytes(b"x")
    for p, m in ((site, 0o755), (site / "sub", 0o700), (site / "index.html", 0o644), (site / "sub" / "x.png", 0o600)):
        p.chmod(m)
    with pytest.raises(AssertionError) as err:
        browser_check.check_site(site, None, driver=driver)
    msg = str(err.value)
    assert "site/sub has mode 0o700: others cannot enter it" in msg and "x.png has mode 0o600" in msg
    assert "index.html has mode" not in msg


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
