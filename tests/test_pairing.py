"""The pairing protocol: split first, pair within splits, label-conditioned vs shuffled, no leaks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.fusion import pairing
from lib.data.splits import SPLITS


def image_table(n_groups_per_class=12, cells=3, classes=("A", "B", "C", "D"), abnormal=("A", "B")):
    rows = []
    for c in classes:
        for g in range(n_groups_per_class):
            for k in range(cells):
                rows.append(dict(path=f"/x/{c}/{g:03d}_{k:02d}.bmp", label=c, group=f"{c}/{g:03d}",
                                 abnormal=c in abnormal))
    t = pd.DataFrame(rows)
    t["label_idx"] = t["label"].map({c: i for i, c in enumerate(classes)})
    return t


def uci_frame(n=400, n_pos=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros(n, int)
    y[rng.choice(n, n_pos, replace=False)] = 1
    return pd.DataFrame({"Age": rng.integers(15, 60, n).astype(float), "Smokes": rng.integers(0, 2, n).astype(float),
                         "Biopsy": y})


@pytest.fixture
def images():
    return image_table()


@pytest.fixture
def uci():
    return uci_frame()


def test_split_uci_is_stratified_seeded_and_complete(uci):
    s = pairing.split_uci(uci, seed=3)
    assert s.index.equals(uci.index) and set(s) == set(SPLITS)
    assert s.equals(pairing.split_uci(uci, seed=3))
    assert not s.equals(pairing.split_uci(uci, seed=4))
    share = s.value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.15, abs=0.01) and share["val"] == pytest.approx(0.15, abs=0.01)
    pos = uci.groupby(s)["Biopsy"].sum()
    assert pos["test"] == 6 and pos["val"] == 6 and pos["train"] == 28  # 40 positives, stratified


def test_label_conditioned_matches_labels_and_stays_inside_splits(images, uci):
    usplit = pairing.split_uci(uci, seed=42)
    c = pairing.pair_label_conditioned(images, uci, seed=42, uci_split=usplit)
    assert list(c.columns) == pairing.COHORT_COLUMNS
    assert len(c) == len(images) and (c["pairing"] == "label_conditioned").all()
    assert (c["record_target"] == c["abnormal"]).all()
    assert (uci.loc[c["record_id"], "Biopsy"].to_numpy() == c["abnormal"].to_numpy()).all()
    # every record comes from the UCI split of its image's split
    assert (usplit.loc[c["record_id"]].to_numpy() == c["split"].to_numpy()).all()
    pairing.assert_no_leak(c)
    # image_index points back at the image table's row
    assert (images["path"].to_numpy()[c["image_index"]] == c["path"].to_numpy()).all()


def test_reuse_is_as_even_as_possible(images, uci):
    c = pairing.pair_label_conditioned(images, uci, seed=1)
    for (s, a), g in c.groupby(["split", "abnormal"]):
        uses = g["record_id"].value_counts()
        assert uses.max() - uses.min() <= 1, (s, a)
    r = pairing.reuse_table(c)
    assert list(r.columns) == ["split", "abnormal", "images", "records_used", "max_uses", "mean_uses"]
    assert r["images"].sum() == len(images)
    # 28 positive train records for ~50 abnormal train images: most are used twice
    train_pos = r[(r["split"] == "train") & (r["abnormal"] == 1)].iloc[0]
    assert train_pos["records_used"] == 28 and train_pos["max_uses"] >= 2


def test_pairing_is_deterministic_for_a_seed(images, uci):
    a = pairing.pair_label_conditioned(images, uci, seed=7)
    b = pairing.pair_label_conditioned(images, uci, seed=7)
    c = pairing.pair_label_conditioned(images, uci, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["record_id"].equals(c["record_id"])


def test_shuffled_keeps_records_and_breaks_the_label_link(images, uci):
    lc = pairing.pair_label_conditioned(images, uci, seed=5)
    sh = pairing.pair_shuffled(images, uci, seed=5)
    assert (sh["pairing"] == "shuffled").all()
    pd.testing.assert_frame_equal(lc.drop(columns=["record_id", "record_target", "pairing"]),
                                  sh.drop(columns=["record_id", "record_target", "pairing"]))
    for s in SPLITS:  # the same records with the same use counts in every split: the same marginal
        assert sorted(lc.loc[lc["split"] == s, "record_id"]) == sorted(sh.loc[sh["split"] == s, "record_id"])
    agreement = (sh["abnormal"] == sh["record_target"]).mean()
    assert agreement < 0.8  # label-conditioned is 1.0; by chance about p^2 + (1-p)^2 = 0.52 here
    pairing.assert_no_leak(sh)


def test_existing_image_split_is_kept(images, uci):
    t = images.copy()
    groups = sorted(t["group"].unique())
    rng = np.random.default_rng(0)
    chosen = {g: SPLITS[i % 3] for i, g in enumerate(rng.permutation(groups))}
    t["split"] = t["group"].map(chosen)
    c = pairing.pair_label_conditioned(t, uci, seed=42)
    assert (c["split"].to_numpy() == t["split"].to_numpy()).all()


def test_assert_no_leak_names_records_and_groups(images, uci):
    c = pairing.pair_label_conditioned(images, uci, seed=42)
    bad = c.copy()
    i_train = bad.index[bad["split"] == "train"][0]
    i_test = bad.index[bad["split"] == "test"][0]
    bad.loc[i_test, "record_id"] = bad.loc[i_train, "record_id"]
    with pytest.raises(ValueError, match=r"1 tabular record\(s\) in more than one split: " + str(bad.loc[i_train, "record_id"])):
        pairing.assert_no_leak(bad)
    bad2 = c.copy()
    bad2.loc[i_test, "group"] = bad2.loc[i_train, "group"]
    with pytest.raises(ValueError, match=r"cluster group\(s\) in more than one split: '" + bad2.loc[i_train, "group"]):
        pairing.assert_no_leak(bad2)


def test_split_without_positive_records_is_a_clear_error(images):
    u = uci_frame(n=200, n_pos=2)  # 2 positives cannot cover three splits
    with pytest.raises(ValueError, match=r"split '(val|test|train)' has \d+ abnormal image\(s\) but no UCI record with Biopsy=1"):
        pairing.pair_label_conditioned(images, u, seed=0)


def test_bad_inputs_are_named(images, uci):
    with pytest.raises(ValueError, match="no column"):
        pairing.pair_label_conditioned(images.drop(columns=["group"]), uci)
    with pytest.raises(ValueError, match="target column 'Biopsy'"):
        pairing.pair_label_conditioned(images, uci.drop(columns=["Biopsy"]))
    with pytest.raises(ValueError, match="parameter 'seed'"):
        pairing.pair_label_conditioned(images, uci, seed=-1)
    with pytest.raises(ValueError, match="aligned"):
        pairing.pair_label_conditioned(images, uci, uci_split=pd.Series(["train"] * 3))


def test_pairing_table_counts(images, uci):
    usplit = pairing.split_uci(uci, seed=42)
    c = pairing.pair_label_conditioned(images, uci, seed=42, uci_split=usplit)
    t = pairing.pairing_table(c, usplit, uci)
    assert list(t.index) == [*SPLITS, "total"]
    assert t.loc["total", "images"] == len(images)
    assert t.loc["total", "records_available"] == len(uci)
    assert t.loc["total", "positive_records_available"] == 40
    assert (t["label_agreement"] == 1.0).all()
    assert t.loc["total", "groups"] == images["group"].nunique()
    sh = pairing.pair_shuffled(images, uci, seed=42, uci_split=usplit)
    assert pairing.pairing_table(sh).loc["total", "label_agreement"] < 0.8


def test_real_uci_pairing(shared_data):
    from lib.data import uci as uci_mod

    data = uci_mod.load_uci(shared_data / "uci" / "risk_factors_cervical_cancer.csv")
    images = image_table(n_groups_per_class=30)
    usplit = pairing.split_uci(data, seed=42)
    assert data.frame.groupby(usplit)["Biopsy"].sum().min() >= 7  # 54 positives after dedup, 15% each
    c = pairing.pair_label_conditioned(images, data, seed=42, uci_split=usplit)
    pairing.assert_no_leak(c)
    assert (c["record_target"] == c["abnormal"]).all()
    t = pairing.pairing_table(c, usplit, data)
    assert t.loc["total", "positive_records_available"] == int(data.frame["Biopsy"].sum())
