"""Render the website report from the papermill-executed notebooks (never re-executing them).

With ``quarto`` on PATH: ``quarto render`` over ``_quarto.yml`` (index, one page per notebook,
model card, dataset cards, TRIPOD+AI checklist, run summary, data provenance). Without it (the
PyPI ``quarto-cli`` cannot install offline) the same pages are built with nbconvert into the same
``_site/`` folder, read from the same ``_quarto.yml`` (pages, sidebar, ``code-fold``). Either way
the command prints which renderer it used.

Staging: executed notebooks of one profile are copied to ``build/report/`` (a banner cell added
on top when their data were synthetic), and the generated Markdown snippets that the ``.qmd``
pages include (headline table, model card, dataset cards, checklist, run summary, banners) are
written there too, computed from the run's metadata (``build/<profile>/metrics/*.json``,
``models/*card*.json``, ``pipeline.json``), never typed by hand. A key the run did not record
shows as "not recorded" instead of failing the report.

The fallback is offline: MathJax 2.7 comes from the installed ``jupyter-server-mathjax`` package
and is copied into the site, referenced relatively; no page loads anything from a network.

Usage: ``python -m lib.report.site --profile smoke [--renderer auto|quarto|nbconvert]``
"""
from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from lib import config
from lib.atomic import read_json, write_text
from lib.image.image_model import MECHANISMS  # no TensorFlow import: the names 02 saves and their meaning

STAGE = config.ROOT / "build" / "report"
SITE = config.ROOT / "_site"
QUARTO_YML = config.ROOT / "_quarto.yml"
STAGE_PREFIX = "build/report/"  # how the .qmd pages and _quarto.yml name the staging folder
NOT_RECORDED = "not recorded"

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

# packages whose versions the run summary lists (distribution names; absent ones say so)
KEY_PACKAGES = ["tensorflow", "tensorflow-cpu", "keras", "numpy", "pandas", "scikit-learn", "scipy", "matplotlib",
                "seaborn", "tf-keras-vis", "pillow", "papermill", "nbconvert", "nbval", "jupyterlab",
                "jupyter-server-mathjax", "selenium"]


# --------------------------------------------------------------------------- the run's metadata
def metrics_files(profile: str) -> list[Path]:
    return sorted(config.metrics_dir(profile).glob("[0-9][0-9]_*.json"))


def _read(path: Path) -> dict:
    """A JSON object, or ``{}`` when the file is absent or not an object (the page then says "not recorded")."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def run_metadata(profile: str) -> dict:
    """Everything the generated pages read: ``{"metrics": {stem: dict}, "cards": [(path, dict)], "pipeline": dict,
    "run": dict}``."""
    return {
        "profile": profile,
        "metrics": {p.stem: _read(p) for p in metrics_files(profile)},
        "cards": [(p, _read(p)) for p in sorted(config.models_dir(profile).glob("*card*.json"))],
        "pipeline": _read(config.run_dir(profile) / "pipeline.json"),
        "run": _read(config.run_dir(profile) / "run.json"),  # parameters + dataset description (lib.run)
    }


def any_synthetic(profile: str) -> bool:
    return any(_read(p).get("synthetic") for p in metrics_files(profile))


def _get(d, *keys, default=NOT_RECORDED):
    """``d[k1][k2]...`` or ``default`` when any level is missing (metadata differ between runs)."""
    for k in keys:
        if isinstance(d, dict) and k in d and d[k] is not None:
            d = d[k]
        else:
            return default
    return d


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {_fmt(x)}" for k, x in v.items()) if v else "none"
    return html.escape(str(v))


def _raw(v) -> str:
    """``_fmt`` without the HTML escaping, for text that is escaped once more on its way into a table cell."""
    return html.unescape(_fmt(v))


def _cell(v) -> str:
    """A value fit for a Markdown table cell."""
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _records_table(records, columns=None) -> str:
    """A Markdown table from a list of dicts (union of keys, in first-seen order)."""
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        return f"*{NOT_RECORDED}*\n"
    cols = columns or list(dict.fromkeys(k for r in records for k in r))
    rows = ["| " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in records]
    return "\n".join(rows) + "\n"


def _iv(v, lo=None, hi=None) -> str:
    """A value with its interval, ``0.812 [0.70, 0.90]``; the value alone when no interval was recorded."""
    return _fmt(v) + (f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else "")


# What each notebook teaches, and the recorded numbers (with intervals) that show it: the index page leads
# with these. Each function reads one notebook's metrics record; a missing key drops the row, never a guess.
LESSONS = {
    "01_eda": [
        ("images are split by group, never one by one",
         lambda m, h: f"{h['images']} images in {h['groups']} groups"),
        ("the positive class is rare: accuracy is the wrong headline",
         lambda m, h: f"Biopsy prevalence {h['biopsy_prevalence']:.1%}"),
        ("screening columns leak the label", lambda m, h: f"best leaking column alone: AUC {_fmt(h['best_leaky_column_auc'])}"),
    ],
    "02_overfitting_baseline": [
        ("fine-tuning everything fits the training images, not new ones",
         lambda m, h: f"peak training accuracy {_fmt(h['peak_train_acc'])} vs best validation {_fmt(h['best_val_acc'])}"),
        ("what the gap is made of, measured", lambda m, h: MECHANISMS[h["mechanism"]]
         + f"; training images in inference mode {_fmt(h['train_acc_inference_mode'])}"),
    ],
    "03_image_branch": [
        ("regularization narrows the gap (same training images, inference mode)",
         lambda m, h: f"naive {_fmt(h['gap_naive_same_images'])} -> regularized {_fmt(h['gap_regularized_same_images'])}"),
        ("fine-tuning has to beat a linear probe: test macro-F1, 95% CI over groups",
         lambda m, h: f"fine-tuned{_tta(h, 'tta_finetuned')} {_iv(h['macro_f1'], h.get('macro_f1_low'), h.get('macro_f1_high'))}"
                      f" vs linear probe{_tta(h, 'tta_probe')} "
                      + _iv(h["probe_macro_f1"], *(lambda c: (c.get("ci_low"), c.get("ci_high")))(
                          (m.get("linear_probe") or {}).get("macro_f1_ci") or {}))),
        ("abnormal-vs-rest AUC (test)",
         lambda m, h: f"fine-tuned{_tta(h, 'tta_finetuned')} {_iv(h['abnormal_auc'], *_auc_ci(m.get('evaluation')))} "
                      f"vs linear probe{_tta(h, 'tta_probe')} {_iv(h['probe_abnormal_auc'], *_auc_ci(m.get('linear_probe')))}"),
    ],
    "04_tabular_mlp": [
        ("leaking columns inflate every model (repeated CV, same folds)",
         lambda m, h: f"honest MLP AUC {_iv(h['auc_mlp'], h.get('auc_mlp_ci_low'), h.get('auc_mlp_ci_high'))} -> "
                      f"with screening columns {_fmt(h['auc_mlp_leaky'])} (published anchor {_fmt(h['published_anchor_auc'])})"),
    ],
    "05_late_fusion": [
        ("the pairing manufactures what risk factors 'know' about a cell image",
         lambda m, h: f"tabular side, label-conditioned {_fmt(h['tabular_only'])} vs shuffled "
                      f"{_fmt(h['tabular_only_shuffled'])}: {h['tabular_information_manufactured']:+.3f} AUC made by the pairing"),
        ("intervals must resample image groups and UCI records (tabular-only AUC, 95%)",
         lambda m, h: f"honest two-way {_iv(h['auc_tabular_only'], *h['tabular_only_ci_grouped'])} vs naive "
                      f"{_iv(h['auc_tabular_only'], *h['tabular_only_ci_naive'])}"),
        ("the fusion gain over the shuffled control (honest risk factors)",
         lambda m, h: f"{h['fusion_gain']:+.3f} AUC (image only {_fmt(h['auc_image_only'])})"),
    ],
    "06_gradcam": [
        ("our Grad-CAM matches the reference implementation",
         lambda m, h: f"Spearman vs tf-keras-vis {_fmt(h['tape_vs_tfkv_spearman'])}"),
        ("the maps depend on what the model learned",
         lambda m, h: f"trained vs randomised top: Spearman {_fmt(h['trained_vs_random_spearman'])}"),
        ("where the evidence sits: share of map mass on the image border",
         lambda m, h: f"{_fmt(h['border_share'])}"),
    ],
}


def _tta(headline: dict, key: str) -> str:
    """03: " (flip TTA)" when that row's variant chosen on validation averages over flips, else ""."""
    return " (flip TTA)" if headline.get(key) is True else ""


def _auc_ci(evaluation) -> tuple:
    auc = ((evaluation or {}).get("binary") or {}).get("auc") or {}
    return auc.get("ci_low"), auc.get("ci_high")


def headline_markdown(profile: str) -> str:
    """The index page's lessons table, read from ``build/<profile>/metrics/*.json``."""
    files = metrics_files(profile)
    if not files:
        return f"*No results yet for profile `{profile}`: run `make report PROFILE={profile}`.*\n"
    rows = ["| notebook | data | what it teaches | evidence from this run |", "|---|---|---|---|"]
    for path in files:
        m = _read(path)
        data = "synthetic stand-in" if m.get("synthetic") else "real"
        headline = m.get("headline", {}) if isinstance(m.get("headline"), dict) else {}
        for lesson, show in LESSONS.get(path.stem, []):
            try:
                evidence = show(m, headline)
            except (KeyError, TypeError, ValueError):
                continue  # not recorded by this run: no row rather than a guess
            rows.append(f"| {path.stem} | {data} | {lesson} | {evidence} |")
    where = config.metrics_dir(profile)
    where = where.relative_to(config.ROOT).as_posix() if where.is_relative_to(config.ROOT) else f"build/{profile}/metrics"
    return (f"Profile **{profile}**; every number is read from the metrics JSON its notebook wrote "
            f"(`{where}/`); brackets are 95% intervals, computed as each notebook's page says.\n\n"
            + "\n".join(rows) + "\n")


# --------------------------------------------------------------------------- model card (Mitchell et al. 2019)
MODEL_CARD_SECTIONS = ["Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                       "Ethical considerations", "Caveats and recommendations"]


def _ci_table(table) -> str:
    """The card's metric table (``{model: {m, m_low, m_high, ...}}``) with each metric shown as value [low, high]."""
    if not isinstance(table, dict) or not table:
        return f"*{NOT_RECORDED}*\n"
    rows = list(table.items())
    keys = list(dict.fromkeys(k for _, r in rows if isinstance(r, dict) for k in r))
    preferred = ["auc", "ap", "sens_at_spec", "f1", "accuracy"]
    metric_keys = [k for k in keys if f"{k}_low" in keys and f"{k}_high" in keys]
    metric_keys.sort(key=lambda k: preferred.index(k) if k in preferred else len(preferred))
    other = [k for k in keys if k not in metric_keys and not any(k in (f"{m}_low", f"{m}_high") for m in metric_keys)]
    other.sort(key=lambda k: ["n_test", "n_pos", "kind", "pairing"].index(k) if k in ("n_test", "n_pos", "kind", "pairing") else 9)
    labels = {"auc": "AUC", "ap": "average precision", "sens_at_spec": "sensitivity at 90% specificity",
              "f1": "F1", "accuracy": "accuracy", "n_test": "n test", "n_pos": "positives",
              "auc_all_draws": "AUC, all test pairings", "ap_all_draws": "AP, all test pairings"}
    cols = metric_keys + other
    out = ["| model | " + " | ".join(labels.get(c, c.replace("_", " ")) for c in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for name, r in rows:
        r = r if isinstance(r, dict) else {}
        cells = []
        for c in cols:
            if c in metric_keys and isinstance(r.get(c), (int, float)):
                lo, hi = r.get(f"{c}_low"), r.get(f"{c}_high")
                ci = (f"<br><small>[{lo:.3f},&nbsp;{hi:.3f}]</small>"
                      if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else "")
                cells.append(f"{r[c]:.3f}{ci}")
            else:
                cells.append(_cell(r.get(c, "")))
        out.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n\nIn brackets: 95% bootstrap confidence interval on the test split.\n"


def _text_block(text) -> str:
    """Free text from a card (may hold Markdown lists), HTML-escaped."""
    return html.escape(str(text)).replace("&gt; ", "> ") + "\n"


def _dl(items, header=("entry", "value")) -> str:
    """A definition list as a two-column table: ``[(label, value)]``."""
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| **{html.escape(k)}** | {_cell(v)} |" for k, v in items]
    return "\n".join(rows) + "\n"


def _pairing_summary(p):
    """The pairing protocol in one line (its per-split counts stay in the JSON)."""
    if not isinstance(p, dict):
        return p
    keep = {k: p[k] for k in ("protocol", "kind", "control", "split", "seed", "train_draws", "test_repairings") if k in p and not isinstance(p[k], dict)}
    return _fmt(keep or p) + ("; per-split counts in the JSON" if len(keep) < len(p) else "")


def _model_card_one(card_path: Path, card: dict, meta: dict, download: str) -> str:
    fusion = meta["metrics"].get("05_late_fusion", {})
    arch = _get(card, "architecture", default={})
    data = _get(card, "data_sources", default={})
    images, tabular = _get(data, "images", default={}), _get(data, "tabular", default={})
    synthetic = card.get("synthetic")
    dataset = card.get("dataset") if isinstance(card.get("dataset"), dict) else {}
    s = {}
    s["Model details"] = _dl([
        ("name", card.get("name", card_path.stem)), ("summary", _get(card, "summary")),
        ("profile", _get(card, "profile")), ("training mode", _get(card, "training_mode")),
        ("image branch", _get(card, "image_branch", "source")),
        ("inputs", _get(arch, "inputs")), ("fusion head", _get(arch, "head")), ("output", _get(arch, "output")),
        ("loss", _get(arch, "loss")), ("optimizer", _get(arch, "optimizer")),
        ("early stopping", _get(arch, "early_stopping")), ("decision threshold", _get(card, "threshold")),
        ("files", _get(card, "files")), ("version / date", _get(card, "version")),
        ("licence", _get(card, "license")),
    ])
    s["Intended use"] = (f"{_fmt(_get(card, 'intended_use'))}\n\n"
                         "**Primary users:** students and instructors of medical machine learning.\n\n"
                         "**Out of scope:** any screening, diagnosis or clinical decision; any use on real patients.\n")
    s["Factors"] = _dl([
        ("image classes", _get(card, "image_classes")), ("abnormal (positive) classes", _get(card, "abnormal_classes")),
        ("groups", (f"{_raw(_get(dataset, 'n_groups'))} {dataset['group_unit']}s: the images of one "
                    f"{dataset['group_unit']} never cross splits") if dataset.get("group_unit")
         else "cluster images: cells of one cluster image never cross splits"),
        ("pairing of the two datasets", _pairing_summary(_get(card, "pairing_protocol"))),
        ("risk-factor columns", len(card["tabular_columns"]) if isinstance(card.get("tabular_columns"), list) else NOT_RECORDED),
        ("demographic factors", "not evaluated: the UCI table records age only, and the images carry no patient data"),
    ])
    s["Metrics"] = (_ci_table(_get(card, "metrics", "test_split_ablation", default=None))
                    + ("\n" + _text_block(card["intervals"]) if card.get("intervals") else "")
                    + "\nMean attention weights (attention-fused head): "
                    + _fmt(_get(card, "metrics", "mean_attention_weights")) + "\n")
    s["Evaluation data"] = _dl([
        ("images", f"{_raw(_get(images, 'source'))} (held-out groups of notebook 03's grouped split)"),
        ("risk factors", "UCI records of the test split (15%, stratified by Biopsy)"),
        ("test pairs", _get(fusion, "headline", "n_test_images")),
        ("synthetic", _get(images, "synthetic")),
        ("note", _get(images, "note") if synthetic else "real images"),
    ])
    s["Training data"] = _dl([
        ("images", _get(images, "source")),
        ("image licence", LICENCES["synthetic"] if synthetic else _get(dataset, "licence")),
        ("image classes and groups", f"{_raw(_get(dataset, 'n_images'))} images in {_raw(_get(dataset, 'n_groups'))} "
                                     f"groups" if dataset else NOT_RECORDED),
        ("image recipe", _get(card, "image_branch", "recipe")),
        ("risk factors", _get(tabular, "name")), ("risk-factor file", _get(tabular, "file")),
        ("sha256", _get(tabular, "sha256")), ("byte-identical to the UCI original", _get(tabular, "matches_uci_original")),
        ("rows after cleaning", _get(tabular, "rows_after_cleaning")), ("positives", _get(tabular, "positives")),
        ("pairing draws for training", _get(fusion, "headline", "train_draws")),
    ])
    ethics = card.get("ethical_considerations")
    s["Ethical considerations"] = (
        (_fmt(ethics) + "\n\n" if ethics else "")
        + "- The images and the risk factors come from **different women**; no record links them. Any pairing is "
          "made up and must never be presented as one patient's data.\n"
        + "- The UCI table is sensitive health data (sexual history, STDs), published de-identified under CC BY 4.0.\n"
        + ("- The images are **synthetic**: nothing here describes real cytology.\n" if synthetic else "")
        + "- A risk score that looks accurate invites clinical use; this model has not been validated on anyone.\n")
    lim = card.get("limitations")
    s["Caveats and recommendations"] = (
        ("\n".join(f"- {html.escape(str(x))}" for x in lim) if isinstance(lim, list) and lim else f"*{NOT_RECORDED}*")
        + "\n\nRecommendation: read the shuffled-pairing control (notebook 05) before reading anything into a fusion gain.\n")
    out = [f"## {html.escape(str(card.get('name', card_path.stem)))}\n",
           f"The card as JSON: [{card_path.name}]({download}) (what `lib.serve.inference` reads).\n"]
    for i, title in enumerate(MODEL_CARD_SECTIONS, 1):
        out.append(f"### {i}. {title}\n\n{s[title]}")
    return "\n".join(out)


def model_card_markdown(profile: str, meta: dict | None = None) -> str:
    """The model card page body, in the order of Mitchell et al. (2019), from the run's JSON card(s)."""
    meta = meta or run_metadata(profile)
    if not meta["cards"]:
        return f"*No model card yet for profile `{profile}`: it is written by the late-fusion notebook.*\n"
    parts = ["Sections follow *Model Cards for Model Reporting* (Mitchell et al., FAT* 2019). Every entry is read "
             "from the card the late-fusion notebook saved; an entry the run did not record says so.\n"]
    for card_path, card in meta["cards"]:
        parts.append(_model_card_one(card_path, card, meta, f"{STAGE_PREFIX}downloads/{card_path.name}"))
    return "\n".join(parts)


def cards_synthetic(meta: dict) -> bool:
    return any(bool(c.get("synthetic")) or bool(_get(c, "data_sources", "images", "synthetic", default=False))
               for _, c in meta["cards"])


# --------------------------------------------------------------------------- dataset cards
LICENCES = {
    "synthetic": "generated by the kit itself (the kit's licence); contains no data of any person",
    "sipakmed": "free for experimental use with citation of Plissiti et al., IEEE ICIP 2018",
    "lbc": "CC BY 4.0 (Hussain et al. 2020, Mendeley Data)",
    "uci": "CC BY 4.0 (UCI Machine Learning Repository, DOI 10.24432/C5Z310)",
}


def _dataset_description(meta: dict) -> dict:
    """The image dataset's description (``lib.data.datasets.DatasetInfo``) the run saved, or ``{}``."""
    d = _get(meta.get("run", {}), "dataset", default=None)
    if not isinstance(d, dict):
        d = _get(meta["metrics"].get("01_eda", {}), "dataset_description", default={})
    return d if isinstance(d, dict) else {}


def _image_source(meta: dict):
    d = _dataset_description(meta)
    if d.get("source"):
        return d.get("name") or d["source"], bool(d.get("synthetic"))
    for stem in ("03_image_branch", "02_overfitting_baseline", "06_gradcam", "01_eda"):
        m = meta["metrics"].get(stem, {})
        if "data_source" in m:
            return m["data_source"], bool(m.get("synthetic"))
    for _, c in meta["cards"]:
        src = _get(c, "data_sources", "images", "source", default=None)
        if src:
            return src, bool(c.get("synthetic"))
    syn = [m.get("synthetic") for k, m in meta["metrics"].items() if k != "04_tabular_mlp"]
    return NOT_RECORDED, bool(syn and any(syn))


SYNTHETIC_NOTE = ('<div class="synthetic-note" style="border-left:6px solid #c0392b;padding:0.4em 0.8em;'
                  'margin:0.5em 0 1em 0;font-weight:bold;color:#c0392b">This dataset is SYNTHETIC: the kit drew '
                  'every image; no person, slide or microscope is behind it.</div>')


def _label_first(records):
    if not isinstance(records, list):
        return records
    return [{**{k: r[k] for k in ("label",) if k in r}, **r} if isinstance(r, dict) else r for r in records]


def dataset_cards_markdown(profile: str, meta: dict | None = None) -> str:
    """One card per dataset the run used: source, licence, counts, groups, what is synthetic."""
    meta = meta or run_metadata(profile)
    eda = meta["metrics"].get("01_eda", {})
    desc = _dataset_description(meta)
    src, synthetic = _image_source(meta)
    src_s = str(desc.get("source") or src)
    key = "synthetic" if synthetic or src_s == "synthetic" else next((k for k in LICENCES if src_s.startswith(k)), None)
    licence = desc.get("licence") or (LICENCES.get(key, NOT_RECORDED) if key else NOT_RECORDED)
    if synthetic:
        licence = LICENCES["synthetic"]
    unit = desc.get("group_unit") or "cluster image"
    n_groups = desc.get("n_groups") or _get(eda, "headline", "groups", default=None) or _get(eda, "headline", "cluster_images")
    both = desc.get("shipped_split_groups_on_both_sides")
    refs = desc.get("references") if isinstance(desc.get("references"), list) else []
    out = ["## Cell images\n", SYNTHETIC_NOTE + "\n" if synthetic else "", _dl([
        ("name", desc.get("name") or src), ("source", src_s), ("where to get it", desc.get("source_url") or NOT_RECORDED),
        ("synthetic", "YES: procedurally drawn cells in SIPaKMeD's folder and file layout; every image is made up"
         if synthetic else "no: real cell images"),
        ("licence", licence),
        ("classes", desc.get("classes") or NOT_RECORDED),
        ("abnormal (positive) classes", desc.get("abnormal_classes") or NOT_RECORDED),
        ("images used", desc.get("n_images") or _get(eda, "headline", "images")),
        ("groups", f"{_raw(n_groups)} {unit}s; every split keeps a group on one side"),
        ("the dataset's own train/test split", f"puts {both} {unit}s on both sides (the kit does not use it)"
         if isinstance(both, int) else "none shipped, or not recorded"),
        ("published results on it", "; ".join(str(r.get("what", "")) for r in refs if isinstance(r, dict)) or "none recorded"),
        ("profile", profile),
    ]), "\n**Per class** (from notebook 01):\n\n", _records_table(_label_first(eda.get("class_balance")))]
    uci = eda.get("uci_summary") if isinstance(eda.get("uci_summary"), dict) else \
        _get(meta["metrics"].get("04_tabular_mlp", {}), "data", default={})
    uci = uci if isinstance(uci, dict) else {}
    out += ["\n## UCI Cervical cancer (Risk Factors), dataset 383\n", _dl([
        ("source", "UCI Machine Learning Repository, dataset 383 (Hospital Universitario de Caracas)"),
        ("synthetic", "no: real, de-identified patient records"),
        ("licence", LICENCES["uci"]),
        ("file", Path(str(uci["path"])).name if uci.get("path") else NOT_RECORDED),
        ("sha256", _get(uci, "sha256")), ("byte-identical to the UCI original", _get(uci, "matches_uci_original")),
        ("raw rows x columns", f"{_raw(_get(uci, 'raw_rows'))} x {_raw(_get(uci, 'raw_columns'))}"),
        ("exact duplicates removed", _get(uci, "duplicates_removed")),
        ("rows after cleaning", _get(uci, "rows")), ("positives after cleaning", _get(uci, "positives")),
        ("Biopsy prevalence", _get(uci, "biopsy_prevalence")),
        ("dropped columns", _get(uci, "dropped_columns")),
        ("groups", "none: one row per patient"),
    ])]
    out.append("\nThe two datasets share **no patients**: the fusion notebook pairs them by a seeded protocol "
               "(see the model card).\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- TRIPOD+AI checklist
# (item, topic, status, answer(meta) -> str, evidence (notebook stem, regex of the cell) or a page name)
# status: "answered" (from this run), "cannot" (the kit has no real patients / the datasets are unpaired),
# "n/a" (not applicable to a teaching rebuild). Items: Collins et al., BMJ 2024;385:e078378.
def _h(meta, stem, key):
    return _fmt(_get(meta["metrics"].get(stem, {}), "headline", key))


def _ds(meta, key, default):
    v = _dataset_description(meta).get(key)
    return v if v else default


def _lesson(meta) -> str:
    les = _get(meta["metrics"].get("05_late_fusion", {}), "lesson", default={})
    t, ts = (les.get("tabular_only"), les.get("tabular_only_shuffled")) if isinstance(les, dict) else (None, None)
    if isinstance(t, (int, float)) and isinstance(ts, (int, float)):
        return (f"The risk factors alone 'predict' the image label with AUC {t:.3f} under label-conditioned pairing "
                f"and {ts:.3f} under shuffled pairing: the pairing, not the patient, carries that information.")
    return "The fusion gain is manufactured by label-conditioned pairing (see the shuffled control)."


NO_PATIENTS = "Cannot answer: the kit recruited no participants; it reuses public datasets."
UNPAIRED = "Cannot answer: images and risk factors come from different people (unpaired datasets)."

TRIPOD_AI = [
    ("1", "Title", "answered", lambda m: "Development and internal evaluation of a multimodal (images + risk factors) "
     "model to predict an abnormal cervical cell / positive biopsy; teaching rebuild.", "index"),
    ("2", "Abstract", "answered", lambda m: "The index page summarises aims, data, methods and headline results.", "index"),
    ("3a", "Background: healthcare context and rationale", "answered",
     lambda m: "Cervical screening; a published hybrid model reported accuracy 97.8%, F1 0.87.", "index"),
    ("3b", "Target population and intended purpose", "answered",
     lambda m: "None clinical: teaching only (see the model card's intended use).", "model_card"),
    ("3c", "Known health inequalities between groups", "cannot", lambda m: NO_PATIENTS, None),
    ("4", "Objectives", "answered", lambda m: "Rebuild the recipe and show where its numbers come from.", "index"),
    ("5a", "Data sources", "answered", lambda m: f"Images: {_fmt(_image_source(m)[0])}; risk factors: UCI dataset 383.",
     "dataset_cards"),
    ("5b", "Dates of data collection", "cannot", lambda m: "Not recorded by either public dataset.", None),
    ("6a", "Participants: setting", "cannot", lambda m: NO_PATIENTS + " UCI: Hospital Universitario de Caracas.",
     "data_provenance"),
    ("6b", "Eligibility criteria", "cannot", lambda m: NO_PATIENTS, None),
    ("6c", "Treatments received", "cannot", lambda m: NO_PATIENTS, None),
    ("7", "Data preparation and quality checks", "answered",
     lambda m: f"Exact duplicate rows removed ({_fmt(_get(m['metrics'].get('01_eda', {}), 'uci_summary', 'duplicates_removed'))}), "
               "near-empty and constant columns dropped, images checked against the manifest.", ("01_eda", r"^## 3\.")),
    ("8a", "Outcome definition", "answered", lambda m: "Images: abnormal class ("
     + _fmt(_ds(m, "abnormal_classes", ["Koilocytotic", "Dyskeratotic"])) + "); table: Biopsy result.", ("01_eda", r"^## 1\.")),
    ("8b", "Qualifications of outcome assessors", "cannot", lambda m: "Not recorded by the public datasets.", None),
    ("8c", "Blinding of outcome assessment", "cannot", lambda m: "Not recorded by the public datasets.", None),
    ("9a", "Choice of initial predictors", "answered", lambda m: "All UCI risk factors except the three screening "
     "results that leak Biopsy (Hinselmann, Schiller, Citology).", ("01_eda", r"^## 4\.")),
    ("9b", "Definition of predictors", "answered", lambda m: "As published by UCI (36 columns, '?' = missing).",
     "dataset_cards"),
    ("10", "Sample size", "answered",
     lambda m: f"{_h(m, '01_eda', 'images')} images; {_h(m, '04_tabular_mlp', 'n_rows')} UCI rows at prevalence "
               f"{_h(m, '04_tabular_mlp', 'biopsy_prevalence')}; no formal sample-size calculation.", ("04_tabular_mlp", r"^## 1\.")),
    ("11", "Missing data", "answered", lambda m: "Median imputation with missingness indicators, fitted inside each "
     "training fold.", ("04_tabular_mlp", r"^## 4\.")),
    ("12a", "How the data were used (partitioning)", "answered", lambda m: "Images: train/val/test grouped by "
     + _ds(m, "group_unit", "cluster image") + "; table: repeated stratified 5-fold CV and a 70/15/15 split for fusion.",
     ("01_eda", r"^## 2\.")),
    ("12b", "Handling of predictors", "answered", lambda m: "Imputation + StandardScaler in an sklearn Pipeline.",
     ("04_tabular_mlp", r"^## 4\.")),
    ("12c", "Model type, building steps, tuning, internal validation", "answered",
     lambda m: f"EfficientNet ({_fmt(_get(m['metrics'].get('03_image_branch', {}), 'params', 'backbone'))}) image branch, "
               "MLP tabular branch, late fusion; early stopping on validation.", ("03_image_branch", r"^## 2\.")),
    ("12d", "Heterogeneity across clusters", "cannot", lambda m: "Single-centre datasets; "
     + _ds(m, "group_unit", "cluster image") + "s are grouped in splits but performance is not reported per centre.", None),
    ("12e", "Performance measures and plots", "answered", lambda m: "AUC, average precision with bootstrap CIs, "
     "sensitivity at 90% specificity, calibration.", ("04_tabular_mlp", r"^## 7\.")),
    ("12f", "Model updating", "n/a", lambda m: "No updating or recalibration was done.", None),
    ("12g", "How predictions were calculated", "answered", lambda m: "Saved Keras model + preprocessor JSON; "
     "`python -m lib.serve.inference`.", ("05_late_fusion", r"^## 9\.")),
    ("13", "Class imbalance", "answered", lambda m: "Balanced class weights (tabular MLP, fusion heads); no "
     "oversampling.", ("05_late_fusion", r"^## 5\.")),
    ("14", "Fairness", "cannot", lambda m: "No sociodemographic groups beyond age are recorded; " + NO_PATIENTS, None),
    ("15", "Model output and thresholds", "answered",
     lambda m: "Sigmoid risk; threshold " + _fmt(_get(m["cards"][0][1] if m["cards"] else {}, "threshold")) + ".",
     "model_card"),
    ("16", "Differences between development and evaluation data", "answered",
     lambda m: "Same sources; held-out " + _ds(m, "group_unit", "cluster image") + "s and UCI records.",
     ("05_late_fusion", r"^## 1\.")),
    ("17", "Ethical approval", "cannot", lambda m: NO_PATIENTS + " Public de-identified data only.", None),
    ("18a", "Funding", "n/a", lambda m: "None.", None),
    ("18b", "Conflicts of interest", "n/a", lambda m: "None.", None),
    ("18c", "Protocol", "n/a", lambda m: "No protocol; the notebooks are the analysis plan.", None),
    ("18d", "Registration", "n/a", lambda m: "Not registered (teaching rebuild).", None),
    ("18e", "Data sharing", "answered", lambda m: "Public datasets; see the dataset cards.", "dataset_cards"),
    ("18f", "Code sharing", "answered", lambda m: "The kit (notebooks + lib) is the code.", "run_summary"),
    ("19", "Patient and public involvement", "cannot", lambda m: NO_PATIENTS, None),
    ("20a", "Flow of participants", "cannot", lambda m: UNPAIRED + " Counts per dataset are on the dataset cards.",
     "dataset_cards"),
    ("20b", "Characteristics of participants", "answered", lambda m: "Class balance, missingness and prevalence.",
     ("01_eda", r"^## 3\.")),
    ("20c", "Development vs evaluation characteristics", "cannot", lambda m: UNPAIRED, None),
    ("21", "Participants and events per analysis", "answered",
     lambda m: f"Fusion test pairs: {_h(m, '05_late_fusion', 'n_test_images')}; UCI rows "
               f"{_h(m, '04_tabular_mlp', 'n_rows')}.", ("05_late_fusion", r"^## 5\.")),
    ("22", "Full model specification", "answered", lambda m: "Saved model files listed on the model card.",
     "model_card"),
    ("23a", "Performance with confidence intervals", "answered",
     lambda m: f"Fused AUC {_h(m, '05_late_fusion', 'auc_fused')}; shuffled control {_h(m, '05_late_fusion', 'auc_shuffled')}; "
               f"tabular MLP {_h(m, '04_tabular_mlp', 'auc_mlp')}.", ("05_late_fusion", r"^## 6\.")),
    ("23b", "Heterogeneity of performance across clusters", "cannot", lambda m: "Single source per modality.", None),
    ("24", "Model updating results", "n/a", lambda m: "No updating.", None),
    ("25", "Interpretation", "answered", _lesson,
     ("05_late_fusion", r"^## What to take away")),
    ("26", "Limitations", "answered", lambda m: "Listed on the model card (caveats).", "model_card"),
    ("27a", "Handling poor-quality or missing input", "answered", lambda m: "`lib.serve.inference` rejects malformed "
     "inputs with an error that names them.", "model_card"),
    ("27b", "User interaction and expertise", "n/a", lambda m: "Not for clinical users.", None),
    ("27c", "Next steps", "answered", lambda m: "Paired multimodal data from the same patients would be needed.",
     ("05_late_fusion", r"^## What to take away")),
]
STATUS_LABEL = {"answered": "answered", "cannot": "**cannot answer**", "n/a": "not applicable"}


def _evidence_cell(staged: dict, stem: str, pattern: str):
    """The id of the first cell of staged notebook ``stem`` whose source matches ``pattern``, or None."""
    nb = staged.get(stem)
    if nb is None:
        return None
    rx = re.compile(pattern, re.M)
    for c in nb["cells"]:
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if rx.search(src) and c.get("id"):
            return c["id"]
    return None


def checklist_markdown(profile: str, meta: dict | None = None, staged: dict | None = None) -> str:
    """The TRIPOD+AI table: each item answered from the run's metadata, with a link to its evidence."""
    meta = meta or run_metadata(profile)
    staged = staged or {}
    rows = ["| item | topic | status | answer (this run) | evidence |", "|---|---|---|---|---|"]
    for item, topic, status, answer, ev in TRIPOD_AI:
        try:
            text = answer(meta)
        except (KeyError, IndexError, TypeError, ValueError):
            text = NOT_RECORDED
        link = ""
        if isinstance(ev, tuple):
            stem, pattern = ev
            if stem in staged:
                cid = _evidence_cell(staged, stem, pattern)
                link = f"[{stem}]({STAGE_PREFIX}{stem}.ipynb{'#cell-id=' + cid if cid else ''})"
            else:
                link = f"{stem} (not in this run)"
        elif isinstance(ev, str):
            link = f"[{ev.replace('_', ' ')}]({ev}.qmd)"
        rows.append(f"| {item} | {topic} | {STATUS_LABEL[status]} | {text.replace('|', '/')} | {link} |")
    n = {s: sum(1 for r in TRIPOD_AI if r[2] == s) for s in STATUS_LABEL}
    return (f"TRIPOD+AI (Collins et al., BMJ 2024;385:e078378): {len(TRIPOD_AI)} items; {n['answered']} answered "
            f"from this run (profile **{profile}**), {n['cannot']} that the kit cannot answer (no real participants, "
            f"unpaired datasets), {n['n/a']} not applicable.\n\n" + "\n".join(rows) + "\n")


# --------------------------------------------------------------------------- run summary
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _num(v, digits: int = 1) -> str:
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else _cell(v)


def run_summary_markdown(profile: str, meta: dict | None = None) -> str:
    """Per-notebook wall time and peak memory (``pipeline.json``), the environment, profile and dataset."""
    meta = meta or run_metadata(profile)
    pipe = meta["pipeline"]
    nbs = pipe.get("notebooks") if isinstance(pipe.get("notebooks"), dict) else {}
    out = ["## Notebooks\n"]
    if nbs:
        out.append("| notebook | wall time (s) | kernel peak memory (MB) |\n|---|---|---|")
        for stem, st in sorted(nbs.items()):
            st = st if isinstance(st, dict) else {}
            out.append(f"| {stem} | {_num(_get(st, 'seconds'))} | {_num(_get(st, 'peak_rss_mb'), 0)} |")
        secs = [st.get("seconds") for st in nbs.values() if isinstance(st, dict) and isinstance(st.get("seconds"), (int, float))]
        peaks = [st.get("peak_rss_mb") for st in nbs.values() if isinstance(st, dict) and isinstance(st.get("peak_rss_mb"), (int, float))]
        out.append(f"| **total / max** | {sum(secs):.1f} | {_num(max(peaks), 0) if peaks else NOT_RECORDED} |\n")
        out.append(f"Last pipeline call: {_num(_get(pipe, 'last_run_seconds'))} s (notebooks that were up to date were "
                   "skipped and keep the times of the run that made them).\n")
    else:
        out.append(f"*{NOT_RECORDED}: no `pipeline.json` for profile `{profile}`.*\n")
    src, synthetic = _image_source(meta)
    params = _get(meta.get("run", {}), "params", default=None)
    if not isinstance(params, dict):
        params = _get(meta["metrics"].get("03_image_branch", {}), "params", default={})
    out += ["## Run\n", _dl([
        ("profile", _get(pipe, "profile", default=profile)),
        ("image data", f"{_raw(src)}{' (SYNTHETIC stand-in)' if synthetic else ''}"),
        ("tabular data", "UCI dataset 383"),
        ("backbone / weights / image size", f"{_raw(_get(params, 'backbone'))} / {_raw(_get(params, 'weights'))} / "
                                            f"{_raw(_get(params, 'image_size'))}"),
        ("seed", _get(params, "seed")),
    ])]
    env = [("Python", platform.python_version()), ("platform", f"{platform.system()} {platform.machine()}"),
           ("CPU cores", os.cpu_count())]
    versions = {d: _version(d) for d in KEY_PACKAGES}
    if versions["tensorflow"] == "not installed" and versions["tensorflow-cpu"] != "not installed":
        del versions["tensorflow"]  # one of the two distributions provides `import tensorflow`
    elif versions["tensorflow-cpu"] == "not installed":
        del versions["tensorflow-cpu"]
    env += list(versions.items())
    out += ["\n## Environment\n", "The environment that rendered this page (`make report` runs the notebooks "
            "and the site in the same `.venv`).\n", _dl(env, ("software", "version"))]
    return "\n".join(out)


# --------------------------------------------------------------------------- staging
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


_FOLD_OPTION = re.compile(r"^#\|\s*code-fold:\s*(\S+)\s*$", re.M)


def stage(profile: str, stage_dir: Path | None = None) -> list[Path]:
    """Copy the executed notebooks of ``profile`` into ``build/report`` and write the page snippets."""
    stage_dir = Path(stage_dir or STAGE)
    src = config.run_dir(profile) / "notebooks"
    nbs = sorted(src.glob("[0-9][0-9]_*.ipynb"))
    if not nbs:
        raise FileNotFoundError(f"no executed notebooks in {src}: run `python -m lib.report.pipeline --profile {profile}` first")
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    meta = run_metadata(profile)
    synthetic_by_nb = {stem: m.get("synthetic", False) for stem, m in meta["metrics"].items()}
    staged, staged_nbs = [], {}
    for nb_path in nbs:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        if synthetic_by_nb.get(nb_path.stem):
            cells.insert(1 if cells and cells[0]["cell_type"] == "markdown" else 0,
                         {"cell_type": "markdown", "id": "synthetic-banner", "metadata": {}, "source": SYNTHETIC_BANNER})
        used = {c.get("id") for c in cells}
        for i, c in enumerate(cells):
            # every cell gets a unique id, so the checklist can link to the cell that holds its evidence
            if not c.get("id"):
                c["id"] = next(f"cell-{i}{s}" for s in ("", *(f"-{k}" for k in range(1, len(cells) + 2)))
                               if f"cell-{i}{s}" not in used)
                used.add(c["id"])
            if c.get("outputs"):
                c["outputs"] = collapse_progress(c["outputs"])
            tags = c.get("metadata", {}).get("tags", [])
            # papermill's injected-parameters cell is an implementation detail: hide it on the page
            if "injected-parameters" in tags and "remove-cell" not in tags:
                c["metadata"]["tags"] = tags + ["remove-cell"]
            if c["cell_type"] == "code":  # Quarto's per-cell option `#| code-fold: false|true|show`
                m = _FOLD_OPTION.search(_text({"text": c["source"]}))
                if m:
                    c["metadata"]["code_fold"] = m.group(1).strip("\"'")
        nb["nbformat"], nb["nbformat_minor"] = 4, max(5, int(nb.get("nbformat_minor", 5)))  # ids need 4.5
        target = stage_dir / nb_path.name
        write_text(target, json.dumps(nb, indent=1))
        staged.append(target)
        staged_nbs[nb_path.stem] = nb
    results_banner = SYNTHETIC_BANNER if any_synthetic(profile) else ""
    card_banner = SYNTHETIC_BANNER if cards_synthetic(meta) else ""
    write_text(stage_dir / "_banner.md", results_banner + "\n\n" + CLINICAL_NOTE + "\n")  # pages with results
    write_text(stage_dir / "_banner_model_card.md", card_banner + "\n\n" + CLINICAL_NOTE + "\n")
    write_text(stage_dir / "_clinical_note.md", CLINICAL_NOTE + "\n")  # pages without synthetic results
    write_text(stage_dir / "_headline.md", headline_markdown(profile))
    write_text(stage_dir / "_model_card.md", model_card_markdown(profile, meta))
    write_text(stage_dir / "_dataset_cards.md", dataset_cards_markdown(profile, meta))
    write_text(stage_dir / "_checklist.md", checklist_markdown(profile, meta, staged_nbs))
    write_text(stage_dir / "_run_summary.md", run_summary_markdown(profile, meta))
    downloads = stage_dir / "downloads"
    downloads.mkdir()
    for card_path, _ in meta["cards"]:
        shutil.copyfile(card_path, downloads / card_path.name)
    return staged


# --------------------------------------------------------------------------- nbconvert fallback
_INCLUDE = re.compile(r"\{\{<\s*include\s+(\S+)\s*>\}\}")
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def quarto_config(path: Path | None = None) -> dict:
    """``_quarto.yml`` as a dict: the fallback builds the same pages, sidebar and code folding from it."""
    import yaml

    path = Path(path or QUARTO_YML)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FileNotFoundError(f"{path}: cannot read the site description ({err})") from None
    if not isinstance(cfg, dict):
        raise FileNotFoundError(f"{path}: expected a YAML mapping with project/website/format")
    return cfg


def code_fold_setting(cfg: dict):
    """``format: html: code-fold``: False, True (folded) or "show" (folded, open)."""
    v = _get(cfg, "format", "html", "code-fold", default=False)
    return "show" if str(v).lower() == "show" else bool(v) and str(v).lower() != "false"


def _sidebar(cfg: dict) -> list:
    """``[(label or None, [entries])]``: the sidebar's top level, sections kept as groups."""
    groups = []
    for entry in _get(cfg, "website", "sidebar", "contents", default=[]) or []:
        if isinstance(entry, dict) and "section" in entry:
            groups.append((str(entry["section"]), [e if isinstance(e, str) else e.get("href", "") for e in entry.get("contents", [])]))
        elif isinstance(entry, dict):
            groups.append((None, [entry.get("href", "")]))
        else:
            groups.append((None, [str(entry)]))
    return groups


def _qmd_pages(cfg: dict) -> list[str]:
    render = _get(cfg, "project", "render", default=[]) or []
    pages = [p for p in render if str(p).endswith(".qmd")]
    return pages or ["index.qmd"]


def _qmd_title(path: Path) -> str:
    m = _FRONT.match(path.read_text(encoding="utf-8"))
    if m:
        for line in m.group(1).splitlines():
            if line.startswith("title:"):
                return line.split(":", 1)[1].strip().strip('"')
    return path.stem


def _resolve_include(name: str, stage_dir: Path) -> Path:
    return stage_dir / name[len(STAGE_PREFIX):] if name.startswith(STAGE_PREFIX) else config.ROOT / name


def _qmd_to_html_body(path: Path, stage_dir: Path | None = None) -> tuple[str, str]:
    """Minimal .qmd reader for the fallback: front-matter title, includes, callouts, links."""
    from nbconvert.filters.markdown import markdown2html

    stage_dir = Path(stage_dir or STAGE)
    text = path.read_text(encoding="utf-8")
    title = _qmd_title(path)
    m = _FRONT.match(text)
    if m:
        text = text[m.end():]

    def include(mm):
        p = _resolve_include(mm.group(1), stage_dir)
        return p.read_text(encoding="utf-8") if p.exists() else ""

    text = _INCLUDE.sub(include, text)
    # Quarto turns links to .qmd/.ipynb pages into .html links; the fallback (one flat folder) does the same
    text = re.sub(r"\]\(([^)\s]+?)\.(?:qmd|ipynb)(#[^)]*)?\)", lambda mm: f"]({Path(mm.group(1)).name}.html{mm.group(2) or ''})", text)
    return title, markdown2html(callouts_to_html(text))


_CALLOUT_OPEN = re.compile(r"^:::+\s*\{\.callout-(\w+)([^}]*)\}\s*$")
_CALLOUT_CLOSE = re.compile(r"^:::+\s*$")


def callouts_to_html(text: str) -> str:
    """Quarto callouts (``::: {.callout-tip collapse="true" title="Answer"}`` ... ``:::``) as HTML for the fallback:
    a box, or a folded ``<details>`` when ``collapse="true"`` (how worked answers stay hidden until asked for).
    A ``## heading`` right after the opening line becomes the title, as in Quarto."""
    out, stack, lines, i = [], [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        m = _CALLOUT_OPEN.match(line)
        if m:
            kind, attrs = m.group(1), m.group(2)
            title = re.search(r'title\s*=\s*"([^"]*)"', attrs)
            title = title.group(1) if title else None
            if title is None and i + 1 < len(lines) and re.match(r"^#{1,6}\s+\S", lines[i + 1]):
                title = re.sub(r"^#{1,6}\s+", "", lines[i + 1]).strip()
                i += 1
            folded = re.search(r'collapse\s*=\s*"?true"?', attrs) is not None
            tag = "details" if folded else "div"
            head = (f"<summary>{html.escape(title or kind.capitalize())}</summary>" if folded
                    else (f"<p><strong>{html.escape(title)}</strong></p>" if title else ""))
            out += [f'<{tag} class="callout callout-{kind}">{head}', ""]
            stack.append(tag)
        elif _CALLOUT_CLOSE.match(line) and stack:
            out += ["", f"</{stack.pop()}>", ""]
        else:
            out.append(line)
        i += 1
    out += [f"</{t}>" for t in reversed(stack)]
    return "\n".join(out)


def _fallback_notebook(nb_path: Path):
    """The staged notebook as the fallback renders it: Quarto callouts in Markdown cells turned into HTML."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    for c in nb.cells:
        if c.cell_type == "markdown" and ":::" in c.source:
            c.source = callouts_to_html(c.source)
    return nb


def _page_title(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for line in src.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb_path.stem


def _pygments_css() -> str:
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(style="default").get_style_defs(".highlight")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;display:flex;line-height:1.45}
nav.sidebar{width:250px;min-height:100vh;background:#f4f6f8;padding:1em;box-sizing:border-box;flex-shrink:0}
nav.sidebar a{display:block;padding:0.3em 0;color:#1a5276;text-decoration:none}
nav.sidebar a.active{font-weight:bold}
nav.sidebar .section{margin-top:0.8em;color:#555;font-size:small;text-transform:uppercase}
nav.sidebar .section ~ a.in-section{padding-left:0.8em}
main{padding:1em 2em;max-width:1000px;flex-grow:1;min-width:0}
main img{max-width:100%}
table{border-collapse:collapse;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:0.25em 0.6em;vertical-align:top}
.output_subarea,.output_html,.output_text,.input_area{max-width:100%;overflow-x:auto}
pre{overflow-x:auto;margin:0.3em 0}
.output_stderr pre{background:#fff5f5}
.input_area{background:#f7f7f7;border:1px solid #e4e4e4;border-radius:4px;padding:0.3em 0.6em}
details.callout>summary{cursor:pointer;font-weight:bold}
main details:not(.code-fold)>summary{cursor:pointer;color:#1a5276;font-weight:600}
main details:not(.code-fold)[open]{border-left:3px solid #aed6f1;padding-left:0.8em}
details.code-fold{margin:0.6em 0 0.2em 0}
details.code-fold>summary{cursor:pointer;color:#555;font-size:small}
a.anchor-link{visibility:hidden;text-decoration:none;margin-left:0.3em;color:#999}
h1:hover a.anchor-link,h2:hover a.anchor-link,h3:hover a.anchor-link,h4:hover a.anchor-link{visibility:visible}
.callout{border-left:4px solid #2e86c1;padding:0.4em 0.8em;margin:0.8em 0;background:#f8fbfd}
.callout-warning{border-color:#e67e22}.callout-important{border-color:#c0392b}
"""

# MathJax 2.7 from the jupyter-server-mathjax package, configured as Jupyter's classic notebook does
# (that package ships only the STIX-Web fonts)
MATHJAX_DIR = "mathjax"
MATHJAX_CONFIG = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({tex2jax:{inlineMath:[['$','$'],['\\\\(','\\\\)']],displayMath:[['$$','$$'],['\\\\[','\\\\]']],
  processEscapes:true,processEnvironments:true},
  "HTML-CSS":{availableFonts:[],imageFont:null,preferredFont:null,webFont:"STIX-Web",linebreaks:{automatic:true}},
  messageStyle:"none",menuSettings:{zoom:"None"},showMathMenu:false});
</script>"""
MATHJAX_SCRIPT = f'<script src="{MATHJAX_DIR}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>'


def mathjax_source() -> Path:
    """The folder holding ``MathJax.js`` in the installed ``jupyter-server-mathjax`` package."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise FileNotFoundError("MathJax for offline math: package 'jupyter-server-mathjax' is not installed "
                                "(it is pinned in requirements.txt: make venv)") from None
    d = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (d / "MathJax.js").exists():
        raise FileNotFoundError(f"jupyter-server-mathjax has no static/MathJax.js under {d.parent.name}")
    return d


def _wrap(title: str, body: str, nav: list, active: str, renderer: str) -> str:
    """One page: sidebar from ``nav`` (``("section", label)`` or ``(href, label)``), MathJax, styles."""
    links, in_section = [], False
    for href, label in nav:
        if href == "section":
            links.append(f"<div class='section'>{html.escape(label)}</div>")
            in_section = True
            continue
        cls = " ".join(c for c in ("active" if href == active else "", "in-section" if in_section else "") if c)
        links.append(f'<a href="{href}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{html.escape(label)}</a>')
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}{_pygments_css()}</style>{MATHJAX_CONFIG}{MATHJAX_SCRIPT}</head><body>"
            f"<nav class='sidebar'><strong>Hybrid cervical-risk kit</strong>{''.join(links)}"
            f"<p style='font-size:small;color:#777'>rendered with {renderer}</p></nav>"
            f"<main>{body}</main></body></html>")


FOLD_TEMPLATE = """{%- extends 'basic/index.html.j2' -%}
{% block input_group -%}
{%- set fold = cell.metadata.get('code_fold', resources.get('code_fold', False)) -%}
{%- if fold in (True, 'true', 'show') -%}
<details class="code-fold"{{ ' open' if fold == 'show' else '' }}><summary>Code</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{%- endblock input_group %}
"""


def _exporter():
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
    c.TagRemovePreprocessor.remove_input_tags = ("remove-input", "hide-input")
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c, template_name="basic", extra_loaders=[DictLoader({"kit_fold.html.j2": FOLD_TEMPLATE})],
                            template_file="kit_fold.html.j2")
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    return exporter


def _nav(cfg: dict, staged: list[Path]) -> list:
    """The sidebar of ``_quarto.yml``; its notebook entries become the staged notebooks of this run, in order."""
    nav, notebooks_done = [], False
    for label, entries in _sidebar(cfg):
        if label:
            nav.append(("section", label))
        for e in entries:
            if e.endswith(".ipynb"):
                if not notebooks_done:
                    nav += [(p.stem + ".html", _page_title(p)) for p in staged]
                    notebooks_done = True
            elif e.endswith(".qmd") and (config.ROOT / e).exists():
                nav.append((Path(e).stem + ".html", _qmd_title(config.ROOT / e)))
    if not notebooks_done:
        nav[1:1] = [(p.stem + ".html", _page_title(p)) for p in staged]
    return nav


def render_nbconvert(staged: list[Path], out_dir: Path, stage_dir: Path | None = None, cfg: dict | None = None) -> None:
    """Build the site with nbconvert: the pages, sidebar and code folding of ``_quarto.yml``, math offline."""
    stage_dir = Path(stage_dir or (staged[0].parent if staged else STAGE))
    cfg = cfg if cfg is not None else quarto_config()
    out_dir = Path(out_dir)
    exporter = _exporter()
    fold = code_fold_setting(cfg)
    pages = _nav(cfg, staged)
    for qmd in _qmd_pages(cfg):
        if not (config.ROOT / qmd).exists():
            continue
        title, body = _qmd_to_html_body(config.ROOT / qmd, stage_dir)
        name = Path(qmd).stem + ".html"
        (out_dir / name).write_text(_wrap(title, f"<h1>{html.escape(title)}</h1>" + body, pages, name, "nbconvert"),
                                    encoding="utf-8")
    for nb_path in staged:
        body, _ = exporter.from_notebook_node(_fallback_notebook(nb_path), resources={"code_fold": fold})
        name = nb_path.stem + ".html"
        (out_dir / name).write_text(_wrap(_page_title(nb_path), body, pages, name, "nbconvert"), encoding="utf-8")
    shutil.copytree(mathjax_source(), out_dir / MATHJAX_DIR, dirs_exist_ok=True)
    if (stage_dir / "downloads").is_dir():  # the .qmd pages link them as build/report/downloads/...
        shutil.copytree(stage_dir / "downloads", out_dir / STAGE_PREFIX / "downloads", dirs_exist_ok=True)


def make_readable(root: Path) -> None:
    """Directories 0755, files 0644: a web server or a colleague can read the site (mkdtemp makes 0700)."""
    root = Path(root)
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, 0o755)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, 0o644)


def render(profile: str = "full", renderer: str = "auto") -> str:
    """Stage and render; returns the renderer used. The old ``_site`` survives a failed render."""
    import time

    t0 = time.perf_counter()
    staged = stage(profile)
    quarto = shutil.which("quarto")
    if renderer == "quarto" and not quarto:
        raise FileNotFoundError("renderer 'quarto' requested but `quarto` is not on PATH "
                                "(install it from conda-forge: `conda install -c conda-forge quarto`)")
    use = "quarto" if (renderer in ("auto", "quarto") and quarto) else "nbconvert"
    tmp = Path(tempfile.mkdtemp(prefix="_site.", dir=SITE.parent))  # same file system: the swap is a rename
    try:
        if use == "quarto":
            subprocess.run([quarto, "render", str(config.ROOT), "--output-dir", str(tmp)], check=True)
        else:
            render_nbconvert(staged, tmp)
        make_readable(tmp)
        old = SITE.with_name(SITE.name + ".old")
        if SITE.exists():
            SITE.rename(old)
        tmp.rename(SITE)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"report rendered with {use}{'' if use == 'quarto' else ' (quarto not on PATH)'} into {SITE.name}/ "
          f"in {time.perf_counter() - t0:.1f} s")
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
