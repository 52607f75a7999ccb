"""Binary-classification metrics shared by the tabular, fusion and image notebooks.

The rule of the kit: report AUC and average precision with confidence intervals,
sensitivity at a fixed specificity, and a calibration view - never accuracy alone.

* :func:`binary_report` - AUC, AP, sensitivity at a fixed specificity, F1, accuracy,
  precision, recall, specificity and Brier score, each with a percentile bootstrap 95% CI.
* :func:`cv_summary` - mean, std and a 95% CI of per-fold scores (Nadeau-Bengio
  corrected, because the folds of (repeated) cross-validation share training rows).
* :func:`calibration_table`, :func:`plot_roc_pr`, :func:`plot_calibration`.
* :func:`rare_class_arithmetic` - what a published accuracy/precision/recall implies
  about how rare the positive class was.

Nothing here writes files; notebooks save figures with :func:`lib.plots.save_figure`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# --------------------------------------------------------------------------- core scores


def _check(y_true, y_score):
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype="float64")
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"y_true and y_score: expected two 1-d arrays of equal length, got shapes {y.shape} and {s.shape}")
    if len(y) == 0:
        raise ValueError("y_true: expected at least one sample, got none")
    if not np.isin(y, [0, 1]).all():
        raise ValueError(f"y_true: expected labels 0/1, got values {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("y_score: expected finite scores, got NaN or inf")
    return y.astype(bool), s


def _curve(y, s):
    """Cumulative TP and FP counts at each distinct threshold (scores descending).

    Returns ``(tps, fps, thresholds)``; predicting positive for ``score >= thresholds[i]``
    gives ``tps[i]`` true and ``fps[i]`` false positives.  Same as sklearn's internal curve.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    return tps.astype("float64"), fps.astype("float64"), s_sorted[last]


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    y, s = _check(y_true, y_score)
    return _auc(y, s)


def _auc(y, s) -> float:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype="float64")
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true, y_score) -> float:
    """Average precision (sklearn's step-wise definition, no interpolation); NaN without positives."""
    y, s = _check(y_true, y_score)
    return _ap(y, s)


def _ap(y, s) -> float:
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    tps, fps, _ = _curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _sens_at_spec(y, s, spec_target):
    """Highest sensitivity among thresholds whose specificity is >= ``spec_target``."""
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    tps, fps, thr = _curve(y, s)
    tpr = np.r_[0.0, tps / n_pos]
    spec = np.r_[1.0, 1.0 - fps / n_neg]
    thr = np.r_[np.inf, thr]
    ok = spec >= spec_target - 1e-12
    i = np.flatnonzero(ok)[np.argmax(tpr[ok])]
    return float(tpr[i]), float(thr[i])


def _threshold_metrics(y, s, threshold):
    pred = s >= threshold
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    tn = float((~pred & ~y).sum())
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return {
        "accuracy": (tp + tn) / len(y),
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else nan,
        "f1": f1,
    }


def _point_metrics(y, s, threshold, spec_target):
    out = {"auc": _auc(y, s), "ap": _ap(y, s)}
    out["sens_at_spec"], _ = _sens_at_spec(y, s, spec_target)
    out.update(_threshold_metrics(y, s, threshold))
    out["brier"] = float(np.mean((s - y) ** 2))
    return out


METRIC_NAMES = ("auc", "ap", "sens_at_spec", "f1", "accuracy", "precision", "recall", "specificity", "brier")


def binary_report(y_true, y_score, threshold: float = 0.5, n_boot: int = 1000, seed: int = 42,
                  spec_target: float = 0.90, ci: float = 0.95) -> dict:
    """Point estimates with percentile-bootstrap confidence intervals.

    Returns a JSON-ready dict: ``n``, ``n_pos``, ``prevalence``, ``threshold``, ``spec_target``,
    ``threshold_at_spec`` (the score cut that achieves ``spec_target`` on these data), ``n_boot``,
    ``ci``, and one entry per metric of :data:`METRIC_NAMES`, each ``{"value", "ci_low", "ci_high"}``.
    ``sens_at_spec`` is the sensitivity at specificity >= ``spec_target``; F1, accuracy,
    precision, recall and specificity use ``score >= threshold``.  Bootstrap resamples rows
    with replacement (``n_boot`` times, seeded); a resample without both classes is skipped for
    the metrics that need both.  With few positives the intervals are wide - that is the point.
    """
    y, s = _check(y_true, y_score)
    if not 0 < spec_target < 1:
        raise ValueError(f"parameter 'spec_target': expected a value in (0, 1), got {spec_target!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"parameter 'n_boot': expected a non-negative integer, got {n_boot!r}")
    point = _point_metrics(y, s, threshold, spec_target)
    _, thr_at_spec = _sens_at_spec(y, s, spec_target)
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in METRIC_NAMES}
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = _point_metrics(y[idx], s[idx], threshold, spec_target)
        for k in METRIC_NAMES:
            boots[k].append(m[k])
    alpha = (1 - ci) / 2
    report = {
        "n": int(n), "n_pos": int(y.sum()), "prevalence": float(y.mean()), "threshold": float(threshold),
        "spec_target": float(spec_target), "threshold_at_spec": thr_at_spec, "n_boot": int(n_boot), "ci": ci,
    }
    for k in METRIC_NAMES:
        b = np.asarray(boots[k], dtype="float64")
        b = b[np.isfinite(b)]
        lo, hi = (np.quantile(b, [alpha, 1 - alpha]) if len(b) else (np.nan, np.nan))
        report[k] = {"value": float(point[k]), "ci_low": float(lo), "ci_high": float(hi)}
    return report


def report_table(reports: dict) -> pd.DataFrame:
    """``{name: binary_report(...)}`` -> one row per model, "value [low, high]" strings, for display."""
    rows = {}
    for name, rep in reports.items():
        rows[name] = {k: f"{rep[k]['value']:.3f} [{rep[k]['ci_low']:.3f}, {rep[k]['ci_high']:.3f}]"
                      for k in METRIC_NAMES}
    return pd.DataFrame(rows).T


# --------------------------------------------------------------------------- cross-validation


def cv_summary(scores_per_fold, test_train_ratio: float | None = 0.25, ci: float = 0.95,
               bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict:
    """Mean, std (ddof=1) and a CI of the mean of per-fold scores.

    Folds of cross-validation are not independent (they share training rows), so the naive
    ``t * std / sqrt(J)`` interval is too narrow.  With ``test_train_ratio`` (``n_test / n_train``,
    0.25 for 5-fold) the interval uses the Nadeau-Bengio corrected variance
    ``(1/J + n_test/n_train) * std**2``; pass ``None`` for the naive interval.
    The interval is clipped to ``bounds`` (AUC and AP live in [0, 1]; ``None`` = no clipping).
    NaN folds (a fold with one class) are ignored and counted in ``n_nan``.
    """
    from scipy import stats

    x = np.asarray(scores_per_fold, dtype="float64").ravel()
    n_nan = int(np.isnan(x).sum())
    x = x[~np.isnan(x)]
    j = len(x)
    if j == 0:
        raise ValueError("scores_per_fold: expected at least one finite score, got none")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if j > 1 else float("nan")
    if j > 1:
        factor = 1 / j + (test_train_ratio if test_train_ratio is not None else 0.0)
        half = float(stats.t.ppf(0.5 + ci / 2, j - 1) * math.sqrt(factor) * std)
    else:
        half = float("nan")
    lo, hi = mean - half, mean + half
    if bounds is not None and j > 1:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "std": std, "ci_low": lo, "ci_high": hi, "n": j, "n_nan": n_nan,
            "corrected": test_train_ratio is not None}


# --------------------------------------------------------------------------- calibration


def calibration_table(y_true, y_score, n_bins: int = 10, strategy: str = "quantile") -> pd.DataFrame:
    """Observed positive rate vs mean predicted score per bin.

    ``strategy="quantile"`` (default) puts about the same number of samples in each bin -
    with a rare positive class, equal-width bins leave the upper bins nearly empty;
    ``"uniform"`` gives equal-width bins on [0, 1].  Empty bins are left out.
    Columns: bin, lower, upper, n, n_pos, mean_score, observed.
    """
    y, s = _check(y_true, y_score)
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"parameter 'n_bins': expected a positive integer, got {n_bins!r}")
    if strategy == "quantile":
        edges = np.unique(np.quantile(s, np.linspace(0, 1, n_bins + 1)))
    elif strategy == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
        edges[0], edges[-1] = min(0.0, s.min()), max(1.0, s.max())
    else:
        raise ValueError(f"parameter 'strategy': expected 'quantile' or 'uniform', got {strategy!r}")
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    b = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for i in range(len(edges) - 1):
        m = b == i
        if m.any():
            rows.append(dict(bin=i, lower=float(edges[i]), upper=float(edges[i + 1]), n=int(m.sum()),
                             n_pos=int(y[m].sum()), mean_score=float(s[m].mean()), observed=float(y[m].mean())))
    return pd.DataFrame(rows, columns=["bin", "lower", "upper", "n", "n_pos", "mean_score", "observed"])


# --------------------------------------------------------------------------- figures


def _as_dict(y_score, name="model"):
    return dict(y_score) if isinstance(y_score, dict) else {name: y_score}


def plot_roc_pr(y_true, y_score, title: str | None = None, spec_target: float | None = 0.90):
    """ROC and precision-recall curves side by side; ``y_score`` may be ``{name: scores}``.

    Returns the matplotlib figure (save it with :func:`lib.plots.save_figure`).
    """
    import matplotlib.pyplot as plt

    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.3))
    y = np.asarray(y_true).astype(bool)
    for name, scores in _as_dict(y_score).items():
        yy, s = _check(y, scores)
        tps, fps, _ = _curve(yy, s)
        tpr = np.r_[0.0, tps / yy.sum()]
        fpr = np.r_[0.0, fps / (~yy).sum()]
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC {_auc(yy, s):.3f})")
        prec = np.r_[1.0, tps / (tps + fps)]
        rec = np.r_[0.0, tps / yy.sum()]
        ax_pr.step(rec, prec, where="post", label=f"{name} (AP {_ap(yy, s):.3f})")
    ax_roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    if spec_target is not None:
        ax_roc.axvline(1 - spec_target, ls=":", c="k", lw=1, label=f"specificity {spec_target:.0%}")
    ax_pr.axhline(y.mean(), ls="--", c="grey", lw=1, label=f"prevalence {y.mean():.3f}")
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", xlim=(0, 1),
              ylim=(0, 1.01))
    ax_roc.legend(loc="lower right", fontsize=8)
    ax_pr.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_calibration(y_true, y_score, n_bins: int = 10, strategy: str = "quantile", title: str | None = None):
    """Reliability diagram (observed rate vs mean score per bin) plus a score histogram."""
    import matplotlib.pyplot as plt

    fig, (ax, ax_h) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    for name, scores in _as_dict(y_score).items():
        t = calibration_table(y_true, scores, n_bins=n_bins, strategy=strategy)
        ax.plot(t["mean_score"], t["observed"], marker="o", label=name)
        ax_h.hist(np.asarray(scores, dtype=float), bins=30, range=(0, 1), histtype="step", label=name)
    ax.set(ylabel="observed positive rate", xlim=(0, 1), ylim=(0, 1), title=title or "Calibration")
    ax.legend(fontsize=8)
    ax_h.set(xlabel="predicted score", ylabel="count")
    ax_h.set_yscale("log")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- rare-class arithmetic


def rare_class_arithmetic(accuracy: float = 0.978, precision: float = 0.84, recall: float = 0.91) -> dict:
    """The positive prevalence implied by a reported accuracy, precision and recall.

    With ``p`` the prevalence and fractions of all samples: TP = recall*p, FN = (1-recall)*p,
    FP = TP*(1-precision)/precision, and 1 - accuracy = FN + FP, so::

        p = (1 - accuracy) / ((1 - recall) + recall * (1 - precision) / precision)

    For the original paper (0.978, 0.84, 0.91) that is p = 0.0835: about 1 positive in 12,
    F1 = 0.874, specificity 0.984 - and a model that always says "negative" already scores
    accuracy 1 - p = 0.916.  Returns a dict with prevalence, f1, specificity, the four
    confusion-matrix fractions, ``accuracy_all_negative`` and ``per_1000`` counts.
    """
    for name, v in (("accuracy", accuracy), ("precision", precision), ("recall", recall)):
        if not 0 < v <= 1:
            raise ValueError(f"parameter {name!r}: expected a value in (0, 1], got {v!r}")
    denom = (1 - recall) + recall * (1 - precision) / precision
    if denom == 0:
        raise ValueError("precision = recall = 1: every error rate is zero, so accuracy does not pin down prevalence")
    p = (1 - accuracy) / denom
    tp = recall * p
    fn = (1 - recall) * p
    fp = tp * (1 - precision) / precision
    tn = 1 - tp - fn - fp
    if not 0 < p < 1 or tn < 0:
        raise ValueError(f"accuracy={accuracy}, precision={precision}, recall={recall} are inconsistent: "
                         f"they imply prevalence {p:.4f} and true-negative share {tn:.4f}")
    return {
        "accuracy": accuracy, "precision": precision, "recall": recall,
        "prevalence": p,
        "f1": 2 * precision * recall / (precision + recall),
        "specificity": tn / (tn + fp),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "accuracy_all_negative": 1 - p,
        "per_1000": {k: round(1000 * v, 1) for k, v in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn))},
    }
