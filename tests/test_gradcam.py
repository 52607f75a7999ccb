"""Grad-CAM (lib.explain.gradcam): the plain-tape implementation against tf-keras-vis, the randomisation
sanity check, the two-input (fusion-shaped) model, and the pictures.

Keras tests use a tiny flat CNN trained for a few seconds on a task whose answer has a known place
(the class is *where* a bright blob sits), so a correct Grad-CAM must light up the blob.
"""
from __future__ import annotations

import numpy as np
import pytest

from lib.explain import gradcam

SIZE = 32
N_CLASSES = 3
BLOB_RADIUS = 4


def blob_images(n_per_class: int = 40, seed: int = 0):
    """Noisy grey images with one bright disc at a random place; the disc's colour (R, G, B) is the class.

    Returns ``(images, labels, centres)``; the answer has a known place, so Grad-CAM must light it up.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    xs, ys, centres = [], [], []
    for c in range(N_CLASSES):
        for _ in range(n_per_class):
            r, cc = rng.integers(BLOB_RADIUS + 1, SIZE - BLOB_RADIUS - 1, size=2)
            img = rng.normal(70, 12, (SIZE, SIZE, 3))
            img[(yy - r) ** 2 + (xx - cc) ** 2 <= BLOB_RADIUS ** 2, c] += 160
            xs.append(np.clip(img, 0, 255))
            ys.append(c)
            centres.append((r, cc))
    return np.asarray(xs, np.float32), np.asarray(ys), np.asarray(centres)


def tiny_cnn(n_out: int = N_CLASSES, seed: int = 0):
    """A flat CNN with the kit's layer names: ... -> top_activation -> avg_pool -> class_probs."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="top_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.8, name="top_bn")(x)
    x = keras.layers.ReLU(name="top_activation")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(16, activation="relu", name="image_embedding")(x)
    out = keras.layers.Dense(n_out, activation="softmax", name="class_probs")(x)
    return keras.Model(inp, out, name="tiny_cnn")


@pytest.fixture(scope="module")
def trained():
    """(model, images, labels): the tiny CNN after a few epochs (well above chance)."""
    import keras

    x, y, _ = blob_images()
    model = tiny_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=6, batch_size=30, verbose=0, shuffle=True)
    xt, yt, centres = blob_images(4, seed=1)
    acc = float((model.predict(xt, verbose=0).argmax(1) == yt).mean())
    assert acc > 0.8, f"fixture model did not learn the blob task (accuracy {acc:.2f})"
    model.blob_centres = centres
    return model, xt, yt


@pytest.fixture(scope="module")
def two_input():
    """A fusion-shaped model: image branch (flat) + tabular MLP, concatenated, one sigmoid ``risk``."""
    import keras

    keras.utils.set_random_seed(1)
    img = keras.Input((SIZE, SIZE, 3), name="image")
    tab = keras.Input((5,), name="tabular")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(img)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="top_conv")(x)
    x = keras.layers.ReLU(name="top_activation")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(8, activation="relu", name="image_embedding")(x)
    t = keras.layers.Dense(4, activation="relu", name="tabular_embedding")(tab)
    z = keras.layers.Concatenate(name="fusion")([x, t])
    out = keras.layers.Dense(1, activation="sigmoid", name="risk")(z)
    return keras.Model([img, tab], out, name="tiny_fusion")


# --------------------------------------------------------------------------- Keras-free helpers
def test_agreement_basic_cases():
    a = np.arange(16, dtype=float).reshape(1, 4, 4)
    assert gradcam.agreement(a, a)[0] == pytest.approx(1.0)
    assert gradcam.agreement(a, -a)[0] == pytest.approx(-1.0)
    assert gradcam.agreement(a, a ** 3)[0] == pytest.approx(1.0)  # ranks only
    blank = np.zeros_like(a)
    assert np.isnan(gradcam.agreement(a, blank)[0])
    assert gradcam.agreement(a, blank, undefined=0.0)[0] == 0.0
    assert gradcam.agreement(blank, blank)[0] == 1.0  # identical maps agree
    assert gradcam.agreement(a[0], a[0]).shape == (1,)
    with pytest.raises(ValueError, match="same shape"):
        gradcam.agreement(a, a[:, :2])


def test_overlay_dtype_shape_and_blend():
    img = np.full((20, 30, 3), 100, np.uint8)
    hm = np.linspace(0, 1, 12).reshape(3, 4)  # smaller than the image: resized
    out = gradcam.overlay(img, hm, alpha=0.4)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert np.array_equal(gradcam.overlay(img, hm, alpha=0.0), img)
    assert not np.array_equal(out, img)
    assert gradcam.overlay(img.astype(np.float32), hm).dtype == np.uint8  # 0..255 floats
    assert gradcam.overlay(img[..., 0], hm).shape == (20, 30, 3)  # gray
    with pytest.raises(ValueError, match="alpha"):
        gradcam.overlay(img, hm, alpha=1.5)
    with pytest.raises(ValueError, match="heatmap"):
        gradcam.overlay(img, np.full((3, 4), np.nan))


def test_save_overlay_png_atomic(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    path = gradcam.save_overlay_png(tmp_path / "figs" / "gradcam_x_0.png", img, np.eye(16), size=64, synthetic=True)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width == 64 and im.height > 64  # upscaled + synthetic band
    assert [p.name for p in path.parent.iterdir()] == ["gradcam_x_0.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match=".png"):
        gradcam.save_overlay_png(tmp_path / "x.jpg", img, np.eye(16))


def test_select_examples_and_gallery():
    import matplotlib.pyplot as plt

    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 1, 0])
    probs = np.eye(3)[pred] * 0.5 + 0.1
    probs[2, 0] = 0.9
    sel = gradcam.select_examples(y, pred, 3, per_class=2, probs=probs)
    first = sel[(sel.true == 0) & (sel.kind == "correct")]
    assert list(first["index"]) == [2, 0]  # most confident first
    assert set(sel[sel.true == 2]["kind"]) == {"wrong"}
    images = np.random.default_rng(0).uniform(0, 255, (6, 8, 8, 3))
    fig, sel2 = gradcam.class_gallery(images, np.random.default_rng(1).uniform(size=(6, 8, 8)), y, pred,
                                      ["a", "b", "c"], probs=probs, per_class=2)
    assert len(fig.axes) == 3 * 4 + 1  # 3 classes x (2 correct + 2 wrong) panels, and the colour bar
    assert sum(bool(ax.get_images()) for ax in fig.axes) == 6  # every example shown once
    assert {"true_class", "pred_class"} <= set(sel2.columns)
    plt.close(fig)
    assert gradcam.slug("Superficial-Intermediate") == "superficial-intermediate"


# --------------------------------------------------------------------------- Keras
@pytest.mark.slow
def test_heatmap_shape_range_and_localisation(trained):
    model, x, y = trained
    maps, targets = gradcam.gradcam_tape(model, x, target=y, return_targets=True)
    assert maps.shape == (len(x), SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.allclose(maps.reshape(len(x), -1).max(axis=1), 1.0)
    assert np.array_equal(targets, y)
    raw = gradcam.gradcam_tape(model, x[:2], target=0, resize=False)
    assert raw.shape == (2, SIZE // 2, SIZE // 2)
    # the evidence for the class is the coloured disc: the hottest pixel must lie on or next to it
    hits = 0
    for m, (r0, c0) in zip(maps, model.blob_centres):
        r, cc = np.unravel_index(np.argmax(m), m.shape)
        hits += np.hypot(r - r0, cc - c0) <= BLOB_RADIUS + 3
    assert hits / len(y) >= 0.75, f"Grad-CAM peak near the blob in only {hits}/{len(y)} images"
    one = gradcam.gradcam_tape(model, x[0])  # a single image, predicted class
    assert one.shape == (1, SIZE, SIZE)


@pytest.mark.slow
def test_tape_agrees_with_tf_keras_vis(trained):
    model, x, y = trained
    probs_before = model.predict(x, verbose=0)
    tape = gradcam.gradcam_tape(model, x, target=y)
    same_grid = gradcam.gradcam_tfkv(model, x, target=y, expand_cam=False)
    own_zoom = gradcam.gradcam_tfkv(model, x, target=y)
    assert np.nanmean(gradcam.agreement(tape, same_grid)) > 0.99
    assert np.nanmean(gradcam.agreement(tape, own_zoom)) > 0.9
    pp = gradcam.gradcam_tfkv(model, x, target=y, method="gradcam++")
    assert pp.shape == tape.shape and pp.min() >= 0 and pp.max() <= 1
    # ReplaceToLinear worked on a clone: the caller's model still outputs probabilities
    assert model.get_layer("class_probs").activation.__name__ == "softmax"
    np.testing.assert_allclose(model.predict(x, verbose=0), probs_before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        gradcam.gradcam_tfkv(model, x, target=y, method="scorecam")


@pytest.mark.slow
def test_randomize_top_layers_is_a_clone_and_changes_maps(trained):
    model, x, y = trained
    before = [w.copy() for w in model.get_weights()]
    rnd = gradcam.randomize_top_layers(model, from_layer="top_conv", seed=3)
    after = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "the original model was modified"
    assert rnd.randomized_layers == ["top_conv", "top_bn", "image_embedding", "class_probs"]
    assert not np.allclose(rnd.get_layer("top_conv").get_weights()[0], model.get_layer("top_conv").get_weights()[0])
    np.testing.assert_array_equal(rnd.get_layer("conv1").get_weights()[0], model.get_layer("conv1").get_weights()[0])
    assert np.allclose(rnd.get_layer("top_bn").get_weights()[3], 1.0)  # BatchNorm variance back to its initializer
    trained_maps = gradcam.gradcam_tape(model, x, target=y)
    rnd_maps = gradcam.gradcam_tape(rnd, x, target=y)
    rho_rand = np.mean(gradcam.agreement(trained_maps, rnd_maps, undefined=0.0))
    rho_same = np.nanmean(gradcam.agreement(trained_maps, gradcam.gradcam_tfkv(model, x, target=y)))
    assert rho_rand < rho_same - 0.3, f"randomised maps still agree: {rho_rand:.2f} vs {rho_same:.2f}"
    assert gradcam.randomize_top_layers(model, n_layers=1).randomized_layers == ["class_probs"]
    with pytest.raises(ValueError, match="from_layer"):
        gradcam.randomize_top_layers(model, from_layer="nope")
    with pytest.raises(ValueError, match="n_layers"):
        gradcam.randomize_top_layers(model, n_layers=0)


@pytest.mark.slow
def test_cascading_randomization_table(trained):
    model, x, y = trained
    before = [w.copy() for w in model.get_weights()]
    table, maps = gradcam.cascading_randomization(model, x[:6], y[:6], steps=("class_probs", "top_conv", "missing", "all"),
                                                  keep_maps=True)
    assert list(table["randomized_from"]) == ["class_probs", "top_conv", "all"]
    assert list(table["layers_randomized"]) == [1, 4, 5]
    assert set(maps) == {"class_probs", "top_conv", "all"} and maps["all"].shape == (6, SIZE, SIZE)
    assert table["spearman_mean"].between(-1, 1).all()
    one_step = gradcam.randomize_top_layers(model, from_layer="top_conv", seed=0)  # same weights as the cascade's step
    np.testing.assert_allclose(gradcam.gradcam_tape(one_step, x[:6], target=y[:6]), maps["top_conv"], atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.slow
def test_two_input_model(two_input):
    model = two_input
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    tab = rng.normal(size=(4, 5)).astype(np.float32)
    feed = {"image": img, "tabular": tab}
    np.testing.assert_allclose(gradcam.predict(model, inputs=feed, batch_size=3),
                               model.predict(feed, verbose=0), rtol=1e-5, atol=1e-6)
    tape = gradcam.gradcam_tape(model, None, target=None, inputs=feed)
    assert tape.shape == (4, SIZE, SIZE) and 0 <= tape.min() and tape.max() <= 1
    ref = gradcam.gradcam_tfkv(model, None, target=None, inputs=feed)  # expand_cam=False inside
    assert ref.shape == tape.shape
    assert np.nanmean(gradcam.agreement(tape, ref)) > 0.99
    neg = gradcam.gradcam_tape(model, img, target=0, inputs={"tabular": tab})  # images= fills inputs["image"]
    assert neg.shape == tape.shape
    with pytest.raises(ValueError, match="expand_cam"):
        gradcam.gradcam_tfkv(model, None, target=None, inputs=feed, expand_cam=True)
    with pytest.raises(ValueError, match="tabular"):
        gradcam.gradcam_tape(model, img)  # the tabular input is missing
    with pytest.raises(ValueError, match="missing"):
        gradcam.gradcam_tape(model, None, inputs={"image": img})


def _residual_cnn():
    """A flat CNN whose feature map ``mid`` is bypassed by a skip connection: it cannot be cut there."""
    import keras

    keras.utils.set_random_seed(2)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    mid = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="mid")(x)
    x = keras.layers.Add(name="skip")([x, mid])
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    out = keras.layers.Dense(N_CLASSES, activation="softmax", name="class_probs")(x)
    return keras.Model(inp, out, name="residual_cnn")


@pytest.mark.slow
def test_cut_at_the_feature_map_gives_the_whole_tapes_maps(trained, two_input, monkeypatch):
    """The backbone below the feature map runs once without a tape; the maps equal those of a tape that
    records the whole forward pass, for a classifier and for the two-input model; a model that cannot
    be cut at the layer (a skip connection bypasses it) falls back to the whole tape."""
    model, x, y = trained
    rng = np.random.default_rng(0)
    feed = {"image": rng.uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32),
            "tabular": rng.normal(size=(5, 5)).astype(np.float32)}
    cut = [gradcam.gradcam_tape(model, x[:20], target=y[:20], normalize=False),
           gradcam.gradcam_tape(two_input, None, inputs=feed, normalize=False)]
    assert gradcam._split_at_feature_map(model, model.get_layer("top_activation"), "image",
                                         [model.outputs[0]]) is not None
    residual = _residual_cnn()
    assert gradcam._split_at_feature_map(residual, residual.get_layer("mid"), "image", [residual.outputs[0]]) is None
    assert gradcam.gradcam_tape(residual, x[:3], layer_name="mid").shape == (3, SIZE, SIZE)
    monkeypatch.setattr(gradcam, "_split_at_feature_map", lambda *a: None)  # record everything, as before
    whole = [gradcam.gradcam_tape(model, x[:20], target=y[:20], normalize=False),
             gradcam.gradcam_tape(two_input, None, inputs=feed, normalize=False)]
    for a, b in zip(cut, whole):
        assert a.shape == b.shape and np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


@pytest.mark.slow
def test_missing_layer_gives_clear_error(trained):
    model, x, _ = trained
    with pytest.raises(ValueError) as e:
        gradcam.gradcam_tape(model, x[:1], layer_name="top_activaton")
    msg = str(e.value)
    assert "'top_activaton'" in msg and "top_activation" in msg and "top_conv" in msg
    with pytest.raises(ValueError, match="top_activaton"):
        gradcam.gradcam_tfkv(model, x[:1], target=0, layer_name="top_activaton")
    with pytest.raises(ValueError, match="4-D"):
        gradcam.gradcam_tape(model, x[:1], layer_name="avg_pool")
    with pytest.raises(ValueError, match="target"):
        gradcam.gradcam_tape(model, x[:1], target=N_CLASSES)


@pytest.mark.slow
def test_real_image_branch_graph():
    """The kit's own flat EfficientNet-Lite0 branch (64 px, random weights): both implementations agree."""
    from lib.image.image_model import build_image_classifier

    model = build_image_classifier(5, "efficientnet_lite0", 64, weights=None, augment=True)
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    tape = gradcam.gradcam_tape(model, x, target=[0, 1, 2])
    ref = gradcam.gradcam_tfkv(model, x, target=[0, 1, 2], expand_cam=False)
    assert tape.shape == (3, 64, 64)
    assert np.nanmean(gradcam.agreement(tape, ref)) > 0.99


# --------------------------------------------------------------------------- notebook 06's steps
def test_save_gallery_pngs_numbers_per_class_and_clears_old_runs(tmp_path):
    from PIL import Image

    (tmp_path / "gradcam_b_7.png").write_bytes(b"stale")       # an older run's file: removed
    (tmp_path / "gradcam_other_0.png").write_bytes(b"keep")     # not one of these classes: kept
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 0])
    sel = gradcam.select_examples(y, pred, 2, per_class=2)
    images = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3))
    names = gradcam.save_gallery_pngs(tmp_path, images, np.random.default_rng(1).uniform(size=(5, 8, 8)), sel,
                                      ["a", "b"])
    assert names == ["gradcam_a_0.png", "gradcam_a_1.png", "gradcam_b_0.png", "gradcam_b_1.png", "gradcam_b_2.png"]
    assert not (tmp_path / "gradcam_b_7.png").exists() and (tmp_path / "gradcam_other_0.png").read_bytes() == b"keep"
    with Image.open(tmp_path / names[0]) as im:
        assert im.format == "PNG"


def test_agreement_table_per_class_means_and_total():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(4, 5, 5))
    tbl, summary = gradcam.agreement_table({"same": (a, a), "reversed": (a, -a)}, labels=["x", "x", "y", "y"])
    assert list(tbl.columns) == ["class", "same", "reversed"] and len(tbl) == 4
    assert list(summary.index) == ["x", "y", "all test images"]
    assert list(summary["images"]) == [2, 2, 4]
    np.testing.assert_allclose(summary["same"], 1.0)
    np.testing.assert_allclose(summary["reversed"], -1.0)


def test_notebook06_inputs_missing_or_mismatched_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebooks/03_image_branch.ipynb first"):
        gradcam.load_explained_model("smoke", models_dir=tmp_path)
    assert gradcam.explain_fusion(tmp_path / "hybrid_cervical_model.keras", np.zeros((1, 8, 8, 3)), None) is None


