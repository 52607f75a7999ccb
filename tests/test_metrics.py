"""lib.metrics against hand-computed cases (and sklearn where it defines the metric)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lib import metrics as M  # noqa: E402

# 10 negatives scored 0.0 .. 0.9, 4 positives
NEG = [i / 10 for i in range(10)]
POS = [0.95, 0.85, 0.55, 0.05]
Y = np.array([0] * 10 + [1] * 4)
S = np.array(NEG + POS)


def test_auc_and_ap_by_hand():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert M.roc_auc(y, s) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    # ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision 1 at recall 1/2, 2/3 at recall 1
    assert M.average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_auc_ties_count_half():
    assert M.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert M.roc_auc([0, 0, 1], [0.2, 0.7, 0.7]) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_auc_ap_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for k in range(20):
        y = rng.integers(0, 2, 200)
        s = np.round(rng.random(200) + 0.3 * y, 1 if k % 2 else 6)  # with and without ties
        assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_threshold_metrics_and_sens_at_spec_by_hand():
    r = M.binary_report(Y, S, threshold=0.5, n_boot=0, spec_target=0.90)
    # at 0.5: TP 3 (0.95, 0.85, 0.55), FN 1, FP 5 (0.5..0.9), TN 5
    assert r["precision"]["value"] == pytest.approx(3 / 8)
    assert r["recall"]["value"] == pytest.approx(3 / 4)
    assert r["specificity"]["value"] == pytest.approx(5 / 10)
    assert r["f1"]["value"] == pytest.approx(2 * 3 / (2 * 3 + 5 + 1))
    assert r["accuracy"]["value"] == pytest.approx(8 / 14)
    # specificity >= 0.9 allows one false positive (0.9): cut at 0.85 catches 0.95 and 0.85
    assert r["sens_at_spec"]["value"] == pytest.approx(0.5)
    assert r["threshold_at_spec"] == pytest.approx(0.85)
    # ordered (pos, neg) pairs: 10 + 9 + 6 + 1 = 26 of 40
    assert r["auc"]["value"] == pytest.approx(26 / 40)
    assert r["brier"]["value"] == pytest.approx(np.mean((S - Y) ** 2))
    assert (r["n"], r["n_pos"], r["prevalence"]) == (14, 4, pytest.approx(4 / 14))
    assert math.isnan(r["auc"]["ci_low"])  # no bootstrap asked


def test_bootstrap_ci_brackets_and_is_seeded():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.1).astype(int)
    s = rng.random(400) * 0.6 + 0.3 * y
    a = M.binary_report(y, s, n_boot=300, seed=7)
    b = M.binary_report(y, s, n_boot=300, seed=7)
    c = M.binary_report(y, s, n_boot=300, seed=8)
    assert a == b and a["auc"] != c["auc"]
    for k in M.METRIC_NAMES:
        assert a[k]["ci_low"] <= a[k]["value"] + 1e-9 <= a[k]["ci_high"] + 2e-9, k
    assert 0 < a["auc"]["ci_high"] - a["auc"]["ci_low"] < 0.3
    assert set(M.report_table({"m": a}).columns) == set(M.METRIC_NAMES)


def test_binary_report_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        M.binary_report([0, 2], [0.1, 0.2], n_boot=0)
    with pytest.raises(ValueError, match="equal length"):
        M.binary_report([0, 1], [0.1], n_boot=0)
    with pytest.raises(ValueError, match="spec_target"):
        M.binary_report([0, 1], [0.1, 0.2], n_boot=0, spec_target=1.5)
    with pytest.raises(ValueError, match="finite"):
        M.binary_report([0, 1], [0.1, np.nan], n_boot=0)


def test_cv_summary_by_hand():
    t975_2 = 4.302652729749464  # Student t, 2 degrees of freedom, 97.5%
    naive = M.cv_summary([0.6, 0.7, 0.8], test_train_ratio=None, bounds=None)
    assert naive["mean"] == pytest.approx(0.7) and naive["std"] == pytest.approx(0.1)
    assert naive["ci_high"] - 0.7 == pytest.approx(t975_2 * 0.1 / math.sqrt(3))
    nb = M.cv_summary([0.6, 0.7, 0.8], test_train_ratio=0.25, bounds=None)
    assert nb["ci_high"] - 0.7 == pytest.approx(t975_2 * 0.1 * math.sqrt(1 / 3 + 0.25))
    assert nb["corrected"] and not naive["corrected"]
    clipped = M.cv_summary([0.6, 0.7, 0.8], test_train_ratio=0.25)
    assert clipped["ci_high"] == 1.0 and clipped["ci_low"] == pytest.approx(0.7 - (nb["ci_high"] - 0.7))
    with_nan = M.cv_summary([0.6, np.nan, 0.8])
    assert with_nan["n"] == 2 and with_nan["n_nan"] == 1
    with pytest.raises(ValueError):
        M.cv_summary([np.nan])


def test_calibration_table_by_hand():
    y = [0, 0, 0, 1, 1, 1, 1, 0]
    s = [0.1, 0.1, 0.2, 0.2, 0.8, 0.8, 0.9, 0.9]
    t = M.calibration_table(y, s, n_bins=2, strategy="uniform")
    assert list(t["n"]) == [4, 4]
    assert list(t["mean_score"]) == pytest.approx([0.15, 0.85])
    assert list(t["observed"]) == pytest.approx([0.25, 0.75])
    q = M.calibration_table(y, s, n_bins=4)
    assert q["n"].sum() == 8
    with pytest.raises(ValueError, match="strategy"):
        M.calibration_table(y, s, strategy="nope")


def test_rare_class_arithmetic_exact_small_case():
    # prevalence 0.1, recall 0.5, precision 0.5: TP = FN = FP = 0.05, TN = 0.85, accuracy 0.9
    r = M.rare_class_arithmetic(accuracy=0.9, precision=0.5, recall=0.5)
    assert r["prevalence"] == pytest.approx(0.1, abs=1e-15)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == pytest.approx((0.05, 0.05, 0.05, 0.85), abs=1e-15)
    assert r["f1"] == pytest.approx(0.5) and r["specificity"] == pytest.approx(0.85 / 0.9)
    assert r["accuracy_all_negative"] == pytest.approx(0.9)


def test_rare_class_arithmetic_paper_numbers():
    r = M.rare_class_arithmetic()  # the paper: accuracy 0.978, precision 0.84, recall 0.91
    expected = 0.022 / (0.09 + 0.91 * 0.16 / 0.84)
    assert r["prevalence"] == pytest.approx(expected, rel=1e-12)
    assert round(r["prevalence"], 4) == 0.0835
    assert r["f1"] == pytest.approx(2 * 0.84 * 0.91 / 1.75)
    assert round(r["f1"], 2) == 0.87  # the paper's F1 is consistent with its precision/recall
    # the recovered confusion matrix reproduces every reported number
    tp, fp, fn, tn = r["tp"], r["fp"], r["fn"], r["tn"]
    assert tp + fp + fn + tn == pytest.approx(1.0)
    assert tp + tn == pytest.approx(0.978)
    assert tp / (tp + fp) == pytest.approx(0.84)
    assert tp / (tp + fn) == pytest.approx(0.91)
    assert r["accuracy_all_negative"] == pytest.approx(1 - expected)
    assert r["per_1000"]["tp"] == 76.0


def test_rare_class_arithmetic_rejects_impossible_numbers():
    with pytest.raises(ValueError, match="inconsistent"):
        M.rare_class_arithmetic(accuracy=0.5, precision=0.99, recall=0.99)
    with pytest.raises(ValueError, match="accuracy"):
        M.rare_class_arithmetic(accuracy=1.2)


def test_plots_return_figures():
    fig = M.plot_roc_pr(Y, {"a": S, "b": S[::-1]}, title="t")
    assert len(fig.axes) == 2
    fig2 = M.plot_calibration(Y, S, n_bins=3)
    assert len(fig2.axes) == 2
    plt.close(fig)
    plt.close(fig2)
