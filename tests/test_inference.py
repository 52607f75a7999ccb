"""``cervical-kit-infer``: main() on real files - a tiny saved hybrid model, good and bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_branch
from lib.fusion import hybrid
from lib.serve import inference

COLUMNS = ["Age", "Smokes", "Num of pregnancies"]
RANGES = {
    "Age": {"train_min": 13.0, "train_max": 84.0, "binary": False, "allowed": [0.0, 120.0]},
    "Smokes": {"train_min": 0.0, "train_max": 1.0, "binary": True, "allowed": [0.0, 1.0]},
    "Num of pregnancies": {"train_min": 0.0, "train_max": 11.0, "binary": False, "allowed": [0.0, 120.0]},
}
CLASSES = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A models folder as notebook 05 leaves it (tiny untrained models: the CLI is under test, not them)."""
    from lib.tabular import mlp

    d = tmp_path_factory.mktemp("models")
    branch = tiny_branch(len(CLASSES))
    branch.save(d / "image_branch.keras")
    pre = mlp.TabularPreprocessor(COLUMNS, [27.0, 0.0, 2.0], ["Smokes"], [27.0, 0.15, 2.2, 0.05],
                                      [8.5, 0.35, 1.4, 0.2], metadata={"feature_ranges": RANGES})
    head = hybrid.build_head("fused", pre.n_features_out)  # 3 columns + 1 missing-value indicator
    model = hybrid.assemble(branch, head)
    card = {"name": "hybrid_cervical_model", "threshold": 0.5, "synthetic": True, "image_classes": CLASSES,
            "abnormal_classes": CLASSES[:2]}
    hybrid.save_hybrid(model, d, preprocessor=pre, card=card)
    return d


@pytest.fixture
def cell(tmp_path, image_writer):
    return image_writer(tmp_path / "cell.bmp", size=(48, 40), value=90)


def write_json(path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


GOOD = {"Age": 35, "Smokes": 1, "Num of pregnancies": 2}


def run(capsys, *argv):
    code = inference.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- good inputs
@pytest.mark.slow
def test_hybrid_prints_a_score_and_class(model_dir, cell, tmp_path, capsys):
    rec = write_json(tmp_path / "r.json", GOOD)
    code, out, err = run(capsys, cell, "--tabular", rec, "--model-dir", model_dir)
    assert code == 0, err
    assert "image + tabular (hybrid model)" in out
    score = float(out.split("risk score: ")[1].split()[0])
    assert 0.0 <= score <= 1.0
    assert f"class: {'abnormal' if score >= 0.5 else 'normal'} (threshold 0.5)" in out
    assert "SYNTHETIC" in out and "not for clinical use" in out
    # the same score as the model on the preprocessed record
    from lib.tabular import mlp
    from lib.image.input_pipeline import load_image

    model = hybrid.load_hybrid(model_dir / "hybrid_cervical_model.keras")
    pre = mlp.load_preprocessor(model_dir / "hybrid_tabular_preprocessor.json")
    import pandas as pd

    x_tab = pre.transform(pd.DataFrame([GOOD], columns=COLUMNS, dtype=float))
    expected = hybrid.predict(model, [load_image(cell, 32)[None].astype("float32"), x_tab])[0]
    assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_csv_record_missing_value_and_gradcam(model_dir, cell, tmp_path, capsys):
    rec = tmp_path / "r.csv"
    rec.write_text("Age,Smokes,Num of pregnancies\n90,?,3\n")
    png = tmp_path / "cam.png"
    code, out, err = run(capsys, cell, "--tabular", rec, "--model-dir", model_dir, "--gradcam", png)
    assert code == 0, err
    assert "field 'Smokes' is missing: imputed" in out
    assert "field 'Age' = 90 is outside the training range 13..84" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) >= 256  # upscaled overlay
    assert f"grad-cam: {png}" in out


@pytest.mark.slow
def test_without_tabular_uses_the_image_branch(model_dir, cell, capsys):
    code, out, err = run(capsys, cell, "--model-dir", model_dir)
    assert code == 0, err
    assert "image only (no --tabular record: the image branch alone; risk = P(Dyskeratotic + Koilocytotic))" in out
    assert "image_branch.keras" in out
    assert 0.0 <= float(out.split("risk score: ")[1].split()[0]) <= 1.0


@pytest.mark.slow
def test_threshold_comes_from_the_model_card(model_dir, cell, tmp_path, capsys):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    card = json.loads((d / "hybrid_cervical_model_card.json").read_text())
    rec = write_json(tmp_path / "r.json", GOOD)
    for thr, cls in ((0.0, "abnormal"), (1.01, "normal")):
        card["threshold"] = thr
        write_json(d / "hybrid_cervical_model_card.json", card)
        code, out, _ = run(capsys, cell, "--tabular", rec, "--model-dir", d)
        assert code == 0 and f"class: {cls} (threshold {thr:g})" in out


@pytest.mark.slow
def test_image_branch_is_scored_with_flips_when_notebook_03_chose_them(model_dir, tmp_path, capsys):
    """The card's ``image_branch.test_time_flips`` (notebook 03's choice) decides: with it the risk is the mean
    over the four flip views, without it one pass; the printed mode says which."""
    from lib.explain import gradcam
    from lib.image import tta

    rng = np.random.default_rng(0)
    img = tmp_path / "asym.png"
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)  # not flip-symmetric
    branch = inference.load_keras_model(model_dir / "image_branch.keras")
    x = inference.load_image_array(img, int(branch.get_layer("image").output.shape[1]))
    views = tta.view_probs(lambda v: gradcam.predict(branch, inputs={"image": v}), x)[:, 0]  # (4, classes)
    risks = {}
    for flips in (False, True):
        d = _copy_models(model_dir, tmp_path, f"m{flips}")
        _edit_card(d, image_branch={"source": "notebook 03", "test_time_flips": flips})
        code, out, err = run(capsys, img, "--model-dir", d)
        assert code == 0, err
        risks[flips] = float(out.split("risk score: ")[1].split()[0])
        assert ("mean of four flip views" in out) is flips
    want = {False: views[0][:2].sum(), True: views.mean(axis=0)[:2].sum()}
    assert abs(views[0][:2].sum() - views.mean(axis=0)[:2].sum()) > 1e-4  # the test can tell them apart
    for flips in (False, True):
        assert risks[flips] == pytest.approx(want[flips], abs=1e-4)


# --------------------------------------------------------------------------- bad inputs (exit 2, one line)
def assert_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model_files_name_the_notebook(cell, tmp_path, capsys):
    rec = write_json(tmp_path / "r.json", GOOD)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", empty)
    assert_error(code, err, "hybrid model not found", "hybrid_cervical_model.keras", "notebooks/05_late_fusion.ipynb")
    code, _, err = run(capsys, cell, "--model-dir", empty)
    assert_error(code, err, "image branch model not found", "image_branch.keras", "notebooks/03_image_branch.ipynb")
    code, _, err = run(capsys, cell, "--model-dir", tmp_path / "nope")
    assert_error(code, err, "model folder", "does not exist")


def test_missing_preprocessor_is_named(model_dir, cell, tmp_path, capsys):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "hybrid_tabular_preprocessor.json").unlink()
    rec = write_json(tmp_path / "r.json", GOOD)
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", d)
    assert_error(code, err, "tabular preprocessor JSON not found", "hybrid_tabular_preprocessor.json")


@pytest.mark.slow
def test_preprocessor_from_another_run_is_caught(model_dir, cell, tmp_path, capsys):
    import shutil

    from lib.tabular import mlp

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    pre = mlp.TabularPreprocessor(COLUMNS, [27.0, 0.0, 2.0], [], [27.0, 0.15, 2.2], [8.5, 0.35, 1.4],
                                      metadata={"feature_ranges": RANGES})
    mlp.save_preprocessor(pre, d / "hybrid_tabular_preprocessor.json")
    rec = write_json(tmp_path / "r.json", GOOD)
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", d)
    assert_error(code, err, "hybrid_tabular_preprocessor.json gives 3 features but", "expects 4")


def test_bad_image_files(model_dir, tmp_path, capsys):
    rec = write_json(tmp_path / "r.json", GOOD)
    code, _, err = run(capsys, tmp_path / "missing.png", "--tabular", rec, "--model-dir", model_dir)
    assert_error(code, err, "image file", "missing.png", "not found")
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    code, _, err = run(capsys, fake, "--tabular", rec, "--model-dir", model_dir)
    assert_error(code, err, "notes.png", "not a readable image")
    code, _, err = run(capsys, tmp_path, "--model-dir", model_dir)
    assert_error(code, err, "is not a file")


@pytest.mark.parametrize("record, needles", [
    ({"Age": 35, "Smokes": 1}, ["missing field(s) ['Num of pregnancies']"]),
    ({**GOOD, "Biopsy": 1, "Schiller": 0}, ["unexpected field(s) ['Biopsy', 'Schiller']"]),
    ({"Age": 35, "Num of pregnancies": 1, "Hinselmann": 0}, ["missing field(s) ['Smokes']", "unexpected field(s) ['Hinselmann']"]),
    ({**GOOD, "Age": "thirty"}, ["field 'Age' = 'thirty' is not a number"]),
    ({**GOOD, "Age": -1}, ["field 'Age' = -1 is out of range: expected 0..120"]),
    ({**GOOD, "Age": 150}, ["field 'Age' = 150 is out of range", "training data: 13..84"]),
    ({**GOOD, "Smokes": 2}, ["field 'Smokes' = 2 is out of range: expected 0 (no) or 1 (yes)"]),
    ({**GOOD, "Num of pregnancies": [1]}, ["field 'Num of pregnancies' = [1] is not a number"]),
    ({**GOOD, "Age": "inf"}, ["field 'Age' = 'inf' is not a finite number"]),
])
def test_bad_records(model_dir, cell, tmp_path, capsys, record, needles):
    rec = write_json(tmp_path / "r.json", record)
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", model_dir)
    assert_error(code, err, "r.json", *needles)


def test_bad_record_files(model_dir, cell, tmp_path, capsys):
    cases = {
        "two.csv": ("Age,Smokes,Num of pregnancies\n30,0,1\n40,1,2\n", "exactly one data row, got 2"),
        "short.csv": ("Age,Smokes,Num of pregnancies\n30,0\n", "header has 3 fields but the data row has 2"),
        "broken.json": ("{\"Age\": 30,", "not valid JSON"),
        "list.json": ("[1, 2]", "expected one JSON object"),
        "record.txt": ("Age=30", "expected a .json or .csv file"),
    }
    for name, (text, needle) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        code, _, err = run(capsys, cell, "--tabular", p, "--model-dir", model_dir)
        assert_error(code, err, name, needle)
    code, _, err = run(capsys, cell, "--tabular", tmp_path / "absent.json", "--model-dir", model_dir)
    assert_error(code, err, "tabular record", "absent.json", "not found")


def test_bad_gradcam_path(model_dir, cell, tmp_path, capsys):
    rec = write_json(tmp_path / "r.json", GOOD)
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", model_dir, "--gradcam", tmp_path / "cam.jpg")
    assert_error(code, err, "--gradcam", "expected a .png")
    code, _, err = run(capsys, cell, "--model-dir", model_dir, "--gradcam", tmp_path / "no" / "cam.png")
    assert_error(code, err, "folder", "does not exist")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        inference.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        inference.main(["x.png", "--profile", "huge"])
    assert e.value.code == 2
    capsys.readouterr()


def test_validate_record_without_ranges_still_checks_numbers():
    frame, notes = inference.validate_record({"a": "1.5", "b": None}, ["a", "b"], None)
    assert frame.iloc[0, 0] == 1.5 and np.isnan(frame.iloc[0, 1]) and len(notes) == 1
    with pytest.raises(inference.InputError, match="'a' = 'x' is not a number"):
        inference.validate_record({"a": "x", "b": 1}, ["a", "b"], None)


# --------------------------------------------------------------------------- crafted folders and records (issue 9)
def _copy_models(model_dir, tmp_path, name="m"):
    import shutil

    d = tmp_path / name
    shutil.copytree(model_dir, d)
    return d


def _edit_card(d, **fields):
    path = d / "hybrid_cervical_model_card.json"
    card = json.loads(path.read_text())
    for k, v in fields.items():
        if k.startswith("files_"):
            card["files"][k[len("files_"):]] = v
        else:
            card[k] = v
    write_json(path, card)
    return card


@pytest.mark.parametrize("text, key", [
    ('{"Age": 35, "Smokes": 1, "Num of pregnancies": 2, "Age": 99}', "'Age'"),
    ('[{"Age": 35, "Smokes": 1, "Smokes": 0, "Num of pregnancies": 2}]', "'Smokes'"),
])
def test_duplicate_key_in_json_record_is_refused(model_dir, cell, tmp_path, capsys, text, key):
    rec = tmp_path / "dup.json"
    rec.write_text(text)
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", model_dir)
    assert_error(code, err, "dup.json", f"key {key} appears more than once")


@pytest.mark.parametrize("card_text, needles", [
    ('{"threshold": "high"}', ["field 'threshold' = 'high' is malformed", "a finite number"]),
    ('{"threshold": true}', ["field 'threshold' = true is malformed"]),
    ('{"threshold": NaN}', ["field 'threshold' = NaN is malformed"]),
    ('{"synthetic": "no"}', ["field 'synthetic' = 'no' is malformed", "true or false"]),
    ('{"files": ["hybrid_cervical_model.keras"]}', ["field 'files' = [", "is malformed"]),
    ('{"files": {"preprocessor": 5}}', ["field 'files.preprocessor'", "got 5"]),
    ('{"image_classes": 5}', ["field 'image_classes' = 5 is malformed", "list of distinct class names"]),
    ('{"abnormal_classes": ["a", "a"]}', ["field 'abnormal_classes'", "is malformed"]),
    ('{"threshold": 0.0, "threshold": 1.0}', ["key 'threshold' appears more than once"]),
    ('{"image_branch": {"test_time_flips": "yes"}}', ["field 'image_branch'", "'test_time_flips' is true or false"]),
    ('{"image_branch": 3}', ["field 'image_branch' = 3 is malformed"]),
])
def test_malformed_model_card_exits_2_with_one_line(model_dir, cell, tmp_path, capsys, card_text, needles):
    d = _copy_models(model_dir, tmp_path)
    (d / "hybrid_cervical_model_card.json").write_text(card_text)
    rec = write_json(tmp_path / "r.json", GOOD)
    for argv in ((cell, "--tabular", rec, "--model-dir", d), (cell, "--model-dir", d)):
        code, _, err = run(capsys, *argv)
        assert_error(code, err, "model card", "hybrid_cervical_model_card.json", *needles)


@pytest.mark.parametrize("how", ["dotdot", "nested", "absolute", "symlink", "other_file"])
def test_card_file_names_must_stay_inside_the_model_folder(model_dir, cell, tmp_path, capsys, how):
    """The preprocessor outside is a valid one: only the containment check can refuse it.

    It lies in ``m_evil`` next to the model folder ``m``: a textual prefix check would take it for inside.
    """
    import shutil

    d = _copy_models(model_dir, tmp_path)
    outside = tmp_path / "m_evil"
    outside.mkdir()
    shutil.copy(d / "hybrid_tabular_preprocessor.json", outside / "pre.json")
    field = "preprocessor"
    if how == "dotdot":
        _edit_card(d, files_preprocessor="../m_evil/pre.json")
    elif how == "nested":
        _edit_card(d, files_preprocessor="sub/../../m_evil/pre.json")
    elif how == "absolute":
        _edit_card(d, files_preprocessor=str(outside / "pre.json"))
    elif how == "symlink":
        (d / "hybrid_tabular_preprocessor.json").unlink()
        (d / "hybrid_tabular_preprocessor.json").symlink_to(outside / "pre.json")
    else:
        _edit_card(d, files_h5="../../m_evil/pre.json")
        field = "h5"
    rec = write_json(tmp_path / "r.json", GOOD)
    code, _, err = run(capsys, cell, "--tabular", rec, "--model-dir", d)
    assert_error(code, err, f"field 'files.{field}'", "outside the model folder" if how != "absolute"
                 else "an absolute path")


@pytest.mark.slow
def test_card_file_in_a_subfolder_is_accepted(model_dir, cell, tmp_path, capsys):
    d = _copy_models(model_dir, tmp_path)
    (d / "pre").mkdir()
    (d / "hybrid_tabular_preprocessor.json").rename(d / "pre" / "p.json")
    _edit_card(d, files_preprocessor="pre/p.json")
    code, out, err = run(capsys, cell, "--tabular", write_json(tmp_path / "r.json", GOOD), "--model-dir", d)
    assert code == 0, err
    assert "risk score:" in out


@pytest.mark.parametrize("damage, needle", [("truncate", "no zip directory"), ("bitflip", "fails its CRC check")])
def test_damaged_keras_file_is_called_damaged(model_dir, cell, tmp_path, capsys, damage, needle):
    import zipfile

    d = _copy_models(model_dir, tmp_path)
    p = d / "hybrid_cervical_model.keras"
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one byte in the middle of the largest member's compressed data
        with zipfile.ZipFile(p) as z:
            info = max(z.infolist(), key=lambda i: i.compress_size)
        data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    code, _, err = run(capsys, cell, "--tabular", write_json(tmp_path / "r.json", GOOD), "--model-dir", d)
    assert_error(code, err, "hybrid_cervical_model.keras", "the file is damaged", needle)
    assert "not found" not in err.lower()


def test_unreadable_image_message_says_it_once(model_dir, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    code, _, err = run(capsys, fake, "--model-dir", model_dir)
    assert_error(code, err, "notes.png", "is not a readable image (UnidentifiedImageError")
    assert err.count("not a readable image") == 1, err


def test_reusable_validators_raise_value_error_naming_the_field():
    values, notes = inference.clean_record({"Age": "35", "Smokes": None, "Num of pregnancies": 2}, COLUMNS, RANGES)
    assert values["Age"] == 35.0 and values["Num of pregnancies"] == 2.0 and np.isnan(values["Smokes"])
    assert list(values) == COLUMNS and len(notes) == 1
    with pytest.raises(ValueError, match="field 'Smokes' = 3 is out of range"):
        inference.clean_record({**GOOD, "Smokes": 3}, COLUMNS, RANGES)
    with pytest.raises(ValueError, match="key 'Age' appears more than once"):
        inference.parse_record_json('{"Age": 1, "Age": 2}')
    assert inference.check_card({"threshold": 0.3, "files": {"keras": "a.keras"}}) == {
        "threshold": 0.3, "files": {"keras": "a.keras"}}
    with pytest.raises(ValueError, match="field 'threshold'"):
        inference.check_card({"threshold": [0.5]})
