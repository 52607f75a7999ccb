"""Narrative markdown never types a number the kit measured: such numbers are printed by code.

Typed numbers drift from the runs they describe (issue 13: "Ten cells per class" beside a gallery of
8, a typed AUC range beside a printed 0.757). So every number in a markdown cell of the six notebooks
must be one of

(a) a literature figure of ``lib.report.references`` (one table), in a sentence that names its source;
(b) a structural number matched by one narrow pattern of ``STRUCTURAL`` below (section and notebook
    numbers, citation years, architecture and recipe settings); each says why, and those that restate
    a setting are checked against that setting, so they cannot drift either;
(c) inside a code span, a code block or a formula (code is code, a formula's constants are maths).

"Number" means digits (``0.757``, ``97.8%``, ``1e-4``) and spelled-out numbers from ten up ("Ten
cells per class"); below ten, spelled words ("two datasets", "three columns") are structural language
far more often than data and are left to review. Anything else fails, naming notebook, cell and number.
"""
from __future__ import annotations

import ast
import functools
import json
import re
import shutil
from pathlib import Path

import pytest

from lib.config import AUTO_IMAGE_SIZES, PROFILES
from lib.report import references

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb"))
LIB = ROOT / "lib"

NUMBER = re.compile(
    r"(?<![\w.])\d+(?:x\d+)?(?:[.,]\d+)*(?:e-?\d+)?(?:\s?%)?(?![\w])"
    r"|\b(?:ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty"
    r"|fifty|sixty|seventy|eighty|ninety|hundreds?|thousands?|dozens?)\b", re.I)
SPELLED = {"ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
           "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
           "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}


# --------------------------------------------------------------------------- settings, read without importing TF
@functools.lru_cache(maxsize=None)
def _tree(relpath: str) -> ast.Module:
    return ast.parse((LIB / relpath).read_text())


def constant(relpath: str, name: str):
    """A module-level constant of a lib file (``LEARNING_RATE = 1e-4``), read from its source."""
    for node in _tree(relpath).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{relpath}: no module-level constant {name}")


def default(relpath: str, func: str, arg: str):
    """The default value of one argument of a lib function (``build_mlp(..., dropout=0.3)``)."""
    for node in ast.walk(_tree(relpath)):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
            for p, d in pairs:
                if p.arg == arg:
                    return ast.literal_eval(d)
    raise LookupError(f"{relpath}: no function {func} with a default for {arg}")


def _dropouts():
    return {default("image/image_model.py", "regularized_recipe", "dropout"),
            constant("tabular/mlp.py", "DROPOUT")}


def _learning_rates():
    return {constant("image/image_model.py", "LEARNING_RATE"), constant("image/image_model.py", "NAIVE_LEARNING_RATE"),
            constant("image/image_model.py", "LINEAR_PROBE_LR"), constant("image/image_model.py", "LP_FT_LEARNING_RATE"),
            constant("fusion/hybrid.py", "LEARNING_RATE"), constant("tabular/mlp.py", "LEARNING_RATE")}


def _sipakmed_files() -> int:
    clusters = json.loads((LIB / "data" / "sipakmed_clusters.json").read_text())
    return sum(sum(per.values()) for per in clusters.values())


def _grid(m) -> bool:
    """``7x7 at 224 px (the `full` profile)``: the named profile's size, divided by EfficientNet's stride 32."""
    a, b, size = int(m["a"]), int(m["b"]), int(m["size"])
    profile = m["p1"] or m["p2"]
    chosen = PROFILES.values() if profile is None else [PROFILES[profile]]
    sizes = set()
    for p in chosen:  # "auto" is one of config.AUTO_IMAGE_SIZES, chosen from the images
        sizes |= set(AUTO_IMAGE_SIZES) if p["image_size"] == "auto" else {p["image_size"]}
    return a == b == size // 32 and size in sizes


def _uci_split(m) -> bool:
    val = default("fusion/pairing.py", "split_uci", "val_frac")
    test = default("fusion/pairing.py", "split_uci", "test_frac")
    expected = [round(100 * (1 - val - test)), round(100 * val), round(100 * test)]
    return [int(m[k]) for k in ("tr", "va", "te")] == expected


def _num(s: str) -> float:
    return float(s.replace("%", "").strip())


#: name, pattern (matched on the cell's text), why it is not data, and a check of the setting it restates.
STRUCTURAL = [
    ("heading number", r"(?m)^#{1,6}\s+\d{1,2}(?=[.\s])", "section numbering", None),
    ("list item number", r"(?m)^\s*(?:\*\*)?\d{1,2}\.(?=\s)", "numbered list or exercise", None),
    ("section reference", r"\b[Ss]ections?\s+\d{1,2}(?:(?:,\s*|\s+and\s+|\s*-\s*)\d{1,2})*\b",
     "points at a heading", None),
    ("notebook number", r"(?<![\w.])0[1-6](?![\w%]|\.\d)", "the six notebooks are 01..06", None),
    ("citation year", r"et al\.?[^()\d]{0,40}?\(?(?:19[5-9]\d|20[0-4]\d)\b", "year of a cited paper", None),
    ("UCI dataset id", r"UCI dataset 383\b", "the UCI repository's identifier of the table", None),
    ("UCI header width", r"header \((?P<n>\d+) named columns\)",
     "the published header the loader checks",
     lambda m: int(m["n"]) == len(constant("data/uci.py", "EXPECTED_COLUMNS"))),
    ("SIPaKMeD file list", r"(?P<n>\d+)-name SIPaKMeD file list", "the shipped list of SIPaKMeD's published files",
     lambda m: int(m["n"]) == _sipakmed_files()),
    ("binary coding", r"\b0/1\b", "a target coded 0/1", None),
    ("unit interval", r"\[0, 1\]", "the range maps are scaled to", None),
    ("metric bound", r"cannot exceed 1\b|(?<=: )1 by\s+construction|counts as 0\b|\(1 = same ordering|stayed near 1\b",
     "a bound or definition of a metric, not a measurement", None),
    ("embedding width", r"\b(?P<n>512|64)-d\b", "the embedding widths of the original architecture",
     lambda m: int(m["n"]) in {default("image/image_model.py", "build_image_classifier", "embedding_dim"),
                               constant("tabular/mlp.py", "EMBEDDING_DIM")}),
    ("MLP widths", r"Dense (?P<a>\d+) / (?P<b>\d+)", "the tabular MLP's hidden layers",
     lambda m: (int(m["a"]), int(m["b"])) == tuple(constant("tabular/mlp.py", "HIDDEN"))),
    ("frozen blocks", r"[Bb]locks 1(?:-| to )6b\b|\bblock 7\b", "EfficientNet's block names", None),
    ("stride", r"divided by 32\b|input / 32\b", "EfficientNet's output stride", None),
    ("feature grid",
     r"(?P<a>\d+)x(?P<b>\d+) at (?:the `(?P<p1>\w+)` profile's )?(?P<size>\d+) px(?: \(the `(?P<p2>\w+)` profile\))?",
     "grid = image_size / 32 of a profile", _grid),
    ("learning rate", r"(?:Adam(?: at)?(?: lr)?|learning rate) (?P<v>\de-\d)\b", "the recipes' learning rates",
     lambda m: float(m["v"]) in _learning_rates()),
    ("dropout", r"dropout (?P<v>0\.\d+)\b", "the recipes' dropout rate", lambda m: float(m["v"]) in _dropouts()),
    ("specificity target", r"(?P<v>\d+)% specificity", "the fixed specificity of every report",
     lambda m: _num(m["v"]) / 100 == default("metrics.py", "binary_report", "spec_target")),
    ("interval level", r"(?P<v>\d+)% CIs?\b", "the coverage of every interval",
     lambda m: _num(m["v"]) / 100 == default("metrics.py", "binary_report", "ci")),
    ("decision threshold", r"threshold\s+(?P<v>0\.\d+)", "the threshold of F1 / precision / recall",
     lambda m: float(m["v"]) == default("metrics.py", "binary_report", "threshold")),
    ("folds", r"\((?P<v>\d+) folds\b", "the cross-validation's folds",
     lambda m: int(m["v"]) == default("tabular/mlp.py", "cross_validate", "n_splits")),
    ("UCI split", r"\((?P<tr>\d+)/(?P<va>\d+)/(?P<te>\d+), stratified", "the UCI split fractions", _uci_split),
]


# --------------------------------------------------------------------------- the check
def _blank(m) -> str:
    return re.sub(r"[^\n]", " ", m.group())


def mask_code_and_math(text: str) -> str:
    """Code blocks, code spans, formulas and HTML tags blanked out, keeping every other character's offset."""
    for pat in (r"```.*?```", r"`[^`\n]*`", r"\$\$.*?\$\$", r"(?<!\\)\$[^$\n]+\$", r"<[^>\n]*>"):
        text = re.sub(pat, _blank, text, flags=re.S)
    return text


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*(])|\n\s*\n|\n\s*(?:[-*]|\d+\.)\s")


def _sentence(text: str, pos: int) -> str:
    """The sentence (or list item) around ``pos``: a figure's source must be named that close to it."""
    start, end = 0, len(text)
    for m in SENTENCE_END.finditer(text):
        if m.end() <= pos:
            start = m.end()
        elif m.start() >= pos:
            end = m.start()
            break
    return text[start:end]


def _literature(token: str, sentence: str) -> dict | None:
    if not re.fullmatch(r"\d+(?:\.\d+)?\s?%?", token):
        return None
    v = _num(token) / (100 if token.endswith("%") else 1)
    for fig in references.figures():
        if abs(fig["value"] - v) < 5e-4 and re.search(fig["cue"], sentence, re.I):
            return fig
    return None


def _where(notebook: Path, i: int, cell: dict) -> str:
    return f"{notebook.name}, cell {i}" + (f" (id {cell['id']})" if cell.get("id") else "")


def violations(notebook: Path) -> list[str]:
    """Every number in the notebook's markdown that is neither literature, structural, nor code."""
    nb = json.loads(notebook.read_text())
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        raw = "".join(cell["source"])
        text = mask_code_and_math(raw)
        allowed = []
        for name, pattern, _why, check in STRUCTURAL:
            for m in re.finditer(pattern, raw):
                if check is not None and not check(m):
                    found.append(f"{_where(notebook, i, cell)}: {m.group()!r} restates a setting "
                                 f"({name}) that the code no longer has")
                    continue
                allowed.append(m.span())
        for m in NUMBER.finditer(text):
            a, b = m.span()
            if any(lo <= a and b <= hi for lo, hi in allowed):
                continue
            if _literature(m.group(), _sentence(text, a)) is not None:
                continue
            context = " ".join(raw[max(0, a - 40):b + 30].split())
            found.append(f"{_where(notebook, i, cell)}: number {m.group()!r} typed in prose "
                         f"(...{context}...); print it from code, or cite it in lib/report/references.py")
    return found


# --------------------------------------------------------------------------- tests
def test_six_notebooks_found():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_types_no_data_derived_number(notebook):
    assert violations(notebook) == []


def _plant(src: Path, dst: Path, sentence: str, cell_id=None) -> int:
    nb = json.loads(src.read_text())
    idx = next(i for i, c in enumerate(nb["cells"])
               if c["cell_type"] == "markdown" and (cell_id is None or c.get("id") == cell_id) and i > 0)
    nb["cells"][idx]["source"] = "".join(nb["cells"][idx]["source"]) + "\n\n" + sentence + "\n"
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return idx


def test_prose_check_fails_on_a_planted_typed_number(tmp_path):
    src = ROOT / "notebooks" / "03_image_branch.ipynb"
    copy = tmp_path / src.name
    shutil.copy(src, copy)
    assert violations(copy) == []
    idx = _plant(src, copy, "The fine-tuned model reaches a macro-F1 of 0.629 on the test split.")
    found = violations(copy)
    assert len(found) == 1
    assert found[0].startswith(f"03_image_branch.ipynb, cell {idx} ") and "'0.629'" in found[0]


@pytest.mark.parametrize("sentence, number", [
    ("Ten cells per class are drawn below.", "Ten"),               # spelled out: issue 13's own example
    ("The tabular side reaches AUC about 0.65-0.69 here.", "0.65"),  # a range: its first end is not literature
    ("Validation accuracy stalls at 33 % after epoch 3.", "33 %"),
    ("The grid is 3x3 at 96 px.", "3x3"),                          # not a profile's image size: not structural
])
def test_prose_check_catches_the_ways_numbers_are_typed(tmp_path, sentence, number):
    src = ROOT / "notebooks" / "02_overfitting_baseline.ipynb"
    copy = tmp_path / src.name
    _plant(src, copy, sentence)
    found = violations(copy)
    assert found and any(f"number {number!r}" in f for f in found), found


def test_literature_figure_needs_its_source_named(tmp_path):
    src = ROOT / "notebooks" / "04_tabular_mlp.ipynb"
    copy = tmp_path / src.name
    _plant(src, copy, "The published anchor is an AUC of 0.69 (Fernandes et al., PeerJ CS 2018).")
    assert violations(copy) == []
    _plant(src, copy, "Our MLP scores 0.69.")  # the same value, typed as a result
    assert any("number '0.69'" in f for f in violations(copy))


def test_code_spans_and_formulas_are_not_prose(tmp_path):
    src = ROOT / "notebooks" / "01_eda.ipynb"
    copy = tmp_path / src.name
    _plant(src, copy, "Run `PER_CLASS = 8` or read $$x = 0.5$$ and\n\n```\nauc 0.757\n```")
    assert violations(copy) == []


def test_a_restated_setting_is_checked_against_the_code(tmp_path):
    src = ROOT / "notebooks" / "05_late_fusion.ipynb"
    copy = tmp_path / src.name
    _plant(src, copy, "Every head uses dropout 0.5 and Adam 1e-2.")
    found = violations(copy)
    assert any("'dropout 0.5'" in f and "setting" in f for f in found)
    assert any("'Adam 1e-2'" in f and "setting" in f for f in found)


def test_references_table_reuses_the_dataset_references():
    from lib.data.datasets import REFERENCES
    values = {round(f["value"], 4) for f in references.figures()}
    assert {0.975, 0.972, 0.69, 0.978, 0.84, 0.91, 0.87} <= values
    dataset_values = {round(float(e[k]), 4) for es in REFERENCES.values() for e in es
                      for k in ("accuracy", "macro_f1") if k in e}
    assert dataset_values <= values
    assert all(f["source"] and f["cue"] for f in references.figures())


def _names(path: Path) -> set[str]:
    """Top-level functions, classes and constants of a lib file (read, not imported: no TensorFlow start-up)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def stale_lib_references(notebook: Path) -> list[str]:
    """Names of lib code in the prose (`lib.x.y.name`, `lib/x/y.py`) that no longer exist (lib was re-laid out)."""
    nb = json.loads(notebook.read_text())
    bad = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for ref in re.findall(r"`(lib[./][\w./]*?)(?:\(\))?`", "".join(cell["source"])):
            if "/" in ref:
                ok = (ROOT / ref).exists()
            else:
                parts, ok = ref.split("."), False
                for k in range(len(parts), 0, -1):
                    base = ROOT.joinpath(*parts[:k])
                    module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                    if module.exists():
                        rest = parts[k:]
                        ok = not rest or (len(rest) == 1 and rest[0] in _names(module))
                        break
            if not ok:
                bad.append(f"{_where(notebook, i, cell)}: `{ref}` names no lib module or name")
    return bad


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_names_lib_code_that_exists(notebook):
    assert stale_lib_references(notebook) == []


def test_stale_lib_reference_is_caught(tmp_path):
    src = ROOT / "notebooks" / "06_gradcam.ipynb"
    copy = tmp_path / src.name
    _plant(src, copy, "Read `lib.gradcam.gradcam_tape` in `lib/gradcam.py`; "
                      "`lib.explain.gradcam.gradcam_tape` is right.")
    found = stale_lib_references(copy)
    assert len(found) == 2 and "`lib.gradcam.gradcam_tape`" in found[0] and "`lib/gradcam.py`" in found[1]
