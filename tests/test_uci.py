"""lib.data.uci: the loader's cleaning rules, every bad-input case, and facts of the real file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lib.data import uci

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "uci" / "risk_factors_cervical_cancer.csv"
needs_real = pytest.mark.skipif(not REAL_CSV.is_file(),
                                reason=f"real UCI CSV not present at {REAL_CSV} (run `make data`)")


def _row(**values) -> dict:
    """One valid row as strings: every column '0' unless given."""
    row = {c: "0" for c in uci.EXPECTED_COLUMNS}
    row.update({"Age": "30", "Number of sexual partners": "2.0", "First sexual intercourse": "17.0",
                "STDs: Time since first diagnosis": "?", "STDs: Time since last diagnosis": "?"})
    row.update({k: str(v) for k, v in values.items()})
    return row


def _rows():
    return [
        _row(),
        _row(Age=41, **{"Num of pregnancies": "?", "Smokes": "1.0", "Biopsy": 1, "Schiller": 1}),
        _row(Age=25, **{"Number of sexual partners": "?", "Num of pregnancies": "2.0", "Hinselmann": 1,
                        "Citology": 1}),
        _row(Age=33, **{"STDs": "1.0", "STDs: Number of diagnosis": 1, "STDs: Time since first diagnosis": "3.0",
                        "STDs: Time since last diagnosis": "2.0"}),
        _row(),  # exact duplicate of the first row
        _row(Age=52, **{"IUD": "?", "IUD (years)": "?", "Biopsy": 1}),
    ]


def write_csv(path: Path, rows, columns=uci.EXPECTED_COLUMNS) -> Path:
    lines = [",".join(columns)] + [",".join(r.get(c, "0") for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_csv(tmp_path):
    return write_csv(tmp_path / "risk_factors_cervical_cancer.csv", _rows())


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- rules


def test_constants():
    assert len(uci.EXPECTED_COLUMNS) == 36 and len(set(uci.EXPECTED_COLUMNS)) == 36
    assert uci.TARGETS == ("Hinselmann", "Schiller", "Citology", "Biopsy")
    assert uci.LEAKY_COLUMNS == ("Hinselmann", "Schiller", "Citology")
    assert "Citology" in uci.EXPECTED_COLUMNS and "Cytology" not in uci.EXPECTED_COLUMNS


def test_small_file_cleaning_rules(small_csv):
    before = _sha(small_csv)
    d = uci.load_uci(small_csv)
    assert _sha(small_csv) == before, "the raw file must never be modified"
    assert d.raw_shape == (6, 36)
    # '?' -> NaN, counted on the raw table: 2 per row for the time-since columns except row 4,
    # plus pregnancies, partners and the two IUD cells
    assert d.missing_cells == 2 * 5 + 1 + 1 + 2
    assert d.duplicates_removed == 1 and len(d.frame) == 5
    assert d.raw_positives == {"Hinselmann": 1, "Schiller": 1, "Citology": 1, "Biopsy": 2}
    assert d.positives == {"Hinselmann": 1, "Schiller": 1, "Citology": 1, "Biopsy": 2}
    # dtypes: float features, int 0/1 targets
    for c in d.frame.columns:
        assert d.frame[c].dtype == ("int64" if c in uci.TARGETS else "float64"), c
    assert np.isnan(d.frame.loc[1, "Num of pregnancies"])
    # time-since columns dropped by rule, with a reason
    for c in uci.TIME_SINCE_COLUMNS:
        assert c in d.dropped_columns and c not in d.frame.columns
        assert "STDs: Number of diagnosis" in d.dropped_columns[c]
    # constant columns are found from the data (here e.g. STDs:AIDS is all zero)
    assert "STDs:AIDS" in d.dropped_columns and "constant" in d.dropped_columns["STDs:AIDS"]
    assert "Age" not in d.dropped_columns and "Smokes" in d.frame.columns
    # targets are never dropped, even when constant
    assert all(t in d.frame.columns for t in uci.TARGETS)
    assert not d.matches_uci_original


def test_summary_and_text(small_csv):
    d = uci.load_uci(small_csv)
    s = d.summary()
    for key in ("raw_rows", "missing_cells_raw", "raw_positives", "duplicates_removed", "dropped_columns",
                "rows", "positives", "biopsy_prevalence", "sha256"):
        assert key in s
    assert s["rows"] == 5 and s["duplicates_removed"] == 1
    text = d.summary_text()
    assert "6 rows" in text and "duplicate rows removed: 1" in text and "Biopsy 2" in text
    assert str(d) == text


def test_feature_columns_exclude_target_and_leaky(small_csv):
    d = uci.load_uci(small_csv)
    honest = uci.feature_columns(d)
    leaky = uci.feature_columns(d, include_leaky=True)
    assert "Biopsy" not in honest and "Biopsy" not in leaky
    assert not set(uci.LEAKY_COLUMNS) & set(honest)
    assert set(leaky) - set(honest) == set(uci.LEAKY_COLUMNS)
    assert uci.feature_columns(d.frame) == honest


def test_column_order_does_not_matter(tmp_path):
    cols = list(uci.EXPECTED_COLUMNS)[::-1]
    d = uci.load_uci(write_csv(tmp_path / "x.csv", _rows(), columns=cols))
    assert len(d.frame) == 5


def test_leakage_table_hand_counts(tmp_path):
    rows = [_row(Age=20 + i) for i in range(8)]
    # Schiller: 2 TP, 1 FP, 1 FN, 4 TN
    for i, (s, b) in enumerate([(1, 1), (1, 1), (1, 0), (0, 1)]):
        rows[i]["Schiller"], rows[i]["Biopsy"] = str(s), str(b)
    t = uci.leakage_table(uci.load_uci(write_csv(tmp_path / "x.csv", rows)))
    r = t.loc["Schiller"]
    assert (r.tp, r.fp, r.fn, r.tn) == (2, 1, 1, 4)
    assert r.sensitivity == pytest.approx(2 / 3) and r.specificity == pytest.approx(4 / 5)
    assert r.ppv == pytest.approx(2 / 3) and r.npv == pytest.approx(4 / 5)
    assert r.auc == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert list(t.index) == list(uci.LEAKY_COLUMNS)


# --------------------------------------------------------------------------- bad input


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        uci.load_uci(tmp_path / "nope.csv")


def test_missing_column(tmp_path):
    cols = [c for c in uci.EXPECTED_COLUMNS if c != "Dx:CIN"]
    path = write_csv(tmp_path / "short.csv", _rows(), columns=cols)
    with pytest.raises(ValueError, match="missing columns") as e:
        uci.load_uci(path)
    assert "Dx:CIN" in str(e.value) and "short.csv" in str(e.value)


def test_renamed_citology_is_rejected(tmp_path):
    cols = ["Cytology" if c == "Citology" else c for c in uci.EXPECTED_COLUMNS]
    rows = [{("Cytology" if k == "Citology" else k): v for k, v in r.items()} for r in _rows()]
    path = write_csv(tmp_path / "renamed.csv", rows, columns=cols)
    with pytest.raises(ValueError) as e:
        uci.load_uci(path)
    msg = str(e.value)
    assert "'Citology'" in msg and "'Cytology'" in msg and "renamed.csv" in msg
    assert "missing columns" in msg and "unexpected columns" in msg


def test_non_numeric_value_names_file_column_row_value(tmp_path):
    rows = _rows()
    rows[2]["Smokes (years)"] = "yes"
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError) as e:
        uci.load_uci(path)
    msg = str(e.value)
    assert "bad.csv" in msg and "'Smokes (years)'" in msg and "row 3" in msg and "'yes'" in msg


@pytest.mark.parametrize("value", ["", "nan", "inf", "1,5"])
def test_other_non_numeric_cells(tmp_path, value):
    rows = _rows()
    rows[0]["Age"] = value if value != "1,5" else '"1,5"'
    with pytest.raises(ValueError, match="'Age'"):
        uci.load_uci(write_csv(tmp_path / "bad.csv", rows))


@pytest.mark.parametrize("value", ["2", "0.5", "?", "-1"])
def test_target_not_0_1(tmp_path, value):
    rows = _rows()
    rows[3]["Biopsy"] = value
    with pytest.raises(ValueError) as e:
        uci.load_uci(write_csv(tmp_path / "t.csv", rows))
    msg = str(e.value)
    assert "'Biopsy'" in msg and "0 or 1" in msg and "row 4" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        uci.load_uci(path)


def test_whitespace_only_file(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        uci.load_uci(path)


def test_header_only(tmp_path):
    with pytest.raises(ValueError, match="no data rows"):
        uci.load_uci(write_csv(tmp_path / "h.csv", []))


# --------------------------------------------------------------------------- the real file


@needs_real
def test_real_file_facts():
    before = _sha(REAL_CSV)
    d = uci.load_uci(REAL_CSV)
    assert _sha(REAL_CSV) == before
    assert d.matches_uci_original
    assert d.raw_shape == (858, 36)
    assert d.missing_cells == 3622
    assert d.raw_positives == {"Hinselmann": 35, "Schiller": 74, "Citology": 44, "Biopsy": 55}
    assert d.duplicates_removed == 23
    assert len(d.frame) == 835
    assert d.positives == {"Hinselmann": 35, "Schiller": 73, "Citology": 43, "Biopsy": 54}
    assert set(d.dropped_columns) == {"STDs:cervical condylomatosis", "STDs:AIDS", *uci.TIME_SINCE_COLUMNS}
    assert "91.7%" in d.dropped_columns["STDs: Time since first diagnosis"]
    assert d.frame.shape[1] == 32
    assert len(uci.feature_columns(d)) == 28


@needs_real
def test_real_leakage_schiller():
    t = uci.leakage_table(uci.load_uci(REAL_CSV))
    assert t.loc["Schiller", "sensitivity"] == pytest.approx(0.87, abs=0.005)
    assert t.loc["Schiller", "specificity"] == pytest.approx(0.97, abs=0.005)
    assert (t["auc"] > 0.6).all()


# --------------------------------------------------------------------------- ranges and edited copies (issue 9)


def test_every_column_has_exactly_one_range_rule():
    groups = [uci.AGE_COLUMNS, uci.COUNT_COLUMNS, uci.YEAR_COLUMNS, uci.DOSE_COLUMNS, uci.BINARY_COLUMNS]
    flat = [c for g in groups for c in g]
    assert sorted(flat) == sorted(uci.EXPECTED_COLUMNS) and len(flat) == len(set(flat))
    assert set(uci.COLUMN_RULES) == set(uci.EXPECTED_COLUMNS)


@pytest.mark.parametrize("column, value, needle", [
    ("Num of pregnancies", "-3", "a whole number >= 0 (a count)"),
    ("Number of sexual partners", "1.5", "a whole number >= 0 (a count)"),
    ("Age", "150", "a whole number 10..100 (an age in years)"),
    ("First sexual intercourse", "4", "a whole number 10..100 (an age in years)"),
    ("IUD (years)", "300", "0..100 (a duration in years)"),
    ("Smokes (packs/year)", "-0.5", ">= 0 (pack-years)"),
    ("Smokes", "2", "0 (no) or 1 (yes)"),
    ("STDs:HIV", "0.5", "0 (no) or 1 (yes)"),
])
def test_out_of_range_value_names_file_column_row_rule(tmp_path, column, value, needle):
    rows = _rows()
    rows[2][column] = value
    with pytest.raises(ValueError) as e:
        uci.load_uci(write_csv(tmp_path / "ranges.csv", rows))
    msg = str(e.value)
    assert "ranges.csv" in msg and f"column {column!r}" in msg and "row 3" in msg and f"{value!r}" in msg
    assert "out of range" in msg and needle in msg


def test_blank_target_says_targets_may_not_be_missing(tmp_path):
    rows = _rows()
    rows[1]["Biopsy"] = ""
    with pytest.raises(ValueError) as e:
        uci.load_uci(write_csv(tmp_path / "t.csv", rows))
    msg = str(e.value)
    assert "'Biopsy'" in msg and "row 2" in msg and "expected 0 or 1 (targets may not be missing)" in msg


def _real_copy(tmp_path, name, edit) -> Path:
    """A copy of the real file, edited the way the known variants in the wild are."""
    p = tmp_path / name
    p.write_bytes(edit(REAL_CSV.read_bytes()))
    return p


@needs_real
@pytest.mark.parametrize("name, edit, needles", [
    ("minus1.csv", lambda b: b.replace(b",?", b",-1"),
     ["missing answers written as -1 instead of '?'", "3622 cell(s)", "'Num of pregnancies': 56",
      "first column 'Number of sexual partners', data row 38 (line 39 of the file)"]),
    ("blank.csv", lambda b: b.replace(b",?", b","),
     ["missing answers written as blank cells instead of '?'", "3622 cell(s)", "'IUD (years)': 117"]),
    ("nan.csv", lambda b: b.replace(b",?", b",NaN"),
     ["missing answers written as 'nan' instead of '?'", "'STDs: Time since first diagnosis': 787"]),
    ("semicolon.csv", lambda b: b.replace(b",", b";"), ["separated by ';', not ','"]),
    ("semicolon_decimal_comma.csv", lambda b: b.replace(b",", b";").replace(b".", b","),
     ["separated by ';', not ','", "decimal commas"]),
    ("tabs.csv", lambda b: b.replace(b",", b"\t"), ["separated by tab, not ','"]),
    ("cytology.csv", lambda b: b.replace(b"Citology", b"Cytology", 1),
     ["missing columns ['Citology']", "unexpected columns ['Cytology']", "edited copy",
      "rename the column back to 'Citology'"]),
    ("spaced.csv", lambda b: b.replace(b"Dx:CIN", b"Dx: CIN", 1),
     ["'Dx: CIN' looks like 'Dx:CIN' edited"]),
])
def test_known_edited_copies_are_named(tmp_path, name, edit, needles):
    path = _real_copy(tmp_path, name, edit)
    with pytest.raises(ValueError) as e:
        uci.load_uci(path)
    msg = str(e.value)
    assert name in msg and "make data" in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


@needs_real
def test_latin1_byte_names_file_and_byte_offset(tmp_path):
    raw = REAL_CSV.read_bytes()
    at = raw.index(b"\n", 5000) + 1  # the start of a data line; 'é' in Latin-1 is 0xe9
    path = _real_copy(tmp_path, "latin1.csv", lambda b: b[:at] + b"\xe9" + b[at:])
    line = raw.count(b"\n", 0, at) + 1
    with pytest.raises(ValueError) as e:
        uci.load_uci(path)
    msg = str(e.value)
    assert not isinstance(e.value, UnicodeDecodeError)
    assert "latin1.csv" in msg and f"byte 0xe9 at byte offset {at} (line {line}, column 1)" in msg
    assert "not UTF-8" in msg and "make data" in msg


@needs_real
def test_byte_order_mark_is_accepted_and_changes_nothing(tmp_path):
    path = _real_copy(tmp_path, "bom.csv", lambda b: b"\xef\xbb\xbf" + b)
    d, ref = uci.load_uci(path), uci.load_uci(REAL_CSV)
    assert not d.matches_uci_original
    assert d.frame.equals(ref.frame) and d.dropped_columns == ref.dropped_columns
