"""lib.data.image_data: image tables from real folders (tiny trees written with PIL here)."""
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest

from lib import config
from lib.data import image_data as D
from lib.data.manifest import CLASSES
from lib.run import load_image_dataset

from conftest import TINY_SIPAKMED, write_image

COLUMNS = ["path", "label", "label_idx", "group", "abnormal", "width", "height", "mode"]


def _truncate(path: Path, keep: int = 60) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


# --------------------------------------------------------------------------- SIPaKMeD layouts
@pytest.mark.parametrize("layout", ["kaggle", "official"])
def test_load_sipakmed_both_layouts(tmp_path, sipakmed_tree, snapshot, layout):
    root = sipakmed_tree(tmp_path / "sip", layout=layout)
    before = snapshot(root)
    ds = D.load_sipakmed(root)
    assert snapshot(root) == before  # nothing written into the data root
    t = ds.table
    assert list(t.columns) == COLUMNS
    assert ds.source == f"sipakmed-{layout}" and ds.layout == layout
    assert ds.classes == list(CLASSES) and ds.abnormal_classes == ["Dyskeratotic", "Koilocytotic"]
    assert ds.synthetic is False and ds.skipped == [] and ds.root == root.resolve()
    assert len(t) == 13  # cluster-level NNN.bmp and .dat files are not cells
    assert t["label"].value_counts().to_dict() == {"Dyskeratotic": 3, "Koilocytotic": 3, "Metaplastic": 3,
                                                   "Parabasal": 2, "Superficial-Intermediate": 2}
    assert t["group"].tolist() == [
        "Dyskeratotic/001", "Dyskeratotic/001", "Dyskeratotic/002", "Koilocytotic/001", "Koilocytotic/003",
        "Koilocytotic/003", "Metaplastic/001", "Metaplastic/001", "Metaplastic/001", "Parabasal/005",
        "Parabasal/006", "Superficial-Intermediate/001", "Superficial-Intermediate/010",
    ]
    assert t["label_idx"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert t["abnormal"].tolist() == [True] * 6 + [False] * 7
    assert (t["width"] == 12).all() and (t["height"] == 9).all() and (t["mode"] == "RGB").all()
    first = Path(t["path"].iloc[0])
    assert first.is_absolute() and first.name == "001_01.bmp"
    mid = "im_Dyskeratotic/im_Dyskeratotic/CROPPED" if layout == "kaggle" else "im_Dyskeratotic/CROPPED"
    assert first == (root / mid / "001_01.bmp").resolve()
    assert t["path"].map(lambda p: Path(p).parent.name).eq("CROPPED").all()
    assert t["label_idx"].dtype.kind == "i" and t["abnormal"].dtype == bool
    assert repr(ds) == ("ImageDataset(source='sipakmed-%s', images=13, classes=5, groups=9, synthetic=False, "
                        "skipped=0)" % layout)


def test_sipakmed_ignores_non_images_hidden_files_and_subfolders(tmp_path, sipakmed_tree):
    root = sipakmed_tree(tmp_path / "sip", layout="official")
    cropped = root / "im_Parabasal" / "CROPPED"
    (cropped / "notes.txt").write_text("x")
    (cropped / "._005_01.bmp").write_bytes(b"AppleDouble junk")  # macOS resource fork from a zip
    write_image(cropped / "nested" / "005_09.bmp")
    write_image(root / "im_Parabasal" / "other" / "007_01.bmp")
    ds = D.load_sipakmed(root)
    assert len(ds.table) == 13 and ds.skipped == []


def test_sipakmed_grayscale_rgba_and_sizes_recorded(tmp_path, sipakmed_tree):
    root = sipakmed_tree(tmp_path / "sip")
    cropped = root / "im_Metaplastic" / "im_Metaplastic" / "CROPPED"
    write_image(cropped / "001_02.bmp", size=(20, 31), mode="L")
    write_image(cropped / "001_03.png", size=(7, 5), mode="RGBA")
    t = D.load_sipakmed(root).table.set_index("path")
    assert tuple(t.loc[str(cropped / "001_02.bmp"), ["width", "height", "mode"]]) == (20, 31, "L")
    assert tuple(t.loc[str(cropped / "001_03.png"), ["width", "height", "mode"]]) == (7, 5, "RGBA")
    assert len(t) == 14  # 001_03.bmp and 001_03.png both count


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        D.load_sipakmed(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file, expected a folder"):
        D.load_sipakmed(f)


def test_unknown_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "im_Dyskeratotic.7z").write_bytes(b"7z")
    with pytest.raises(ValueError) as exc:
        D.load_sipakmed(tmp_path)
    msg = str(exc.value)
    assert msg.startswith(f"unknown layout in {tmp_path}")
    assert "root/im_<Class>/CROPPED/NNN_MM.bmp" in msg and "root/im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp" in msg
    assert "['images']" in msg and "['im_Dyskeratotic.7z']" in msg


def test_missing_class_mixed_and_double_layouts(tmp_path, sipakmed_tree):
    part = {k: v for k, v in TINY_SIPAKMED.items() if k != "Parabasal"}
    root = sipakmed_tree(tmp_path / "a", clusters=part)
    with pytest.raises(FileNotFoundError, match=r"no CROPPED folder for class\(es\) \['Parabasal'\]"):
        D.load_sipakmed(root)
    sipakmed_tree(root, layout="official", clusters={"Parabasal": {"001": 1}})
    with pytest.raises(ValueError, match="mixes layouts: .*Parabasal: official"):
        D.load_sipakmed(root)
    root = sipakmed_tree(tmp_path / "b")
    sipakmed_tree(root, layout="official", clusters={"Parabasal": {"001": 1}})
    with pytest.raises(ValueError, match=r"class\(es\) \['Parabasal'\] have both layouts"):
        D.load_sipakmed(root)


def test_empty_class_folder(tmp_path, sipakmed_tree):
    root = sipakmed_tree(tmp_path / "sip")
    cropped = root / "im_Koilocytotic" / "im_Koilocytotic" / "CROPPED"
    for p in cropped.iterdir():
        p.unlink()
    (cropped / "001_01.dat").write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"class folder {cropped} has no images")) as exc:
        D.load_sipakmed(root)
    assert "['001_01.dat']" in str(exc.value)


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_bad_image_raises_or_is_skipped_loudly(tmp_path, sipakmed_tree, kind):
    root = sipakmed_tree(tmp_path / "sip", size=(40, 30))
    bad = root / "im_Parabasal" / "im_Parabasal" / "CROPPED" / "005_01.bmp"
    if kind == "truncated":
        _truncate(bad)
    else:
        bad.write_text("this is not a bitmap\n")
    with pytest.raises(ValueError) as exc:
        D.load_sipakmed(root)
    msg = str(exc.value)
    assert msg.startswith("1 bad image file(s) in SIPaKMeD folder") and f"{bad}: not a readable image" in msg
    assert "on_bad='skip'" in msg
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        ds = D.load_sipakmed(root, on_bad="skip")
    assert len(ds.table) == 12 and str(bad) not in set(ds.table["path"])
    assert [f for f, _ in ds.skipped] == [str(bad)]
    assert ds.skipped[0][1].startswith("not a readable image")


def test_badly_named_cell_has_no_group(tmp_path, sipakmed_tree):
    root = sipakmed_tree(tmp_path / "sip")
    odd = write_image(root / "im_Parabasal" / "im_Parabasal" / "CROPPED" / "cell.bmp")
    with pytest.raises(ValueError, match=re.escape(f"{odd}: file name does not match NNN_MM")):
        D.load_sipakmed(root)
    with pytest.warns(UserWarning):
        ds = D.load_sipakmed(root, on_bad="skip")
    assert ds.skipped[0][0] == str(odd) and len(ds.table) == 13


def test_class_emptied_by_skipping_raises(tmp_path, sipakmed_tree):
    root = sipakmed_tree(tmp_path / "sip")
    for p in (root / "im_Parabasal" / "im_Parabasal" / "CROPPED").iterdir():
        p.write_text("junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no readable images left for class\(es\) \['Parabasal'\]"):
        D.load_sipakmed(root, on_bad="skip")


def test_on_bad_is_validated(tmp_path):
    with pytest.raises(ValueError, match="parameter 'on_bad'"):
        D.load_sipakmed(tmp_path, on_bad="ignore")
    with pytest.raises(ValueError, match="parameter 'on_bad'"):
        D.load_image_folder(tmp_path, on_bad=None)


def test_synthetic_marker_flags_the_dataset(tmp_path, sipakmed_tree):
    root = sipakmed_tree(tmp_path / "synth" / "seed1")
    (tmp_path / "synth" / "SYNTHETIC.txt").write_text("synthetic: true\n")
    ds = D.load_sipakmed(root)
    assert ds.source == "synthetic" and ds.synthetic and ds.layout == "kaggle"
    assert ds.marker == str(tmp_path / "synth" / "SYNTHETIC.txt")


def test_reading_4049_files_is_fast(tmp_path):
    """All of SIPaKMeD's size: the loader decodes every file, so keep an eye on speed."""
    import time

    from lib.data.manifest import sipakmed_manifest

    m = sipakmed_manifest()
    src = write_image(tmp_path / "one.bmp", size=(90, 80))
    data = src.read_bytes()
    for rel in m["kaggle_layout_relpath"]:
        p = tmp_path / "sip" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    t0 = time.perf_counter()
    ds = D.load_sipakmed(tmp_path / "sip")
    elapsed = time.perf_counter() - t0
    assert len(ds.table) == 4049 and ds.table["group"].nunique() == 966
    assert elapsed < 20, f"loading 4049 small BMPs took {elapsed:.1f} s"


# --------------------------------------------------------------------------- folder-per-class
def _folder_dataset(root: Path) -> Path:
    write_image(root / "tumor" / "001_01.png")
    write_image(root / "tumor" / "001_02.png")
    write_image(root / "tumor" / "scan_b.jpg", size=(5, 6))
    write_image(root / "healthy" / "a.bmp", mode="L")
    write_image(root / "healthy" / "b.tif", mode="RGBA")
    (root / "healthy" / "README.txt").write_text("notes")
    write_image(root / ".ipynb_checkpoints" / "x.png")  # hidden folder: not a class
    (root / "LICENSE").write_text("cc")
    return root


def test_load_image_folder(tmp_path, snapshot):
    root = _folder_dataset(tmp_path / "ds")
    before = snapshot(root)
    ds = D.load_image_folder(root, abnormal_classes=["tumor"])
    assert snapshot(root) == before
    t = ds.table
    assert list(t.columns) == COLUMNS
    assert ds.classes == ["healthy", "tumor"] and ds.abnormal_classes == ["tumor"]
    assert ds.source == "folder" and ds.layout == "folder" and not ds.synthetic
    assert [Path(p).name for p in t["path"]] == ["a.bmp", "b.tif", "001_01.png", "001_02.png", "scan_b.jpg"]
    assert t["group"].tolist() == ["healthy/a.bmp", "healthy/b.tif", "tumor/001", "tumor/001", "tumor/scan_b.jpg"]
    assert t["label_idx"].tolist() == [0, 0, 1, 1, 1]
    assert t["abnormal"].tolist() == [False, False, True, True, True]
    assert t["mode"].tolist() == ["L", "RGBA", "RGB", "RGB", "RGB"]
    assert t["width"].tolist() == [12, 12, 12, 12, 5] and t["height"].tolist() == [9, 9, 9, 9, 6]
    s = ds.summary()
    assert s.loc["tumor", "images"] == 3 and s.loc["tumor", "groups"] == 2 and s.loc["healthy", "modes"] == "L,RGBA"


def test_load_image_folder_refuses_nested_images_and_one_class(tmp_path):
    root = _folder_dataset(tmp_path / "ds")
    write_image(root / "healthy" / "thumbs" / "c.png")
    with pytest.raises(ValueError, match=r"healthy has subfolder\(s\) with images \(\['thumbs'\]\)"):
        D.load_image_folder(root)
    one = tmp_path / "one"
    write_image(one / "only" / "a.png")
    with pytest.raises(ValueError, match=r"found 1 class folder\(s\) \['only'\]; a classifier needs at least two"):
        D.load_image_folder(one)


def test_group_pattern_groups_augmented_copies(tmp_path):
    root = tmp_path / "aug"
    for name in ("HSIL_1 (10)_0_4446.jpg", "HSIL_1 (10)_0_8415.jpg", "HSIL_2 (3)_0_1.jpg"):
        write_image(root / "HSIL" / name)
    for name in ("NL_10_ (1).jpg", "NL_10_ (2).jpg"):
        write_image(root / "NL" / name)
    ds = D.load_image_folder(root, ["HSIL"], group_pattern=r"^(?P<group>.+?)_\d+_\d+$")
    assert ds.table["group"].tolist() == ["HSIL/HSIL_1 (10)", "HSIL/HSIL_1 (10)", "HSIL/HSIL_2 (3)",
                                          "NL/NL_10_ (1).jpg", "NL/NL_10_ (2).jpg"]
    assert ds.group_rules == {"pattern": 3, "file": 2}
    with pytest.raises(ValueError, match=r"group_pattern.*matched no file name"):
        D.load_image_folder(root, group_pattern=r"^zzz(\d+)$")
    with pytest.raises(ValueError, match=r"group_pattern.*needs one capturing group"):
        D.load_image_folder(root, group_pattern=r"^HSIL")
    with pytest.raises(ValueError, match=r"group_pattern.*not a valid regular expression"):
        D.load_image_folder(root, group_pattern=r"(unclosed")


def test_shipped_split_folders_recognised(tmp_path):
    root = tmp_path / "shipped"
    write_image(root / "train" / "SCC" / "SCC_1 (1)_0_1.jpg")
    write_image(root / "test" / "SCC" / "SCC_1 (1)_0_2.jpg")  # a copy of the same source on the other side
    write_image(root / "train" / "NL" / "NL_1.jpg")
    write_image(root / "test" / "NL" / "NL_2.jpg")
    ds = D.load_image_folder(root, ["SCC"], group_pattern=r"^(?P<group>.+?)_\d+_\d+$")
    assert ds.layout == "split-folders" and ds.classes == ["NL", "SCC"]
    assert sorted(ds.table["shipped_split"]) == ["test", "test", "train", "train"]
    sides = ds.table.groupby("group")["shipped_split"].nunique()
    assert sides.loc["SCC/SCC_1 (1)"] == 2 and ds.shipped_both_sides == 1
    assert D.subsample(ds, 1, seed=0).shipped_both_sides == 1  # counted before subsampling
    (root / "extra").mkdir()
    write_image(root / "extra" / "x.jpg")
    with pytest.raises(ValueError, match="mixes split folders"):
        D.load_image_folder(root)


def test_load_image_folder_abnormal_classes(tmp_path):
    root = _folder_dataset(tmp_path / "ds")
    assert D.load_image_folder(root).table["abnormal"].sum() == 0
    assert D.load_image_folder(root, abnormal_classes="tumor").abnormal_classes == ["tumor"]
    with pytest.raises(ValueError, match=r"parameter 'abnormal_classes': \['cancer'\] not among .*\['healthy', 'tumor'\]"):
        D.load_image_folder(root, abnormal_classes=("cancer",))


def test_load_image_folder_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_image_folder(tmp_path / "missing")
    flat = tmp_path / "flat"
    write_image(flat / "a.png")
    with pytest.raises(ValueError, match=r"unknown layout in .*expected one subfolder per class"):
        D.load_image_folder(flat)
    root = _folder_dataset(tmp_path / "ds")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"class folder {root / 'empty'} has no images")):
        D.load_image_folder(root)
    (root / "empty").rmdir()
    bad = root / "tumor" / "002_01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        D.load_image_folder(root)
    with pytest.warns(UserWarning, match="skipped 1 bad image"):
        ds = D.load_image_folder(root, on_bad="skip")
    assert ds.skipped[0][0] == str(bad) and len(ds.table) == 5


# --------------------------------------------------------------------------- subsample
def _table_dataset(sizes: dict) -> D.ImageDataset:
    rows = []
    for cls, groups in sizes.items():
        for g, n in groups.items():
            rows += [(f"/x/{cls}/{g}_{i:02d}.bmp", cls, f"{cls}/{g}") for i in range(1, n + 1)]
    t = pd.DataFrame(rows, columns=["path", "label", "group"])
    classes = sorted(sizes)
    t["label_idx"] = t["label"].map(classes.index)
    t["abnormal"] = t["label"] == classes[0]
    t["width"], t["height"], t["mode"] = 10, 10, "RGB"
    return D.ImageDataset(t[COLUMNS], classes, [classes[0]], "folder", Path("/x"))


SIZES = {"A": {"001": 12, "002": 1, "003": 5, "004": 2, "005": 7, "006": 3},
         "B": {"001": 1, "002": 1, "003": 1}}


def test_subsample_spreads_over_groups_deterministically():
    ds = _table_dataset(SIZES)
    sub = D.subsample(ds, 6, seed=3)
    t = sub.table
    assert t["label"].value_counts().to_dict() == {"A": 6, "B": 3}
    assert t[t["label"] == "A"]["group"].nunique() == 6  # one image from each of A's six groups
    pd.testing.assert_frame_equal(t, D.subsample(ds, 6, seed=3).table)
    assert set(t["path"]) <= set(ds.table["path"]) and list(t.columns) == COLUMNS
    assert sub.classes == ds.classes and sub.source == ds.source
    assert D.subsample(ds, None, seed=3) is ds
    picks = {tuple(D.subsample(ds, 9, seed=s).table["path"]) for s in range(6)}
    assert len(picks) > 1  # the seed matters
    assert len(D.subsample(ds, 100, seed=0).table) == len(ds.table)


def test_subsample_whole_groups():
    ds = _table_dataset(SIZES)
    for seed in range(10):
        t = D.subsample(ds, 8, seed=seed, whole_groups=True).table
        a = t[t["label"] == "A"]
        assert len(a) <= 8
        sizes = a["group"].value_counts()
        full = ds.table["group"].value_counts()
        assert (sizes == full[sizes.index]).all()  # every chosen group is complete
    big = _table_dataset({"A": {"001": 5}, "B": {"001": 1}})
    with pytest.raises(ValueError, match=r"every group of class\(es\) \['A'\] is larger than 3 images"):
        D.subsample(big, 3, seed=0, whole_groups=True)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "24", True])
def test_subsample_validates_images_per_class(bad):
    with pytest.raises(ValueError, match="parameter 'images_per_class'"):
        D.subsample(_table_dataset(SIZES), bad, seed=0)


# --------------------------------------------------------------------------- the entry point
def test_load_image_dataset_auto_prefers_real_data(tmp_path, sipakmed_tree, capsys):
    sipakmed_tree(tmp_path / "data" / "sipakmed", layout="official")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real data: no synthetic warning
        ds = load_image_dataset("auto", data_dir=tmp_path / "data")
    assert ds.source == "sipakmed-official" and len(ds.table) == 13 and not ds.synthetic
    assert "SYNTHETIC" not in capsys.readouterr().out
    sub = load_image_dataset("sipakmed", data_dir=tmp_path / "data", images_per_class=2, seed=1)
    assert sub.table["label"].value_counts().to_dict() == {c: 2 for c in CLASSES}


def test_load_image_dataset_real_data_errors_are_not_hidden(tmp_path):
    (tmp_path / "data" / "sipakmed").mkdir(parents=True)
    (tmp_path / "data" / "sipakmed" / "im_Parabasal.7z").write_bytes(b"7z")  # downloaded, not extracted
    with pytest.raises(ValueError, match="unknown layout"):
        load_image_dataset("auto", data_dir=tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"source='sipakmed': folder .* does not exist; run `make data`"):
        load_image_dataset("sipakmed", data_dir=tmp_path / "empty")


def test_load_image_dataset_from_a_path(tmp_path, sipakmed_tree):
    ds = load_image_dataset(str(_folder_dataset(tmp_path / "ds")), folder_abnormal=["tumor"])
    assert ds.source == "folder" and ds.abnormal_classes == ["tumor"] and len(ds.table) == 5
    root = sipakmed_tree(tmp_path / "sip")
    assert load_image_dataset(root).source == "sipakmed-kaggle"
    with pytest.raises(FileNotFoundError, match=r"parameter 'source': 'sipakmd' is not 'auto', 'sipakmed' or 'synthetic'"):
        load_image_dataset("sipakmd")
    with pytest.raises(ValueError, match="parameter 'images_per_class'"):
        load_image_dataset(root, images_per_class=0)


def test_load_image_dataset_marker_path_is_loud(tmp_path, sipakmed_tree, capsys):
    root = sipakmed_tree(tmp_path / "copy")
    (root / "SYNTHETIC.txt").write_text("synthetic: true\n")
    with pytest.warns(UserWarning, match="is SYNTHETIC"):
        ds = load_image_dataset(root)
    assert ds.synthetic and ds.source == "synthetic"
    assert "SYNTHETIC DATA" in capsys.readouterr().out


def test_synthetic_root_is_per_seed_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_CACHE, str(tmp_path))
    assert D.synthetic_root(7) == tmp_path.resolve() / "synthetic_sipakmed" / "seed7"
    assert D.synthetic_root(7, 14) == tmp_path.resolve() / "synthetic_sipakmed" / "seed7-clusters14"


def test_load_image_dataset_synthetic(tmp_path, monkeypatch, capsys):
    """The real generator (lib.scaffold.synthetic), a few clusters per class; loud, flagged, subsampled."""
    synthetic = pytest.importorskip("lib.scaffold.synthetic")
    monkeypatch.setenv(config.ENV_CACHE, str(tmp_path / "cache"))
    calls = []
    real = synthetic.make_synthetic_sipakmed

    def spy(out_root, seed=42, clusters_per_class=None):
        calls.append((Path(out_root), seed, clusters_per_class))
        return real(out_root, seed=seed, clusters_per_class=clusters_per_class)

    monkeypatch.setattr(synthetic, "make_synthetic_sipakmed", spy)
    with pytest.warns(UserWarning, match="SYNTHETIC SIPaKMeD stand-in"):
        ds = load_image_dataset("auto", data_dir=tmp_path / "nodata", seed=5, images_per_class=3)
    assert calls == [((tmp_path / "cache").resolve() / "synthetic_sipakmed" / "seed5-clusters4", 5, 4)]
    out = capsys.readouterr().out
    assert "SYNTHETIC DATA - real SIPaKMeD was not found" in out
    assert ds.synthetic and ds.source == "synthetic" and ds.layout == "kaggle"
    assert ds.marker == str(calls[0][0] / "SYNTHETIC.txt")
    assert ds.table["label"].value_counts().to_dict() == {c: 3 for c in CLASSES}
    assert ds.table["group"].str.fullmatch(r"[A-Za-z-]+/00[1-4]").all()  # the first 4 clusters only
    assert (ds.table["mode"] == "RGB").all() and ds.skipped == []


def test_truncated_file_is_bad_even_when_pil_is_told_to_be_lenient(tmp_path, sipakmed_tree, monkeypatch):
    from PIL import ImageFile

    root = sipakmed_tree(tmp_path / "sip", size=(40, 30))
    bad = _truncate(root / "im_Parabasal" / "im_Parabasal" / "CROPPED" / "006_01.bmp", keep=200)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        D.load_sipakmed(root)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards
