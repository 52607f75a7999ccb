"""Shared fixtures: project locations (relative to this file) and tiny real image trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
#: the team's shared read-only data (``../shared/data`` next to the checkout); may be absent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; skips the test when it is not there (e.g. a user's checkout)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (only the team machines have it)")
    return SHARED_DATA


def write_image(path, size=(12, 9), mode="RGB", value=0) -> Path:
    """A real, decodable image file (format from the suffix) of ``size`` (w, h) and ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (np.arange(w * h * channels, dtype=np.uint32).reshape(h, w, channels) * 7 + value) % 256
    arr = arr.astype(np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return path


@pytest.fixture
def image_writer():
    """The :func:`write_image` helper, as a fixture for test modules."""
    return write_image


#: a tiny SIPaKMeD: class -> {cluster: cells}; 2-3 clusters per class, 13 cells in all
TINY_SIPAKMED = {
    "Dyskeratotic": {"001": 2, "002": 1},
    "Koilocytotic": {"001": 1, "003": 2},
    "Metaplastic": {"001": 3},
    "Parabasal": {"005": 1, "006": 1},
    "Superficial-Intermediate": {"001": 1, "010": 1},
}


def make_sipakmed_tree(root, layout="kaggle", clusters=None, size=(12, 9)) -> Path:
    """Write a tiny SIPaKMeD tree in the ``"kaggle"`` or ``"official"`` layout.

    The official one also gets what the real archives hold outside ``CROPPED``: a
    cluster-level ``NNN.bmp`` and ``.dat`` boundary files.
    """
    root = Path(root)
    clusters = TINY_SIPAKMED if clusters is None else clusters
    for cls, cl in clusters.items():
        top = root / f"im_{cls}"
        cropped = (top / "CROPPED") if layout == "official" else (top / f"im_{cls}" / "CROPPED")
        cropped.mkdir(parents=True, exist_ok=True)
        for nnn, k in cl.items():
            for mm in range(1, k + 1):
                write_image(cropped / f"{nnn}_{mm:02d}.bmp", size=size)
                if layout == "official":
                    (cropped / f"{nnn}_{mm:02d}_cyt.dat").write_text("1.0,2.0\n")
            if layout == "official":
                write_image(top / f"{nnn}.bmp", size=(40, 30))
                (top / f"{nnn}_cyt01.dat").write_text("1.0,2.0\n")
    return root


@pytest.fixture
def sipakmed_tree():
    """The :func:`make_sipakmed_tree` helper, as a fixture."""
    return make_sipakmed_tree


def tree_snapshot(root) -> dict:
    """``{relative path: (size, mtime_ns)}`` of everything under ``root`` (to prove nothing is written)."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def snapshot():
    return tree_snapshot


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """A folder-per-class dataset with 3 classes (nothing may assume SIPaKMeD's 5)."""
    from lib.data import image_data

    root = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(0)
    colours = {"alpha": (200, 60, 60), "beta": (60, 200, 60), "gamma": (60, 60, 200)}
    for cls, rgb in colours.items():
        for i in range(7):
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            p = root / cls / f"{i:03d}_01.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
    return image_data.load_image_folder(root, abnormal_classes=["gamma"])


def tiny_branch(n_classes: int = 5, size: int = 32, seed: int = 0):
    """An untrained image branch with the contract's layer names (``image`` ... ``top_activation``,
    ``avg_pool``, ``image_embedding``, ``class_probs``): for tests of code that serves or explains a
    branch, not of the branch itself."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = layers.Conv2D(8, 3, strides=4, padding="same", name="top_conv")(x)
    x = layers.Activation("relu", name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dense(512, activation="relu", name="image_embedding")(x)
    out = layers.Dense(n_classes, activation="softmax", name="class_probs")(x)
    return keras.Model(inp, out, name="tiny_branch")
