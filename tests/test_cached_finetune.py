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


# --------------------------------------------------------------------------- LP-FT and the other knobs
def _lp_recipe(labels=None, **kw):
    import keras

    keras.utils.set_random_seed(3)
    return im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights=None, seed=3, train_labels=labels, **kw)


def _halves(three_class):
    t = three_class.table.reset_index(drop=True)
    return t[t.index % 3 != 0], t[t.index % 3 == 0]


@pytest.mark.slow
def test_linear_probe_stage_trains_the_head_only(three_class):
    train_t, val_t = _halves(three_class)
    r = _lp_recipe(train_t.label_idx, linear_probe_epochs=3, linear_probe_patience=5)
    m = r.model
    a = cf.cache_activations(r, train_t, val_t, SIZE, 4, views=2, progress=False)
    assert a["train"].shape[:2] == (2, len(train_t)) and len(a["val"]) == len(val_t)
    top_before = m.get_layer("top_conv").get_weights()[0].copy()
    head_before = [w.copy() for w in m.get_layer("class_probs").get_weights()]
    pooled = cf.pooled_features(m, a["val"])
    assert pooled.shape == (len(val_t), m.get_layer("avg_pool").output.shape[-1])
    h = cf.linear_probe_stage(r, a["train"], train_t.label_idx.to_numpy(), a["val"], val_t.label_idx.to_numpy(), 4)
    assert h["epochs_run"] == 3
    np.testing.assert_array_equal(m.get_layer("top_conv").get_weights()[0], top_before)  # top blocks untouched
    # the head learned (random-init features are tiny, so the biases move most)
    assert any(not np.allclose(w, b) for w, b in zip(m.get_layer("class_probs").get_weights(), head_before))
    # pooled features are what the frozen backbone gives for the clean images
    from lib.image.input_pipeline import load_images

    ref = im.backbone_view(m)(load_images(val_t, SIZE), training=False).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(pooled, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_lp_ft_runs_both_stages_and_saves_the_same_flat_graph(three_class, tmp_path):
    train_t, val_t = _halves(three_class)
    r = _lp_recipe(train_t.label_idx, linear_probe_epochs=2, lr=3e-5, lr_schedule="cosine", label_smoothing=0.1)
    assert r.settings["linear_probe_epochs"] == 2 and "cosine" in r.settings["optimizer"]
    assert "label smoothing 0.1" in r.settings["loss"]
    m = r.model
    names_before = [layer.name for layer in m.layers]
    frozen_before = m.get_layer("block5a_expand_conv").get_weights()[0].copy()
    top_before = m.get_layer("top_conv").get_weights()[0].copy()
    h = cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=2, views=2, log=False, progress=False)
    assert h["linear_probe"]["epochs_run"] == 2 and h["epochs_run"] == 2
    np.testing.assert_array_equal(m.get_layer("block5a_expand_conv").get_weights()[0], frozen_before)
    assert not np.array_equal(m.get_layer("top_conv").get_weights()[0], top_before)
    path = im.save_model(m, tmp_path / "branch.keras")
    back = im.load_model(path)
    assert [layer.name for layer in back.layers] == names_before  # flat graph, augmentation layers included
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(back.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_reused_activations_are_checked_against_the_model_and_tables(three_class):
    train_t, val_t = _halves(three_class)
    r = _lp_recipe(train_t.label_idx)
    a = cf.cache_activations(r, train_t, val_t, SIZE, 4, views=2, progress=False)
    h = cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=1, views=1, log=False, progress=False, activations=a)
    assert h["views"] == 1 and h["cut_layer"] == a["cut_layer"]
    with pytest.raises(ValueError, match="2 views, 3 asked"):
        cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=1, views=3, log=False, progress=False, activations=a)
    with pytest.raises(ValueError, match="rows"):
        cf.fit_top(r, train_t.iloc[1:], val_t, SIZE, 4, epochs=1, views=1, log=False, progress=False, activations=a)
    deeper = _lp_recipe(train_t.label_idx, unfreeze_from="block7a")
    with pytest.raises(ValueError, match="block7a"):
        cf.fit_top(deeper, train_t, val_t, SIZE, 4, epochs=1, views=1, log=False, progress=False, activations=a)


def test_label_smoothing_loss_matches_smoothed_one_hot_cross_entropy():
    y = np.array([0, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], np.float32)
    got = np.asarray(cf._loss(3, 0.1)(y.astype("float32"), p))
    target = np.full((3, 3), 0.1 / 3) + 0.9 * np.eye(3)[y]
    np.testing.assert_allclose(got, -(target * np.log(p)).sum(axis=1), rtol=1e-5)
    assert cf._loss(3, 0.0) == "sparse_categorical_crossentropy"


def test_cosine_schedule_decays_to_zero_over_the_fine_tuning_steps():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    cf._compile_stage(model, 1e-3, 3, schedule="cosine", total_steps=4)
    x, y = np.zeros((8, 2), np.float32), np.zeros(8, np.int32)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # 4 steps
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="'lr_schedule'"):
        cf._compile_stage(model, 1e-3, 3, schedule="step")


@pytest.mark.parametrize("kw, name", [(dict(linear_probe_epochs=-1), "linear_probe_epochs"),
                                      (dict(linear_probe_epochs=True), "linear_probe_epochs"),
                                      (dict(lr_schedule="step"), "lr_schedule"),
                                      (dict(label_smoothing=0.7), "label_smoothing")])
def test_regularized_recipe_refuses_bad_options_before_building(kw, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights=None, **kw)


@pytest.mark.slow
def test_default_recipe_is_lp_ft_at_the_lower_rate_and_explicit_settings_win():
    r = _lp_recipe()
    assert r.settings["linear_probe_epochs"] == im.LINEAR_PROBE_EPOCHS > 0 and r.lr == im.LP_FT_LEARNING_RATE
    joint = _lp_recipe(linear_probe_epochs=0)
    assert joint.settings["linear_probe_epochs"] == 0 and joint.lr == im.LEARNING_RATE
    assert _lp_recipe(lr=5e-4).lr == 5e-4


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(im.FINE_TUNE_DEPTHS))
def test_each_fine_tune_depth_builds_the_recipe_it_names(depth):
    """What notebook 03 passes for ``fine_tune``: the cut, the rate and the early-stopping patience reach the model."""
    import keras

    opts = im.FINE_TUNE_DEPTHS[depth]
    keras.utils.set_random_seed(3)
    r = im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights=None, seed=3, **opts)
    cut = im.trainable_summary(r.model)["first_trainable_backbone_layer"]
    assert cut.startswith(opts["unfreeze_from"] + "_") and cf.split_model(r.model)[3] == cut
    assert r.lr == opts["lr"] and f"lr={opts['lr']:g}" in r.settings["optimizer"]
    stop = next(c for c in r.callbacks if isinstance(c, keras.callbacks.EarlyStopping))
    assert stop.patience == opts.get("patience", 3) and f"patience {stop.patience}," in r.settings["early_stopping"]
    assert stop.restore_best_weights


@pytest.mark.slow
def test_fine_tuning_worse_than_its_head_only_start_hands_back_the_head_only_weights(three_class):
    """A diverging fine-tune (Adam at lr 100) must not replace the head-only stage it started from."""
    import keras

    train_t, val_t = _halves(three_class)
    keras.utils.set_random_seed(3)
    r = im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights="imagenet", seed=3, train_labels=train_t.label_idx,
                              linear_probe_epochs=5, lr=100.0)
    h = cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=2, views=2, log=False, progress=False)
    lp_best = max(h["linear_probe"]["val_accuracy"])
    assert lp_best == 1.0 and max(h["val_accuracy"]) < lp_best  # the colours are easy; lr 100 wrecks the top
    assert h["kept_linear_probe"] is True
    assert im.accuracy(r.model, val_t, SIZE, 4) == pytest.approx(lp_best)  # the model is the head-only stage again
    keras.utils.set_random_seed(3)
    sane = im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights="imagenet", seed=3,
                                 train_labels=train_t.label_idx, linear_probe_epochs=5)
    assert cf.fit_top(sane, train_t, val_t, SIZE, 4, epochs=2, views=2, log=False,
                      progress=False)["kept_linear_probe"] is False


@pytest.mark.slow
def test_macro_f1_monitor_is_logged_each_epoch_and_picks_the_restored_weights(three_class):
    """``monitor="val_macro_f1"``: early stopping and the head-only comparison judge on macro-F1 computed each
    epoch on the validation activations; the weights handed back score what the record says."""
    import keras

    train_t, val_t = _halves(three_class)
    keras.utils.set_random_seed(3)
    r = im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights="imagenet", seed=3, train_labels=train_t.label_idx,
                              linear_probe_epochs=1, lr=1e-3, monitor="val_macro_f1")
    assert r.settings["monitor"] == "val_macro_f1" and r.settings["early_stopping"].startswith("val_macro_f1")
    a = cf.cache_activations(r, train_t, val_t, SIZE, 4, views=2, progress=False)
    h = cf.fit_top(r, train_t, val_t, SIZE, 4, epochs=3, views=2, log=False, progress=False, activations=a)
    f1s = h["val_macro_f1"]
    assert len(f1s) == h["epochs_run"] == 3 and all(0.0 <= v <= 1.0 for v in f1s)
    assert h["best_epoch"] == int(np.argmax(f1s)) + 1
    top = cf.split_model(r.model)[2]
    y_val = val_t["label_idx"].to_numpy()
    now = cf.val_macro_f1(top, a["val"], y_val, 3)
    expected = h["linear_probe"]["start_score"] if h["kept_linear_probe"] else max(f1s)
    assert now == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="'monitor'"):
        im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights=None, monitor="val_auc")


def test_val_macro_f1_counts_every_class():
    class Fixed:  # a plain function stands in for a model (lib.predict runs it as it is)
        def __call__(self, x, training=False):
            return np.eye(3)[np.asarray(x[:, 0], int)]

    x = np.array([[0.0], [0.0], [1.0], [1.0]])
    assert cf.val_macro_f1(Fixed(), x, np.array([0, 0, 1, 2]), 3) == pytest.approx((1 + 2 / 3 + 0) / 3)
