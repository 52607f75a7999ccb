"""lib.config: one place for paths and parameters; lib.atomic: outputs are never half-written."""
import json
import os

import pytest

from lib import atomic, config


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(config.ENV_DATA, raising=False)
    assert config.data_root() == config.ROOT / "data"
    monkeypatch.setenv(config.ENV_DATA, str(tmp_path / "env"))
    assert config.data_root() == (tmp_path / "env").resolve()
    assert config.data_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    # no uci/ under the data folder: the embedded copy that ships with the kit
    assert config.uci_csv_path(tmp_path) == config.EMBEDDED_UCI
    own = tmp_path / "uci" / "risk_factors_cervical_cancer.csv"
    own.parent.mkdir()
    own.write_text("x")
    assert config.uci_csv_path(tmp_path) == own.resolve()


def test_embedded_uci_is_the_original_file():
    import hashlib

    digest = hashlib.sha256(config.EMBEDDED_UCI.read_bytes()).hexdigest()
    assert digest == "8df193ad5c9ff4288fb4c401eef70dcd2cbda404ce7f82ac74c68cfc960ab063"


def test_run_dirs_are_per_profile(tmp_path):
    smoke = config.models_dir("smoke", tmp_path)
    full = config.models_dir("full", tmp_path)
    assert smoke != full and smoke.is_dir() and full.is_dir()
    assert config.metrics_dir("smoke", tmp_path).parent == config.run_dir("smoke", tmp_path)
    with pytest.raises(ValueError, match="profile"):
        config.run_dir("medium", tmp_path)


def test_run_params_profiles_and_overrides():
    smoke = config.run_params("smoke")
    full = config.run_params("full")
    assert smoke["image_size"] == 64 and full["image_size"] == "auto"  # resolved from the images (Run.open)
    assert full["images_per_class"] is None
    p = config.run_params("smoke", image_size=96, epochs=None, seed=7)
    assert p["image_size"] == 96 and p["epochs"] == smoke["epochs"] and p["seed"] == 7


@pytest.mark.parametrize("knob,value,match", [
    ("image_size", 8, "image_size"), ("image_size", 1000, "image_size"), ("image_size", 64.5, "image_size"),
    ("epochs", 0, "epochs"), ("batch_size", -1, "batch_size"), ("images_per_class", 1, "images_per_class"),
])
def test_run_params_rejects_out_of_range(knob, value, match):
    with pytest.raises(ValueError, match=match):
        config.run_params("smoke", **{knob: value})


@pytest.mark.parametrize("sides, size, words", [
    ([40, 38, 44], 128, "enlarges it 3.2x"),          # small crops: 224 px would enlarge them 5.6x
    ([90, 85, 120], 224, "(90 px) at most 3x"),       # the stand-in's cells
    ([512, 512], 224, "(512 px) at most 3x"),         # LBC fields: never larger than 224 px
    ([50, 60, 45], 128, "(50 px) at most 3x"),        # 128 px enlarges 50 px 2.6x
])
def test_auto_image_size_follows_the_images(sides, size, words):
    got, why = config.resolve_image_size("auto", sides)
    assert got == size and words in why and f"{size} px" in why
    assert config.resolve_image_size(96, sides) == (96, None)  # a number is kept as it is


@pytest.mark.parametrize("sides, depth", [([40, 38, 44], "deep"), ([50, 60, 45], "deep"), ([90, 85, 120], "top"),
                                          ([512, 512], "top")])
def test_auto_fine_tune_depth_follows_the_images(sides, depth):
    """Small crops (224 px would enlarge them more than 3x) are fine-tuned deep; the rest from the top blocks."""
    from lib.image.image_model import FINE_TUNE_DEPTHS

    got, why = config.resolve_fine_tune("auto", sides)
    assert got == depth and why.startswith(f"fine_tune='auto': {depth}") and depth in FINE_TUNE_DEPTHS
    assert config.resolve_fine_tune("top", sides) == ("top", None)
    with pytest.raises(ValueError, match="'fine_tune': expected one of"):
        config.resolve_fine_tune("all", sides)
    with pytest.raises(ValueError, match="'fine_tune': expected one of"):
        config.run_params("full", fine_tune="everything")


def test_auto_image_size_needs_sizes():
    for bad in ([], [0, 40], [float("nan")]):
        with pytest.raises(ValueError, match="image_size / fine_tune .auto."):
            config.resolve_image_size("auto", bad)
    with pytest.raises(ValueError, match="'image_size': expected 'auto'"):
        config.run_params("full", image_size="big")


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="'profile'.*medium"):
        config.run_params("medium")


def test_seed_everything_repeats_numpy():
    import numpy as np

    config.seed_everything(3)
    a = np.random.rand(3)
    config.seed_everything(3)
    assert (np.random.rand(3) == a).all()


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    atomic.write_json(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}  # earlier result intact
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind


def test_atomic_json_converts_numpy(tmp_path):
    import numpy as np

    atomic.write_json(tmp_path / "n.json", {"x": np.float32(0.5), "v": np.arange(2)})
    assert atomic.read_json(tmp_path / "n.json") == {"x": 0.5, "v": [0, 1]}


def test_save_figure_stamps_and_rejects_folders(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib import plots

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    out = plots.save_figure(fig, "demo", synthetic=True, figures_dir=tmp_path)
    assert out == tmp_path / "demo.png" and out.stat().st_size > 1000
    assert any(t.get_text() == plots.SYNTHETIC_STAMP for t in fig.texts)
    with pytest.raises(ValueError, match="folders"):
        plots.save_figure(fig, "sub/demo", figures_dir=tmp_path)
    plt.close(fig)


def test_save_png_writes_atomically_with_the_asked_dpi_and_keeps_an_old_file_on_failure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from lib import plots

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    out = plots.save_png(fig, tmp_path / "bench.png", dpi=50, close=True)
    assert Image.open(out).size == (100, 50) and not plt.fignum_exists(fig.number)
    before = out.read_bytes()

    class Broken:
        def savefig(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        plots.save_png(Broken(), out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["bench.png"]
