"""lib.image.tta: exact flips, averaging over views, and a choice made on validation only."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib import config
from lib.image import shortcuts, tta

SIZE = 4


def corner_model():
    """A real (tiny) Keras model whose class-1 logit reads only the top-left pixel of the first channel:
    it is not flip-invariant, so flips change its predictions in a known way."""
    import keras

    inp = keras.Input((SIZE, SIZE, 3), name="image")
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    w = np.zeros((SIZE * SIZE * 3, 2), np.float32)
    w[0, 1] = 4.0                       # pixel (0, 0), channel 0
    model.layers[-1].set_weights([w, np.array([0.0, -2.0], np.float32)])  # class 1 iff that pixel > 0.5
    return model


def random_model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x))
    return keras.Model(inp, out)


def corners(*which):
    """A (SIZE, SIZE, 3) image, zero except for bright corners among 'tl', 'tr', 'bl', 'br'."""
    x = np.zeros((SIZE, SIZE, 3), np.float32)
    pos = {"tl": (0, 0), "tr": (0, SIZE - 1), "bl": (SIZE - 1, 0), "br": (SIZE - 1, SIZE - 1)}
    for w in which:
        x[pos[w]] = 1.0
    return x


def table(labels, prefix):
    labels = np.asarray(labels)
    return pd.DataFrame({"label_idx": labels, "label": [f"c{v}" for v in labels],
                         "group": [f"{prefix}{i}" for i in range(len(labels))]})


def test_flip_views_are_exact_flips():
    x = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3)).astype(np.float32)
    ident, h, v, both = tta.flip_views(x)
    np.testing.assert_array_equal(ident, x)
    np.testing.assert_array_equal(h, np.flip(x, axis=2))
    np.testing.assert_array_equal(v, np.flip(x, axis=1))
    np.testing.assert_array_equal(both, np.flip(np.flip(x, axis=1), axis=2))
    assert h[0, 0, 0, 0] == x[0, 0, 6, 0] and v[0, 0, 0, 0] == x[0, 4, 0, 0] and both[0, 0, 0, 0] == x[0, 4, 6, 0]
    assert len(tta.VIEWS) == 4
    with pytest.raises(ValueError, match="images"):
        tta.flip_views(np.zeros((5, 7, 3)))


def test_flips_of_a_flip_invariant_input_equal_the_plain_prediction():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 255, (6, SIZE, SIZE, 3)).astype(np.float32)
    sym = (base + base[:, :, ::-1] + base[:, ::-1] + base[:, ::-1, ::-1]) / 4  # invariant under both flips
    predict = shortcuts.keras_predictor(random_model(), batch_size=4)
    plain = predict(sym)
    np.testing.assert_allclose(tta.with_flips(predict)(sym), plain, rtol=1e-5, atol=1e-6)
    # and on an ordinary input the average is the mean of the four views' predictions
    views = tta.view_probs(predict, base)
    assert views.shape == (4, 6, 3)
    np.testing.assert_allclose(tta.with_flips(predict)(base), views.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(views[1], predict(base[:, :, ::-1]), rtol=1e-5, atol=1e-6)


def test_the_probe_predictor_averages_over_flipped_features():
    import keras
    from sklearn.linear_model import LogisticRegression

    keras.utils.set_random_seed(2)
    inp = keras.Input((SIZE, SIZE, 3))
    feat = keras.Model(inp, keras.layers.Dense(5)(keras.layers.Flatten()(inp)))
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (12, SIZE, SIZE, 3)).astype(np.float32)
    y = np.arange(12) % 2
    from lib.predict import predict as batched

    clf = LogisticRegression().fit(batched(feat, x), y)
    predict = shortcuts.probe_predictor(feat, clf, n_classes=2, batch_size=5)
    expected = np.mean([clf.predict_proba(batched(feat, v)) for v in tta.flip_views(x)], axis=0)
    np.testing.assert_allclose(tta.with_flips(predict)(x), expected, rtol=1e-6)


def test_choose_flips_picks_the_higher_validation_score_ties_none():
    assert tta.choose_flips(0.8, 0.9) is True
    assert tta.choose_flips(0.9, 0.8) is False
    assert tta.choose_flips(0.85, 0.85) is False
    assert tta.choose_flips(0.9, 0.8, mode=True) is True
    assert tta.choose_flips(0.8, 0.9, mode=False) is False
    with pytest.raises(ValueError, match="test_time_flips"):
        tta.choose_flips(0.8, 0.9, mode="yes")


def test_the_choice_follows_validation_even_when_test_favours_the_other():
    predict = shortcuts.keras_predictor(corner_model())
    only_tl = corners("tl")                  # plain: class 1; three of four flipped views: class 0
    all_but_tl = corners("tr", "bl", "br")   # plain: class 0; three of four flipped views: class 1
    x = np.stack([only_tl, all_but_tl] * 2)
    assert predict(x).argmax(1).tolist() == [1, 0, 1, 0]
    assert tta.with_flips(predict)(x).argmax(1).tolist() == [0, 1, 0, 1]
    classes = ["c0", "c1"]
    flips_right, plain_right = table([0, 1, 0, 1], "v"), table([1, 0, 1, 0], "t")
    kw = dict(classes=classes, abnormal_classes=["c1"], n_boot=20)
    # validation favours flips, test favours none: flips chosen, test reported for flips
    r = tta.choose_and_score(predict, x, flips_right, x, plain_right, **kw)
    assert r["use_flips"] is True
    assert r["val"]["flips"]["macro_f1"] == 1.0 and r["val"]["plain"]["macro_f1"] == 0.0
    assert r["chosen"] is r["test"]["flips"] and r["chosen"]["macro_f1"] == 0.0
    assert r["unchosen"]["macro_f1"] == 1.0
    # the mirror case: validation favours none
    r = tta.choose_and_score(predict, x, plain_right, x, flips_right, **kw)
    assert r["use_flips"] is False and r["chosen"] is r["test"]["plain"] and r["chosen"]["macro_f1"] == 0.0
    # forcing overrides the validation scores, which are still reported
    r = tta.choose_and_score(predict, x, plain_right, x, flips_right, mode=True, **kw)
    assert r["use_flips"] is True and r["chosen"]["macro_f1"] == 1.0
    s = tta.summary(r)
    assert s["val_macro_f1_plain"] == 1.0 and s["val_macro_f1_flips"] == 0.0 and s["test_macro_f1_unchosen"] == 0.0
    assert "forced" in tta.describe("m", r)
    table_ = tta.comparison_table({"m": r})
    assert list(table_.index) == ["m, flip TTA"] and table_.loc["m, flip TTA", "test_macro_f1_unchosen"] == 0.0


def test_the_knob_is_in_both_profiles_and_validated():
    for name in config.PROFILES:
        assert config.run_params(name)["test_time_flips"] == "auto"
    assert config.run_params("smoke", test_time_flips=False)["test_time_flips"] is False
    with pytest.raises(ValueError, match="test_time_flips"):
        config.run_params("smoke", test_time_flips="on")
    with pytest.raises(ValueError, match="test_time_flips"):
        config.run_params("smoke", test_time_flips=1)


def test_the_site_headline_says_when_flips_were_used():
    from lib.report.site import LESSONS

    h = {"macro_f1": 0.9, "macro_f1_low": 0.8, "macro_f1_high": 0.95, "probe_macro_f1": 0.85,
         "abnormal_auc": 0.97, "probe_abnormal_auc": 0.96, "gap_naive_same_images": 0.2,
         "gap_regularized_same_images": 0.1}
    show = {topic: f for topic, f in LESSONS["03_image_branch"]}
    f1 = next(f for t, f in show.items() if "linear probe" in t)
    plain = f1({}, {**h, "tta_finetuned": False, "tta_probe": False})
    assert "TTA" not in plain
    both = f1({}, {**h, "tta_finetuned": True, "tta_probe": False})
    assert both.startswith("fine-tuned (flip TTA) ") and "linear probe (flip TTA)" not in both
    assert "TTA" not in f1({}, h)  # records written before the knob existed
