"""The pairing protocol: how cell images and UCI risk-factor records become "patients".

SIPaKMeD (cell images) and the UCI risk-factor table come from **different women**: no image
has a questionnaire and no questionnaire has an image.  A "hybrid" model needs pairs, so pairs
are *made up*, and how they are made decides what the fused model can learn.  The kit makes
them by an explicit, seeded protocol:

1. **Split first.**  The UCI rows are split into train/val/test, stratified by ``Biopsy`` and
   seeded (:func:`split_uci`); the images are split by whole cluster groups with
   :func:`lib.data.splits.grouped_split` (or keep the ``split`` column they already carry, e.g. the
   split the image branch was trained on).  The fractions are the same on both sides.
2. **Pair within each split only.**  Images of the train split get train records, and so on,
   so no tabular record and no cluster group is ever on both sides of a split
   (:func:`assert_no_leak` checks both).
3. **Label-conditioned pairing** (:func:`pair_label_conditioned`): each image gets a record
   whose ``Biopsy`` equals the image's ``abnormal`` flag.  Records are drawn in a seeded random
   order without replacement until that split's pool of records with the right label is used
   up, then the pool is reshuffled and drawn again: records are reused, as evenly as possible
   (use counts within a pool differ by at most one; :func:`reuse_table` reports them).  There
   are far more abnormal images than positive biopsies (55 in the whole UCI table), so each
   positive record stands in for many images.
4. **Shuffled control** (:func:`pair_shuffled`): the same records with the same use counts
   (the same marginal distribution), but permuted across the images of each split ignoring
   labels.  The tabular side then carries no information about the image label.

What it means.  Under label-conditioned pairing the tabular record's label *is* the image
label, by construction, so the tabular features become a second, independent view of that
label - something no real patient provides (a woman's questionnaire is not chosen to match
her cell).  Any gain of the fused model over the image-only model under this pairing is
therefore **manufactured by the pairing itself**: it measures how well the risk factors
predict ``Biopsy`` (honestly about AUC 0.65-0.69, DESIGN.md section 3), transplanted onto images.
The shuffled control keeps everything else identical and removes the manufactured link; a
gain that vanishes there was never evidence that images and risk factors complement each other.
Only data with both modalities from the same women can show that.

The cohort table (one row per image) has columns ``path``, ``group``, ``label`` (image class),
``abnormal`` (int 0/1: the target), ``image_index`` (row position in the image table),
``record_id`` (index label of the UCI row), ``record_target`` (that row's ``Biopsy``),
``split`` and ``pairing`` (``"label_conditioned"`` or ``"shuffled"``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lib.data.splits import SPLITS, grouped_split

TARGET = "Biopsy"
PAIRINGS = ("label_conditioned", "shuffled")
COHORT_COLUMNS = ["path", "group", "label", "abnormal", "image_index", "record_id", "record_target", "split",
                  "pairing"]
_IMAGE_COLUMNS = ("path", "group", "label", "abnormal")


# --------------------------------------------------------------------------- checks
def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"parameter 'seed': expected a non-negative integer, got {seed!r}")
    return int(seed)


def _check_uci(uci_frame, target: str) -> pd.DataFrame:
    frame = getattr(uci_frame, "frame", uci_frame)  # UciData or its DataFrame
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"parameter 'uci_frame': expected a pandas DataFrame (or UciData), got {type(frame).__name__}")
    if target not in frame.columns:
        raise ValueError(f"parameter 'uci_frame': no target column {target!r}; columns are {list(frame.columns)}")
    y = frame[target]
    if y.isna().any() or not y.isin([0, 1]).all():
        raise ValueError(f"UCI column {target!r}: expected 0/1 for every row")
    if not frame.index.is_unique:
        raise ValueError("parameter 'uci_frame': its index must be unique (the index is the record id)")
    return frame


def _check_images(image_table) -> pd.DataFrame:
    if not isinstance(image_table, pd.DataFrame):
        raise ValueError(f"parameter 'image_table': expected a pandas DataFrame, got {type(image_table).__name__}")
    absent = [c for c in _IMAGE_COLUMNS if c not in image_table.columns]
    if absent:
        raise ValueError(f"image table has no column(s) {absent}; expected the image-table contract "
                         f"(CONTRIBUTING.md): {list(_IMAGE_COLUMNS)}")
    if len(image_table) == 0:
        raise ValueError("parameter 'image_table': it has no rows")
    return image_table


# --------------------------------------------------------------------------- splitting
def split_uci(uci_frame, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 42,
              target: str = TARGET) -> pd.Series:
    """``split`` (train/val/test) for every UCI row, stratified by ``target``, seeded.

    Test is drawn first, then val from the rest (the same order and fractions as
    :func:`lib.data.splits.grouped_split`).  Returns a Series aligned with the frame's index.
    """
    from sklearn.model_selection import train_test_split

    frame = _check_uci(uci_frame, target)
    seed = _check_seed(seed)
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"parameters 'val_frac', 'test_frac': expected fractions summing to < 1, got {val_frac}, {test_frac}")
    y = frame[target].to_numpy().astype(int)
    idx = np.arange(len(frame))
    split = np.full(len(frame), "train", dtype=object)
    rest = idx
    if test_frac > 0:
        rest, test = train_test_split(idx, test_size=test_frac, stratify=y, random_state=seed)
        split[test] = "test"
    if val_frac > 0:
        _, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=y[rest], random_state=seed + 1)
        split[val] = "val"
    return pd.Series(split.astype(str), index=frame.index, name="split")


def _image_splits(image_table, val_frac, test_frac, seed) -> pd.DataFrame:
    """The image table with a ``split`` column: kept when present, else :func:`grouped_split`."""
    if "split" in image_table.columns:
        bad = sorted(set(image_table["split"].astype(str)) - set(SPLITS))
        if bad:
            raise ValueError(f"image table column 'split': expected values in {SPLITS}, found {bad}")
        return image_table
    return grouped_split(image_table, val_frac=val_frac, test_frac=test_frac, seed=seed)


# --------------------------------------------------------------------------- pairing
def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` ids from ``pool``: random order without replacement, reshuffled each time the pool runs out."""
    out = []
    while sum(len(o) for o in out) < n:
        out.append(rng.permutation(pool))
    return np.concatenate(out)[:n] if out else np.empty(0, dtype=pool.dtype)


def pair_label_conditioned(image_table, uci_frame, seed: int = 42, target: str = TARGET, uci_split=None,
                           val_frac: float = 0.15, test_frac: float = 0.15) -> pd.DataFrame:
    """Cohort table: each image paired with a record of the same split whose ``target`` equals its
    ``abnormal`` flag (protocol in the module docstring).

    ``image_table``: the image-table contract; its ``split`` column is used when present (e.g. the
    split the image branch was trained on), else :func:`lib.data.splits.grouped_split` makes one (seeded).
    ``uci_split``: a train/val/test Series aligned with the UCI frame; default :func:`split_uci`.
    Raises ``ValueError`` naming the split and label when a split has images of a label but no
    record with that label.
    """
    seed = _check_seed(seed)
    images = _image_splits(_check_images(image_table), val_frac, test_frac, seed)
    frame = _check_uci(uci_frame, target)
    rsplit = split_uci(frame, val_frac, test_frac, seed, target) if uci_split is None else pd.Series(uci_split)
    if not rsplit.index.equals(frame.index):
        raise ValueError("parameter 'uci_split': expected a Series aligned with the UCI frame's index")
    rng = np.random.default_rng([seed, 1])  # its own stream: changing the splits' seed use changes nothing here
    abnormal = images["abnormal"].astype(bool).to_numpy()
    isplit = images["split"].astype(str).to_numpy()
    record = np.empty(len(images), dtype=object)
    ry = frame[target].to_numpy().astype(int)
    rs = rsplit.astype(str).to_numpy()
    for s in SPLITS:
        for label in (0, 1):
            want = np.flatnonzero((isplit == s) & (abnormal == bool(label)))
            if len(want) == 0:
                continue
            pool = frame.index.to_numpy()[(rs == s) & (ry == label)]
            if len(pool) == 0:
                raise ValueError(f"pairing: split {s!r} has {len(want)} {'abnormal' if label else 'normal'} image(s) "
                                 f"but no UCI record with {target}={label} in that split")
            record[want] = _draw(pool, len(want), rng)
    return _cohort(images, frame, record, target, "label_conditioned")


def pair_shuffled(image_table, uci_frame, seed: int = 42, target: str = TARGET, uci_split=None,
                  val_frac: float = 0.15, test_frac: float = 0.15) -> pd.DataFrame:
    """The control: the label-conditioned cohort's records (same records, same use counts) permuted
    across the images of each split, ignoring labels; the tabular side no longer knows the label."""
    lc = pair_label_conditioned(image_table, uci_frame, seed, target, uci_split, val_frac, test_frac)
    frame = _check_uci(uci_frame, target)
    rng = np.random.default_rng([_check_seed(seed), 2])
    record = lc["record_id"].to_numpy(dtype=object).copy()
    for s in SPLITS:
        pos = np.flatnonzero(lc["split"].to_numpy() == s)
        record[pos] = record[rng.permutation(pos)]
    return _cohort(lc, frame, record, target, "shuffled")


def _cohort(images, frame, record, target, pairing) -> pd.DataFrame:
    out = pd.DataFrame({
        "path": images["path"].astype(str).to_numpy(),
        "group": images["group"].astype(str).to_numpy(),
        "label": images["label"].astype(str).to_numpy(),
        "abnormal": images["abnormal"].astype(bool).astype(int).to_numpy(),
        "image_index": (images["image_index"].to_numpy() if "image_index" in images.columns
                        else np.arange(len(images))),
        "record_id": list(record),
        "split": images["split"].astype(str).to_numpy(),
    })
    out["record_id"] = pd.array(out["record_id"].tolist(), dtype=frame.index.dtype)
    out["record_target"] = frame.loc[out["record_id"], target].to_numpy().astype(int)
    out["pairing"] = pairing
    out = out[COHORT_COLUMNS]
    assert_no_leak(out)
    return out


# --------------------------------------------------------------------------- checks and reports
def assert_no_leak(cohort: pd.DataFrame) -> None:
    """Raise ``ValueError`` naming every record id and every cluster group found in more than one split."""
    absent = [c for c in ("record_id", "group", "split") if c not in cohort.columns]
    if absent:
        raise ValueError(f"cohort has no column(s) {absent}; expected a table from pair_label_conditioned/pair_shuffled")
    problems = []
    for col, what in (("record_id", "tabular record(s)"), ("group", "cluster group(s)")):
        per = cohort.groupby(col, sort=True)["split"].unique()
        leaks = per[per.map(len) > 1]
        if len(leaks):
            shown = ", ".join(f"{k!r} in {sorted(v)}" for k, v in leaks.head(10).items())
            more = f" ... (+{len(leaks) - 10} more)" if len(leaks) > 10 else ""
            problems.append(f"{len(leaks)} {what} in more than one split: {shown}{more}")
    if problems:
        raise ValueError("pairing leak: " + "; ".join(problems))


def reuse_table(cohort: pd.DataFrame) -> pd.DataFrame:
    """Per split and image label: images, distinct records used, and how often a record is reused.

    Columns: split, abnormal, images, records_used, max_uses, mean_uses.
    """
    rows = []
    for (s, a), g in cohort.groupby(["split", "abnormal"], sort=False):
        uses = g["record_id"].value_counts()
        rows.append(dict(split=s, abnormal=int(a), images=len(g), records_used=int(len(uses)),
                         max_uses=int(uses.max()), mean_uses=round(float(uses.mean()), 2)))
    out = pd.DataFrame(rows)
    out["split"] = pd.Categorical(out["split"], SPLITS, ordered=True)
    return out.sort_values(["split", "abnormal"]).reset_index(drop=True).astype({"split": str})


def pairing_table(cohort: pd.DataFrame, uci_split=None, uci_frame=None, target: str = TARGET) -> pd.DataFrame:
    """The protocol as one small table (rows: train, val, test, total).

    Columns: images, abnormal images, cluster groups, records used (of them positive), and, when
    ``uci_split``/``uci_frame`` are given, records available (positive) in that split, plus the
    largest reuse of one record and the share of pairs whose record label equals the image label
    (1.0 under label-conditioned pairing, about the base rate under the shuffled control).
    """
    rows = {}
    for s in [*SPLITS, "total"]:
        g = cohort if s == "total" else cohort[cohort["split"] == s]
        recs = g.drop_duplicates("record_id")
        row = {
            "images": len(g),
            "abnormal_images": int(g["abnormal"].sum()),
            "groups": int(g["group"].nunique()),
            "records_used": len(recs),
            "positive_records_used": int(recs["record_target"].sum()),
            "max_uses_of_a_record": int(g["record_id"].value_counts().max()) if len(g) else 0,
            "label_agreement": round(float((g["abnormal"] == g["record_target"]).mean()), 3) if len(g) else float("nan"),
        }
        if uci_split is not None and uci_frame is not None:
            frame = getattr(uci_frame, "frame", uci_frame)
            m = np.ones(len(frame), bool) if s == "total" else (pd.Series(uci_split).astype(str).to_numpy() == s)
            row["records_available"] = int(m.sum())
            row["positive_records_available"] = int(frame[target].to_numpy()[m].sum())
        rows[s] = row
    out = pd.DataFrame(rows).T
    out = out.astype({c: "int64" for c in out.columns if c != "label_agreement"})
    out.index.name = "split"
    return out
