"""Binary-classification metrics shared by the tabular, fusion and image notebooks.

The rule of the kit: report AUC and average precision with confidence intervals,
sensitivity at a fixed specificity, and a calibration view - never accuracy alone.

* :func:`binary_report` - AUC, AP, sensitivity at a fixed specificity, F1, accuracy,
  precision, recall, specificity and Brier score, each with a percentile bootstrap 95% CI.
  ``groups=`` makes the bootstrap resample whole groups (cluster images, source images) or,
  with ``groups=(image_groups, record_ids)``, both factors of the fusion pairs at once
  (two-way "pigeonhole" bootstrap); every report names its method in ``report["method"]``.
* :func:`bootstrap_interval` - one metric (AUC, AP, sensitivity at specificity or your own
  function) through the same resampling; :func:`naive_vs_grouped` sets the naive interval
  beside the group-aware one; :func:`methods_note` is the line to print under a table.
* :func:`cv_summary` - mean, std and a 95% CI of per-fold scores (Nadeau-Bengio
  corrected, because the folds of (repeated) cross-validation share training rows).
* :func:`calibration_table`, :func:`plot_roc_pr`, :func:`plot_calibration`.
* :func:`rare_class_arithmetic` - what a published accuracy/precision/recall implies
  about how rare the positive class was.

Nothing here writes files; notebooks save figures with :func:`lib.plots.save_figure`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

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


def sensitivity_at_specificity(y_true, y_score, spec_target: float = 0.90) -> float:
    """Highest sensitivity at a threshold whose specificity is >= ``spec_target``; NaN with one class.

    Screening fixes how many healthy women it may recall (the specificity) and asks how many
    cases it then finds; this is that number.
    """
    y, s = _check(y_true, y_score)
    _check_spec(spec_target)
    return _sens_at_spec(y, s, spec_target)[0]


def _check_spec(spec_target):
    if not 0 < spec_target < 1:
        raise ValueError(f"parameter 'spec_target': expected a value in (0, 1), got {spec_target!r}")


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


# --------------------------------------------------------------------------- resampling designs
#
# Why groups: cells cut from one cluster image share stain, focus and patient; in the fusion
# cohort one UCI record stands in for ~29 abnormal images.  Resampling images one by one treats
# those as independent evidence and gives intervals that are too narrow.  The unit that was
# sampled (the group) is the unit to resample.

_DEFAULT_NAMES = {"rows": "rows", "cluster": "groups", "two-way": ("image groups", "UCI records")}


def _json_float(x):
    """float, or None where undefined: strict JSON has no NaN."""
    x = float(x)
    return x if math.isfinite(x) else None


def _factor(values, n, what):
    """Integer codes 0..G-1 for one grouping factor (order of first appearance)."""
    v = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values, dtype=object)
    if v.ndim != 1 or len(v) != n:
        raise ValueError(f"parameter {what}: expected one group label per sample ({n}), got shape {np.shape(v)}")
    codes, uniques = pd.factorize(v, use_na_sentinel=True)
    if (codes < 0).any():
        raise ValueError(f"parameter {what}: {int((codes < 0).sum())} missing group label(s) (None/NaN); "
                         "every sample needs a group")
    return codes.astype(np.int64), len(uniques)


def _strata(codes, n_groups, y, stratify):
    """Groups holding a positive vs groups without, when both exist (so each draw keeps both classes)."""
    has_pos = np.bincount(codes, weights=y.astype("float64"), minlength=n_groups) > 0
    if stratify and has_pos.any() and not has_pos.all():
        return [np.flatnonzero(has_pos), np.flatnonzero(~has_pos)], int(has_pos.sum()), True
    return [np.arange(n_groups)], int(has_pos.sum()), False


class _Design:
    """How one bootstrap draw is made: ``rows`` (today's independent rows), ``cluster`` (whole
    groups) or ``two-way`` (both factors of a crossed design, pairs weighted by multiplicity)."""

    def __init__(self, y, groups, stratify: bool, group_names):
        n = len(y)
        self.n = n
        if groups is None:
            self.kind, self.factors = "rows", []
        elif (isinstance(groups, (tuple, list)) and len(groups) == 2
              and all(np.ndim(g) == 1 and len(g) == n for g in groups)):
            self.kind = "two-way"
            self.factors = [_factor(groups[0], n, "'groups[0]'"), _factor(groups[1], n, "'groups[1]'")]
        else:
            self.kind, self.factors = "cluster", [_factor(groups, n, "'groups'")]
        names = _DEFAULT_NAMES[self.kind] if group_names is None else group_names
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.names) != max(1, len(self.factors)):
            raise ValueError(f"parameter 'group_names': expected {max(1, len(self.factors))} name(s) for a "
                             f"{self.kind} bootstrap, got {group_names!r}")
        self.strata, self.n_pos_groups, self.stratified = [], [], []
        for codes, g in self.factors:
            st, n_pos, done = _strata(codes, g, y, stratify)
            self.strata.append(st)
            self.n_pos_groups.append(n_pos)
            self.stratified.append(done)

    @property
    def n_groups(self):
        return [g for _, g in self.factors]

    def _counts(self, k, rng):
        """How often each group of factor ``k`` is drawn (each stratum resampled to its own size)."""
        g = self.factors[k][1]
        counts = np.zeros(g, dtype=np.int64)
        for st in self.strata[k]:
            counts += np.bincount(st[rng.integers(0, len(st), len(st))], minlength=g)
        return counts

    def draw(self, rng) -> np.ndarray:
        """Row indices of one resample, repeated by multiplicity (order does not matter to any metric)."""
        if self.kind == "rows":
            return rng.integers(0, self.n, self.n)  # exactly today's draw: same numbers for a seed
        w = np.ones(self.n, dtype=np.int64)
        for k, (codes, _) in enumerate(self.factors):
            w *= self._counts(k, rng)[codes]  # two-way: a pair survives only if both members were drawn
        return np.repeat(np.arange(self.n), w)

    def describe(self, n_boot: int, ci: float, n_undefined: int) -> str:
        """The short line a table prints under itself."""
        level = f"{ci:.0%}".replace(".0%", "%")
        if self.kind == "rows":
            text = f"{level} percentile bootstrap over {self.n} {self.names[0]} resampled independently"
        else:
            parts = []
            for (_, g), name, n_pos, strat in zip(self.factors, self.names, self.n_pos_groups, self.stratified):
                parts.append(f"{g} {name} ({n_pos} with positives{', stratified' if strat else ''})")
            if self.kind == "cluster":
                text = f"{level} percentile bootstrap over {parts[0]}"
            else:
                text = (f"{level} two-way (pigeonhole) percentile bootstrap over {parts[0]} x {parts[1]}, "
                        "pairs weighted by how often both members were drawn")
        text += f", {n_boot} draws"
        if n_undefined:
            text += (f"; {n_undefined} draw{'' if n_undefined == 1 else 's'} with one class only "
                     "(left out wherever a metric needs both)")
        return text

    def summary(self) -> dict:
        return {"kind": self.kind, "n_rows": int(self.n), "group_names": list(self.names),
                "n_groups": [int(g) for g in self.n_groups],
                "n_groups_with_positives": [int(p) for p in self.n_pos_groups],
                "stratified": [bool(s) for s in self.stratified]}


def _undefined(y_sample) -> bool:
    """A resample on which AUC/AP/sensitivity are undefined: empty or one class only."""
    k = int(y_sample.sum())
    return k == 0 or k == len(y_sample)


def _percentile(values, alpha):
    b = np.asarray(values, dtype="float64")
    b = b[np.isfinite(b)]
    if not len(b):
        return None, None, 0
    lo, hi = np.quantile(b, [alpha, 1 - alpha])
    return float(lo), float(hi), int(len(b))


def _check_boot(n_boot, ci):
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"parameter 'n_boot': expected a non-negative integer, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"parameter 'ci': expected a coverage in (0, 1), e.g. 0.95, got {ci!r}")


def binary_report(y_true, y_score, threshold: float = 0.5, n_boot: int = 1000, seed: int = 42,
                  spec_target: float = 0.90, ci: float = 0.95, groups=None, stratify: bool = True,
                  group_names=None) -> dict:
    """Point estimates with percentile-bootstrap confidence intervals.

    Returns a strict-JSON dict (undefined numbers are ``None``, never NaN): ``n``, ``n_pos``,
    ``prevalence``, ``threshold``, ``spec_target``, ``threshold_at_spec`` (the score cut that
    achieves ``spec_target`` on these data), ``n_boot``, ``ci``, ``method`` (one line naming the
    resampling, to print under the table), ``bootstrap`` (the design: kind, groups, strata),
    ``n_boot_undefined`` (draws with one class only, or empty) and one entry per metric of
    :data:`METRIC_NAMES`, each ``{"value", "ci_low", "ci_high", "n_draws"}`` (``n_draws``: draws on
    which that metric was defined and so entered its interval).

    ``sens_at_spec`` is the sensitivity at specificity >= ``spec_target``; F1, accuracy,
    precision, recall and specificity use ``score >= threshold``.

    Resampling (``n_boot`` draws, seeded, deterministic):

    * ``groups=None`` - rows with replacement, independently (the behaviour before groups
      existed: the same numbers for the same seed).  Right only when rows are independent.
    * ``groups=labels`` (one per row, e.g. the cluster image of each cell) - a cluster bootstrap:
      whole groups are drawn with replacement and every row of a drawn group comes along.  With
      ``stratify`` (default) groups holding a positive and groups without are resampled
      separately, each to its own count, so every draw keeps both classes whenever the data allow.
    * ``groups=(g1, g2)`` - the two-way ("pigeonhole") bootstrap for crossed designs such as the
      fusion cohort, where each test pair has an image group *and* a UCI record and one record is
      reused for many images: the ``g1`` groups and the ``g2`` groups are drawn independently and
      a pair enters the draw with weight (times its ``g1`` group was drawn) x (times its ``g2``
      group was drawn), so pairs whose members were not both drawn drop out.  Owen, A. B. (2007),
      "The pigeonhole bootstrap", Annals of Applied Statistics 1(2):386-411; Owen & Eckles (2012),
      "Bootstrapping data arrays of arbitrary order", Annals of Applied Statistics 6(3):895-927.
      Owen shows the variance estimate is mildly conservative, which suits a teaching kit.

    ``group_names`` name the units in ``method`` (a string, or two for the two-way design).
    A draw on which a metric is undefined (e.g. AUC with one class) is left out of that metric's
    interval and counted.  With few positive groups the intervals are wide - that is the point.
    """
    y, s = _check(y_true, y_score)
    _check_spec(spec_target)
    _check_boot(n_boot, ci)
    design = _Design(y, groups, stratify, group_names)
    point = _point_metrics(y, s, threshold, spec_target)
    _, thr_at_spec = _sens_at_spec(y, s, spec_target)
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in METRIC_NAMES}
    n_undefined = 0
    for _ in range(n_boot):
        idx = design.draw(rng)
        if len(idx) == 0:  # two-way: no pair had both members drawn
            n_undefined += 1
            continue
        yb = y[idx]
        n_undefined += _undefined(yb)
        m = _point_metrics(yb, s[idx], threshold, spec_target)
        for k in METRIC_NAMES:
            boots[k].append(m[k])
    alpha = (1 - ci) / 2
    report = {
        "n": int(len(y)), "n_pos": int(y.sum()), "prevalence": float(y.mean()), "threshold": float(threshold),
        "spec_target": float(spec_target), "threshold_at_spec": _json_float(thr_at_spec), "n_boot": int(n_boot),
        "ci": ci, "method": design.describe(n_boot, ci, n_undefined), "bootstrap": design.summary(),
        "n_boot_undefined": int(n_undefined),
    }
    for k in METRIC_NAMES:
        lo, hi, used = _percentile(boots[k], alpha)
        report[k] = {"value": _json_float(point[k]), "ci_low": lo, "ci_high": hi, "n_draws": used}
    return report


_SINGLE = {
    "auc": lambda y, s, spec: _auc(y, s),
    "ap": lambda y, s, spec: _ap(y, s),
    "sens_at_spec": lambda y, s, spec: _sens_at_spec(y, s, spec)[0],
}


def bootstrap_interval(y_true, y_score, metric: str | Callable = "auc", n_boot: int = 1000, seed: int = 42,
                       ci: float = 0.95, groups=None, stratify: bool = True, group_names=None,
                       spec_target: float = 0.90) -> dict:
    """One metric with a percentile-bootstrap interval, through the same resampling as
    :func:`binary_report` (same ``groups`` / ``stratify`` / ``group_names`` meaning, same draws
    for the same seed and design).

    ``metric``: ``"auc"``, ``"ap"``, ``"sens_at_spec"`` (at ``spec_target``) or a function
    ``f(y_bool, scores) -> float`` returning NaN where undefined.  Cheaper than a full report when
    one number is needed.  Returns ``{"metric", "value", "ci_low", "ci_high", "n_draws", "n_boot",
    "n_boot_undefined", "ci", "method", "bootstrap"}``, strict JSON (``None`` where undefined).
    """
    y, s = _check(y_true, y_score)
    _check_spec(spec_target)
    _check_boot(n_boot, ci)
    if callable(metric):
        fn, name = (lambda yy, ss, spec: metric(yy, ss)), getattr(metric, "__name__", "custom")
    elif metric in _SINGLE:
        fn, name = _SINGLE[metric], metric
    else:
        raise ValueError(f"parameter 'metric': expected one of {sorted(_SINGLE)} or a function, got {metric!r}")
    design = _Design(y, groups, stratify, group_names)
    rng = np.random.default_rng(seed)
    values, n_undefined = [], 0
    for _ in range(n_boot):
        idx = design.draw(rng)
        if len(idx) == 0 or _undefined(y[idx]):
            n_undefined += 1
            if len(idx) == 0:
                continue
        values.append(fn(y[idx], s[idx], spec_target))
    lo, hi, used = _percentile(values, (1 - ci) / 2)
    return {"metric": name, "value": _json_float(fn(y, s, spec_target)), "ci_low": lo, "ci_high": hi,
            "n_draws": used, "n_boot": int(n_boot), "n_boot_undefined": int(n_undefined), "ci": ci,
            "method": design.describe(n_boot, ci, n_undefined), "bootstrap": design.summary()}


def naive_vs_grouped(y_true, y_score, groups, metric: str | Callable = "auc", n_boot: int = 1000,
                     seed: int = 42, ci: float = 0.95, group_names=None, spec_target: float = 0.90) -> dict:
    """The same metric with the naive (rows independent) and the group-aware interval, side by side.

    Returns ``{"naive": ..., "grouped": ..., "width_naive", "width_grouped", "width_ratio"}``
    (:func:`bootstrap_interval` dicts; ratio = grouped / naive width, ``None`` when undefined) -
    the one comparison that shows how much a row-wise bootstrap overstates what the data know.
    """
    kw = dict(metric=metric, n_boot=n_boot, seed=seed, ci=ci, spec_target=spec_target)
    naive = bootstrap_interval(y_true, y_score, **kw)
    grouped = bootstrap_interval(y_true, y_score, groups=groups, group_names=group_names, **kw)

    def width(r):
        return None if r["ci_low"] is None else r["ci_high"] - r["ci_low"]

    wn, wg = width(naive), width(grouped)
    ratio = wg / wn if wn and wg is not None else None
    return {"naive": naive, "grouped": grouped, "width_naive": wn, "width_grouped": wg, "width_ratio": ratio}


def _fmt(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def report_table(reports: dict) -> pd.DataFrame:
    """``{name: binary_report(...)}`` -> one row per model, "value [low, high]" strings, for display.

    ``n/a`` marks an undefined number.  The resampling methods are in ``table.attrs["method"]``
    (print :func:`methods_note` under the table).
    """
    rows = {}
    for name, rep in reports.items():
        rows[name] = {k: f"{_fmt(rep[k]['value'])} [{_fmt(rep[k]['ci_low'])}, {_fmt(rep[k]['ci_high'])}]"
                      for k in METRIC_NAMES}
    table = pd.DataFrame(rows).T
    table.attrs["method"] = methods_note(reports)
    return table


def methods_note(reports: dict) -> str:
    """The line(s) to print under a table of ``{name: report}``: the interval method once when all
    rows share it, else one line per row.  Reports made before ``method`` existed read as the
    row-wise bootstrap they were."""
    def method(rep):
        return rep.get("method") or f"percentile bootstrap over {rep.get('n')} rows resampled independently"

    methods = {name: method(rep) for name, rep in reports.items()}
    distinct = list(dict.fromkeys(methods.values()))
    if len(distinct) == 1:
        return f"Intervals: {distinct[0]}."
    return "Intervals:\n" + "\n".join(f"- {name}: {m}." for name, m in methods.items())


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
