"""Cluster-grouped, stratified train/val/test splits and the leak check.

SIPaKMeD crops several cells from one cluster image; cells of one cluster share stain,
focus and background, so a cluster split across train and test lets a model score well
by recognising the picture instead of the cell.  Published random-split results
(95-99.7%) carry that leak; every split here keeps each ``group`` whole and keeps the
class mix of each split close to the whole table's.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

SPLITS = ("train", "val", "test")
_ATTEMPTS = 10  # seeded reshuffles tried when a fold misses a class (tiny tables only)


def _check_table(table, cols) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"parameter 'table': expected a pandas DataFrame, got {type(table).__name__}")
    absent = [c for c in cols if c not in table.columns]
    if absent:
        raise ValueError(f"table has no column(s) {absent}; columns are {list(table.columns)}")
    for c in cols:
        if table[c].isna().any():
            raise ValueError(f"column {c!r} has {int(table[c].isna().sum())} missing value(s); every row needs one")


def _check_frac(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value < 1:
        raise ValueError(f"parameter {name!r}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def _hold_out(labels: np.ndarray, groups: np.ndarray, frac: float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of about ``frac`` of the rows, whole groups, every class on both sides.

    StratifiedGroupKFold with ``round(1/frac)`` folds; the fold whose per-class fractions
    are closest to ``frac`` among folds holding every class.  If no fold holds every class
    (only with very few groups), reshuffle with derived seeds before giving up.
    """
    n_splits = max(2, int(round(1 / frac)))
    classes, y = np.unique(labels, return_inverse=True)
    class_n = np.bincount(y, minlength=len(classes))
    if class_n.min() < n_splits:  # tiny smoke tables: StratifiedGroupKFold needs n_splits rows per class
        smallest = classes[class_n.argmin()]
        n_splits = max(2, int(class_n.min()))
        warnings.warn(
            f"grouped_split: class {smallest!r} has only {class_n.min()} row(s) left for the {what} split; "
            f"holding out about 1/{n_splits} instead of {frac:.0%}", UserWarning, stacklevel=3,
        )
    for attempt in range(_ATTEMPTS):
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 7919 * attempt)
        best, best_score = None, None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            folds = [test for _, test in sgkf.split(np.zeros(len(y)), y, groups)]
        for test in folds:
            counts = np.bincount(y[test], minlength=len(classes))
            if (counts == 0).any() or (counts == class_n).any():  # every class on both sides
                continue
            score = float(np.abs(counts / class_n - frac).mean())
            if best_score is None or score < best_score - 1e-12:
                best, best_score = test, score
        if best is not None:
            mask = np.zeros(len(y), dtype=bool)
            mask[best] = True
            return mask
    raise ValueError(
        f"could not put every class into the {what} split ({frac:.0%} of the rows as whole groups); "
        "groups per class: " + ", ".join(f"{c}: {n}" for c, n in _groups_per_class(labels, groups).items())
        + f". Each class needs roughly {n_splits} groups or more: use more images per class or a larger fraction"
    )


def _groups_per_class(labels, groups) -> dict:
    return pd.DataFrame({"l": labels, "g": groups}).groupby("l", sort=True)["g"].nunique().to_dict()


def grouped_split(table: pd.DataFrame, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 42,
                  label_col: str = "label", group_col: str = "group") -> pd.DataFrame:
    """A copy of ``table`` with a ``split`` column in {train, val, test}.

    Stratified by ``label_col`` and grouped by ``group_col`` (scikit-learn's
    ``StratifiedGroupKFold``, shuffled with ``seed``): test is taken first, then val from
    the rest, so fractions are approximate (whole groups; ``round(1/frac)`` folds).  Same
    table + same seed = same split.  Every class appears in every split; a class with too
    few groups raises ``ValueError`` naming it.  ``val_frac=0`` gives train/test only.
    """
    _check_table(table, [label_col, group_col])
    val_frac, test_frac = _check_frac("val_frac", val_frac), _check_frac("test_frac", test_frac)
    if val_frac + test_frac >= 1:
        raise ValueError(f"parameters 'val_frac' + 'test_frac' must leave rows for training; got {val_frac} + {test_frac}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"parameter 'seed': expected a non-negative integer, got {seed!r}")
    if len(table) == 0:
        raise ValueError("parameter 'table': it has no rows")
    labels = table[label_col].astype(str).to_numpy()
    groups = table[group_col].astype(str).to_numpy()
    need = 1 + (val_frac > 0) + (test_frac > 0)
    per_class = _groups_per_class(labels, groups)
    short = {c: n for c, n in per_class.items() if n < need}
    if short:
        raise ValueError(
            f"too few groups to split: class(es) " + ", ".join(f"{c!r} has {n} group(s)" for c, n in short.items())
            + f"; each class needs at least {need} (one per split). Groups per class: {per_class}"
        )
    split = np.full(len(table), "train", dtype=object)
    if test_frac > 0:
        split[_hold_out(labels, groups, test_frac, seed, "test")] = "test"
    if val_frac > 0:
        rest = np.flatnonzero(split == "train")
        mask = _hold_out(labels[rest], groups[rest], val_frac / (1 - test_frac), seed + 1, "val")
        split[rest[mask]] = "val"
    out = table.copy()
    out["split"] = split.astype(str)
    assert_no_group_leak(out, group_col=group_col, split_col="split")
    return out


def assert_no_group_leak(table: pd.DataFrame, group_col: str = "group", split_col: str = "split") -> None:
    """Raise ``ValueError`` naming every group found in more than one split."""
    _check_table(table, [group_col, split_col])
    bad_values = sorted(set(table[split_col].astype(str)) - set(SPLITS))
    if bad_values:
        raise ValueError(f"column {split_col!r}: expected values in {SPLITS}, found {bad_values}")
    per_group = table.groupby(group_col, sort=True)[split_col].unique()
    leaks = per_group[per_group.map(len) > 1]
    if len(leaks):
        listing = ", ".join(f"{g!r} in {sorted(s)}" for g, s in leaks.head(10).items())
        more = f" ... (+{len(leaks) - 10} more)" if len(leaks) > 10 else ""
        raise ValueError(f"group leak: {len(leaks)} group(s) of {group_col!r} appear in more than one split: {listing}{more}")


def split_summary(table: pd.DataFrame, label_col: str = "label", split_col: str = "split",
                  groups: bool = False, group_col: str = "group") -> pd.DataFrame:
    """Counts per class x split (rows: classes + ``total``; columns: train, val, test, total).

    ``groups=True`` counts distinct groups instead of images.
    """
    cols = [label_col, split_col] + ([group_col] if groups else [])
    _check_table(table, cols)
    if groups:
        counts = table.groupby([label_col, split_col])[group_col].nunique().unstack(fill_value=0)
    else:
        counts = pd.crosstab(table[label_col], table[split_col])
    order = [s for s in SPLITS if s in counts.columns] + sorted(c for c in counts.columns if c not in SPLITS)
    counts = counts.reindex(columns=order, fill_value=0).astype(int)
    if groups:
        counts["total"] = table.groupby(label_col)[group_col].nunique().reindex(counts.index).astype(int)
        total_row = {s: table.loc[table[split_col] == s, group_col].nunique() for s in order}
        total_row["total"] = table[group_col].nunique()
    else:
        counts["total"] = counts.sum(axis=1)
        total_row = counts.sum(axis=0).to_dict()
    counts.loc["total"] = pd.Series(total_row)
    counts = counts.astype(int)
    counts.index.name = label_col
    counts.columns.name = None
    return counts


def stratified_sample(labels, n: int | None, seed: int = 42) -> np.ndarray:
    """Sorted indices of at most ``n`` items, each label's share kept (largest remainders), seeded.

    ``None`` or ``n >= len(labels)``: every index.  Every label present keeps at least one item when
    ``n`` allows, so per-class tables stay complete.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n is None or n >= total:
        return np.arange(total)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"parameter 'n': expected None or a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n / total
    take = np.maximum(np.floor(share).astype(int), 1 if n >= len(classes) else 0)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for i in order:
        if take.sum() >= n:
            break
        take[i] += 1
    while take.sum() > n:  # the minimum of one per class overshot: trim the largest
        take[np.argmax(take)] -= 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=min(k, cnt), replace=False)
              for c, k, cnt in zip(classes, take, counts)]
    return np.sort(np.concatenate(picked)).astype(int)


def stratified_rows(table: pd.DataFrame, n: int | None, seed: int = 42) -> pd.DataFrame:
    """At most ``n`` rows of ``table``, each ``label``'s share kept (:func:`stratified_sample`), in table order."""
    return table.iloc[stratified_sample(table["label"].to_numpy(), n, seed)]
