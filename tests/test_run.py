"""lib.run: the run object writes the grouped split once, reads it back, refuses contradicting
parameters, and writes strict, timing-free metrics."""
import json
import math

import pytest

from conftest import write_image
from lib import config
from lib.run import ARTIFACTS, Run, check_inputs


def _copies_dataset(root):
    """Two classes, six source images each, three augmented copies per source (LBC-style names)."""
    for cls in ("HSIL", "NL"):
        for src in range(6):
            for k in range(3):
                write_image(root / cls / f"{cls}_1 ({src})_0_{k}.jpg", value=src * 3 + k)
    return root


def _open(root, build, **kw):
    kw.setdefault("group_pattern", r"^(?P<group>.+?)_\d+_\d+$")
    return Run.open("smoke", data_source=str(root), abnormal_classes=["HSIL"], build=build,
                    images_per_class=None, **kw)


def test_open_writes_split_once_and_later_opens_read_it(tmp_path):
    root = _copies_dataset(tmp_path / "ds")
    run = _open(root, tmp_path / "b")
    assert (run.root / ARTIFACTS["split"]).exists() and (run.root / ARTIFACTS["run"]).exists()
    assert run.dataset.group_unit == "source image" and not run.dataset.groups_are_clusters
    assert run.dataset.n_groups == 12 and run.dataset.n_images == 36
    # copies of one source image never sit on two sides
    assert (run.table.groupby("group")["split"].nunique() == 1).all()
    saved = (run.root / ARTIFACTS["split"]).read_text()
    again = _open(root, tmp_path / "b")
    assert (run.root / ARTIFACTS["split"]).read_text() == saved
    assert again.table[["path", "split"]].equals(run.table[["path", "split"]])
    # the split file names images relative to the dataset root: no machine path in it
    assert str(tmp_path) not in saved


def test_auto_image_size_and_depth_are_resolved_from_the_run_images(tmp_path):
    """image_size and fine_tune "auto" are resolved in Run.open, from the images' own sizes, reasons kept."""
    root = _copies_dataset(tmp_path / "ds")  # 12 x 9 px images: 128 px already enlarges them far more than 3x
    run = _open(root, tmp_path / "b", image_size="auto")
    assert run.params["image_size"] == 128 and "shorter side is 9 px" in run.params["image_size_reason"]
    assert run.params["fine_tune"] == "deep" and "small crops" in run.params["fine_tune_reason"]  # smoke's "auto"
    fixed = _open(root, tmp_path / "b2", image_size=96, fine_tune="top")
    assert fixed.params["image_size"] == 96 and fixed.params["image_size_reason"] is None
    assert fixed.params["fine_tune"] == "top" and fixed.params["fine_tune_reason"] is None


def test_describe_fits_a_report_page_and_loses_no_word(tmp_path):
    """Run.describe() is printed by four notebooks: no line may scroll sideways on the report's page."""
    from lib.run import PAGE_WIDTH

    root = tmp_path / "ds"
    classes = [f"a_long_class_name_number_{i}" for i in range(6)]
    for cls in classes:
        for src in range(6):
            write_image(root / cls / f"{cls}_1 ({src})_0_0.jpg", value=src)
    run = Run.open("smoke", data_source=str(root), abnormal_classes=classes[:3], build=tmp_path / "b",
                   images_per_class=None, group_pattern=r"^(?P<group>.+?)_\d+_\d+$")
    text = run.describe()
    assert max(len(line) for line in text.splitlines()) <= PAGE_WIDTH
    assert len(text.splitlines()) > 4  # the class list did not fit on one line: it was wrapped, not cut
    assert f"classes: {classes};" in " ".join(text.split())  # rejoined at the breaks: the same words


def test_contradicting_parameter_is_refused_and_nothing_overwritten(tmp_path):
    root = _copies_dataset(tmp_path / "ds")
    run = _open(root, tmp_path / "b")
    before = (run.root / ARTIFACTS["split"]).read_bytes()
    with pytest.raises(ValueError, match=r"parameter 'seed' = 7 contradicts the run saved in"):
        _open(root, tmp_path / "b", seed=7)
    with pytest.raises(ValueError, match=r"parameter 'group_pattern'"):
        _open(root, tmp_path / "b", group_pattern=r"^(HSIL)")
    assert (run.root / ARTIFACTS["split"]).read_bytes() == before


def test_changed_images_are_detected(tmp_path):
    root = _copies_dataset(tmp_path / "ds")
    _open(root, tmp_path / "b")
    write_image(root / "NL" / "NL_1 (99)_0_0.jpg")
    with pytest.raises(ValueError, match=r"not the ones .*split.csv was written for"):
        _open(root, tmp_path / "b")


def test_inputs_checked_before_image_work(tmp_path):
    root = _copies_dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"'abnormal_classes': \['SCC'\] are not class folders"):
        check_inputs(data_source=str(root), abnormal_classes=["SCC"])
    with pytest.raises(FileNotFoundError, match="parameter 'data_source'"):
        check_inputs(data_source=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="parameter 'dataset'"):
        check_inputs(dataset="imagenet")
    with pytest.raises(ValueError, match=r"\['LSIL', 'SCC'\] are not class folders"):  # the preset's classes
        check_inputs(data_source=str(root), dataset="lbc")
    resolved = check_inputs(data_source=str(root), dataset="lbc", abnormal_classes=["HSIL"])
    assert resolved["abnormal_classes"] == ["HSIL"] and resolved["group_pattern"].startswith("^(?P<group>")


def test_save_metrics_is_strict_json_without_timings(tmp_path):
    run = _open(_copies_dataset(tmp_path / "ds"), tmp_path / "b")
    out = run.save_metrics("99_test", headline={"auc": float("nan"), "gap": 0.25},
                           history={"fit_seconds": 12.5, "train_images_per_s": 40.0, "accuracy": [0.5, math.inf]})
    text = out.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert record["headline"] == {"auc": None, "gap": 0.25}
    assert record["history"] == {"accuracy": [0.5, None]}
    assert record["dataset"] == run.dataset.name and record["synthetic"] is False
    timings = json.loads((run.root / "timings" / "99_test.json").read_text())
    assert timings == {"history.fit_seconds": 12.5, "history.train_images_per_s": 40.0}
    # a rerun with other wall-clock numbers writes byte-identical metrics
    run.save_metrics("99_test", headline={"auc": float("nan"), "gap": 0.25},
                     history={"fit_seconds": 99.0, "train_images_per_s": 1.0, "accuracy": [0.5, math.inf]})
    assert out.read_text() == text


def test_metrics_written_by_an_older_notebook_say_which_to_rerun(tmp_path):
    """03 reads 02's record: one written before 02 saved its training images names the notebook to rerun."""
    run = _open(_copies_dataset(tmp_path / "ds"), tmp_path / "b")
    assert run.metrics("02_overfitting_baseline") is None  # not run: the reader says so itself
    run.save_metrics("02_overfitting_baseline", headline={"gap": 0.2}, batchnorm={"accuracies": {"train": 0.9}})
    record = run.metrics("02_overfitting_baseline", needs=("headline.gap", "batchnorm.accuracies"))
    assert record["batchnorm"]["accuracies"] == {"train": 0.9}
    with pytest.raises(ValueError, match=r"lacks \['train_paths', 'batchnorm.mode'\].*older version of notebook "
                                         r"02_overfitting_baseline.*--only 02_overfitting_baseline") as err:
        run.metrics("02_overfitting_baseline", needs=("train_paths", "batchnorm.accuracies", "batchnorm.mode"))
    assert "metrics/02_overfitting_baseline.json" in str(err.value) and str(tmp_path) not in str(err.value)


def test_paths_are_named_in_one_place(tmp_path):
    run = _open(_copies_dataset(tmp_path / "ds"), tmp_path / "b")
    assert run.path("image_branch") == run.root / "models" / "image_branch.keras"
    assert run.path("figures").is_dir()
    with pytest.raises(KeyError, match="unknown artifact"):
        run.path("03_image_branch.json")
    assert run.root == config.run_dir("smoke", tmp_path / "b")


def test_saved_split_reads_back_what_the_run_wrote(tmp_path):
    from lib.run import saved_split

    run = _open(_copies_dataset(tmp_path / "ds"), tmp_path / "b")
    table = saved_split("smoke", tmp_path / "b")
    assert table["path"].tolist() == run.table["path"].tolist()
    assert table["split"].tolist() == run.table["split"].tolist()
    assert saved_split("full", tmp_path / "b") is None  # no run saved for that profile


def test_uci_split_is_drawn_once_and_read_back(tmp_path):
    from lib.data import uci

    import pandas as pd

    root = _copies_dataset(tmp_path / "ds")
    run = _open(root, tmp_path / "b")
    frame = uci.load_uci(run.uci_csv).frame
    first = run.uci_split(frame)
    assert set(first) == {"train", "val", "test"} and first.index.equals(frame.index)
    saved = run.root / "uci_split.csv"
    assert saved.is_file()
    again = _open(root, tmp_path / "b").uci_split(frame.sample(frac=1.0, random_state=0))  # another order: same split
    pd.testing.assert_series_equal(again.loc[frame.index], first)
    before = saved.read_bytes()
    with pytest.raises(ValueError, match="other records"):
        run.uci_split(frame.iloc[:-5])
    assert saved.read_bytes() == before  # nothing overwritten
