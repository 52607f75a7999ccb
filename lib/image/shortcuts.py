"""Shortcut checks: how much of a score survives when the image borders are cropped away at evaluation.

Why: in LBC only the abnormal classes were augmented, and many augmented copies carry
replicated-pixel streaks along their borders (see the data's PROVENANCE entry).  A model can
score well by looking at the frame instead of the cells.  Cropping the borders away *at test time*
(keep the central ``keep`` fraction of each side, resize back to the model's input size) removes
that cue; a score that drops with it was partly earned on the border.  The crop also zooms in a
little, so a small drop is expected from the change of scale alone: read the drop against the
interval, and compare models under the same crop.

Nothing is retrained: the same model (or probe) scores the same test images, cropped.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

#: central fractions kept on each side (1.0 = the uncropped image)
DEFAULT_KEEPS = (1.0, 0.8, 0.7)


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.floating)) or not 0.2 <= float(keep) <= 1.0:
        raise ValueError(f"parameter 'keep': expected the central fraction of each side to keep, in [0.2, 1], "
                         f"got {keep!r}")
    return float(keep)


def central_box(width: int, height: int, keep: float) -> tuple[int, int, int, int]:
    """The central ``keep`` x ``keep`` box (left, upper, right, lower) of a ``width`` x ``height`` image."""
    w, h = max(1, int(round(width * keep))), max(1, int(round(height * keep)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def crop_border(images, keep: float) -> np.ndarray:
    """Central crop of each image in ``images`` ``(n, h, w, 3)`` (0..255), resized back to ``(h, w)``
    (bilinear, like :func:`lib.image.input_pipeline.load_image`); float32.  ``keep=1`` returns a copy."""
    keep = _check_keep(keep)
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"parameter 'images': expected an array (n, height, width, 3), got shape {arr.shape}")
    n, h, w, _ = arr.shape
    if keep == 1.0:
        return arr.astype(np.float32, copy=True)
    box = central_box(w, h, keep)
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        im = Image.fromarray(np.clip(np.rint(arr[i]), 0, 255).astype(np.uint8))
        out[i] = np.asarray(im.crop(box).resize((w, h), Image.BILINEAR), np.float32)
    return out


def mask_border(images, keep: float) -> np.ndarray:
    """The control for :func:`crop_border`: same images, same scale, but everything outside the central
    ``keep`` box painted with the mean colour of that box.  A crop also zooms in; a mask does not, so a
    score that drops under both was earned on the border, not lost to the change of scale."""
    keep = _check_keep(keep)
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"parameter 'images': expected an array (n, height, width, 3), got shape {arr.shape}")
    out = arr.astype(np.float32, copy=True)
    if keep == 1.0:
        return out
    n, h, w, _ = arr.shape
    left, top, right, bottom = central_box(w, h, keep)
    inner = out[:, top:bottom, left:right].copy()
    out[:] = inner.mean(axis=(1, 2), keepdims=True)
    out[:, top:bottom, left:right] = inner
    return out


def load_cropped(table, image_size: int, keep: float) -> np.ndarray:
    """The rows of ``table`` decoded at full resolution, central ``keep`` crop, resized to ``image_size``:
    ``(n, image_size, image_size, 3)`` float32 0..255.  Cropping before resizing keeps the detail the
    model would see in an uncropped image of the same field; ``keep=1`` equals
    :func:`lib.image.input_pipeline.load_images`."""
    from lib.image.input_pipeline import ImageDecodeError, to_rgb

    keep = _check_keep(keep)
    paths = [str(p) for p in table["path"].tolist()]
    out = np.empty((len(paths), image_size, image_size, 3), np.float32)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im.load()
                rgb = to_rgb(im)
        except Exception as exc:  # noqa: BLE001 - name the file, whatever Pillow raised
            raise ImageDecodeError(f"image file {p!r}: cannot decode ({type(exc).__name__}: {exc})") from exc
        if keep < 1.0:
            rgb = rgb.crop(central_box(*rgb.size, keep))
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
        out[i] = np.asarray(rgb, np.float32)
    return out


def keras_predictor(model, batch_size: int = 32):
    """``images -> class probabilities`` of a Keras image model in inference mode (no augmentation)."""

    from lib.predict import predict as batched

    def predict(x):
        return batched(model, x, batch_size=batch_size)

    return predict


def probe_predictor(feature_model, classifier, n_classes: int, batch_size: int = 32):
    """``images -> class probabilities`` of a linear probe: pooled features of the frozen ``feature_model``
    (:func:`lib.image.features.feature_model`), then ``classifier.predict_proba`` (scikit-learn)."""

    from lib.predict import predict as batched

    def predict(x):
        feats = batched(feature_model, x, batch_size=batch_size)
        probs = np.zeros((len(x), n_classes))
        probs[:, classifier.classes_] = classifier.predict_proba(feats)
        return probs

    return predict


def scored_once(predict):
    """``predict``, run once per image array: a second call with the same array object (not merely equal
    pixels) returns the first call's probabilities.  Why: notebook 03 scores the plain test images for
    the flip choice and again as the uncropped row of the border check, for both of its rows; in the full
    profile (224 px) its three evaluation cells took 52 s less with this (329 -> 277 s).  The arrays must not be changed in place between calls (03 never does)."""
    import weakref

    seen = {}  # id(array) -> (weak reference to it, probabilities); the reference rules out a recycled id

    def predict_once(x):
        hit = seen.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        out = predict(x)
        try:
            seen[id(x)] = (weakref.ref(x), out)
        except TypeError:  # lists and other inputs without weak references: not remembered
            pass
        return out

    return predict_once


def border_crop_scores(predict, table, classes, abnormal_classes, image_size: int, keeps=DEFAULT_KEEPS,
                       n_boot: int = 200, seed: int = 42, group_word: str = "groups", images=None) -> dict:
    """Scores of ``predict`` (images -> class probabilities) on the rows of ``table`` with their borders
    cropped away, one entry per ``keep`` fraction: macro-F1 and abnormal AUC with the group-bootstrap
    intervals of :func:`lib.image.image_model.score_probs`, accuracy, and per-class recall.

    ``images``: optional callable ``keep -> images`` (default :func:`load_cropped` of ``table``), e.g. to
    score arrays already in memory with :func:`crop_border`.
    """
    from lib.image.image_model import score_probs

    keeps = [_check_keep(k) for k in keeps]
    if not keeps:
        raise ValueError("parameter 'keeps': expected at least one fraction to keep")
    load = images or (lambda k: load_cropped(table, image_size, k))
    out = {}
    for k in keeps:
        x = load(k)
        probs = np.asarray(predict(x))
        if probs.shape != (len(table), len(list(classes))):
            raise ValueError(f"predict returned shape {probs.shape}, expected ({len(table)}, {len(list(classes))})")
        ev = score_probs(probs, table, classes, abnormal_classes, n_boot=n_boot, seed=seed, group_word=group_word)
        auc = (ev["binary"] or {}).get("auc", {})
        out[f"{k:g}"] = {
            "keep": k, "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
            "macro_f1_low": ev["macro_f1_ci"]["ci_low"], "macro_f1_high": ev["macro_f1_ci"]["ci_high"],
            "abnormal_auc": auc.get("value"), "auc_low": auc.get("ci_low"), "auc_high": auc.get("ci_high"),
            "recall": {c: float(ev["per_class"][c]["recall"]) for c in classes},
            "interval_method": ev["macro_f1_ci"]["method"],
        }
    return out


def border_crop_table(results: dict):
    """``{model name: border_crop_scores(...)}`` -> one row per (model, keep): macro-F1, AUC (with
    intervals) and per-class recall, plus the change from that model's uncropped row where it has one."""
    import pandas as pd

    rows = []
    for name, by_keep in results.items():
        base = by_keep.get("1")
        for key, r in by_keep.items():
            row = {"model": name, "keep": r["keep"], "macro_f1": r["macro_f1"], "macro_f1_low": r["macro_f1_low"],
                   "macro_f1_high": r["macro_f1_high"], "abnormal_auc": r["abnormal_auc"], "auc_low": r["auc_low"],
                   "auc_high": r["auc_high"], **{f"recall {c}": v for c, v in r["recall"].items()}}
            if base is not None:
                row["d_macro_f1"] = r["macro_f1"] - base["macro_f1"]
                if r["abnormal_auc"] is not None and base["abnormal_auc"] is not None:
                    row["d_auc"] = r["abnormal_auc"] - base["abnormal_auc"]
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "keep"])
