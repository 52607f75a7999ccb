"""lib.training: the one early-stopping loop of the tabular MLP and the fusion heads (real Keras models)."""
from __future__ import annotations

import numpy as np
import pytest

from lib import metrics, training

pytestmark = pytest.mark.slow


def two_input_model(seed=0, n_a=3, n_b=2):
    import keras

    keras.utils.set_random_seed(seed)
    a, b = keras.Input((n_a,), name="a"), keras.Input((n_b,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(8, activation="relu")(h)
    h = keras.layers.Dropout(0.2, seed=seed)(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    m = keras.Model([a, b], out)
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return m


def data(n=240, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    xa = rng.normal(size=(n, 3)).astype("float32")
    xa[:, 0] += 1.5 * y
    xb = rng.normal(size=(n, 2)).astype("float32")
    return [xa, xb], y


def test_class_weights_balance_the_classes():
    w = training.class_weights([0, 0, 0, 1])
    assert w == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}
    with pytest.raises(ValueError, match="both classes"):
        training.class_weights([1, 1])


def test_two_inputs_learn_stop_early_and_restore_the_best_epoch():
    x, y = data()
    tr, va = slice(0, 160), slice(160, None)
    m = two_input_model()
    info = training.fit_binary(m, [a[tr] for a in x], y[tr], [a[va] for a in x], y[va], epochs=200, seed=3,
                               patience=5, monitor="val_loss")
    h = info["history"]
    assert info["epochs_run"] < 200 and info["epochs_run"] == len(h["loss"]) == len(h["val_loss"])
    assert info["epochs_run"] - info["best_epoch"] == 5  # stopped `patience` epochs after the best one
    assert info["best_val_loss"] == min(h["val_loss"])
    # the restored weights are the best epoch's: their validation loss is the recorded minimum
    p = np.clip(m.predict([a[va] for a in x], verbose=0).ravel().astype("float64"), 1e-7, 1 - 1e-7)
    cw = training.class_weights(y[tr])
    w = np.where(y[va] > 0, cw[1], cw[0])
    yv = y[va]
    assert float(-np.mean(w * (yv * np.log(p) + (1 - yv) * np.log(1 - p)))) == pytest.approx(info["best_val_loss"], rel=1e-4)
    assert metrics.roc_auc(yv, p) > 0.75


def test_same_seed_same_model_and_reset_reuses_the_trace():
    x, y = data()
    a = two_input_model(seed=5)
    t = training.BinaryTrainer(a, batch_size=16)
    i1 = t.fit(x, y, x, y, epochs=6, seed=2, monitor="val_auc")
    p1 = t.predict(x)
    t.reset(two_input_model(seed=5))  # same start as a fresh model of the same seed
    i2 = t.fit(x, y, x, y, epochs=6, seed=2, monitor="val_auc")
    np.testing.assert_array_equal(t.predict(x), p1)
    assert i1 == i2
    b = two_input_model(seed=5)
    training.fit_binary(b, x, y, x, y, epochs=6, seed=2, batch_size=16, monitor="val_auc")
    np.testing.assert_allclose(b.predict(x, verbose=0).ravel(), p1, atol=1e-6)
    t.reset(two_input_model(seed=6))
    t.fit(x, y, x, y, epochs=6, seed=2, monitor="val_auc")
    assert not np.allclose(t.predict(x), p1)  # another seed, another model


def test_without_validation_all_epochs_run():
    x, y = data()
    info = training.fit_binary(two_input_model(), x, y, epochs=4, seed=0)
    assert info["epochs_run"] == 4 and info["best_epoch"] == 4 and info["best_val_loss"] is None


def test_frozen_layers_do_not_change():
    import keras

    x, y = data()
    m = two_input_model()
    dense = [layer for layer in m.layers if isinstance(layer, keras.layers.Dense)][0]
    dense.trainable = False
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    before = [w.copy() for w in dense.get_weights()]
    training.fit_binary(m, x, y, epochs=3, seed=0)
    for b, a in zip(before, dense.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_name_the_parameter():
    x, y = data()
    m = two_input_model()
    with pytest.raises(ValueError, match="'epochs'"):
        training.fit_binary(m, x, y, epochs=0)
    with pytest.raises(ValueError, match="'monitor'"):
        training.fit_binary(m, x, y, epochs=2, monitor="accuracy")
    with pytest.raises(ValueError, match="'batch_size'"):
        training.BinaryTrainer(m, batch_size=0)
    with pytest.raises(ValueError, match="x_tr"):
        training.fit_binary(m, [x[0][:10], x[1]], y, epochs=1)
    with pytest.raises(ValueError, match="variables"):
        training.BinaryTrainer(m).reset(two_input_model(n_a=4))
