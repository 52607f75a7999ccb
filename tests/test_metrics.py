"""lib.metrics against hand-computed cases (and sklearn where it defines the metric)."""
from __future__ import annotations

import json
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
    assert r["auc"]["ci_low"] is None and r["auc"]["n_draws"] == 0  # no bootstrap asked: undefined, JSON null
    assert M.sensitivity_at_specificity(Y, S, 0.90) == pytest.approx(0.5)


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


# --------------------------------------------------------------------------- group-aware bootstrap


def _clustered(n_groups=60, size=10, seed=0):
    """Every group shares one score and one label: ``size`` rows carry one row's information."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n_groups) % 3 == 0).astype(int)
    score = rng.normal(0, 1, n_groups) + label
    g = np.repeat(np.arange(n_groups), size)
    return np.repeat(label, size), np.repeat(score, size), g


def _fusion_test_set(seed=0):
    """The fusion cohort's shape (issue 13, notebook 05 full): 235 abnormal images in 47 cluster groups
    share 8 positive UCI records (about 29 uses each); 300 normal images in 60 groups share 121
    negative records.  The tabular-only score is a function of the record alone."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(235, int), np.zeros(300, int)]
    image_group = np.r_[np.repeat(np.arange(47), 5), 100 + np.repeat(np.arange(60), 5)]
    record = np.r_[np.resize(rng.permutation(8), 235), 8 + np.resize(rng.permutation(121), 300)]
    record_score = rng.normal(0, 1, 129)
    record_score[:8] += 1.0
    return y, record_score[record], image_group, record


def _width(r):
    return r["ci_high"] - r["ci_low"]


def test_row_bootstrap_is_the_documented_algorithm():
    # groups=None is today's bootstrap: n rows drawn with rng.integers from default_rng(seed), percentile CI
    rng = np.random.default_rng(5)
    y = (rng.random(120) < 0.15).astype(int)
    s = np.round(rng.random(120) * 0.7 + 0.3 * y, 2)
    draws = np.random.default_rng(11)
    aucs, accs = [], []
    for _ in range(200):
        idx = draws.integers(0, 120, 120)
        aucs.append(M.roc_auc(y[idx], s[idx]))
        accs.append(np.mean((s[idx] >= 0.5) == y[idx]))
    aucs = np.asarray(aucs)
    expected_auc = np.quantile(aucs[np.isfinite(aucs)], [0.025, 0.975])
    for rep in (M.binary_report(y, s, n_boot=200, seed=11), M.binary_report(y, s, n_boot=200, seed=11, groups=None)):
        assert [rep["auc"]["ci_low"], rep["auc"]["ci_high"]] == list(expected_auc)
        assert [rep["accuracy"]["ci_low"], rep["accuracy"]["ci_high"]] == list(np.quantile(accs, [0.025, 0.975]))
        assert rep["auc"]["n_draws"] == int(np.isfinite(aucs).sum())
        assert rep["n_boot_undefined"] == int((~np.isfinite(aucs)).sum())
        assert rep["bootstrap"]["kind"] == "rows" and "resampled independently" in rep["method"]
    assert M.binary_report(y, s, n_boot=200, seed=11) == M.binary_report(y, s, n_boot=200, seed=11, groups=None)
    one = M.bootstrap_interval(y, s, "auc", n_boot=200, seed=11)
    assert [one["ci_low"], one["ci_high"]] == list(expected_auc)


def test_cluster_bootstrap_is_wider_on_correlated_groups():
    y, s, g = _clustered()
    cmp = M.naive_vs_grouped(y, s, g, n_boot=1000, seed=1, group_names="cluster images")
    # ten copies of each group's row: the honest interval is about sqrt(10) = 3.2 times the naive one
    assert cmp["width_ratio"] > 2.2, cmp["width_ratio"]
    assert cmp["width_grouped"] == pytest.approx(_width(cmp["grouped"]))
    assert cmp["grouped"]["method"] == ("95% percentile bootstrap over 60 cluster images (20 with positives, "
                                        "stratified), 1000 draws")
    rep = M.binary_report(y, s, n_boot=1000, seed=1, groups=g, group_names="cluster images")
    # the full report and the one-metric interval use the same draws
    assert (rep["auc"]["ci_low"], rep["auc"]["ci_high"]) == (cmp["grouped"]["ci_low"], cmp["grouped"]["ci_high"])
    assert rep["method"] == cmp["grouped"]["method"]
    naive = M.binary_report(y, s, n_boot=1000, seed=1)
    for k in ("ap", "sens_at_spec"):  # AP and sensitivity at specificity widen through the same machinery
        assert _width(rep[k]) > 1.8 * _width(naive[k]), k


def test_cluster_bootstrap_agrees_with_naive_on_independent_rows():
    rng = np.random.default_rng(2)
    y = (rng.random(600) < 0.3).astype(int)
    s = rng.normal(0, 1, 600) + y
    g = rng.permutation(np.repeat(np.arange(120), 5))  # groups that carry no shared information
    ratios = [M.naive_vs_grouped(y, s, g, n_boot=800, seed=seed)["width_ratio"] for seed in range(3)]
    assert 0.85 < float(np.mean(ratios)) < 1.15, ratios


def test_two_way_bootstrap_on_reused_positive_records():
    y, s, image_group, record = _fusion_test_set()
    naive = M.bootstrap_interval(y, s, n_boot=1000, seed=3)
    two = M.bootstrap_interval(y, s, n_boot=1000, seed=3, groups=(image_group, record))
    assert naive["value"] == two["value"]
    assert _width(two) > 2.5 * _width(naive), (_width(two), _width(naive))
    assert two["bootstrap"]["n_groups"] == [107, 129] and two["bootstrap"]["n_groups_with_positives"] == [47, 8]
    assert two["method"].startswith("95% two-way (pigeonhole) percentile bootstrap over 107 image groups "
                                    "(47 with positives, stratified) x 129 UCI records (8 with positives, stratified)")
    assert two["n_boot_undefined"] == 0
    rep = M.binary_report(y, s, n_boot=300, seed=3, groups=(image_group, record),
                          group_names=("cluster images", "records"))
    assert "107 cluster images" in rep["method"] and "129 records" in rep["method"]
    assert rep["bootstrap"]["kind"] == "two-way"


def test_two_way_draw_weights_pairs_by_both_multiplicities():
    # a full 3 x 4 crossed design, one row per (image group, record) cell; the metric records each draw
    a, b = np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3)
    y = np.array([1, 0, 1, 0] * 3)
    seen = []

    def spy(yy, ss):
        seen.append(np.bincount(ss.astype(int), minlength=12).reshape(3, 4))
        return 0.5

    r = M.bootstrap_interval(y, np.arange(12.0), spy, n_boot=200, seed=0, groups=(a, b), stratify=False)
    assert (seen.pop() == 1).all()  # the point estimate, on the data as they are
    assert len(seen) == r["n_draws"] and 150 < len(seen) <= 200  # draws where no pair survived are skipped
    for m in seen:
        # multiplicity of cell (i, j) = (times group i drawn) x (times record j drawn): a rank-one table
        u, v = m.sum(axis=1), m.sum(axis=0)
        assert (m * m.sum() == np.outer(u, v)).all()
    # pairs whose members were not both drawn are gone: some cells are empty in most draws
    assert np.mean([(m == 0).any() for m in seen]) > 0.9
    assert r["n_draws"] == len(seen)


def test_cluster_bootstrap_resamples_whole_groups_within_strata():
    # 2 positive groups of 3 rows, 28 negative groups of different sizes
    g = np.r_[np.repeat([0, 1], 3), np.repeat(np.arange(2, 30), np.arange(28) % 3 + 1)]
    y = (g < 2).astype(int)
    s = np.arange(len(g), dtype=float)
    sizes = np.bincount(g)
    seen = []

    def spy(yy, ss):
        seen.append(np.bincount(ss.astype(int), minlength=len(g)))
        return float("nan")

    r = M.bootstrap_interval(y, s, spy, n_boot=100, seed=4, groups=g)
    assert (seen.pop() == 1).all() and len(seen) == 100
    for counts in seen:
        per_group = np.bincount(g, weights=counts)
        drawn = per_group / sizes
        assert (drawn == np.round(drawn)).all()  # every row of a drawn group comes along, equally often
        assert all((counts[g == k] == drawn[k]).all() for k in range(30))
        assert drawn[:2].sum() == 2 and drawn[2:].sum() == 28  # each stratum resampled to its own size
    assert r["ci_low"] is None and r["n_draws"] == 0  # a metric undefined everywhere gives null, not NaN
    strat = M.binary_report(y, np.r_[np.full(6, 0.9), np.full(len(g) - 6, 0.1)] + 0.0, n_boot=300, seed=4, groups=g)
    plain = M.binary_report(y, np.r_[np.full(6, 0.9), np.full(len(g) - 6, 0.1)], n_boot=300, seed=4, groups=g,
                            stratify=False)
    assert strat["n_boot_undefined"] == 0 and strat["bootstrap"]["stratified"] == [True]
    # without strata about (28/30)^30 = 13% of draws hold no positive group: skipped and counted
    assert 15 < plain["n_boot_undefined"] < 70 and plain["auc"]["n_draws"] == 300 - plain["n_boot_undefined"]
    assert f"; {plain['n_boot_undefined']} draws with one class only" in plain["method"]


def test_group_bootstrap_is_seeded_and_json_strict():
    y, s, image_group, record = _fusion_test_set(seed=1)
    for groups in (image_group, (image_group, record)):
        a = M.binary_report(y, s, n_boot=100, seed=7, groups=groups)
        b = M.binary_report(y, s, n_boot=100, seed=7, groups=groups)
        c = M.binary_report(y, s, n_boot=100, seed=8, groups=groups)
        assert a == b and a["auc"] != c["auc"]
        json.dumps(a, allow_nan=False)
    # undefined numbers are null: no bootstrap, and a threshold above every score (no predicted positive)
    r = M.binary_report([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9, n_boot=0)
    assert r["precision"]["value"] is None and r["precision"]["ci_low"] is None
    json.dumps(r, allow_nan=False)
    table = M.report_table({"m": r})
    assert table.loc["m", "precision"] == "n/a [n/a, n/a]"
    assert table.attrs["method"] == "Intervals: 95% percentile bootstrap over 4 rows resampled independently, 0 draws."


def test_methods_note_one_line_or_per_row():
    y, s, g = _clustered(n_groups=30, size=4)
    naive = M.binary_report(y, s, n_boot=20)
    grouped = M.binary_report(y, s, n_boot=20, groups=g, group_names="cluster images")
    assert M.methods_note({"a": naive, "b": dict(naive)}) == f"Intervals: {naive['method']}."
    note = M.methods_note({"naive": naive, "grouped": grouped})
    assert note.splitlines()[1:] == [f"- naive: {naive['method']}.", f"- grouped: {grouped['method']}."]
    legacy = {k: v for k, v in naive.items() if k != "method"}
    assert M.methods_note({"old": legacy}) == "Intervals: percentile bootstrap over 120 rows resampled independently."


def test_group_bootstrap_rejects_bad_groups():
    y, s, g = _clustered(n_groups=12, size=2)
    with pytest.raises(ValueError, match=r"'groups': expected one group label per sample \(24\)"):
        M.binary_report(y, s, n_boot=5, groups=g[:-1])
    with pytest.raises(ValueError, match=r"'groups\[1\]': 1 missing group label"):
        M.binary_report(y, s, n_boot=5, groups=(g, [None] + list(g[1:])))
    with pytest.raises(ValueError, match="'group_names': expected 2 name"):
        M.binary_report(y, s, n_boot=5, groups=(g, g), group_names="images")
    with pytest.raises(ValueError, match="'metric'"):
        M.bootstrap_interval(y, s, "brier", n_boot=5)
    with pytest.raises(ValueError, match="'ci'"):
        M.bootstrap_interval(y, s, n_boot=5, ci=95)
    with pytest.raises(ValueError, match="'n_boot'"):
        M.binary_report(y, s, n_boot=-1, groups=g)
