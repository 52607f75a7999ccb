"""``cervical-kit-infer``: the risk score of one cell image, with or without a risk-factor record.

    python -m lib.serve.inference IMAGE [--tabular record.json|record.csv] [--model-dir D | --profile smoke|full]
                                 [--gradcam out.png]

With ``--tabular`` it loads the saved hybrid model (``hybrid_cervical_model.keras`` and the tabular
preprocessor JSON written by ``notebooks/05_late_fusion.ipynb``) and prints the fused risk score;
without, it uses the image branch alone (``image_branch.keras`` from
``notebooks/03_image_branch.ipynb``), whose risk score is the summed probability of the abnormal
classes, and says so.  The class is ``abnormal`` when the score reaches the threshold stored in the
model card (default 0.5).  ``--gradcam`` writes a Grad-CAM overlay of ``top_activation``
(:mod:`lib.explain.gradcam`) as a PNG: for the hybrid model of the risk score, for the image branch of the
likelier abnormal class.

The record is one JSON object ``{"Age": 35, ...}`` or a CSV file with a header and one row; every
field the preprocessor was fitted on must be there and no other (``null``, ``""`` or ``"?"`` mean
missing and are imputed as in training).  Values must be numbers inside the allowed range stored in
the preprocessor's metadata (0/1 for yes/no columns; 0..120 for ages, counts and years, or the
training maximum when larger); a value outside the *training* range is accepted with a note.

Every input problem exits with status 2 and one line on stderr naming the file or field.  The model
folder is input too: a JSON key given twice (record or card) is refused rather than resolved silently
by "last one wins"; the card's fields must have their types (:func:`check_card`); every file the card
names, and every file loaded, must resolve inside the model folder (:func:`model_file`), symlinks
included; a truncated or corrupted ``.keras`` is called damaged (:func:`load_keras_model`).

Reusable pieces (for a UI that takes the same inputs): :func:`parse_record_json`,
:func:`clean_record` / :func:`validate_record`, :func:`read_card` / :func:`check_card`,
:func:`model_file`, :func:`load_keras_model`, :func:`check_image_file`.  Each raises
:class:`InputError` (a ``ValueError``) with a one-line message naming the file or field.

This is a teaching tool: the models may be trained on synthetic images, and nothing it prints is
medical advice.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

from lib import config
from lib.fusion.hybrid import (CARD_FILE, DEFAULT_THRESHOLD, FEATURE_LAYER, H5_FILE, IMAGE_BRANCH_FILE, KERAS_FILE,
                     PREPROCESSOR_FILE)

EXIT_INPUT = 2
MISSING_TOKENS = ("", "?", "nan", "NaN", "NA")


class InputError(ValueError):
    """A problem with the user's input or the model folder; the message is one line.

    A ``ValueError`` so that callers validating input (a UI, a notebook) can catch one familiar type.
    """


# --------------------------------------------------------------------------- locating the models
def resolve_model_dir(model_dir=None, profile=None, need: str = KERAS_FILE) -> Path:
    """``--model-dir``, else ``build/<profile>/models``; with neither, the first of full, smoke holding ``need``."""
    if model_dir is not None:
        d = Path(model_dir).expanduser()
        if not d.is_dir():
            raise InputError(f"model folder {str(d)!r} does not exist")
        return d
    if profile is not None:
        return config.models_dir(profile)
    for p in ("full", "smoke"):
        d = config.build_dir() / p / "models"
        if (d / need).is_file():
            return d
    return config.build_dir() / "smoke" / "models"


def _need_file(path: Path, what: str, how: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found: {path} (build it with {how})")
    return path


def model_file(model_dir, name, what: str = "model file") -> Path:
    """``model_dir / name``, refused unless ``name`` is a relative path that resolves inside the folder.

    Why: the card is a file like any other; a name such as ``../x`` or ``/etc/x``, or a symlink leading out,
    would make the tool read whatever it points at.  Symlinks are resolved before the check.
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise InputError(f"{what}: expected a file name inside the model folder {str(model_dir)!r}, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or rel.drive:
        raise InputError(f"{what} {name!r}: an absolute path; expected a file name inside the model folder "
                         f"{str(model_dir)!r}")
    root = Path(model_dir).resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise InputError(f"{what} {name!r} resolves to {str(target)!r}, outside the model folder {str(root)!r}; "
                         "refusing to read it")
    return Path(model_dir) / rel


def _no_duplicate_keys(source: str):
    """``object_pairs_hook`` for :func:`json.loads`: a key given twice is an error, not "last one wins"."""
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise InputError(f"{source}: key {k!r} appears more than once in a JSON object; "
                                 "remove the duplicate (which value is meant cannot be guessed)")
            seen.add(k)
        return dict(pairs)
    return hook


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_card(card: dict, model_dir=None, source: str = "model card") -> dict:
    """The card's fields that the tool uses, type-checked; returns ``card``, or :class:`InputError` naming the field.

    ``threshold`` a finite number; ``synthetic`` true/false; ``image_classes`` and ``abnormal_classes`` lists of
    distinct names; ``image_branch.test_time_flips`` true/false; ``files`` an object of file names, each inside
    ``model_dir`` (when given).  Other fields are descriptive and not checked.
    """
    if not isinstance(card, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(card).__name__}")

    def bad(field, expected):
        return InputError(f"{source}: field {field!r} = {_short(card[field])} is malformed: expected {expected}")

    if "threshold" in card and not (_is_number(card["threshold"]) and math.isfinite(card["threshold"])):
        raise bad("threshold", "a finite number (the risk score at which the class becomes 'abnormal')")
    if "synthetic" in card and not isinstance(card["synthetic"], bool):
        raise bad("synthetic", "true or false")
    for field in ("image_classes", "abnormal_classes"):
        v = card.get(field)
        if field in card and v is not None:
            if (not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v)
                    or len(set(v)) != len(v)):
                raise bad(field, "a non-empty list of distinct class names")
    branch = card.get("image_branch")
    if "image_branch" in card and not (isinstance(branch, dict)
                                       and isinstance(branch.get("test_time_flips", False), bool)):
        raise bad("image_branch", "an object whose 'test_time_flips' is true or false (notebook 03's choice)")
    if "files" in card:
        files = card["files"]
        if not isinstance(files, dict):
            raise bad("files", "an object {\"keras\": file name, \"preprocessor\": file name, ...}")
        for key, name in files.items():
            if model_dir is None:
                if not isinstance(name, str):
                    raise InputError(f"{source}: field 'files.{key}' = {_short(name)} is malformed: "
                                     "expected a file name")
            else:
                model_file(model_dir, name, f"{source}: field 'files.{key}'")
    return card


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_card(model_dir: Path) -> dict:
    """The model card of ``model_dir`` (``{}`` when there is none), checked by :func:`check_card`."""
    path = model_dir / CARD_FILE
    if not path.is_file():
        return {}
    path = model_file(model_dir, CARD_FILE, "model card")
    try:
        card = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys(f"model card {path}"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"model card {path}: not readable JSON ({_one_line(e)})") from None
    return check_card(card, model_dir, f"model card {path}")


def load_keras_model(path):
    """``keras.saving.load_model(path, compile=False)``, or :class:`InputError`; a broken archive is called damaged.

    Why: Keras reports a truncated ``.keras`` (no zip directory at its end) as "File not found", which sends
    the user looking for a file that is right there.
    """
    import keras

    path = Path(path)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # a truncated or foreign file
        damage = _zip_damage(path) if path.suffix.lower() == ".keras" else None
        if damage:
            raise InputError(f"model file {path}: the file is damaged ({damage}); copy or rebuild it") from None
        raise InputError(f"model file {path}: cannot be loaded ({_one_line(e)[:300]})") from None


def _zip_damage(path: Path) -> str | None:
    """Why the ``.keras`` zip archive is broken, or None when it reads back whole."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        return f"not a complete .keras (zip) archive: no zip directory in its {size} bytes, e.g. truncated"
    try:
        with zipfile.ZipFile(path) as z:
            broken = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        return f"its zip archive does not read back: {_one_line(e)}"
    if broken:
        return f"member {broken!r} of its zip archive fails its CRC check"
    return None


# --------------------------------------------------------------------------- inputs
def _one_line(e) -> str:
    return " ".join(str(e).split())


def load_image_array(path, image_size: int) -> np.ndarray:
    """``(1, size, size, 3)`` float32 in 0..255, or :class:`InputError` naming the file."""
    from lib.image.input_pipeline import load_image

    p = check_image_file(path)
    try:
        arr = load_image(p, int(image_size))
    except ValueError as e:  # ImageDecodeError
        raise InputError(f"image file {str(p)!r} is not a readable image ({_one_line(e.__cause__ or e)})") from None
    return arr[None].astype("float32")


def parse_record_json(text: str, source: str = "tabular record") -> dict:
    """One record ``{"field": value, ...}`` (or a list of exactly one) from JSON text; a key given twice is refused."""
    try:
        rec = json.loads(text, object_pairs_hook=_no_duplicate_keys(source))
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON ({_one_line(e)})") from None
    if isinstance(rec, list) and len(rec) == 1:
        rec = rec[0]
    if not isinstance(rec, dict):
        raise InputError(f"{source}: expected one JSON object {{\"field\": value, ...}}, got {type(rec).__name__}")
    return rec


def read_record(path) -> dict:
    """The raw ``{field: value}`` of a one-record ``.json`` or ``.csv`` file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"tabular record {str(p)!r} not found")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"tabular record {str(p)!r}: cannot read it as text ({_one_line(e)})") from None
    if suffix == ".json":
        return parse_record_json(text, f"tabular record {str(p)!r}")
    if suffix == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
        if len(rows) != 2:
            raise InputError(f"tabular record {str(p)!r}: expected a header line and exactly one data row, "
                             f"got {max(0, len(rows) - 1)} data row(s)")
        header, values = [h.strip() for h in rows[0]], rows[1]
        if len(values) != len(header):
            raise InputError(f"tabular record {str(p)!r}: the header has {len(header)} fields but the data row has "
                             f"{len(values)}")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise InputError(f"tabular record {str(p)!r}: duplicate field(s) {dup}")
        return dict(zip(header, values))
    raise InputError(f"tabular record {str(p)!r}: expected a .json or .csv file, got {suffix or 'no extension'!r}")


def validate_record(rec: dict, columns: list, ranges: dict | None, source: str = "record"):
    """Check fields and values; returns ``(one-row DataFrame in column order, notes)``.

    Raises :class:`InputError` listing missing and unexpected fields, or naming the first field whose
    value is not a number or is outside its allowed range.
    """
    import pandas as pd

    values, notes = clean_record(rec, columns, ranges, source)
    return pd.DataFrame([values], columns=list(columns)), notes


def clean_record(rec: dict, columns: list, ranges: dict | None, source: str = "record") -> tuple[dict, list]:
    """``({field: float, NaN for missing}, notes)`` in ``columns`` order, or :class:`InputError` naming the field.

    The rules of :func:`validate_record`, without pandas: for callers that hold a dict (a form) rather than a file.
    """
    if not isinstance(rec, dict):
        raise InputError(f"tabular record {source}: expected an object of fields, got {type(rec).__name__}")
    missing = [c for c in columns if c not in rec]
    extra = [k for k in rec if k not in columns]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing field(s) {missing}")
        if extra:
            parts.append(f"unexpected field(s) {extra}")
        raise InputError(f"tabular record {source}: {'; '.join(parts)} (expected exactly these {len(columns)} fields: "
                         f"{columns})")
    values, notes = {}, []
    for c in columns:
        v = rec[c]
        if v is None or (isinstance(v, str) and v.strip() in MISSING_TOKENS):
            values[c] = float("nan")
            notes.append(f"field {c!r} is missing: imputed with the training median")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise InputError(f"tabular record {source}: field {c!r} = {v!r} is not a number")
        try:
            x = float(v)
        except ValueError:
            raise InputError(f"tabular record {source}: field {c!r} = {v!r} is not a number") from None
        if not math.isfinite(x):
            raise InputError(f"tabular record {source}: field {c!r} = {v!r} is not a finite number")
        r = (ranges or {}).get(c)
        if r:
            lo, hi = r["allowed"]
            if r.get("binary") and x not in (0.0, 1.0):
                raise InputError(f"tabular record {source}: field {c!r} = {v!r} is out of range: expected 0 (no) or 1 (yes)")
            if not lo <= x <= hi:
                raise InputError(f"tabular record {source}: field {c!r} = {v!r} is out of range: expected {lo:g}..{hi:g} "
                                 f"(training data: {r['train_min']:g}..{r['train_max']:g})")
            if not r["train_min"] <= x <= r["train_max"]:
                notes.append(f"field {c!r} = {x:g} is outside the training range {r['train_min']:g}..{r['train_max']:g}: "
                             "the model extrapolates")
        values[c] = x
    return values, notes


# --------------------------------------------------------------------------- Grad-CAM
def check_output_png(out) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--gradcam {str(out)!r}: expected a .png file name")
    if not out.parent.is_dir():
        raise InputError(f"--gradcam {str(out)!r}: folder {str(out.parent)!r} does not exist")
    return out


def check_image_file(path) -> Path:
    """Exists, is a file, and Pillow can read its header (cheap, before TensorFlow is imported)."""
    from lib.image.input_pipeline import header_problem

    p = Path(path)
    if not p.exists():
        raise InputError(f"image file {str(p)!r} not found")
    if not p.is_file():
        raise InputError(f"image file {str(p)!r} is not a file")
    problem = header_problem(p)
    if problem:
        problem = _one_line(problem)
        prefix = "not a readable image ("
        if problem.startswith(prefix) and problem.endswith(")"):  # header_problem already says it
            problem = problem[len(prefix):-1]
        raise InputError(f"image file {str(p)!r} is not a readable image ({problem})")
    return p


# --------------------------------------------------------------------------- the command
def abnormal_indices(card: dict, n_classes: int) -> tuple[list, list]:
    """Which outputs of the image branch are abnormal (indices and names), checked against the card."""
    from lib.data.manifest import ABNORMAL, CLASSES

    classes = card.get("image_classes") or (list(CLASSES) if n_classes == len(CLASSES) else None)
    abnormal = card.get("abnormal_classes") or list(ABNORMAL)
    if classes is None or len(classes) != n_classes:
        raise InputError(f"image branch has {n_classes} classes but their names are unknown (no model card with "
                         "'image_classes'); cannot tell which are abnormal")
    idx = [classes.index(c) for c in abnormal if c in classes]
    if not idx:
        raise InputError(f"none of the abnormal classes {abnormal} is among the image branch's classes {classes}")
    return idx, [classes[i] for i in idx]


#: what the CLI's mode line and the app's notes say when the image branch is scored with flips
FLIPS_NOTE = "mean of four flip views (flip test-time augmentation, chosen on the validation split in notebook 03)"


def uses_flips(card: dict) -> bool:
    """Whether the image branch is scored with flip test-time augmentation: notebook 03 chose it on the
    validation split (saved in the card by notebook 05); a card without the field means no."""
    return bool((card.get("image_branch") or {}).get("test_time_flips", False))


def image_probabilities(model, x: np.ndarray, card: dict) -> np.ndarray:
    """Class probabilities of the image branch for images ``x`` (RGB 0..255), scored as notebook 03
    reported it: the mean over the four flip views (:mod:`lib.image.tta`) when 03 chose flip TTA on
    validation, else one pass.  The CLI and the app both call this, so they agree with 03's numbers."""
    from lib.explain import gradcam
    from lib.image import tta

    def one_pass(images):
        return gradcam.predict(model, inputs={"image": images})

    return (tta.with_flips(one_pass) if uses_flips(card) else one_pass)(x)


def predict_one(image_path, tabular_path=None, model_dir=None, profile=None, gradcam_out=None) -> dict:
    """Everything :func:`main` prints, as a dict; raises :class:`InputError` for bad input."""
    from lib.tabular import mlp

    check_image_file(image_path)
    if gradcam_out:
        check_output_png(gradcam_out)
    need = KERAS_FILE if tabular_path else IMAGE_BRANCH_FILE
    d = resolve_model_dir(model_dir, profile, need)
    card = read_card(d)
    threshold = float(card.get("threshold", DEFAULT_THRESHOLD))
    notes = []
    if tabular_path:
        model_path = _need_file(model_file(d, KERAS_FILE, "hybrid model"), "hybrid model",
                                "notebooks/05_late_fusion.ipynb "
                                "(papermill notebooks/05_late_fusion.ipynb out.ipynb -p profile smoke)")
        pre_name = card.get("files", {}).get("preprocessor", PREPROCESSOR_FILE)
        pre_path = _need_file(model_file(d, pre_name, "tabular preprocessor JSON"), "tabular preprocessor JSON",
                              "notebooks/05_late_fusion.ipynb")
        try:
            pre = mlp.load_preprocessor(pre_path)
        except ValueError as e:
            raise InputError(_one_line(e)) from None
        rec = read_record(tabular_path)
        frame, notes = validate_record(rec, pre.columns, pre.metadata.get("feature_ranges"), repr(str(tabular_path)))
        x_tab = pre.transform(frame).astype("float32")
    else:
        model_path = _need_file(model_file(d, IMAGE_BRANCH_FILE, "image branch model"), "image branch model",
                                "notebooks/03_image_branch.ipynb "
                                "(papermill notebooks/03_image_branch.ipynb out.ipynb -p profile smoke)")
    model = load_keras_model(model_path)
    size = int(model.get_layer("image").output.shape[1])
    if tabular_path:
        want = int(dict((t.name, t) for t in model.inputs)["tabular"].shape[-1])
        if x_tab.shape[1] != want:
            raise InputError(f"{pre_path.name} gives {x_tab.shape[1]} features but {model_path.name} expects {want}: "
                             "the two files come from different runs; rerun notebooks/05_late_fusion.ipynb")
    x_img = load_image_array(image_path, size)
    from lib.explain import gradcam

    if tabular_path:
        feed = {"image": x_img, "tabular": x_tab}
        score = float(gradcam.predict(model, inputs=feed).reshape(-1)[0])
        target = None  # the risk score
        mode = "image + tabular (hybrid model)"
    else:
        idx, abnormal = abnormal_indices(card, int(model.output.shape[-1]))
        feed = {"image": x_img}
        probs = image_probabilities(model, x_img, card)[0]
        score = float(probs[idx].sum())
        target = int(idx[int(np.argmax(probs[idx]))])  # Grad-CAM of the likelier abnormal class
        mode = (f"image only (no --tabular record: the image branch alone; risk = P({' + '.join(abnormal)})"
                + (f"; {FLIPS_NOTE}" if uses_flips(card) else "") + ")")
    result = {"model": str(model_path), "mode": mode, "image": str(image_path), "risk": score,
              "threshold": threshold, "class": "abnormal" if score >= threshold else "normal", "notes": notes,
              "synthetic": bool(card.get("synthetic", False))}
    if gradcam_out:
        try:
            heat = gradcam.gradcam_tape(model, None, target=target, inputs=feed, layer_name=FEATURE_LAYER)
        except ValueError as e:
            raise InputError(f"Grad-CAM on {model_path.name}: {_one_line(e)}") from None
        result["gradcam"] = str(gradcam.save_overlay_png(gradcam_out, x_img[0], heat[0], synthetic=result["synthetic"]))
    return result


def main(argv=None) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a command line tool: no TensorFlow start-up chatter
    ap = argparse.ArgumentParser(prog="cervical-kit-infer", description=__doc__.splitlines()[0].strip("`: "),
                                 epilog="Teaching tool: not for clinical use.")
    ap.add_argument("image", help="a cell image (bmp, png, jpg, tif)")
    ap.add_argument("--tabular", metavar="RECORD", help="one risk-factor record: .json object or .csv (header + 1 row)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--model-dir", metavar="D", help="folder with the saved models (default build/<profile>/models)")
    where.add_argument("--profile", choices=sorted(config.PROFILES), help="use build/<profile>/models")
    ap.add_argument("--gradcam", metavar="OUT.png", help="write a Grad-CAM overlay (top_activation) to this PNG")
    args = ap.parse_args(argv)
    try:
        r = predict_one(args.image, args.tabular, args.model_dir, args.profile, args.gradcam)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    print(f"model: {r['model']}")
    print(f"mode: {r['mode']}")
    print(f"image: {r['image']}")
    for n in r["notes"]:
        print(f"note: {n}")
    print(f"risk score: {r['risk']:.4f}")
    print(f"class: {r['class']} (threshold {r['threshold']:g})")
    if r.get("gradcam"):
        print(f"grad-cam: {r['gradcam']}")
    if r["synthetic"]:
        print("note: this model was trained on SYNTHETIC cell images")
    print("teaching tool: not for clinical use")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
