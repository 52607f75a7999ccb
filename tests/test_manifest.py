"""lib.data.manifest: the bundled SIPaKMeD file list and completeness reports."""
import re

import pandas as pd
import pytest

from lib.data import manifest as M


def test_json_expands_to_the_public_manifest_exactly(shared_data):
    csv = shared_data / "sipakmed" / "MANIFEST.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} is absent")
    ref = pd.read_csv(csv, dtype=str)
    ours = M.sipakmed_manifest()
    assert list(ours.columns) == ["class", "file_name", "kaggle_layout_relpath", "group"]
    pd.testing.assert_frame_equal(ours.drop(columns="group"), ref)


def test_manifest_counts_and_names():
    m = M.sipakmed_manifest()
    assert len(m) == 4049
    assert m["class"].value_counts().sort_index().tolist() == [813, 825, 793, 787, 831]
    assert m.groupby("class")["group"].nunique().tolist() == [223, 238, 271, 108, 126]
    assert m["group"].nunique() == 966
    assert not m.duplicated(["class", "file_name"]).any()
    assert m["file_name"].str.fullmatch(r"\d{3}_\d{2}\.bmp").all()
    row = m.iloc[0]
    assert (row["class"], row["file_name"], row["group"]) == ("Dyskeratotic", "001_01.bmp", "Dyskeratotic/001")
    assert row["kaggle_layout_relpath"] == "im_Dyskeratotic/im_Dyskeratotic/CROPPED/001_01.bmp"
    # group = class + the file's cluster number
    assert (m["group"] == m["class"] + "/" + m["file_name"].str[:3]).all()
    assert M.official_relpath("Parabasal", "005_01.bmp") == "im_Parabasal/CROPPED/005_01.bmp"


def test_cells_in_a_cluster_are_numbered_consecutively():
    m = M.sipakmed_manifest()
    mm = m["file_name"].str[4:6].astype(int)
    for _, s in mm.groupby(m["group"]):
        assert sorted(s) == list(range(1, len(s) + 1))


def test_class_constants_partition_the_classes():
    assert M.CLASSES == tuple(sorted(M.CLASSES))
    assert M.ABNORMAL == ("Dyskeratotic", "Koilocytotic")
    assert M.BENIGN == ("Metaplastic",)
    assert M.NORMAL == ("Parabasal", "Superficial-Intermediate")
    assert sorted(M.ABNORMAL + M.BENIGN + M.NORMAL) == list(M.CLASSES)
    assert M.CATEGORY["Koilocytotic"] == "abnormal" and M.CATEGORY["Parabasal"] == "normal"


def test_completeness_of_the_full_list():
    rep = M.completeness(M.sipakmed_manifest())
    assert rep.complete and rep.exact
    assert rep.missing == [] and rep.extra == []
    assert rep.per_class.loc["total"].tolist() == [4049, 4049, 0, 0]
    assert str(rep).splitlines()[0] == "SIPaKMeD completeness: COMPLETE - all 4049 expected files found"


def test_completeness_counts_missing_and_extra_from_an_image_table():
    m = M.sipakmed_manifest()
    found = m[~m["file_name"].isin(["001_01.bmp"]) | (m["class"] != "Parabasal")]
    found = found[~((found["class"] == "Metaplastic") & found["file_name"].isin(["002_01.bmp", "002_02.bmp"]))]
    table = pd.DataFrame({"label": found["class"], "path": "/data/x/" + found["file_name"]})
    extra = pd.DataFrame({"label": ["Parabasal", "Unknown"], "path": ["/d/999_01.bmp", "/d/a.bmp"]})
    rep = M.completeness(pd.concat([table, extra, table.head(3)]))  # duplicates are counted once
    assert not rep.complete and not rep.exact
    assert rep.missing == ["Metaplastic/002_01.bmp", "Metaplastic/002_02.bmp", "Parabasal/001_01.bmp"]
    assert rep.extra == ["Parabasal/999_01.bmp", "Unknown/a.bmp"]
    pc = rep.per_class
    assert pc.loc["Metaplastic"].tolist() == [793, 791, 2, 0]
    assert pc.loc["Parabasal"].tolist() == [787, 787, 1, 1]
    assert pc.loc["Unknown"].tolist() == [0, 1, 0, 1]
    assert pc.loc["total"].tolist() == [4049, 4048, 3, 2]
    text = str(rep)
    assert text.splitlines()[0] == ("SIPaKMeD completeness: INCOMPLETE - 3 of 4049 expected files missing, "
                                    "2 not in the manifest")
    assert "missing (3): Metaplastic/002_01.bmp, Metaplastic/002_02.bmp, Parabasal/001_01.bmp" in text
    assert "extra (2): Parabasal/999_01.bmp, Unknown/a.bmp" in text


def test_completeness_complete_with_extras_and_long_lists_are_shortened():
    m = M.sipakmed_manifest()
    extra = pd.DataFrame({"class": ["Parabasal"] * 12, "file_name": [f"9{i:02d}_01.bmp" for i in range(12)]})
    rep = M.completeness(pd.concat([m[["class", "file_name"]], extra]))
    assert rep.complete and not rep.exact
    assert "plus 12 not in the manifest" in str(rep)
    assert "(+2 more)" in str(rep)


def test_completeness_against_a_custom_manifest():
    man = pd.DataFrame({"class": ["A", "A", "B"], "file_name": ["1_01.png", "1_02.png", "2_01.png"]})
    rep = M.completeness(pd.DataFrame({"class": ["A", "B"], "file_name": ["1_01.png", "2_01.png"]}), manifest=man)
    assert rep.missing == ["A/1_02.png"]
    assert rep.per_class.loc["A"].tolist() == [2, 1, 1, 0]


def test_completeness_of_a_folder_and_of_a_dataset(tmp_path, sipakmed_tree):
    from lib.data.image_data import load_sipakmed

    root = sipakmed_tree(tmp_path / "sip")
    rep = M.completeness(load_sipakmed(root, on_bad="skip"))
    # Koilocytotic cluster 003 has one cell in SIPaKMeD, so the tree's 003_02 is extra
    assert rep.per_class.loc["total"].tolist() == [4049, 13, 4037, 1]
    assert rep.extra == ["Koilocytotic/003_02.bmp"]
    assert "Dyskeratotic/001_01.bmp" not in rep.missing and "Dyskeratotic/001_03.bmp" in rep.missing
    assert M.completeness(load_sipakmed(root)).missing == rep.missing
    with pytest.raises(ValueError, match="load_sipakmed"):  # a folder is the loader's job
        M.completeness(root)


@pytest.mark.parametrize("bad, match", [
    (pd.DataFrame({"x": [1]}), "'class' or 'label'"),
    (pd.DataFrame({"class": ["A"]}), "'file_name' or 'path'"),
    ([1, 2], "expected a DataFrame"),
])
def test_completeness_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        M.completeness(bad)
