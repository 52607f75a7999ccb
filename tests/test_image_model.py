"""lib.image.image_model: flat graph with the contract's layer names, recipes, a tiny end-to-end train."""
from __future__ import annotations

import numpy as np
import pytest

from lib import config
from lib.image import image_model as im

SIZE = 32  # smallest size the backbones accept: keeps these tests to seconds


def test_class_weights_only_when_unbalanced():
    assert im.class_weights([0, 1, 2] * 10, 3) is None
    w = im.class_weights([0] * 30 + [1] * 10 + [2] * 10, 3)
    assert w[1] == pytest.approx(3 * w[0]) and w[1] == w[2]
    with pytest.raises(ValueError, match="no training images"):
        im.class_weights([0, 0, 1], 3)


def test_gap_uses_restored_epoch_or_last():
    h = {"accuracy": [0.5, 0.8, 1.0], "val_accuracy": [0.4, 0.7, 0.6], "best_epoch": 2, "restored_best": False}
    assert im.gap(h) == pytest.approx(0.4)
    assert im.gap(dict(h, restored_best=True)) == pytest.approx(0.1)
    assert im.headline_accuracies(h)["val_acc"] == 0.6


def test_naive_settings_come_from_the_profile():
    """The naive recipe's epochs and subset are profile knobs of lib.config, overridable like any other."""
    assert {k: config.run_params("smoke")[k] for k in ("naive_epochs", "naive_train_images")} == {
        "naive_epochs": 8, "naive_train_images": None}
    assert config.run_params("full")["naive_train_images"] == 200
    assert config.run_params("full", naive_epochs=3)["naive_epochs"] == 3


def _accs(train_inf, train_bat, val_inf):
    return {"train, inference mode": train_inf, "train, training mode": train_bat,
            "validation, inference mode": val_inf, "validation, training mode": val_inf}


@pytest.mark.parametrize("accs, mechanism", [
    (_accs(0.96, 0.98, 0.60), "memorisation"),
    (_accs(0.55, 0.97, 0.30), "batchnorm_collapse"),
    (_accs(0.845, 0.980, 0.655), "both"),  # the full profile's naive run on the stand-in (200 images)
    (_accs(0.800, 0.988, 0.529), "both"),  # smoke: a drop of 0.188, but 0.271 memorised is the larger part
    (_accs(0.50, 0.60, 0.45), "underfit"),
])
def test_gap_mechanism_names_what_was_measured(accs, mechanism):
    mech, verdict = im.gap_mechanism(accs)
    assert mech == mechanism
    if mechanism != "underfit":  # both measured parts are printed, and they add up to the gap
        bn = accs["train, training mode"] - accs["train, inference mode"]
        mem = accs["train, inference mode"] - accs["validation, inference mode"]
        assert f"{bn:.3f} from batch statistics" in verdict and f"{mem:.3f} memorised" in verdict
        assert f"gap of {bn + mem:.3f}" in verdict
    if mechanism == "both":  # it fits with batch statistics: the verdict must not say it does not fit
        assert "does not fit" not in verdict and verdict.startswith("both")
    # the one-line meaning 02 and the index table print is the verdict's own first words
    assert verdict.split(":")[0] == im.MECHANISMS[mech].split(":")[0]


@pytest.fixture(scope="module")
def classifier():
    return im.build_image_classifier(4, "efficientnet_lite0", SIZE, weights=None, seed=1)


@pytest.mark.slow
def test_classifier_is_flat_with_contract_layer_names(classifier):
    import keras

    names = [layer.name for layer in classifier.layers]
    assert names[0] == "image"
    assert names[1:6] == ["aug_rotation", "aug_flip", "aug_zoom", "aug_brightness", "aug_contrast"]
    assert names[-5:] == ["avg_pool", "head_dropout_1", "image_embedding", "head_dropout_2", "class_probs"]
    assert names[-6] == "top_activation"
    assert not any(isinstance(layer, keras.Model) for layer in classifier.layers), "backbone must not be nested"
    assert classifier.get_layer("top_activation").output.shape[-1] == 1280
    assert classifier.output.shape == (None, 4)
    emb = im.embedding_model(classifier)
    assert emb.output.shape == (None, 512)
    out = emb.predict(np.zeros((2, SIZE, SIZE, 3), "float32"), verbose=0)
    assert out.shape == (2, 512)


@pytest.mark.slow
def test_regularized_recipe_freezes_lower_blocks_and_all_batchnorm():
    r = im.regularized_recipe(3, "efficientnet_lite0", SIZE, weights=None, train_labels=[0] * 9 + [1] * 3 + [2] * 3)
    m = r.model
    bns = [layer for layer in m.layers if im.is_batchnorm(layer)]
    assert bns and not any(layer.trainable for layer in bns)
    assert not m.get_layer("stem_conv").trainable and not m.get_layer("block5a_expand_conv").trainable
    assert not m.get_layer("block6b_expand_conv").trainable
    assert m.get_layer("block6c_expand_conv").trainable and m.get_layer("top_conv").trainable
    assert all(m.get_layer(n).trainable for n in ("image_embedding", "class_probs"))
    assert r.class_weight is not None and r.class_weight[1] > r.class_weight[0]
    assert any(type(c).__name__ == "EarlyStopping" and c.monitor == "val_accuracy" for c in r.callbacks)
    assert m.get_layer("head_dropout_1").rate == pytest.approx(0.3)
    s = im.trainable_summary(m)
    assert s["batchnorm_trainable"] == 0 and 0 < s["trainable_layers"] < s["layers_with_weights"]


@pytest.mark.slow
def test_tiny_end_to_end_three_classes(three_class, tmp_path):
    from lib.image import input_pipeline as ip

    ds = three_class
    assert ds.classes == ["alpha", "beta", "gamma"] and len(ds.table) == 21
    t = ds.table.reset_index(drop=True)
    train_t, val_t = t.iloc[[i for i in range(21) if i % 7 < 5]], t.iloc[[i for i in range(21) if i % 7 >= 5]]
    naive = im.naive_recipe(len(ds.classes), "efficientnet_lite0", SIZE, weights=None)
    assert not any(layer.name.startswith("aug_") for layer in naive.model.layers)
    assert all(layer.trainable for layer in naive.model.layers if layer.weights)
    assert naive.model.get_layer("head_dropout_1").rate == 0 and not naive.callbacks
    # train the regularized recipe: tracing a whole-network train step costs minutes on a busy 2-core box
    r = im.regularized_recipe(len(ds.classes), "efficientnet_lite0", SIZE, weights=None,
                              train_labels=train_t.label_idx)
    tr = ip.make_dataset(train_t, SIZE, 8, training=True)
    va = ip.make_dataset(val_t, SIZE, 8)
    h = im.train(r.model, tr, va, 1, log=False, n_train=len(train_t), **r.fit_kwargs)
    assert h["epochs_run"] == 1 and len(h["val_accuracy"]) == 1 and h["train_images_per_s"] > 0
    ev = im.evaluate(r.model, va, val_t, ds.classes, ds.abnormal_classes, n_boot=10)
    assert np.asarray(ev["confusion_matrix"]).shape == (3, 3) and ev["n"] == len(val_t)
    assert ev["probs"].shape == (len(val_t), 3)
    assert np.allclose(ev["abnormal_score"], ev["probs"][:, 2])
    assert ev["binary"] is not None and 0.0 <= ev["binary"]["auc"]["value"] <= 1.0
    table = im.per_class_table(ev)
    assert list(table.index[:3]) == ds.classes and "f1-score" in table.columns
    path = im.save_model(r.model, tmp_path / "image_branch.keras")
    again = im.load_model(path)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    assert np.allclose(again.predict(x, verbose=0), r.model.predict(x, verbose=0), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["image_branch.keras"]


def test_strategy_is_default_without_several_gpus():
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) > 1:
        pytest.skip("several GPUs visible")
    assert im.strategy() is tf.distribute.get_strategy()


def test_macro_f1_counts_every_class_and_the_interval_brackets_it():
    y, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 0, 1, 1])
    assert im.macro_f1(y, pred, 3) == pytest.approx((0.8 + 0.4 + 0.0) / 3)
    assert im.macro_f1(y, pred, 4) == pytest.approx((0.8 + 0.4) / 4)  # a class nobody has still counts, as 0
    ci = im.macro_f1_interval(y, pred, groups=np.arange(6), n_labels=3, n_boot=50, seed=0)
    assert ci["value"] == pytest.approx(im.macro_f1(y, pred, 3)) and ci["ci_low"] <= ci["value"] <= ci["ci_high"]


def test_learning_curves_mark_the_restored_epoch_or_the_kept_head_only_stage():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = {"accuracy": [0.5, 0.7], "val_accuracy": [0.4, 0.6], "loss": [1.0, 0.8], "val_loss": [1.1, 0.9],
         "restored_best": True, "best_epoch": 2}
    kept = {**h, "kept_linear_probe": True, "linear_probe": {"val_accuracy": [0.5, 0.65]}}
    fig = im.plot_learning_curves({"fine-tuned": h, "kept": kept})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "fine-tuned: restored epoch" in labels and "kept: restored epoch" not in labels
    assert "kept: head-only stage kept (validation)" in labels
    line = next(x for x in fig.axes[0].get_lines() if x.get_label().startswith("kept: head-only"))
    assert list(line.get_ydata()) == [0.65, 0.65]
    plt.close(fig)
