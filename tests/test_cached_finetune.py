"""Training the top of the image branch on cached activations of its frozen bottom (lib.image.cached_finetune)."""
from __future__ import annotations

import numpy as np
import pytest

from lib.image import cached_finetune as cf
from lib.image import image_model as im

SIZE = 32


def _recipe(seed=3, labels=None):
    import keras

    keras.utils.set_random_seed(seed)  # weights=None: the backbone's random initialisation is seeded too
    return im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights=None, seed=seed, train_labels=labels)


@pytest.mark.slow
def test_split_model_composes_back_to_the_image_branch():
    r = _recipe()
    augmenter, bottom, top, cut = cf.split_model(r.model)
    assert cut == "block6c_expand_conv"
    assert [layer.name for layer in augmenter.layers] == ["aug_rotation", "aug_flip", "aug_zoom", "aug_brightness",
                                                          "aug_contrast"]
    assert not any(layer.trainable_weights for layer in bottom.layers if layer.trainable)
    # the top owns the model's own variables: training it trains the image branch
    top_ids = {id(v) for v in top.trainable_weights}
    assert top_ids == {id(v) for v in r.model.trainable_weights}
    x = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    whole = r.model(x, training=False).numpy()
    parts = top(bottom(x, training=False), training=False).numpy()
    np.testing.assert_allclose(parts, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_split_model_refuses_a_fully_frozen_model():
    r = _recipe()
    for layer in r.model.layers:
        layer.trainable = False
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        cf.split_model(r.model)


@pytest.mark.slow
def test_views_are_augmented_clean_view_is_not_and_reruns_repeat(three_class):
    t = three_class.table.reset_index(drop=True)
    r = _recipe()
    augmenter, bottom, _, _ = cf.split_model(r.model)
    views = cf.compute_views(augmenter, bottom, t, SIZE, 8, 2, progress=False)
    assert views.shape[:2] == (2, len(t)) and views.dtype == np.float32
    scale = np.abs(views).max()  # random weights: tiny activations, so compare relative to their scale
    assert scale > 0 and np.abs(views[0] - views[1]).max() > 1e-2 * scale, "views must differ (augmentation on)"
    clean = cf.compute_views(augmenter, bottom, t, SIZE, 8, 0, progress=False)
    from lib.image.input_pipeline import load_images

    ref = bottom(load_images(t, SIZE).astype("float32"), training=False).numpy()
    np.testing.assert_allclose(clean[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    again = _recipe()  # same seeds: the same weights and augmentation draws
    a2, b2, _, _ = cf.split_model(again.model)
    np.testing.assert_allclose(cf.compute_views(a2, b2, t, SIZE, 8, 2, progress=False), views, rtol=1e-4,
                               atol=1e-4 * scale)
    with pytest.raises(ValueError, match="'views'"):
        cf.compute_views(augmenter, bottom, t, SIZE, 8, -1, progress=False)


def test_view_sequence_shows_every_image_once_per_epoch_in_varying_views():
    acts = np.stack([np.full((10, 2), v, np.float32) + np.arange(10, dtype=np.float32)[:, None] * 10
                     for v in range(3)])  # acts[v, i] = 10*i + v
    seq = cf._view_sequence_class()(acts, np.arange(10) % 2, 4, np.linspace(1, 2, 10).astype("float32"), seed=0)
    assert len(seq) == 3

    def epoch():
        xs, ws = [], []
        for i in range(len(seq)):
            x, y, w = seq[i]
            assert x.shape[1:] == (2,) and len(x) == len(y) == len(w)
            xs.append(x[:, 0])
            ws.append(w)
        got = np.concatenate(xs)
        return got // 10, got % 10, np.concatenate(ws)

    img1, view1, w1 = epoch()
    assert sorted(img1) == list(range(10))  # each image once
    np.testing.assert_allclose(w1, np.linspace(1, 2, 10)[img1.astype(int)])  # weights follow their image
    seq.on_epoch_end()
    img2, view2, _ = epoch()
    assert sorted(img2) == list(range(10))
    assert not (np.array_equal(img1, img2) and np.array_equal(view1, view2))
    assert set(view1) | set(view2) <= {0, 1, 2} and len(set(view1) | set(view2)) > 1


@pytest.mark.slow
def test_fit_top_trains_the_image_branch_top_only(three_class):
    t = three_class.table.reset_index(drop=True)
    train_t, val_t = t[t.index % 3 != 0], t[t.index % 3 == 0]
    r = _recipe(labels=train_t.label_idx)
    m = r.model
    frozen_before = m.get_layer("block5a_expand_conv").get_weights()[0].copy()
    top_before = m.get_layer("top_conv").get_weights()[0].copy()
    head_before = m.get_layer("class_probs").get_weights()[0].copy()
    h = cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=2, views=2, log=False, progress=False)
    assert h["epochs_run"] == 2 and len(h["val_accuracy"]) == 2 and h["views"] == 2
    assert h["cut_layer"] == "block6c_expand_conv" and h["cache_mb"] > 0 and h["train_images_per_s"] > 0
    # Keras 3 EarlyStopping puts the best epoch's weights back at the end of fit, stopped early or not
    assert h["restored_best"] is True and h["best_epoch"] == int(np.argmax(h["val_accuracy"])) + 1
    np.testing.assert_array_equal(m.get_layer("block5a_expand_conv").get_weights()[0], frozen_before)
    assert not np.array_equal(m.get_layer("top_conv").get_weights()[0], top_before)
    assert not np.allclose(m.get_layer("class_probs").get_weights()[0], head_before)
    # the image branch itself predicts with the trained weights
    from lib.image.input_pipeline import make_dataset

    ev = im.evaluate(m, make_dataset(val_t, SIZE, 4), val_t, three_class.classes, three_class.abnormal_classes,
                     n_boot=5)
    assert ev["n"] == len(val_t)
    with pytest.raises(ValueError, match="'views'"):
        cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=1, views=0, log=False, progress=False)
