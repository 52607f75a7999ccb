"""lib.image.features: on-disk cache keyed by files + backbone + weights + size; hit, invalidation, atomicity."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.image import features


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(d))
    return d


@pytest.fixture
def table(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / "imgs" / f"{i:03d}_01.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    return pd.DataFrame({"path": paths, "label_idx": [0, 1, 0, 1, 0]})


@pytest.fixture
def counting(monkeypatch):
    """Replace the expensive parts by a fake backbone that counts how often features are computed."""
    calls = []

    def fake_model(backbone, image_size, weights, seed):
        return ("fake", backbone, image_size)

    def fake_compute(model, table, image_size, batch_size=32, progress=True, desc=""):
        calls.append(len(table))
        return np.tile(np.arange(len(table), dtype=np.float32)[:, None], (1, 4)) + image_size

    monkeypatch.setattr(features, "feature_model", fake_model)
    monkeypatch.setattr(features, "compute_features", fake_compute)
    return calls


def test_second_call_reads_the_cache(cache, table, counting):
    a = features.extract_features(table, "efficientnet_lite0", 32, "imagenet", 2, progress=False)
    files = list((cache / "features").glob("*.npz"))
    assert counting == [5] and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = features.extract_features(table, "efficientnet_lite0", 32, "imagenet", 2, progress=False)
    assert counting == [5], "cache hit must not recompute"
    assert np.array_equal(a, b) and files[0].stat().st_mtime_ns == mtime
    assert not [p for p in (cache / "features").iterdir() if p.name.startswith(".")], "no temp files left"


def test_changes_invalidate_the_cache(cache, table, counting):
    features.extract_features(table, "efficientnet_lite0", 32, "imagenet", progress=False)
    features.extract_features(table, "efficientnet_lite0", 48, "imagenet", progress=False)   # image size
    assert len(counting) == 2
    features.extract_features(table, "efficientnet_b0", 32, "imagenet", progress=False)      # backbone
    features.extract_features(table, "efficientnet_lite0", 32, None, progress=False)         # weights
    assert len(counting) == 4
    p = table.path[2]
    Image.fromarray(np.full((10, 10, 3), 7, np.uint8)).save(p)                               # a file changes
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    features.extract_features(table, "efficientnet_lite0", 32, "imagenet", progress=False)
    assert len(counting) == 5
    features.extract_features(table.iloc[:4], "efficientnet_lite0", 32, "imagenet", progress=False)  # list changes
    assert len(counting) == 6
    features.extract_features(table, "efficientnet_lite0", 32, "imagenet", cache=False, progress=False)
    assert len(counting) == 7


def test_weights_file_identity(tmp_path):
    w = tmp_path / "w.weights.h5"
    w.write_bytes(b"x")
    assert str(w.resolve()) in features.weights_id(w)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        features.weights_id(tmp_path / "nope.h5")


@pytest.mark.slow
def test_real_backbone_features_are_pooled_1280d(cache, table):
    f = features.extract_features(table, "efficientnet_lite0", 32, None, batch_size=2, progress=False)
    assert f.shape == (5, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    g = features.extract_features(table, "efficientnet_lite0", 32, None, batch_size=2, progress=False)
    assert np.array_equal(f, g)
