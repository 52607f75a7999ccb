"""UCI "Cervical cancer (Risk Factors)" loader and the kit's explicit cleaning rules.

The table (UCI dataset 383, 858 rows x 36 columns) is read as it was published and
cleaned by these rules, in this order.  Every rule is counted and reported by
:class:`UciData`; nothing is dropped silently, and the raw file is never written to.

1. **Missing values.**  The original writes a missing answer as ``?``; it becomes NaN.
2. **Header.**  Exactly the 36 columns of :data:`EXPECTED_COLUMNS`, matched by exact
   name (the original spells ``Citology``; a copy that renamed it ``Cytology`` is not
   the same table).  A missing or unexpected column raises ``ValueError`` naming the
   columns and the file.  Column order is not checked.
3. **Values.**  Every cell is a number or ``?``.  Anything else (text, an empty cell,
   ``nan``, ``inf``) raises ``ValueError`` naming the file, column, row and value.
4. **Dtypes.**  Features are ``float64``; the four targets (:data:`TARGETS`) are
   ``int64`` and must be 0 or 1 (a ``?`` or a 2 in a target raises ``ValueError``).
5. **Duplicates.**  Exact duplicate rows (23 in the original) are dropped, keeping
   the first, and counted in :attr:`UciData.duplicates_removed`.
6. **Time since diagnosis.**  ``STDs: Time since first diagnosis`` and ``STDs: Time
   since last diagnosis`` are dropped.  They are 91.7% missing, and their missingness
   only encodes "no STD diagnosed", which ``STDs: Number of diagnosis`` already says.
7. **Constant columns.**  Feature columns with at most one distinct non-missing value
   are dropped; identified from the data (in the original: ``STDs:cervical
   condylomatosis`` and ``STDs:AIDS``, all zero).

Leakage: ``Hinselmann``, ``Schiller`` and ``Citology`` (:data:`LEAKY_COLUMNS`) are not
risk factors but the results of screening tests done at the same visit as the
biopsy; they nearly *are* the ``Biopsy`` label (see :func:`leakage_table`).
:func:`feature_columns` leaves them out unless asked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib import config

TARGET = "Biopsy"
TARGETS = ("Hinselmann", "Schiller", "Citology", "Biopsy")
LEAKY_COLUMNS = ("Hinselmann", "Schiller", "Citology")
TIME_SINCE_COLUMNS = ("STDs: Time since first diagnosis", "STDs: Time since last diagnosis")
MISSING_TOKEN = "?"

#: sha256 of the file as published by UCI (dataset 383)
UCI_SHA256 = "8df193ad5c9ff4288fb4c401eef70dcd2cbda404ce7f82ac74c68cfc960ab063"

EXPECTED_COLUMNS = (
    "Age", "Number of sexual partners", "First sexual intercourse", "Num of pregnancies",
    "Smokes", "Smokes (years)", "Smokes (packs/year)",
    "Hormonal Contraceptives", "Hormonal Contraceptives (years)", "IUD", "IUD (years)",
    "STDs", "STDs (number)", "STDs:condylomatosis", "STDs:cervical condylomatosis",
    "STDs:vaginal condylomatosis", "STDs:vulvo-perineal condylomatosis", "STDs:syphilis",
    "STDs:pelvic inflammatory disease", "STDs:genital herpes", "STDs:molluscum contagiosum",
    "STDs:AIDS", "STDs:HIV", "STDs:Hepatitis B", "STDs:HPV", "STDs: Number of diagnosis",
    "STDs: Time since first diagnosis", "STDs: Time since last diagnosis",
    "Dx:Cancer", "Dx:CIN", "Dx:HPV", "Dx",
    "Hinselmann", "Schiller", "Citology", "Biopsy",
)


@dataclass
class UciData:
    """The cleaned table plus an account of every cleaning step."""

    frame: pd.DataFrame                       # cleaned: float features, int 0/1 targets
    path: Path
    raw_shape: tuple[int, int]
    dropped_columns: dict[str, str]           # column -> reason
    duplicates_removed: int
    missing_cells: int                        # '?' cells in the raw file
    raw_positives: dict[str, int] = field(default_factory=dict)  # per target, before dedup
    sha256: str = ""
    raw: pd.DataFrame | None = field(default=None, repr=False)  # validated, before dedup/drops: for missingness maps

    @property
    def positives(self) -> dict[str, int]:
        """Positives per target in the cleaned (deduplicated) table."""
        return {t: int(self.frame[t].sum()) for t in TARGETS}

    @property
    def matches_uci_original(self) -> bool:
        return self.sha256 == UCI_SHA256

    def summary(self) -> dict:
        n = len(self.frame)
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "matches_uci_original": self.matches_uci_original,
            "raw_rows": self.raw_shape[0],
            "raw_columns": self.raw_shape[1],
            "missing_cells_raw": self.missing_cells,
            "raw_positives": dict(self.raw_positives),
            "duplicates_removed": self.duplicates_removed,
            "dropped_columns": dict(self.dropped_columns),
            "rows": n,
            "columns": self.frame.shape[1],
            "missing_cells": int(self.frame.isna().sum().sum()),
            "positives": self.positives,
            "biopsy_prevalence": self.positives[TARGET] / n if n else float("nan"),
        }

    def summary_text(self) -> str:
        s = self.summary()
        lines = [
            f"UCI cervical cancer risk factors: {self.path.name}",
            f"  sha256 {s['sha256'][:12]}... "
            + ("(byte-identical to the UCI original)" if s["matches_uci_original"] else "(differs from the UCI original)"),
            f"  raw: {s['raw_rows']} rows x {s['raw_columns']} columns, {s['missing_cells_raw']} missing cells ('?')",
            "  raw positives: " + ", ".join(f"{t} {v}" for t, v in s["raw_positives"].items()),
            f"  exact duplicate rows removed: {s['duplicates_removed']}",
            "  dropped columns:",
        ]
        lines += [f"    - {c}: {r}" for c, r in s["dropped_columns"].items()] or ["    (none)"]
        lines += [
            f"  clean: {s['rows']} rows x {s['columns']} columns, {s['missing_cells']} missing cells",
            "  positives after dedup: " + ", ".join(f"{t} {v}" for t, v in s["positives"].items())
            + f"  (Biopsy prevalence {s['biopsy_prevalence']:.1%})",
        ]
        return "\n".join(lines)

    __str__ = summary_text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_raw(path: Path) -> pd.DataFrame:
    """Every cell as the exact string in the file (no NA guessing)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; expected the UCI risk-factors CSV with a header of 36 columns")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty; expected the UCI risk-factors CSV with a header of 36 columns") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: not a well-formed CSV ({e})") from None
    return raw


def _check_header(raw: pd.DataFrame, path: Path) -> None:
    got = list(raw.columns)
    missing = [c for c in EXPECTED_COLUMNS if c not in got]
    unexpected = [c for c in got if c not in EXPECTED_COLUMNS]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if unexpected:
            parts.append(f"unexpected columns {unexpected}")
        hint = ""
        if "Cytology" in unexpected and "Citology" in missing:
            hint = " (the UCI original spells the column 'Citology'; this copy renamed it)"
        raise ValueError(
            f"{path}: header does not match the UCI risk-factors table: {'; '.join(parts)}{hint}. "
            f"Expected exactly these {len(EXPECTED_COLUMNS)} columns: {list(EXPECTED_COLUMNS)}"
        )
    if len(raw) == 0:
        raise ValueError(f"{path}: header only, no data rows")


def _parse_values(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    out = {}
    for col in EXPECTED_COLUMNS:
        s = raw[col].str.strip()
        is_missing = s == MISSING_TOKEN
        num = pd.to_numeric(s.where(~is_missing), errors="coerce")
        num = num.astype("float64")
        bad = ~is_missing & ~np.isfinite(num)  # unparsable (NaN after coercion), 'nan', 'inf'
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            value = raw[col].iloc[i]
            what = "an empty cell" if value.strip() == "" else f"value {value!r}"
            raise ValueError(
                f"{path}: column {col!r}, data row {i + 1} (line {i + 2} of the file) has {what}; "
                f"expected a number or '{MISSING_TOKEN}' for missing ({int(bad.sum())} such cell(s) in this column)"
            )
        out[col] = num.astype("float64")
    frame = pd.DataFrame(out, index=raw.index)
    for t in TARGETS:
        v = frame[t]
        bad = ~v.isin([0.0, 1.0])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{path}: target column {t!r}, data row {i + 1} (line {i + 2} of the file) has value "
                f"{raw[t].iloc[i]!r}; expected 0 or 1 (targets may not be missing)"
            )
        frame[t] = v.astype("int64")
    return frame


def load_uci(path=None) -> UciData:
    """Load and clean the UCI risk-factors CSV by the rules in the module docstring.

    ``path``: the CSV; default :func:`lib.config.uci_csv_path` (``$CERVICAL_KIT_DATA`` or ``data/``).
    Raises ``FileNotFoundError`` when it is absent, ``ValueError`` when it is not the expected table.
    """
    path = Path(path) if path is not None else config.uci_csv_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"UCI risk-factors CSV not found at {path}. Run `make data`, or set "
            f"{config.ENV_DATA} (or pass data_dir) to a folder holding uci/risk_factors_cervical_cancer.csv"
        )
    raw = _read_raw(path)
    _check_header(raw, path)
    frame = _parse_values(raw, path)[list(EXPECTED_COLUMNS)]
    parsed = frame.copy()
    raw_shape = frame.shape
    missing_cells = int(frame.isna().sum().sum())
    raw_positives = {t: int(frame[t].sum()) for t in TARGETS}

    raw_missing_share = frame.isna().mean()
    dup = frame.duplicated(keep="first")
    frame = frame.loc[~dup].reset_index(drop=True)

    dropped: dict[str, str] = {}
    for col in TIME_SINCE_COLUMNS:
        dropped[col] = (f"{raw_missing_share[col]:.1%} missing in the raw file; its missingness only encodes "
                        "'no STD diagnosis', which 'STDs: Number of diagnosis' already carries")
    for col in frame.columns:
        if col in TARGETS or col in dropped:
            continue
        values = frame[col].dropna().unique()
        if len(values) <= 1:
            shown = "all missing" if len(values) == 0 else f"always {values[0]:g}"
            dropped[col] = f"constant ({shown} after removing duplicates): carries no information"
    frame = frame.drop(columns=list(dropped))
    return UciData(frame=frame, path=path, raw_shape=raw_shape, dropped_columns=dropped,
                   duplicates_removed=int(dup.sum()), missing_cells=missing_cells,
                   raw_positives=raw_positives, sha256=_sha256(path), raw=parsed)


def feature_columns(data, include_leaky: bool = False, target: str = TARGET) -> list[str]:
    """Model inputs: every cleaned column except the target and (by default) the leaky screening results."""
    frame = data.frame if isinstance(data, UciData) else data
    drop = {target} | (set() if include_leaky else set(LEAKY_COLUMNS))
    # the other targets are screening results: only ever inputs as the labelled leaky demonstration
    drop |= set(TARGETS) - set(LEAKY_COLUMNS) - {target}
    return [c for c in frame.columns if c not in drop]


def leakage_table(data, target: str = TARGET) -> pd.DataFrame:
    """Each screening result (Hinselmann, Schiller, Citology) read as a test for ``target``.

    Columns: tp, fp, fn, tn, sensitivity, specificity, ppv, npv, auc.  For a single 0/1
    column the ROC curve has one corner, so AUC = (sensitivity + specificity) / 2.
    """
    frame = data.frame if isinstance(data, UciData) else data
    y = frame[target].to_numpy().astype(bool)
    rows = []
    for col in LEAKY_COLUMNS:
        x = frame[col].to_numpy().astype(bool)
        tp, fp = int((x & y).sum()), int((x & ~y).sum())
        fn, tn = int((~x & y).sum()), int((~x & ~y).sum())
        sens = tp / (tp + fn) if tp + fn else float("nan")
        spec = tn / (tn + fp) if tn + fp else float("nan")
        rows.append(dict(column=col, tp=tp, fp=fp, fn=fn, tn=tn, sensitivity=sens, specificity=spec,
                         ppv=tp / (tp + fp) if tp + fp else float("nan"),
                         npv=tn / (tn + fn) if tn + fn else float("nan"),
                         auc=(sens + spec) / 2))
    return pd.DataFrame(rows).set_index("column")
