"""lib.data.splits: grouped, stratified splits that never leak a cluster image across splits."""
import re

import numpy as np
import pandas as pd
import pytest

from lib.data.manifest import CLASSES, sipakmed_manifest
from lib.data import splits
from lib.data.splits import SPLITS, assert_no_group_leak, grouped_split, split_summary


@pytest.fixture(scope="module")
def sipakmed_table():
    """The real 4049 SIPaKMeD names as an image table with fake paths."""
    m = sipakmed_manifest()
    return pd.DataFrame({"path": "/fake/" + m["kaggle_layout_relpath"], "label": m["class"], "group": m["group"]})


@pytest.fixture(scope="module")
def sipakmed_split(sipakmed_table):
    return grouped_split(sipakmed_table, seed=42)


def _toy(groups_per_class=6, cells=(1, 2, 3)):
    rows = []
    for c in ("a", "b", "c"):
        for g in range(groups_per_class):
            rows += [(c, f"{c}/{g:03d}")] * cells[g % len(cells)]
    return pd.DataFrame(rows, columns=["label", "group"])


def test_no_group_crosses_splits_on_the_real_names(sipakmed_table, sipakmed_split):
    s = sipakmed_split
    assert len(s) == 4049 and set(s["split"]) == set(SPLITS)
    assert (s.groupby("group")["split"].nunique() == 1).all()
    assert_no_group_leak(s)
    # untouched otherwise: same rows, same order, one new column, input not modified
    pd.testing.assert_frame_equal(s.drop(columns="split"), sipakmed_table)
    assert "split" not in sipakmed_table.columns


def test_stratification_is_preserved(sipakmed_split):
    summ = split_summary(sipakmed_split)
    assert list(summ.columns) == ["train", "val", "test", "total"]
    assert list(summ.index) == list(CLASSES) + ["total"]
    assert summ.loc["total", "total"] == 4049
    assert summ.loc[list(CLASSES), "total"].tolist() == [813, 825, 793, 787, 831]
    frac = summ.loc[list(CLASSES), ["train", "val", "test"]].div(summ.loc[list(CLASSES), "total"], axis=0)
    # 7 folds for 15% test, then 6 folds of the rest for val: about 1/7 each, per class
    assert frac["test"].between(0.12, 0.17).all(), frac
    assert frac["val"].between(0.12, 0.17).all(), frac
    assert frac["train"].between(0.68, 0.75).all(), frac
    groups = split_summary(sipakmed_split, groups=True)
    assert groups.loc["total", "total"] == 966
    assert groups.loc[list(CLASSES), "total"].tolist() == [223, 238, 271, 108, 126]
    assert (groups.loc[list(CLASSES), ["train", "val", "test"]] >= 10).all().all()


def test_deterministic_and_seeded(sipakmed_table, sipakmed_split):
    again = grouped_split(sipakmed_table, seed=42)
    assert again["split"].tolist() == sipakmed_split["split"].tolist()
    other = grouped_split(sipakmed_table, seed=7)
    assert other["split"].tolist() != sipakmed_split["split"].tolist()
    assert_no_group_leak(other)


def test_small_tables_get_every_class_in_every_split():
    t = _toy(groups_per_class=6)
    for seed in range(20):
        s = grouped_split(t, seed=seed)
        assert_no_group_leak(s)
        counts = pd.crosstab(s["label"], s["split"])
        assert (counts[list(SPLITS)] > 0).all().all(), (seed, counts)


def test_val_frac_zero_gives_train_and_test_only():
    s = grouped_split(_toy(), val_frac=0, test_frac=0.3, seed=1)
    assert set(s["split"]) == {"train", "test"}
    assert_no_group_leak(s)
    assert split_summary(s).columns.tolist() == ["train", "test", "total"]


def test_groups_spanning_labels_still_do_not_leak():
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"label": rng.choice(["x", "y"], 300), "group": rng.integers(0, 40, 300).astype(str)})
    s = grouped_split(t, seed=3)
    assert_no_group_leak(s)
    assert set(s["split"]) == set(SPLITS)


def test_custom_column_names():
    t = _toy(groups_per_class=14).rename(columns={"label": "y", "group": "patient"})
    s = grouped_split(t, label_col="y", group_col="patient", seed=0)
    assert_no_group_leak(s, group_col="patient")
    # a shuffled, non-contiguous index is kept and labels stay with their rows
    r = grouped_split(t.iloc[::-2], label_col="y", group_col="patient", seed=0)
    assert list(r.index) == list(t.index[::-2])
    assert_no_group_leak(r, group_col="patient")


def test_too_few_groups_names_the_class():
    t = pd.concat([_toy(), pd.DataFrame({"label": ["d"] * 5 + ["e"] * 4, "group": ["d/1"] * 3 + ["d/2"] * 2 + ["e/1"] * 4})])
    with pytest.raises(ValueError) as exc:
        grouped_split(t)
    msg = str(exc.value)
    assert msg.startswith("too few groups to split: class(es) 'd' has 2 group(s), 'e' has 1 group(s); "
                          "each class needs at least 3 (one per split)")
    # two groups are enough without a val split (tiny class: a larger fraction is held out, with a warning)
    with pytest.warns(UserWarning, match=r"class 'd' has only 5 row\(s\) left for the test split; holding out about 1/5"):
        s = grouped_split(t[t["label"] != "e"], val_frac=0, seed=0)
    assert set(s.loc[s["label"] == "d", "split"]) == {"train", "test"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(val_frac=-0.1), "parameter 'val_frac': expected a fraction in [0, 1), got -0.1"),
    (dict(test_frac=1.0), "parameter 'test_frac': expected a fraction in [0, 1), got 1.0"),
    (dict(test_frac="0.2"), "parameter 'test_frac'"),
    (dict(val_frac=0.5, test_frac=0.5), "must leave rows for training"),
    (dict(seed=-1), "parameter 'seed'"),
    (dict(label_col="class"), "table has no column(s) ['class']"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        grouped_split(_toy(), **kwargs)


def test_bad_tables():
    with pytest.raises(ValueError, match="expected a pandas DataFrame"):
        grouped_split([1, 2, 3])
    t = _toy()
    t.loc[0, "group"] = None
    with pytest.raises(ValueError, match="column 'group' has 1 missing value"):
        grouped_split(t)
    with pytest.raises(ValueError, match="it has no rows"):
        grouped_split(_toy().iloc[:0])


def test_assert_no_group_leak_names_the_groups():
    t = pd.DataFrame({"group": ["a", "a", "b", "c", "c", "d"], "split": ["train", "test", "val", "val", "val", "test"]})
    with pytest.raises(ValueError) as exc:
        assert_no_group_leak(t)
    assert str(exc.value) == "group leak: 1 group(s) of 'group' appear in more than one split: 'a' in ['test', 'train']"
    t.loc[2, "group"] = "c"
    t.loc[5, "split"] = "train"
    t.loc[5, "group"] = "c"
    with pytest.raises(ValueError, match=r"2 group\(s\).*'a' in \['test', 'train'\], 'c' in \['train', 'val'\]"):
        assert_no_group_leak(t)
    with pytest.raises(ValueError, match=r"expected values in \('train', 'val', 'test'\), found \['holdout'\]"):
        assert_no_group_leak(pd.DataFrame({"group": ["a"], "split": ["holdout"]}))
    with pytest.raises(ValueError, match=r"no column\(s\) \['split'\]"):
        assert_no_group_leak(pd.DataFrame({"group": ["a"]}))
    assert_no_group_leak(pd.DataFrame({"group": ["a", "a", "b"], "split": ["val", "val", "test"]}))


def test_split_summary_exact_counts():
    t = pd.DataFrame({
        "label": ["x", "x", "x", "y", "y", "y", "y"],
        "group": ["x1", "x1", "x2", "y1", "y2", "y3", "y3"],
        "split": ["train", "train", "test", "train", "val", "test", "test"],
    })
    s = split_summary(t)
    assert s.to_dict("index") == {
        "x": {"train": 2, "val": 0, "test": 1, "total": 3},
        "y": {"train": 1, "val": 1, "test": 2, "total": 4},
        "total": {"train": 3, "val": 1, "test": 3, "total": 7},
    }
    g = split_summary(t, groups=True)
    assert g.to_dict("index") == {
        "x": {"train": 1, "val": 0, "test": 1, "total": 2},
        "y": {"train": 1, "val": 1, "test": 1, "total": 3},
        "total": {"train": 2, "val": 1, "test": 2, "total": 5},
    }


def test_stratified_sample_keeps_shares_and_is_seeded():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = splits.stratified_sample(y, 10, seed=1)
    assert len(idx) == 10 and len(set(idx)) == 10 and list(idx) == sorted(idx)
    assert np.bincount(y[idx]).tolist() == [5, 3, 2]
    np.testing.assert_array_equal(idx, splits.stratified_sample(y, 10, seed=1))
    assert not np.array_equal(idx, splits.stratified_sample(y, 10, seed=2))
    np.testing.assert_array_equal(splits.stratified_sample(y, None), np.arange(100))
    np.testing.assert_array_equal(splits.stratified_sample(y, 500), np.arange(100))
    rare = np.array([0] * 98 + [1, 2])
    assert set(rare[splits.stratified_sample(rare, 5, seed=0)]) == {0, 1, 2}  # every class kept
    with pytest.raises(ValueError, match="'n'"):
        splits.stratified_sample(y, 0)


def test_stratified_rows_keeps_table_order_and_labels():
    t = pd.DataFrame({"label": ["a"] * 30 + ["b"] * 10, "v": range(40)})
    r = splits.stratified_rows(t, 8, seed=3)
    assert len(r) == 8 and r["label"].value_counts().to_dict() == {"a": 6, "b": 2}
    assert r.index.is_monotonic_increasing
    assert splits.stratified_rows(t, None).equals(t)
