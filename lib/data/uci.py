"""UCI "Cervical cancer (Risk Factors)" loader and the kit's explicit cleaning rules.

The table (UCI dataset 383, 858 rows x 36 columns) is read as it was published and
cleaned by these rules, in this order.  Every rule is counted and reported by
:class:`UciData`; nothing is dropped silently, and the raw file is never written to.

0. **Text.**  The file is UTF-8 (the original is plain ASCII).  Any other byte raises
   ``ValueError`` naming the file, the byte and its offset: a Latin-1 byte means an edited copy.
1. **Missing values.**  The original writes a missing answer as ``?``; it becomes NaN.
2. **Header.**  Exactly the 36 columns of :data:`EXPECTED_COLUMNS`, separated by ``,`` and
   matched by exact name (the original spells ``Citology``; a copy that renamed it
   ``Cytology`` is not the same table).  A missing or unexpected column raises ``ValueError``
   naming the columns and the file.  Column order is not checked.
3. **Values.**  Every cell is a number or ``?``.  Anything else (text, an empty cell,
   ``nan``, ``inf``) raises ``ValueError`` naming the file, column, row and value.
   **Ranges** (:data:`COLUMN_RULES`): ages are whole numbers in 10..100, counts whole numbers
   >= 0, years in 0..100, packs/year >= 0, yes/no columns 0 or 1.  A value outside raises
   ``ValueError`` naming the file, column, row, value and rule.  Why so strict: a wrong value
   here is not noise, it is a silently different table.
   **Known edited copies** (:func:`_check_variants` and the header check) are named as such, with
   what to do: missing written as ``-1``, as blank cells or as ``nan``/``NA`` instead of ``?``;
   ``;`` or tab separators (a spreadsheet export); ``Cytology`` for ``Citology``.  A ``-1``
   cannot be told from an answer, and left in it turns counts negative and keeps constant
   columns (rule 7) alive.
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

import difflib
import hashlib
import io
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

#: where to get a clean copy (said by every "edited copy" error)
_FIX = "use the UCI original (`make data` downloads it)"

# ranges: every column has exactly one rule (a test checks the partition)
AGE_COLUMNS = ("Age", "First sexual intercourse")
COUNT_COLUMNS = ("Number of sexual partners", "Num of pregnancies", "STDs (number)", "STDs: Number of diagnosis")
YEAR_COLUMNS = ("Smokes (years)", "Hormonal Contraceptives (years)", "IUD (years)", *TIME_SINCE_COLUMNS)
DOSE_COLUMNS = ("Smokes (packs/year)",)
BINARY_COLUMNS = (
    "Smokes", "Hormonal Contraceptives", "IUD", "STDs",
    "STDs:condylomatosis", "STDs:cervical condylomatosis", "STDs:vaginal condylomatosis",
    "STDs:vulvo-perineal condylomatosis", "STDs:syphilis", "STDs:pelvic inflammatory disease",
    "STDs:genital herpes", "STDs:molluscum contagiosum", "STDs:AIDS", "STDs:HIV", "STDs:Hepatitis B", "STDs:HPV",
    "Dx:Cancer", "Dx:CIN", "Dx:HPV", "Dx", *TARGETS,
)
AGE_RANGE = (10.0, 100.0)   # the survey's women were 13..84; first intercourse 10..32
YEARS_MAX = 100.0


@dataclass(frozen=True)
class ColumnRule:
    """The allowed values of one column: ``lo <= x <= hi`` (``hi`` None: no upper bound), whole numbers if asked."""

    kind: str
    lo: float
    hi: float | None = None
    whole: bool = False

    def ok(self, x: pd.Series) -> pd.Series:
        """True where ``x`` is allowed or missing (missing is judged elsewhere)."""
        good = x >= self.lo
        if self.hi is not None:
            good &= x <= self.hi
        if self.whole:
            good &= x == np.floor(x)
        return good | x.isna()

    def describe(self) -> str:
        if self.kind == "binary":
            return "0 (no) or 1 (yes)"
        span = f"{self.lo:g}..{self.hi:g}" if self.hi is not None else f">= {self.lo:g}"
        return f"{'a whole number ' if self.whole else ''}{span} ({self.kind})"


COLUMN_RULES: dict[str, ColumnRule] = {
    **{c: ColumnRule("an age in years", *AGE_RANGE, whole=True) for c in AGE_COLUMNS},
    **{c: ColumnRule("a count", 0.0, whole=True) for c in COUNT_COLUMNS},
    **{c: ColumnRule("a duration in years", 0.0, YEARS_MAX) for c in YEAR_COLUMNS},
    **{c: ColumnRule("pack-years", 0.0) for c in DOSE_COLUMNS},
    **{c: ColumnRule("binary", 0.0, 1.0, whole=True) for c in BINARY_COLUMNS},
}

#: spellings of "missing" that edited copies use instead of '?' (compared stripped, lower case)
MISSING_VARIANTS = {"": "blank cells", "nan": "'nan'", "na": "'NA'", "n/a": "'N/A'", "null": "'null'",
                    "none": "'None'"}


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


def _read_text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is named with its offset (pandas reports a chunk-relative one)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise ValueError(
            f"{path}: byte 0x{data[at]:02x} at byte offset {at} (line {line}, column {column}) is not UTF-8 "
            f"({e.reason}). The UCI original is plain ASCII, so this is an edited copy saved in another encoding "
            f"(Latin-1 or Windows-1252?); {_FIX}, or save this copy as UTF-8"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text  # a spreadsheet's byte-order mark


def _read_raw(path: Path) -> pd.DataFrame:
    """Every cell as the exact string in the file (no NA guessing)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; expected the UCI risk-factors CSV with a header of 36 columns")
    text = _read_text(path)
    header = text.lstrip().split("\n", 1)[0]
    for sep, name in ((";", "';'"), ("\t", "tab")):
        if "," not in header and header.count(sep) >= len(EXPECTED_COLUMNS) // 2:
            raise ValueError(
                f"{path}: the header is separated by {name}, not ',': an edited copy (a spreadsheet export, "
                f"perhaps with decimal commas); {_FIX}, or export it again as comma-separated with '.' decimals"
            )
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
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
        hints = []
        for c in unexpected:
            if c == "Cytology" and "Citology" in missing:
                hints.append("'Cytology' is an edited copy's spelling: the UCI original spells the column 'Citology'; "
                             f"{_FIX}, or rename the column back to 'Citology'")
                continue
            near = difflib.get_close_matches(c, missing, n=1, cutoff=0.85)
            if near:
                hints.append(f"{c!r} looks like {near[0]!r} edited; rename it back or {_FIX}")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(
            f"{path}: header does not match the UCI risk-factors table: {'; '.join(parts)}{hint}. "
            f"Expected exactly these {len(EXPECTED_COLUMNS)} columns: {list(EXPECTED_COLUMNS)}"
        )
    if len(raw) == 0:
        raise ValueError(f"{path}: header only, no data rows")


def _where(mask: pd.Series) -> str:
    i = int(np.flatnonzero(mask.to_numpy())[0])
    return f"data row {i + 1} (line {i + 2} of the file)"


def _per_column(mask: pd.DataFrame) -> dict[str, int]:
    counts = mask.sum()
    return {c: int(n) for c, n in counts.items() if n}


def _check_variants(raw: pd.DataFrame, path: Path) -> None:
    """Name the known edited copies' spellings of "missing" before any cell-by-cell error hides them."""
    features = [c for c in EXPECTED_COLUMNS if c not in TARGETS]
    cells = raw[features].apply(lambda s: s.str.strip().str.lower())
    for token, name in MISSING_VARIANTS.items():
        hit = cells == token
        if hit.to_numpy().any():
            cols = _per_column(hit)
            first = next(iter(cols))
            raise ValueError(
                f"{path}: missing answers written as {name} instead of '{MISSING_TOKEN}' (an edited copy, e.g. "
                f"re-saved by a spreadsheet or pandas): {sum(cols.values())} cell(s) in column(s) {cols}, first "
                f"column {first!r}, {_where(hit[first])}; {_FIX}, or write '{MISSING_TOKEN}' in those cells"
            )
    minus1 = cells == "-1"
    minus1 |= cells.apply(lambda s: pd.to_numeric(s, errors="coerce")) == -1  # '-1.0' too
    if minus1.to_numpy().any():
        cols = _per_column(minus1)
        first = next(iter(cols))
        raise ValueError(
            f"{path}: missing answers written as -1 instead of '{MISSING_TOKEN}' (an edited copy; no value in these "
            f"columns can be negative, and a -1 cannot be told from an answer): {sum(cols.values())} cell(s) in "
            f"column(s) {cols}, first column {first!r}, {_where(minus1[first])}; {_FIX}, or write "
            f"'{MISSING_TOKEN}' in those cells"
        )


def _parse_values(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    _check_variants(raw, path)
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
            expected = ("0 or 1 (targets may not be missing)" if col in TARGETS
                        else f"a number or '{MISSING_TOKEN}' for missing")
            raise ValueError(
                f"{path}: column {col!r}, data row {i + 1} (line {i + 2} of the file) has {what}; "
                f"expected {expected} ({int(bad.sum())} such cell(s) in this column)"
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
    _check_ranges(frame, raw, path)
    return frame


def _check_ranges(frame: pd.DataFrame, raw: pd.DataFrame, path: Path) -> None:
    """Every value inside its column's rule (:data:`COLUMN_RULES`), or a ``ValueError`` naming the first one outside."""
    for col in EXPECTED_COLUMNS:
        rule = COLUMN_RULES[col]
        bad = ~rule.ok(frame[col].astype("float64"))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{path}: column {col!r}, data row {i + 1} (line {i + 2} of the file) has value "
                f"{raw[col].iloc[i].strip()!r}, out of range: expected {rule.describe()} "
                f"({int(bad.sum())} such cell(s) in this column)"
            )


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
