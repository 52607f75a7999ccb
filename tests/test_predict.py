"""lib.predict: the one batched forward pass; image models run as a cached graph, same numbers as eager."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from lib import predict as P

pytestmark = pytest.mark.slow


def tiny_image_model(seed=0, two_inputs=False):
    import keras

    keras.utils.set_random_seed(seed)
    img = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu")(img)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    inputs = [img]
    if two_inputs:
        tab = keras.Input((5,), name="tabular")
        inputs.append(tab)
        h = keras.layers.Concatenate()([h, tab])
    out = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(inputs if two_inputs else img, out)


def test_graph_pass_equals_eager_call_in_batches():
    m = tiny_image_model()
    x = np.random.default_rng(1).uniform(0, 255, (37, 16, 16, 3)).astype("float32")
    want = np.asarray(m(x, training=False))
    got = P.predict(m, x, batch_size=8)  # 5 batches, the last one short: one trace, free batch size
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(P._GRAPHS[m]) == 1
    np.testing.assert_allclose(P.predict(m, list(x[None])[0]), want, rtol=1e-5, atol=1e-6)


def test_two_inputs_by_name_and_by_order_and_training_mode():
    m = tiny_image_model(two_inputs=True)
    rng = np.random.default_rng(2)
    x, t = rng.uniform(0, 255, (9, 16, 16, 3)).astype("float32"), rng.normal(size=(9, 5)).astype("float32")
    want = np.asarray(m([x, t], training=False))
    np.testing.assert_allclose(P.predict(m, {"image": x, "tabular": t}, batch_size=4), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(P.predict(m, [x, t], batch_size=4), want, rtol=1e-5, atol=1e-6)
    # training=True: BatchNorm uses the batch's statistics, so one batch of all rows equals the eager call
    train = np.asarray(m([x, t], training=True))
    np.testing.assert_allclose(P.predict(m, [x, t], batch_size=9, training=True), train, rtol=1e-4, atol=1e-5)


def test_cache_does_not_keep_models_alive_and_many_models_trace_quietly(caplog):
    import weakref

    for seed in range(8):  # one trace per model: TensorFlow's "retracing" warning is not shown
        P.predict(tiny_image_model(seed), np.zeros((2, 16, 16, 3), "float32"))
    assert "retracing" not in caplog.text
    m = tiny_image_model()
    P.predict(m, np.zeros((2, 16, 16, 3), "float32"))
    r = weakref.ref(m)
    del m
    gc.collect()
    assert r() is None


def test_feature_vectors_stay_eager():
    import keras

    inp = keras.Input((4,))
    m = keras.Model(inp, keras.layers.Dense(1)(inp))
    x = np.ones((3, 4), "float32")
    np.testing.assert_allclose(P.predict(m, x), np.asarray(m(x)), rtol=1e-6)
    assert m not in P._GRAPHS
