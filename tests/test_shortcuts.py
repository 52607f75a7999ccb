"""Border-crop shortcut checks (lib.image.shortcuts) on small synthetic arrays and files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.image import shortcuts as sc

RED = (255, 0, 0)


def framed(size=40, frame=4, centre=(128, 128, 128), edge=RED):
    """A grey image with a coloured frame ``frame`` px wide: the border streak stand-in."""
    arr = np.empty((size, size, 3), np.uint8)
    arr[:] = edge
    arr[frame:size - frame, frame:size - frame] = centre
    return arr


def test_crop_border_removes_the_frame_and_keeps_the_shape():
    x = np.stack([framed(), framed(edge=(0, 0, 255))]).astype(np.float32)
    out = sc.crop_border(x, 0.8)  # 40 px, central 32 px: the 4-px frame is gone
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.allclose(out, 128, atol=1)
    assert not np.allclose(sc.crop_border(x, 0.9), 128, atol=1)  # 36 px kept: part of the frame survives
    same = sc.crop_border(x, 1.0)
    np.testing.assert_array_equal(same, x)
    same[0, 0, 0, 0] = 7  # a copy, not a view
    assert x[0, 0, 0, 0] == 255


def test_box_is_central():
    assert sc.central_box(100, 50, 0.8) == (10, 5, 90, 45)
    assert sc.central_box(512, 512, 0.7) == (77, 77, 435, 435)


@pytest.mark.parametrize("keep", [0.1, 1.5, True, "0.8"])
def test_bad_keep_is_refused(keep):
    with pytest.raises(ValueError, match="'keep'"):
        sc.crop_border(np.zeros((1, 8, 8, 3)), keep)


def test_bad_image_array_is_refused():
    with pytest.raises(ValueError, match="'images'"):
        sc.crop_border(np.zeros((8, 8, 3)), 0.8)


def test_load_cropped_crops_at_full_resolution(tmp_path):
    from lib.image.input_pipeline import load_images

    paths = []
    for i, edge in enumerate([RED, (0, 255, 0)]):
        p = tmp_path / f"img {i} (1).png"  # spaces and parentheses, like LBC's names
        Image.fromarray(framed(size=100, frame=10, edge=edge)).save(p)
        paths.append(str(p))
    table = pd.DataFrame({"path": paths})
    np.testing.assert_array_equal(sc.load_cropped(table, 20, 1.0), load_images(table, 20))
    inner = sc.load_cropped(table, 20, 0.75)  # the 10-px frame of a 100-px image is outside the central 75 px
    assert inner.shape == (2, 20, 20, 3) and np.allclose(inner, 128, atol=1)
    with pytest.raises(ValueError, match="cannot decode"):
        sc.load_cropped(pd.DataFrame({"path": [str(tmp_path / "missing.png")]}), 20, 0.8)


def _border_world(n_per_class=12, size=40, seed=0):
    """Abnormal images carry a bright frame, normal ones none; centres are drawn alike for both."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            centre = tuple(int(v) for v in rng.integers(90, 160, 3))
            imgs.append(framed(size, 4, centre, edge=(250, 250, 250) if label else centre))
            labels.append(label)
    table = pd.DataFrame({"label_idx": labels, "group": [f"g{i // 2}" for i in range(len(labels))]})
    return np.stack(imgs).astype(np.float32), table


def frame_detector(x):
    """A 'model' that looks only at the border: P(abnormal) = how bright the outermost ring is."""
    ring = np.concatenate([x[:, 0, :, :], x[:, -1, :, :], x[:, :, 0, :], x[:, :, -1, :]], axis=1).mean(axis=(1, 2))
    p = (ring > 200).astype(float)
    return np.stack([1 - p, p], axis=1)


def test_a_border_only_model_loses_its_score_when_the_border_is_cropped():
    x, table = _border_world()
    res = sc.border_crop_scores(frame_detector, table, ["normal", "abnormal"], ["abnormal"], 40, keeps=(1.0, 0.7),
                                n_boot=50, images=lambda k: sc.crop_border(x, k))
    assert set(res) == {"1", "0.7"}
    assert res["1"]["macro_f1"] == 1.0 and res["1"]["abnormal_auc"] == 1.0
    assert res["0.7"]["abnormal_auc"] == 0.5 and res["0.7"]["recall"] == {"normal": 1.0, "abnormal": 0.0}
    assert res["0.7"]["macro_f1"] < 0.5
    assert res["1"]["macro_f1_low"] <= res["1"]["macro_f1"] <= res["1"]["macro_f1_high"]
    assert "groups" in res["1"]["interval_method"]
    tab = sc.border_crop_table({"frame detector": res})
    assert tab.loc[("frame detector", 0.7), "d_auc"] == pytest.approx(-0.5)
    assert tab.loc[("frame detector", 1.0), "d_macro_f1"] == 0.0
    assert tab.loc[("frame detector", 0.7), "recall abnormal"] == 0.0


def test_a_model_that_reads_the_cells_keeps_its_score():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 10)
    # the label is in the centre's tone (the "cells") and both classes wear the same frame
    x = np.stack([framed(40, 4, (200 if y else 80, int(rng.integers(90, 160)), 120), edge=(250, 250, 250))
                  for y in labels]).astype(np.float32)
    table = pd.DataFrame({"label_idx": labels, "group": [f"g{i}" for i in range(len(labels))]})

    def centre_reader(imgs):
        p = (imgs[:, 20, 20, 0] > 140).astype(float)
        return np.stack([1 - p, p], axis=1)

    res = sc.border_crop_scores(centre_reader, table, ["normal", "abnormal"], ["abnormal"], 40, keeps=(1.0, 0.7),
                                n_boot=20, images=lambda k: sc.crop_border(x, k))
    assert res["0.7"]["macro_f1"] == res["1"]["macro_f1"] == 1.0
    assert frame_detector(x)[:, 1].all()  # the frame alone says "abnormal" for every image here


def test_wrong_prediction_shape_is_refused():
    x, table = _border_world(n_per_class=3)
    with pytest.raises(ValueError, match="predict returned shape"):
        sc.border_crop_scores(lambda imgs: np.zeros((len(imgs), 3)), table, ["normal", "abnormal"], ["abnormal"], 40,
                              keeps=(1.0,), n_boot=5, images=lambda k: sc.crop_border(x, k))


def test_probe_predictor_maps_classifier_columns():
    from sklearn.linear_model import LogisticRegression

    feats = np.array([[0.0], [1.0], [0.1], [0.9]])
    clf = LogisticRegression().fit(feats, [0, 2, 0, 2])  # class 1 never seen in training

    def fm(x, training=False):
        assert training is False
        return x.reshape(len(x), -1)[:, :1] / 255.0

    x = np.zeros((2, 2, 2, 3), np.float32)
    x[1] = 255
    probs = sc.probe_predictor(fm, clf, 3, batch_size=1)(x)
    assert probs.shape == (2, 3) and np.all(probs[:, 1] == 0) and np.allclose(probs.sum(axis=1), 1)
    assert probs[0, 0] > 0.5 and probs[1, 2] > 0.5


@pytest.mark.slow
def test_probe_predictor_gives_the_probes_test_probabilities(three_class):
    from lib.image import probe
    from lib.image.input_pipeline import load_images

    t = three_class.table.reset_index(drop=True).copy()
    t["split"] = np.where(t.index % 3 == 0, "test", np.where(t.index % 3 == 1, "val", "train"))
    lp = probe.linear_probe(t, "efficientnet_lite0", 32, None, seed=5, batch_size=4)
    pred = probe.predictor(lp, "efficientnet_lite0", 32, None, seed=5, batch_size=4)
    for split, key in (("test", "probs"), ("val", "val_probs")):  # images through the backbone = cached features
        np.testing.assert_allclose(pred(load_images(t[t["split"] == split], 32)), lp[key], atol=1e-3)


def test_mask_border_paints_the_frame_without_zooming():
    x = np.stack([framed(), framed(centre=(10, 200, 30))]).astype(np.float32)
    out = sc.mask_border(x, 0.8)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[:, 4:36, 4:36], x[:, 4:36, 4:36])  # the centre is untouched: same scale
    assert np.allclose(out[0], 128) and np.allclose(out[1, 0, 0], (10, 200, 30))  # frame = the centre's mean
    np.testing.assert_array_equal(sc.mask_border(x, 1.0), x)
    xb, table = _border_world()
    res = sc.border_crop_scores(frame_detector, table, ["normal", "abnormal"], ["abnormal"], 40, keeps=(0.8,),
                                n_boot=20, images=lambda k: sc.mask_border(xb, k))
    assert res["0.8"]["abnormal_auc"] == 0.5


def test_scored_once_reuses_the_plain_test_views_of_the_flip_choice():
    """03's pattern: the flip choice scores the plain test images, the border check scores them again."""
    from lib.image import tta

    x, table = _border_world()
    classes, abnormal = ["normal", "abnormal"], ["abnormal"]
    calls = []

    def counting(imgs):
        calls.append(id(imgs))
        return frame_detector(imgs)

    once = sc.scored_once(counting)
    tta.choose_and_score(once, x.copy(), table, x, table, classes, abnormal, n_boot=20)
    assert len(calls) == 8  # four views of validation, four of test
    crops = {1.0: x, 0.7: sc.crop_border(x, 0.7)}
    res = sc.border_crop_scores(once, table, classes, abnormal, 40, keeps=(1.0, 0.7), n_boot=20, images=crops.get)
    assert len(calls) == 9  # the uncropped row was the plain test view already scored: only the 0.7 crop is new
    assert res == sc.border_crop_scores(frame_detector, table, classes, abnormal, 40, keeps=(1.0, 0.7), n_boot=20,
                                        images=crops.get)  # same numbers as without the wrapper
    once(x.copy())  # equal pixels, another array: scored again
    assert len(calls) == 10
