"""Flip test-time augmentation (TTA), chosen on the grouped validation split, never on test.

A cell image has no preferred left/right or up/down: its mirror images are the same cells.  Flip
TTA scores each image in four views (as is, mirrored left-right, mirrored up-down, both: a half
turn) and averages the class probabilities.  It costs four forward passes instead of one and can
help or hurt, depending on the model and the data, so whether to use it is a choice, made like
every other choice of the kit on the validation split: :func:`choose_and_score` scores validation
with and without flips, picks the higher macro-F1 (ties: no flips), and only then scores test, so
the test numbers of both variants can be shown but never decide.

Works with any ``images -> class probabilities`` predictor, e.g. those of :mod:`lib.image.shortcuts`
(the fine-tuned Keras model, :func:`~lib.image.shortcuts.keras_predictor`; the linear probe,
:func:`lib.image.probe.predictor`: each flipped view goes through the frozen backbone
and the logistic regression, and the probe's probabilities are averaged).
"""
from __future__ import annotations

import numpy as np

#: the views, in the order of :func:`flip_views`
VIEWS = ("identity", "horizontal flip", "vertical flip", "both flips")
#: values of the ``test_time_flips`` knob: "auto" chooses on validation, True / False force it
MODES = ("auto", True, False)


def check_mode(mode):
    """``mode`` if it is one of :data:`MODES`, else ``ValueError`` naming ``test_time_flips``."""
    from lib.config import check_test_time_flips

    return check_test_time_flips(mode)


def _check_images(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"parameter 'images': expected an array (n, height, width, channels), got shape {arr.shape}")
    return arr


def flip_views(images) -> list[np.ndarray]:
    """The four views of ``images`` ``(n, h, w, c)``: identity, horizontal flip (left-right), vertical
    flip (up-down), both.  The flips are exact (index reversal: no resampling), returned as arrays."""
    x = _check_images(images)
    return [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]


def view_probs(predict, images) -> np.ndarray:
    """``(4, n, n_classes)``: ``predict`` (images -> class probabilities) of each view of
    :func:`flip_views`, one batched call per view."""
    views = flip_views(images)
    out = [np.asarray(predict(np.ascontiguousarray(v)), dtype=np.float64) for v in views]
    shapes = {p.shape for p in out}
    if len(shapes) != 1 or out[0].ndim != 2 or out[0].shape[0] != len(views[0]):
        raise ValueError(f"predict returned shapes {sorted(shapes)}, expected ({len(views[0])}, n_classes) per view")
    return np.stack(out)


def with_flips(predict):
    """``images -> class probabilities`` averaged over the four views of :func:`flip_views`."""

    def predict_flips(images):
        return view_probs(predict, images).mean(axis=0)

    return predict_flips


def choose_flips(val_plain: float, val_flips: float, mode="auto") -> bool:
    """Whether to use flips: ``mode`` True / False forces it; ``"auto"`` uses them only when the
    validation macro-F1 with flips is strictly higher (ties: no flips, the cheaper variant).
    Takes validation numbers only, so test cannot enter the choice."""
    mode = check_mode(mode)
    if isinstance(mode, bool):
        return mode
    return bool(float(val_flips) > float(val_plain))


def choose_and_score(predict, val_images, val_table, test_images, test_table, classes, abnormal_classes,
                     mode="auto", n_boot: int = 200, seed: int = 42, group_word: str = "groups") -> dict:
    """Score ``predict`` on validation with and without flips, choose (:func:`choose_flips`), then
    score test both ways with :func:`lib.image.image_model.score_probs` (same intervals).

    Returns ``use_flips`` (bool), ``mode``, ``val`` and ``test`` (``{"plain": ev, "flips": ev}``),
    ``chosen`` (the test evaluation of the chosen variant: the one to report) and ``unchosen`` (the
    other variant's, shown only as a labelled extra, never used to choose).
    """
    from lib.image.image_model import score_probs

    mode = check_mode(mode)
    n_classes = len(list(classes))

    def score(images, table):
        views = view_probs(predict, images)
        if views.shape[1:] != (len(table), n_classes):
            raise ValueError(f"predict returned shape {views.shape[1:]}, expected ({len(table)}, {n_classes})")
        kw = dict(n_boot=n_boot, seed=seed, group_word=group_word)
        return {"plain": score_probs(views[0], table, classes, abnormal_classes, **kw),
                "flips": score_probs(views.mean(axis=0), table, classes, abnormal_classes, **kw)}

    val = score(val_images, val_table)
    use = choose_flips(val["plain"]["macro_f1"], val["flips"]["macro_f1"], mode)
    test = score(test_images, test_table)  # after the choice, which it cannot change
    key, other = ("flips", "plain") if use else ("plain", "flips")
    return {"use_flips": use, "mode": mode, "val": val, "test": test, "chosen": test[key], "unchosen": test[other]}


def _auc(ev):
    return ((ev.get("binary") or {}).get("auc") or {}).get("value")


def summary(result: dict) -> dict:
    """JSON-able record of :func:`choose_and_score`: the choice, validation macro-F1 and abnormal AUC of
    both variants, and the unchosen variant's test scores (labelled as such)."""
    return {"use_flips": result["use_flips"], "mode": result["mode"],
            "val_macro_f1_plain": result["val"]["plain"]["macro_f1"],
            "val_macro_f1_flips": result["val"]["flips"]["macro_f1"],
            "val_abnormal_auc_plain": _auc(result["val"]["plain"]),
            "val_abnormal_auc_flips": _auc(result["val"]["flips"]),
            "test_macro_f1_unchosen": result["unchosen"]["macro_f1"],
            "test_abnormal_auc_unchosen": _auc(result["unchosen"])}


def describe(name: str, result: dict) -> str:
    """One line: what was chosen for ``name``, how, and both validation numbers."""
    s = summary(result)
    how = ("chosen on validation" if s["mode"] == "auto"
           else f"forced by test_time_flips={s['mode']!r}")
    return (f"{name}: {'flip TTA' if s['use_flips'] else 'no TTA'} ({how}); validation macro-F1 "
            f"without flips {s['val_macro_f1_plain']:.3f}, with flips {s['val_macro_f1_flips']:.3f}")


def label(name: str, result: dict) -> str:
    """``name`` with the variant: ``"<name>, flip TTA"`` or ``"<name>, no TTA"``."""
    return f"{name}, {'flip TTA' if result['use_flips'] else 'no TTA'}"


def comparison_table(results: dict):
    """``{model name: choose_and_score(...)}`` -> :func:`lib.image.image_model.comparison_table` of the
    chosen variants (rows named with :func:`label`), plus the validation macro-F1 of both variants and,
    as a labelled extra column, the test macro-F1 of the variant *not* chosen."""
    from lib.image.image_model import comparison_table as base

    table = base({label(n, r): r["chosen"] for n, r in results.items()})
    for n, r in results.items():
        s = summary(r)
        table.loc[label(n, r), "val_macro_f1_no_tta"] = s["val_macro_f1_plain"]
        table.loc[label(n, r), "val_macro_f1_tta"] = s["val_macro_f1_flips"]
        table.loc[label(n, r), "test_macro_f1_unchosen"] = s["test_macro_f1_unchosen"]
    return table
