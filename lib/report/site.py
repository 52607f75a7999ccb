"""Render the website report from the papermill-executed notebooks (never re-executing them).

With ``quarto`` on PATH: ``quarto render`` over ``_quarto.yml`` (index, one page per
notebook, model card, data provenance). Without it (the PyPI ``quarto-cli`` cannot install
offline) the same pages are built with nbconvert into the same ``_site/`` folder. Either
way the command prints which renderer it used.

Staging: executed notebooks of one profile are copied to ``build/report/`` (a banner cell
added on top when their data were synthetic), and the generated Markdown snippets that the
``.qmd`` pages include (headline table, model card, banner) are written there too, computed
from the metrics JSON, never typed by hand.

Usage: ``python -m lib.report.site --profile smoke [--renderer auto|quarto|nbconvert]``
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lib import config
from lib.atomic import read_json, write_text

STAGE = config.ROOT / "build" / "report"
SITE = config.ROOT / "_site"
PAGES_QMD = ["index.qmd", "model_card.qmd", "data_provenance.qmd"]

SYNTHETIC_BANNER = (
    '<div class="synthetic-banner" style="background:#c0392b;color:white;padding:0.6em 1em;'
    'border-radius:6px;font-weight:bold;margin:0.5em 0 1em 0">'
    "SYNTHETIC DATA: the cell images on this page are the kit's procedurally drawn SIPaKMeD-layout "
    "stand-in, not SIPaKMeD. Numbers and pictures teach the method; they say nothing about real cytology."
    "</div>"
)
CLINICAL_NOTE = (
    '<div class="not-clinical" style="border-left:4px solid #e67e22;padding:0.4em 0.8em;margin:0.5em 0 1em 0">'
    "<strong>Not for clinical use.</strong> A teaching kit: the models here were built to show how a "
    "multimodal result is made and where it misleads, not to screen anyone.</div>"
)

# The index page's results table: per notebook, the few numbers that carry its lesson, in order.
# (Each notebook's JSON holds many more; its own page shows them.)
HEADLINE = {
    "01_eda": [("images", "cell images used"), ("cluster_images", "cluster images (groups)"),
               ("biopsy_prevalence", "Biopsy prevalence (UCI)"), ("best_leaky_column_auc", "AUC of the best leaking screening column alone")],
    "02_overfitting_baseline": [("train_acc", "naive recipe: train accuracy"), ("val_acc", "naive recipe: validation accuracy"),
                                ("gap", "naive recipe: train-validation gap")],
    "03_image_branch": [("macro_f1", "macro-F1, 5 classes (test)"), ("accuracy", "accuracy (test)"),
                        ("abnormal_auc", "abnormal-vs-rest AUC (test)"), ("gap_naive", "train-validation gap, naive"),
                        ("gap_regularized", "train-validation gap, regularized")],
    "04_tabular_mlp": [("auc_mlp", "AUC, tabular MLP (repeated CV)"), ("auc_logreg", "AUC, logistic regression"),
                       ("auc_rf", "AUC, random forest"), ("auc_mlp_leaky", "AUC, MLP WITH leaking screening columns"),
                       ("published_anchor_auc", "published honest anchor (Fernandes et al. 2018)")],
    "05_late_fusion": [("auc_image_only", "AUC, image only"), ("auc_tabular_only", "AUC, tabular only"),
                       ("auc_fused", "AUC, fused (label-conditioned pairing)"), ("auc_shuffled", "AUC, fused (shuffled pairing)"),
                       ("auc_attention", "AUC, attention-weighted fusion")],
    "06_gradcam": [("tape_vs_tfkv_spearman", "Grad-CAM: lib vs tf-keras-vis (Spearman)"),
                   ("trained_vs_random_spearman", "Grad-CAM: trained vs randomised top (Spearman)")],
}


def metrics_files(profile: str) -> list[Path]:
    return sorted(config.metrics_dir(profile).glob("[0-9][0-9]_*.json"))


def any_synthetic(profile: str) -> bool:
    return any(read_json(p).get("synthetic") for p in metrics_files(profile))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    return html.escape(str(v))


def headline_markdown(profile: str) -> str:
    """The index page's results table, read from ``build/<profile>/metrics/*.json``."""
    files = metrics_files(profile)
    if not files:
        return f"*No results yet for profile `{profile}`: run `make report PROFILE={profile}`.*\n"
    rows = ["| notebook | data | result | value |", "|---|---|---|---|"]
    for path in files:
        m = read_json(path)
        data = "synthetic stand-in" if m.get("synthetic") else "real"
        headline = m.get("headline", {})
        for key, label in HEADLINE.get(path.stem, [(k, k) for k in list(headline)[:6]]):
            if key in headline:
                rows.append(f"| {path.stem} | {data} | {label} | {_fmt(headline[key])} |")
    return (f"Profile **{profile}**; every number is read from the metrics JSON its notebook wrote "
            f"(`build/{profile}/metrics/`).\n\n" + "\n".join(rows) + "\n")


def model_card_markdown(profile: str) -> str:
    """The model card page body from the JSON card the fusion notebook writes."""
    cards = sorted(config.models_dir(profile).glob("*model_card*.json"))
    if not cards:
        return f"*No model card yet for profile `{profile}`: it is written by the late-fusion notebook.*\n"
    out = []
    for card_path in cards:
        card = read_json(card_path)
        out.append(f"## {card.get('name', card_path.stem)}\n")
        for key, value in card.items():
            if key == "name":
                continue
            if isinstance(value, (dict, list)):
                value = "\n\n```json\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```\n"
            out.append(f"**{key.replace('_', ' ')}**: {value}\n")
    return "\n".join(out)


def collapse_progress(outputs: list) -> list:
    """Stream outputs as a terminal would show them: consecutive pieces of one stream joined, and of
    each line only what follows its last carriage return.

    A tqdm bar redraws itself with ``\\r``; JupyterLab overwrites, but a rendered page would list
    every redraw (hundreds of lines for one progress bar).  Other outputs are kept as they are.
    """
    out: list = []
    for o in outputs:
        if o.get("output_type") == "stream" and out and out[-1].get("output_type") == "stream" \
                and out[-1].get("name") == o.get("name"):
            out[-1] = {**out[-1], "text": _text(out[-1]) + _text(o)}
        else:
            out.append(dict(o))
    for o in out:
        if o.get("output_type") == "stream":
            lines = _text(o).split("\n")
            o["text"] = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)
    return out


def _text(output) -> str:
    t = output.get("text", "")
    return "".join(t) if isinstance(t, list) else t


def stage(profile: str) -> list[Path]:
    """Copy the executed notebooks of ``profile`` into ``build/report`` and write the snippets."""
    src = config.run_dir(profile) / "notebooks"
    nbs = sorted(src.glob("[0-9][0-9]_*.ipynb"))
    if not nbs:
        raise FileNotFoundError(f"no executed notebooks in {src}: run `python -m lib.report.pipeline --profile {profile}` first")
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    synthetic_by_nb = {p.stem: read_json(p).get("synthetic", False) for p in metrics_files(profile)}
    staged = []
    for nb_path in nbs:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        if synthetic_by_nb.get(nb_path.stem):
            cells.insert(1 if cells and cells[0]["cell_type"] == "markdown" else 0,
                         {"cell_type": "markdown", "id": "synthetic-banner", "metadata": {}, "source": SYNTHETIC_BANNER})
        # papermill's injected-parameters cell is an implementation detail: hide it on the page
        for c in cells:
            if c.get("outputs"):
                c["outputs"] = collapse_progress(c["outputs"])
            tags = c.get("metadata", {}).get("tags", [])
            if "injected-parameters" in tags and "remove-cell" not in tags:
                c["metadata"]["tags"] = tags + ["remove-cell"]
        target = STAGE / nb_path.name
        write_text(target, json.dumps(nb, indent=1))
        staged.append(target)
    banner = SYNTHETIC_BANNER if any_synthetic(profile) else ""
    write_text(STAGE / "_banner.md", banner + "\n\n" + CLINICAL_NOTE + "\n")
    write_text(STAGE / "_headline.md", headline_markdown(profile))
    write_text(STAGE / "_model_card.md", model_card_markdown(profile))
    return staged


# --------------------------------------------------------------------------- nbconvert fallback
_INCLUDE = re.compile(r"\{\{<\s*include\s+(\S+)\s*>\}\}")
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def _qmd_to_html_body(path: Path) -> tuple[str, str]:
    """Minimal .qmd reader for the fallback: front-matter title, includes, callouts."""
    from nbconvert.filters.markdown import markdown2html

    text = path.read_text(encoding="utf-8")
    title = path.stem
    m = _FRONT.match(text)
    if m:
        for line in m.group(1).splitlines():
            if line.startswith("title:"):
                title = line.split(":", 1)[1].strip().strip('"')
        text = text[m.end():]
    text = _INCLUDE.sub(lambda mm: (config.ROOT / mm.group(1)).read_text(encoding="utf-8")
                        if (config.ROOT / mm.group(1)).exists() else "", text)
    # Quarto turns links to .qmd/.ipynb pages into .html links; the fallback does the same
    text = re.sub(r"\]\(([^)\s]+?)\.(?:qmd|ipynb)(#[^)]*)?\)", lambda mm: f"]({Path(mm.group(1)).name}.html{mm.group(2) or ''})", text)
    text = re.sub(r"^:::\s*\{\.callout-(\w+)\}\s*$", r'<div class="callout callout-\1">', text, flags=re.M)
    text = re.sub(r"^:::\s*$", "</div>", text, flags=re.M)
    # raw HTML blocks must be separated from Markdown for mistune
    return title, markdown2html(text)


def _page_title(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for line in src.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb_path.stem


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;display:flex}
nav.sidebar{width:250px;min-height:100vh;background:#f4f6f8;padding:1em;box-sizing:border-box;flex-shrink:0}
nav.sidebar a{display:block;padding:0.3em 0;color:#1a5276;text-decoration:none}
nav.sidebar a.active{font-weight:bold}
main{padding:1em 2em;max-width:1000px;flex-grow:1;min-width:0}
main img{max-width:100%}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:0.25em 0.6em}
.callout{border-left:4px solid #2e86c1;padding:0.4em 0.8em;margin:0.8em 0;background:#f8fbfd}
.callout-warning{border-color:#e67e22}.callout-important{border-color:#c0392b}
"""


def _wrap(title: str, body: str, nav: list[tuple[str, str]], active: str, renderer: str) -> str:
    links = "\n".join(
        f'<a href="{href}"{" class=active" if href == active else ""}>{html.escape(label)}</a>' for href, label in nav)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><nav class='sidebar'><strong>Hybrid cervical-risk kit</strong>"
            f"{links}<p style='font-size:small;color:#777'>rendered with {renderer}</p></nav>"
            f"<main>{body}</main></body></html>")


def render_nbconvert(staged: list[Path], out_dir: Path) -> None:
    """Build the site with nbconvert: same pages, a plain sidebar."""
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c, template_name="basic")
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    pages = [("index.html", "Home")] + [(p.stem + ".html", _page_title(p)) for p in staged] + [
        ("model_card.html", "Model card"), ("data_provenance.html", "Data, provenance, licences")]
    for qmd in PAGES_QMD:
        title, body = _qmd_to_html_body(config.ROOT / qmd)
        name = Path(qmd).stem + ".html"
        (out_dir / name).write_text(_wrap(title, f"<h1>{html.escape(title)}</h1>" + body, pages, name, "nbconvert"),
                                    encoding="utf-8")
    for nb_path in staged:
        body, _ = exporter.from_filename(str(nb_path))
        name = nb_path.stem + ".html"
        (out_dir / name).write_text(_wrap(_page_title(nb_path), body, pages, name, "nbconvert"), encoding="utf-8")


def render(profile: str = "full", renderer: str = "auto") -> str:
    """Stage and render; returns the renderer used. The old ``_site`` survives a failed render."""
    staged = stage(profile)
    quarto = shutil.which("quarto")
    if renderer == "quarto" and not quarto:
        raise FileNotFoundError("renderer 'quarto' requested but `quarto` is not on PATH "
                                "(install it from conda-forge: `conda install -c conda-forge quarto`)")
    use = "quarto" if (renderer in ("auto", "quarto") and quarto) else "nbconvert"
    tmp = Path(tempfile.mkdtemp(prefix="_site.", dir=config.ROOT))
    try:
        if use == "quarto":
            subprocess.run([quarto, "render", str(config.ROOT), "--output-dir", str(tmp)], check=True)
        else:
            render_nbconvert(staged, tmp)
        old = config.ROOT / "_site.old"
        if SITE.exists():
            SITE.rename(old)
        tmp.rename(SITE)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"report rendered with {use}{'' if use == 'quarto' else ' (quarto not on PATH)'} into {SITE}")
    return use


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report.site", description="Render the report website.")
    ap.add_argument("--profile", default="full", choices=sorted(config.PROFILES))
    ap.add_argument("--renderer", default="auto", choices=["auto", "quarto", "nbconvert"])
    args = ap.parse_args(argv)
    try:
        render(args.profile, args.renderer)
    except (FileNotFoundError, subprocess.CalledProcessError) as err:
        print(f"render failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
