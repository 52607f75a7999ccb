"""lib.report.site builds the fallback website from executed notebooks and the run's metadata.

The fixture stages the committed notebooks (their real headings, math and code; outputs added by
hand, since the site never executes anything) beside metadata written the way the notebooks write
it, with the real model card of ``lib.fusion.hybrid``.
"""
import json
import os
import re
import shutil
import stat
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from lib import config, metrics
from lib.atomic import write_json
from lib.fusion import hybrid
from lib.report import site

ROOT = config.ROOT
NOTEBOOKS = ["01_eda", "04_tabular_mlp", "05_late_fusion", "06_gradcam"]


def _card(synthetic=True):
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(40)]
    s = np.clip(y * 0.4 + rng.random(60) * 0.6, 0, 1)
    reports = {"fused": metrics.binary_report(y, s, n_boot=50), "image only": metrics.binary_report(y, s[::-1], n_boot=50)}
    return hybrid.model_card(
        synthetic=synthetic, image_source="SYNTHETIC stand-in in SIPaKMeD's layout" if synthetic else "SIPaKMeD's cells",
        uci_summary={"path": "/x/risk_factors_cervical_cancer.csv", "sha256": "ab" * 32, "matches_uci_original": True,
                     "rows": 835, "positives": {"Biopsy": 54}},
        pairing={"kind": "label-conditioned", "seed": 42}, training_mode=hybrid.TRAINING_MODES[0],
        ablation=hybrid.ablation_table(reports), attention={"image": 0.6, "tabular": 0.4},
        image_branch={"source": "notebook 03"}, tabular_columns=["Age", "Smokes"], classes=["a", "b"],
        abnormal_classes=["b"], image_size=64, head_config=hybrid.HeadConfig(), profile="smoke")


def _make_run(build: Path, synthetic=True, card_synthetic=None, pipeline=True):
    """A run in ``build/smoke`` as ``make report`` leaves it (notebooks not executed: the site never executes)."""
    nbdir = build / "smoke" / "notebooks"
    nbdir.mkdir(parents=True)
    wide = pd.DataFrame([[0.123456] * 40] * 3, columns=[f"a_rather_long_column_name_{i}" for i in range(40)])
    for stem in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text(encoding="utf-8"))
        for i, c in enumerate(nb["cells"]):
            if c["cell_type"] == "code":
                c["execution_count"], c["outputs"] = i, [{"output_type": "stream", "name": "stdout", "text": f"out {i}\n"}]
        nb["cells"].append({"cell_type": "code", "execution_count": 99, "metadata": {}, "source": "wide_table",
                            "outputs": [{"output_type": "execute_result", "execution_count": 99, "metadata": {},
                                         "data": {"text/html": wide.to_html(), "text/plain": "wide"}}]})
        (nbdir / f"{stem}.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    md = build / "smoke" / "metrics"
    write_json(md / "01_eda.json", {"notebook": "01_eda", "synthetic": synthetic,
                                    "headline": {"images": 120, "cluster_images": 40},
                                    "class_balance": [{"label": "Parabasal", "images": 24, "groups": 8}],
                                    "uci_summary": {"rows": 835, "duplicates_removed": 23, "positives": {"Biopsy": 54}}})
    write_json(md / "04_tabular_mlp.json", {"notebook": "04_tabular_mlp", "synthetic": False,
                                            "headline": {"auc_mlp": 0.66, "n_rows": 835}})
    write_json(md / "05_late_fusion.json", {"notebook": "05_late_fusion", "synthetic": synthetic,
                                            "headline": {"auc_fused": 0.9, "n_test_images": 18}})
    write_json(md / "06_gradcam.json", {"notebook": "06_gradcam", "synthetic": synthetic, "headline": {}})
    card = _card(synthetic if card_synthetic is None else card_synthetic)
    write_json(build / "smoke" / "models" / hybrid.CARD_FILE, card)
    if pipeline:
        write_json(build / "smoke" / "pipeline.json", {"profile": "smoke", "last_run_seconds": 99.5, "notebooks": {
            "01_eda": {"seconds": 12.25, "peak_rss_mb": 401.0}, "06_gradcam": {"seconds": 61.0, "peak_rss_mb": 2100.4}}})
    return card


@pytest.fixture
def built(tmp_path, monkeypatch):
    """Render the site of a synthetic run; returns a function that re-renders with other metadata."""
    def build(**kw):
        root = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        monkeypatch.setenv(config.ENV_BUILD, str(root / "build"))
        monkeypatch.setattr(site, "STAGE", root / "build" / "report")
        monkeypatch.setattr(site, "SITE", root / "_site")
        _make_run(root / "build", **kw)
        site.render("smoke", "nbconvert")
        return root / "_site"
    return build


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.ids, self.scripts = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _headings(page: Path, level="h3"):
    text = page.read_text(encoding="utf-8")
    return [re.sub(r"<[^>]+>|¶|&#182;", "", h).strip() for h in re.findall(rf"<{level}[^>]*>(.*?)</{level}>", text, re.S)]


# --------------------------------------------------------------------------- pages, math, folding
def test_pages_follow_quarto_yml(built):
    out = built()
    cfg = site.quarto_config()
    qmds = [Path(p).stem for p in cfg["project"]["render"] if p.endswith(".qmd")]
    assert {"checklist", "run_summary", "dataset_cards", "model_card"} <= set(qmds)
    assert sorted(p.stem for p in out.glob("*.html")) == sorted(qmds + NOTEBOOKS)
    nav = _parse(out / "index.html").hrefs
    for page in qmds + NOTEBOOKS:  # every page is in the sidebar of every page
        assert f"{page}.html" in nav
    assert "rendered with nbconvert" in (out / "index.html").read_text()


def test_math_is_offline_and_relative(built):
    out = built()
    for page in out.glob("*.html"):
        scripts = _parse(page).scripts
        assert scripts, f"{page.name}: no script"
        for src in scripts:
            assert not urlparse(src).scheme and not src.startswith("/"), f"{page.name}: script {src} is not relative"
            assert (out / unquote(urlparse(src).path)).is_file(), f"{page.name}: {src} not in the site"
    assert any("MathJax.js" in s for s in _parse(out / "06_gradcam.html").scripts)
    assert r"\frac{1}{hw}" in (out / "06_gradcam.html").read_text()  # left for MathJax, not mangled


def test_code_cells_fold_as_quarto_yml_asks(built, tmp_path):
    out = built()
    html = (out / "06_gradcam.html").read_text()
    nb = json.loads((config.ROOT / "notebooks" / "06_gradcam.ipynb").read_text())
    n_code = sum(1 for c in nb["cells"] if c["cell_type"] == "code") + 1  # + the wide table cell
    assert site.code_fold_setting(site.quarto_config()) is True
    assert html.count('<details class="code-fold">') == n_code
    assert re.search(r'<details class="code-fold"><summary>Code</summary>\s*<div class="input">', html)
    # code-fold: false in the site description, and a Quarto cell option (`#| code-fold: show`) that overrides it
    executed = config.run_dir("smoke") / "notebooks" / "01_eda.ipynb"
    nb = json.loads(executed.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["source"] = "#| code-fold: show\n" + "".join(code["source"])
    executed.write_text(json.dumps(nb))
    staged = site.stage("smoke", tmp_path / "stage")
    other = tmp_path / "nofold"
    other.mkdir()
    cfg = site.quarto_config()
    cfg["format"]["html"]["code-fold"] = False
    site.render_nbconvert(staged, other, tmp_path / "stage", cfg)
    html = (other / "01_eda.html").read_text()
    assert re.findall(r'<details class="code-fold"[^>]*>', html) == ['<details class="code-fold" open="">']


def test_wide_tables_scroll_inside_the_page(built):
    driver = _driver_or_skip()
    out = built()
    try:
        driver.set_window_size(1280, 900)
        driver.get((out / "04_tabular_mlp.html").as_uri())
        got = driver.execute_script(
            "const t = Array.from(document.querySelectorAll('table')).pop();"
            "return {page: document.documentElement.scrollWidth, win: window.innerWidth,"
            " table: t.scrollWidth, box: t.clientWidth};")
    finally:
        driver.quit()
    assert got["table"] > got["box"]  # the 40-column table is wider than its box: it scrolls ...
    assert got["page"] <= got["win"]  # ... and the page itself does not


def _driver_or_skip():
    from lib.report import browser_check

    if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser"))):
        pytest.skip("Debian chromium + chromium-driver not installed (.ci/run installs them)")
    return browser_check.make_driver()


def test_site_is_world_readable(built):
    old = os.umask(0o077)  # the strictest umask a user may have: mkdtemp and files would be owner-only
    try:
        out = built()
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    bad = {str(p.relative_to(out.parent)): oct(m) for p, m in modes.items()
           if m != (0o755 if p.is_dir() else 0o644)}
    assert not bad
    assert (out / "mathjax" / "MathJax.js").exists()


# --------------------------------------------------------------------------- cards
def test_model_card_follows_mitchell_in_order(built):
    out = built()
    page = out / "model_card.html"
    heads = [h for h in _headings(page) if re.match(r"\d\. ", h)]
    assert heads == [f"{i}. {t}" for i, t in enumerate(site.MODEL_CARD_SECTIONS, 1)]
    assert heads[:3] == ["1. Model details", "2. Intended use", "3. Factors"] and heads[-1] == "8. Caveats and recommendations"
    text = page.read_text()
    assert re.search(r"\d\.\d{3}<br><small>\[\d\.\d{3},(&nbsp;|\xa0)\d\.\d{3}\]</small>", text)  # metrics with intervals
    assert "```json" not in text and "Teaching only" in text and "different women" in text
    assert not re.search(r"&amp;(#x?[0-9a-f]+|amp|lt|gt|quot);", text)  # escaped once, never twice
    json_links = [h for h in _parse(page).hrefs if h.endswith(".json")]
    assert json_links and json.loads((out / json_links[0]).read_text())["name"] == hybrid.MODEL_NAME


def test_model_card_says_not_recorded_for_missing_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_BUILD, str(tmp_path / "build"))
    write_json(config.models_dir("smoke") / "x_model_card.json", {"name": "bare"})
    (config.metrics_dir("smoke") / "05_late_fusion.json").write_text("not json")
    md = site.model_card_markdown("smoke")
    assert md.count(site.NOT_RECORDED) >= 10 and "### 8. Caveats and recommendations" in md
    assert site.checklist_markdown("smoke") and site.run_summary_markdown("smoke")  # nothing raises


def test_dataset_cards_one_per_dataset(built):
    out = built()
    page = out / "dataset_cards.html"
    assert _headings(page, "h2") == ["Cell images", "UCI Cervical cancer (Risk Factors), dataset 383"]
    text = page.read_text()
    assert "YES: procedurally drawn" in text and "CC BY 4.0" in text and "Parabasal" in text and "835" in text
    assert "This dataset is SYNTHETIC" in text
    real = built(synthetic=False) / "dataset_cards.html"
    assert "no: real cell images" in real.read_text() and "This dataset is SYNTHETIC" not in real.read_text()


def test_dataset_card_reads_the_runs_dataset_description(tmp_path, monkeypatch):
    from lib.data import datasets

    monkeypatch.setenv(config.ENV_BUILD, str(tmp_path / "build"))
    _make_run(tmp_path / "build", synthetic=False)
    info = datasets.DatasetInfo(name="Liquid-based cytology Pap smears", preset="lbc", source="folder",
                                classes=["HSIL", "LSIL", "NL", "SCC"], abnormal_classes=["HSIL", "LSIL", "SCC"],
                                synthetic=False, group_unit="source image", groups_are_clusters=False,
                                group_pattern=None, n_images=2246, n_groups=1100, shipped_split_groups_on_both_sides=224,
                                licence="CC BY 4.0", source_url="Mendeley Data, DOI 10.17632/zddtpgzv63")
    write_json(config.run_dir("smoke") / "run.json", {"params": {"backbone": "efficientnet_lite0", "image_size": 64,
                                                                  "seed": 7}, "dataset": info.to_dict()})
    md = site.dataset_cards_markdown("smoke")
    for want in ("Liquid-based cytology", "1100 source images", "puts 224 source images on both sides",
                 "| **licence** | CC BY 4.0 |", "HSIL, LSIL, SCC", "no: real cell images"):
        assert want in md, want
    assert "| **seed** | 7 |" in site.run_summary_markdown("smoke")


# --------------------------------------------------------------------------- checklist, run summary, banner
def test_checklist_rows_link_to_existing_pages_and_cells(built):
    out = built()
    page = out / "checklist.html"
    text = page.read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", text, re.S)[1:]
    assert len(rows) == len(site.TRIPOD_AI)
    checked = 0
    for href in _parse(page).hrefs:
        url = urlparse(href)
        if url.scheme or not url.path.endswith(".html"):
            continue
        target = out / unquote(url.path)
        assert target.is_file(), f"checklist links to missing {href}"
        if url.fragment:
            assert unquote(url.fragment) in _parse(target).ids, f"checklist links to missing cell {href}"
            checked += 1
    assert checked >= 10  # evidence links point at cells, not only at pages
    ethics = next(r for r in rows if re.search(r"<td>17</td>", r))
    assert "cannot answer" in ethics
    assert "unpaired" in next(r for r in rows if "<td>20c</td>" in r)


def test_run_summary_times_memory_versions(built, tmp_path):
    from importlib.metadata import version

    out = built()
    text = (out / "run_summary.html").read_text()
    assert "12.2" in text and "2,100" in text and "73.2" in text  # per notebook, and the total
    assert version("keras") in text and version("pandas") in text and "smoke" in text
    text = (built(pipeline=False) / "run_summary.html").read_text()
    assert "not recorded" in text


def test_banner_only_on_pages_with_synthetic_results(built):
    out = built(synthetic=True, card_synthetic=False)
    has = {p.stem: "synthetic-banner" in p.read_text() for p in out.glob("*.html")}
    assert not has["data_provenance"] and not has["run_summary"] and not has["dataset_cards"]
    assert not has["model_card"]  # the card says its data were real
    assert has["index"] and has["06_gradcam"] and not has["04_tabular_mlp"]
    out = built(synthetic=False)
    assert not any("synthetic-banner" in p.read_text() for p in out.glob("*.html"))


def test_rendered_pages_show_a_progress_bar_once_not_every_redraw():
    outs = [{"output_type": "stream", "name": "stderr", "text": ["\r", "views 0%|  | 0/9"]},
            {"output_type": "stream", "name": "stderr", "text": "\rviews 50%|# | 4/9\rviews 100%|##| 9/9\n"},
            {"output_type": "stream", "name": "stdout", "text": "epoch 1/2\r\nepoch 2/2\n"},
            {"output_type": "display_data", "data": {"text/plain": "x"}, "metadata": {}}]
    got = site.collapse_progress(outs)
    assert [o["output_type"] for o in got] == ["stream", "stream", "display_data"]
    assert got[0]["text"] == "views 100%|##| 9/9\n"
    assert got[1]["text"] == "epoch 1/2\nepoch 2/2\n"  # Windows line ends are not redraws
    assert got[2] == outs[3] and outs[0]["text"] == ["\r", "views 0%|  | 0/9"]  # input untouched


def test_missing_notebooks_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_BUILD, str(tmp_path / "build"))
    with pytest.raises(FileNotFoundError, match="no executed notebooks"):
        site.stage("smoke", tmp_path / "stage")


def test_stage_marks_synthetic_notebooks_and_curates_the_headline(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_BUILD, str(tmp_path / "build"))
    _make_run(tmp_path / "build")
    write_json(config.metrics_dir("smoke") / "04_tabular_mlp.json", {"synthetic": False, "headline": {
        "auc_mlp": 0.6612, "auc_mlp_ci_low": 0.6, "auc_mlp_ci_high": 0.7, "auc_mlp_leaky": 0.95,
        "published_anchor_auc": 0.69, "noise": 1}})
    staged = site.stage("smoke", tmp_path / "stage")
    assert [p.stem for p in staged] == NOTEBOOKS
    first = json.loads(staged[0].read_text())
    assert "SYNTHETIC DATA" in "".join(first["cells"][1]["source"])
    assert "SYNTHETIC DATA" not in staged[1].read_text()  # 04 used the real UCI table
    assert all(c.get("id") for c in first["cells"])  # ids: the checklist links to cells
    head = (tmp_path / "stage" / "_headline.md").read_text()
    assert ("| 04_tabular_mlp | real | leaking columns inflate every model (repeated CV, same folds) | "
            "honest MLP AUC 0.661 [0.600, 0.700] -> with screening columns 0.950 (published anchor 0.690) |") in head
    assert "noise" not in head
    assert "| 06_gradcam |" not in head  # no curated key recorded: no row


@pytest.mark.parametrize("mechanism", ["memorisation", "batchnorm_collapse", "both", "underfit"])
def test_index_names_02s_mechanism_in_the_words_02_prints(tmp_path, monkeypatch, mechanism):
    """The index row says what 02 measured, in image_model.MECHANISMS' words (the ones 02's conclusion uses)."""
    from lib.image.image_model import MECHANISMS

    monkeypatch.setenv(config.ENV_BUILD, str(tmp_path / "build"))
    write_json(config.metrics_dir("smoke") / "02_overfitting_baseline.json", {"synthetic": True, "headline": {
        "peak_train_acc": 0.98, "best_val_acc": 0.6, "mechanism": mechanism, "train_acc_inference_mode": 0.845}})
    md = site.headline_markdown("smoke")
    assert f"| {MECHANISMS[mechanism]}; training images in inference mode 0.845 |" in md
    write_json(config.metrics_dir("smoke") / "02_overfitting_baseline.json", {"synthetic": True, "headline": {
        "peak_train_acc": 0.98, "best_val_acc": 0.6, "mechanism": "mixed", "train_acc_inference_mode": 0.845}})
    assert "what the gap is made of" not in site.headline_markdown("smoke")  # an unknown name: no row, no guess


def test_folded_answers_render_in_the_fallback(tmp_path, monkeypatch):
    """Worked answers written as a Quarto callout with collapse="true" (or raw <details>) stay folded on the page."""
    md = ("## Exercises\n\n1. Halve `epochs`: what happens to the gap?\n\n"
          '::: {.callout-tip collapse="true"}\n## Answer\n\nThe gap **shrinks**: fewer epochs, less memorising.\n:::\n\n'
          "<details><summary>Answer 2</summary>\n\nRead the *shuffled* row.\n\n</details>\n")
    monkeypatch.setenv(config.ENV_BUILD, str(tmp_path / "build"))
    _make_run(tmp_path / "build")
    executed = config.run_dir("smoke") / "notebooks" / "06_gradcam.ipynb"
    nb = json.loads(executed.read_text())
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": md})
    executed.write_text(json.dumps(nb))
    staged = site.stage("smoke", tmp_path / "stage")
    assert json.loads(staged[-1].read_text())["cells"][-1]["source"] == md  # staged for Quarto as written
    out = tmp_path / "site"
    out.mkdir()
    site.render_nbconvert(staged, out, tmp_path / "stage")
    page = (out / "06_gradcam.html").read_text()
    assert '<details class="callout callout-tip"><summary>Answer</summary>' in page
    assert "<strong>shrinks</strong>" in page and "<em>shuffled</em>" in page and "<summary>Answer 2</summary>" in page
    assert "::: {.callout" not in page
