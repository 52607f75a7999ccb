"""Grad-CAM for the image branch and the fusion model: a plain ``GradientTape`` implementation,
the tf-keras-vis reference (Grad-CAM and Grad-CAM++), the agreement between maps, the
model-randomisation sanity check, and overlays / galleries.

    from lib.explain import gradcam
    maps = gradcam.gradcam_tape(model, images, target=classes_idx)            # (n, H, W) in [0, 1]
    ref = gradcam.gradcam_tfkv(model, images, target=classes_idx)             # tf-keras-vis
    gradcam.agreement(maps, ref)                                              # Spearman per image, ~1
    rnd = gradcam.randomize_top_layers(model, from_layer="top_conv", seed=0)  # a clone; model untouched
    gradcam.agreement(maps, gradcam.gradcam_tape(rnd, images, target=classes_idx))  # should drop

What Grad-CAM computes (Selvaraju et al. 2017), for one image and a target score ``y`` (the logit
of the target class, i.e. the score *before* softmax/sigmoid, as in the paper):

    A = conv feature map at ``layer_name`` (h x w x K)     alpha_k = mean over h, w of dy/dA_k
    cam = ReLU(sum_k alpha_k A_k)  -> resized to the input size -> min-max normalised to [0, 1]

Targets: an integer class index (the same for every image) or one per image for a softmax model;
``None`` means each image's predicted class.  For a single-unit sigmoid model (the fusion model's
``risk``) ``None`` / ``1`` explains the positive (risk) score and ``0`` the negative one.

tf-keras-vis traps handled here (DESIGN.md section 6):

* the model must be flat (the backbone's layers in the model's own graph) - ``lib.image.image_model`` is;
* ``penultimate_layer="top_activation"`` alone is **not** enough: with the default
  ``seek_penultimate_conv_layer=True`` tf-keras-vis walks back from the named layer to the nearest
  *Conv* layer and uses ``top_conv`` (before BatchNorm and ReLU6).  :func:`gradcam_tfkv` passes
  ``seek_penultimate_conv_layer=False`` so both implementations explain the same tensor;
* on a model with two inputs (image + tabular) the default ``expand_cam=True`` raises "sequence
  argument must have length equal to input rank" (it tries to zoom the 2-D map to the tabular
  input's shape); :func:`gradcam_tfkv` uses ``expand_cam=False`` and resizes the map itself;
* ``ReplaceToLinear`` edits a *clone* (tf-keras-vis clones the model when a modifier is given), so
  the caller's model keeps its softmax; cloning costs a few seconds for EfficientNet: call
  :func:`gradcam_tfkv` once with all images rather than once per image.

Sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps"): an explanation that barely
changes when the model's top layers are re-initialised does not explain the *trained* model.
:func:`randomize_top_layers` returns such a clone; compare its maps with :func:`agreement`.
"""
from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import numpy as np

from lib.atomic import atomic_path

DEFAULT_LAYER = "top_activation"
DEFAULT_RANDOMIZE_FROM = "top_conv"
METHODS = ("gradcam", "gradcam++")
NOISE_FLOOR = 1e-6
"""Raw Grad-CAM values at or below this (in units of the target logit) are set to 0 before the maps are
scaled to [0, 1]: a map of float32 round-off (e.g. a fully randomised network whose activations vanish)
is shown as blank instead of being min-max stretched into a pattern."""
_EPS = 1e-7
#: model -> {feature-map layer: (bottom, head, other inputs) or None}; entries go with their model
_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- model plumbing
def _layer_names(model) -> list[str]:
    return [layer.name for layer in model.layers]


def spatial_layers(model) -> list[str]:
    """Names of layers with a 4-D output (batch, h, w, channels), last first: Grad-CAM candidates."""
    out = []
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # input layers of nested graphs, multi-output layers
            continue
        if len(shape) == 4 and not layer.name.startswith("aug_"):
            out.append(layer.name)
    return out


def _get_layer(model, layer_name: str):
    """``model.get_layer(layer_name)`` with a clear ``ValueError`` naming the layer and the candidates."""
    if not isinstance(layer_name, str) or layer_name not in _layer_names(model):
        cands = spatial_layers(model)
        shown = ", ".join(cands[:12]) + (f", ... ({len(cands) - 12} more)" if len(cands) > 12 else "")
        raise ValueError(
            f"parameter 'layer_name': model {model.name!r} has no layer {layer_name!r}. "
            f"Layers with a spatial (4-D) output, last first: {shown or 'none'}. "
            "Grad-CAM needs the model built flat (lib.image.image_model); a backbone nested as one layer hides them."
        )
    layer = model.get_layer(layer_name)
    if len(layer.output.shape) != 4:
        raise ValueError(f"parameter 'layer_name': layer {layer_name!r} has output shape {tuple(layer.output.shape)}; "
                         f"Grad-CAM needs a 4-D conv feature map. Candidates: {', '.join(spatial_layers(model)[:12])}")
    return layer


def _input_names(model) -> list[str]:
    return [t.name for t in model.inputs]


def _image_input_name(model) -> str:
    """The image input: the one named ``image`` (the kit's contract), else the only 4-D input."""
    names = _input_names(model)
    if "image" in names:
        return "image"
    four_d = [t.name for t in model.inputs if len(t.shape) == 4]
    if len(four_d) != 1:
        raise ValueError(f"model {model.name!r}: cannot tell which input is the image (inputs {names}); "
                         "name it 'image'")
    return four_d[0]


def _as_inputs(model, images, inputs) -> tuple[dict, str]:
    """``{input name: float32 array}`` for every model input, and the image input's name."""
    names = _input_names(model)
    img_name = _image_input_name(model)
    if inputs is None:
        if len(names) != 1:
            raise ValueError(f"model {model.name!r} has inputs {names}: pass inputs={{name: array}} for all of them "
                             "(images may then be None)")
        if images is None:
            raise ValueError("parameter 'images': expected a batch of images, got None")
        feed = {img_name: images}
    else:
        if not isinstance(inputs, dict):
            raise ValueError(f"parameter 'inputs': expected a dict {{input name: array}} with keys {names}, "
                             f"got {type(inputs).__name__}")
        feed = dict(inputs)
        if images is not None:
            feed[img_name] = images
        missing = [n for n in names if n not in feed]
        extra = [k for k in feed if k not in names]
        if missing or extra:
            raise ValueError(f"parameter 'inputs': model {model.name!r} has inputs {names}; "
                             f"missing {missing}, unexpected {extra}")
    out = {}
    for t in model.inputs:
        arr = np.asarray(feed[t.name], dtype=np.float32)
        if arr.ndim == len(t.shape) - 1:  # a single example
            arr = arr[None]
        if arr.ndim != len(t.shape) or any(s is not None and s != a for s, a in zip(t.shape[1:], arr.shape[1:])):
            raise ValueError(f"input {t.name!r}: expected shape (n, {', '.join(str(s) for s in t.shape[1:])}), "
                             f"got {arr.shape}")
        out[t.name] = arr
    n = {a.shape[0] for a in out.values()}
    if len(n) != 1:
        raise ValueError(f"inputs have different numbers of rows: { {k: v.shape[0] for k, v in out.items()} }")
    return out, img_name


def _output_layer(model):
    if len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.outputs)} outputs; Grad-CAM here needs exactly one")
    return model.outputs[0]._keras_history[0]


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else "linear"


def _is_binary(model) -> bool:
    return int(model.outputs[0].shape[-1]) == 1


def _targets(model, target, n: int, probs=None):
    """Per-image targets: class indices (softmax) or booleans (single-unit sigmoid: explain the positive)."""
    if _is_binary(model):
        if target is None:
            return np.ones(n, dtype=bool)
        t = np.asarray(target).reshape(-1)
        if t.size == 1:
            t = np.repeat(t, n)
        if t.size != n or not np.isin(t.astype(float), (0.0, 1.0)).all():
            raise ValueError(f"parameter 'target': for a single-output model expected None, 0/1 or {n} of them, got {target!r}")
        return t.astype(bool)
    n_classes = int(model.outputs[0].shape[-1])
    if target is None:
        if probs is None:
            raise ValueError("parameter 'target': None needs the model's predictions")
        return np.asarray(probs).argmax(axis=1).astype(int)
    t = np.asarray(target).reshape(-1)
    if t.size == 1:
        t = np.repeat(t, n)
    if t.size != n or not np.issubdtype(t.dtype, np.integer) or (t < 0).any() or (t >= n_classes).any():
        raise ValueError(f"parameter 'target': expected a class index in 0..{n_classes - 1} (or one per image, "
                         f"{n} in all), got {target!r}")
    return t.astype(int)


#: images per Grad-CAM gradient pass.  It mattered when the tape recorded the whole backbone (16 instead of
#: 32 took notebook 06's full-profile peak from 6.49 GB to 5.04 GB); now the tape records only the head
#: above the feature map, except for a model that cannot be cut there (:func:`_split_at_feature_map`)
GRADIENT_BATCH = 16


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def predict(model, images=None, inputs=None, batch_size: int = 32) -> np.ndarray:
    """The model's outputs for ``images`` (or ``inputs`` as in :func:`gradcam_tape`), in eager batches.

    Same numbers as ``model.predict``, but without its ``tf.data`` machinery, which on TF 2.21 logs a
    timestamped ``node_def_util ... use_unbounded_threadpool`` line to stderr (noise that breaks nbval).
    Multi-input models are called with a dict by input name (no structure warning).
    """
    from lib.predict import predict as batched

    feed, _ = _as_inputs(model, images, inputs)
    names = _input_names(model)
    return batched(model, {k: feed[k] for k in names} if len(names) > 1 else feed[names[0]], batch_size=int(batch_size))


# --------------------------------------------------------------------------- map post-processing
def normalize_maps(cams) -> np.ndarray:
    """Min-max normalise each map of ``(n, h, w)`` to [0, 1] (an all-constant map becomes zeros)."""
    cams = np.asarray(cams, dtype=np.float32)
    lo = cams.min(axis=(1, 2), keepdims=True)
    hi = cams.max(axis=(1, 2), keepdims=True)
    return np.clip((cams - lo) / np.maximum(hi - lo, _EPS), 0.0, 1.0).astype(np.float32)


def resize_maps(cams, size) -> np.ndarray:
    """Bilinear resize of ``(n, h, w)`` maps to ``size`` = ``(H, W)`` (or an int), then normalise.

    Pillow's bilinear filter on float images (pixel centres aligned, edges clamped; the same
    convention as ``tf.image.resize``), so pictures need no TensorFlow.
    """
    from PIL import Image

    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim == 2:
        cams = cams[None]
    size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    if cams.shape[1:] != size:
        cams = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((size[1], size[0]), Image.BILINEAR))
                         for c in cams]).astype(np.float32)
    return normalize_maps(cams)


# --------------------------------------------------------------------------- Grad-CAM, plain tape
def _split_at_feature_map(model, conv_layer, img_name: str, outputs):
    """``(bottom, head, other input names)``: ``bottom`` maps the image to ``conv_layer``'s output, ``head``
    maps that feature map (and the model's other inputs, e.g. the fusion model's tabular one) to
    ``outputs``; ``None`` when the model cannot be cut there (a connection bypasses the layer, or it is
    not a single tensor), and then Grad-CAM records the whole forward pass instead."""
    import keras

    key = conv_layer.name  # the image input and the outputs follow from the model itself
    per_model = _SPLITS.setdefault(model, {})
    if key in per_model:  # built once per model: the app explains every request with the same two models,
        return per_model[key]  # and lib.predict keeps the bottom's traced graph as long as the bottom lives
    feature = conv_layer.output
    if isinstance(feature, (list, tuple)):
        per_model[key] = None
        return None
    others = [t for t in model.inputs if t.name != img_name]
    image = next(t for t in model.inputs if t.name == img_name)
    try:
        bottom = keras.Model(image, feature, name="gradcam_bottom")
        head = keras.Model([feature, *others] if others else feature, outputs, name="gradcam_head")
    except ValueError:  # the head needs a tensor computed below the feature map other than through it
        per_model[key] = None
        return None
    per_model[key] = (bottom, head, [t.name for t in others])
    return per_model[key]


def gradcam_tape(model, images, target=None, layer_name: str = DEFAULT_LAYER, inputs=None,
                 batch_size: int = GRADIENT_BATCH, resize: bool = True, return_targets: bool = False,
                 normalize: bool = True):
    """Grad-CAM with a plain ``tf.GradientTape``: ``(n, H, W)`` float32 maps in [0, 1].

    ``images``: ``(n, H, W, 3)`` (or one ``(H, W, 3)``) float RGB in 0..255, what the model takes.
    ``target``: see the module docstring (``None``: predicted class / the positive score).
    ``inputs``: for a model with several inputs, ``{"image": ..., "tabular": ...}`` (``images`` may then
    be ``None``; when given it replaces ``inputs["image"]``); gradients flow to ``layer_name`` in the
    image branch only, the other inputs are held fixed.
    The score is the output layer's *logit* when that layer is a ``Dense`` with a softmax/sigmoid
    activation (as in the Grad-CAM paper and in tf-keras-vis with ``ReplaceToLinear``), else the output.
    ``resize=False`` returns the maps at the feature-map resolution (``h x w``), normalised.
    ``return_targets=True`` returns ``(maps, targets)``.

    The gradient is needed only from the score back to the feature map, so the backbone below it runs
    once, without a tape, as a traced graph, and the tape records the head alone.  Measured on
    EfficientNet-Lite0 at 224 px (96 images, 2-core CPU): 8.2 s -> 1.9 s, peak RSS 2.9 -> 1.2 GB, one
    image 0.45 -> 0.06 s, maps identical to a tape over the whole forward pass (which remains the path
    for a model with a connection around the layer).
    """
    import keras
    import tensorflow as tf

    conv_layer = _get_layer(model, layer_name)
    feed, img_name = _as_inputs(model, images, inputs)
    out_layer = _output_layer(model)
    dense_logit = isinstance(out_layer, keras.layers.Dense) and _activation_name(out_layer) in ("softmax", "sigmoid")
    head_in = out_layer.input if dense_logit else model.outputs[0]
    names = _input_names(model)
    n = next(iter(feed.values())).shape[0]
    split = _split_at_feature_map(model, conv_layer, img_name, [head_in, model.outputs[0]])
    if split is not None:
        # Grad-CAM needs dy/dA only from the score back to the feature map A: the backbone below A runs
        # once, without a tape, as a traced graph; the tape records the small head alone
        from lib.predict import predict as batched

        bottom, head, others = split
        feature_maps = batched(bottom, feed[img_name], batch_size=32)
    else:  # a connection bypasses the feature map: record the whole forward pass
        grad_model = keras.Model({t.name: t for t in model.inputs} if len(names) > 1 else model.inputs[0],
                                 [conv_layer.output, head_in, model.outputs[0]])
    maps, targets = [], []
    for sl in _batches(n, int(batch_size)):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            if split is not None:
                conv = tf.convert_to_tensor(feature_maps[sl])
                tape.watch(conv)
                rest = [tf.convert_to_tensor(feed[name][sl]) for name in others]
                h, probs = head([conv, *rest] if rest else conv, training=False)
            else:
                xs = {name: tf.convert_to_tensor(feed[name][sl]) for name in names}
                tape.watch(list(xs.values()))
                conv, h, probs = grad_model(xs if len(names) > 1 else xs[names[0]], training=False)
            if dense_logit:
                score = tf.matmul(h, tf.convert_to_tensor(out_layer.kernel))
                if out_layer.use_bias:
                    score = score + tf.convert_to_tensor(out_layer.bias)
            else:
                score = h
            t = _targets(model, target if target is None or np.size(target) == 1 else np.asarray(target).reshape(-1)[sl],
                         sl.stop - sl.start, probs=probs.numpy())
            if _is_binary(model):
                chosen = score[:, 0] * tf.constant(np.where(t, 1.0, -1.0), dtype=score.dtype)
            else:
                chosen = tf.gather(score, tf.constant(t), axis=1, batch_dims=1)
        grads = tape.gradient(chosen, conv)
        if grads is None:
            raise ValueError(f"layer {layer_name!r} is not connected to the model's output: no gradient")
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(conv * weights, axis=-1)).numpy()
        maps.append(cam)
        targets.append(t)
    cams = np.concatenate(maps)
    if not normalize:  # raw ReLU(sum_k alpha_k A_k) at the feature-map resolution (magnitudes comparable)
        return (cams, np.concatenate(targets)) if return_targets else cams
    cams = np.where(cams > NOISE_FLOOR, cams, 0.0).astype(np.float32)
    cams = resize_maps(cams, feed[img_name].shape[1:3]) if resize else normalize_maps(cams)
    return (cams, np.concatenate(targets)) if return_targets else cams


# --------------------------------------------------------------------------- Grad-CAM, tf-keras-vis
def gradcam_tfkv(model, images, target=None, method: str = "gradcam", inputs=None,
                 layer_name: str = DEFAULT_LAYER, expand_cam: bool | None = None, batch_size: int = GRADIENT_BATCH):
    """Grad-CAM / Grad-CAM++ from tf-keras-vis: ``(n, H, W)`` float32 maps in [0, 1].

    ``method``: ``"gradcam"`` (``Gradcam``) or ``"gradcam++"`` (``GradcamPlusPlus``); scores
    ``CategoricalScore`` (softmax) or ``BinaryScore`` (single-unit sigmoid), ``ReplaceToLinear`` on a
    clone, ``penultimate_layer=layer_name`` with ``seek_penultimate_conv_layer=False``.
    ``expand_cam``: ``None`` = tf-keras-vis's own resize (scipy zoom) for a one-input model and
    ``expand_cam=False`` + :func:`resize_maps` for a multi-input model (where ``True`` fails);
    ``False`` forces the latter everywhere (same interpolation as :func:`gradcam_tape`).
    ``target`` and ``inputs`` as in :func:`gradcam_tape`.
    """
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import BinaryScore, CategoricalScore

    if method not in METHODS:
        raise ValueError(f"parameter 'method': expected one of {METHODS}, got {method!r}")
    _get_layer(model, layer_name)
    feed, img_name = _as_inputs(model, images, inputs)
    names = _input_names(model)
    multi = len(names) > 1
    if expand_cam is None:
        expand_cam = not multi
    if expand_cam and multi:
        raise ValueError("parameter 'expand_cam': True fails on a multi-input model in tf-keras-vis 0.8 "
                         "('sequence argument must have length equal to input rank'); use None or False")
    n = feed[img_name].shape[0]
    if target is None and not _is_binary(model):
        target = predict(model, inputs=feed, batch_size=batch_size).argmax(axis=1)
    t = _targets(model, target, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        viz = (Gradcam if method == "gradcam" else GradcamPlusPlus)(model, model_modifier=ReplaceToLinear(), clone=True)
    maps = []
    for sl in _batches(n, int(batch_size)):
        tt = t[sl]
        score = BinaryScore(tt.tolist()) if _is_binary(model) else CategoricalScore(tt.tolist())
        seed = [feed[k][sl] for k in names] if multi else feed[names[0]][sl]
        cam = viz(score, seed, penultimate_layer=layer_name, seek_penultimate_conv_layer=False,
                  expand_cam=bool(expand_cam), normalize_cam=True)
        maps.append(np.asarray(cam, dtype=np.float32).reshape((sl.stop - sl.start,) + np.shape(cam)[-2:]))
    cams = np.concatenate(maps)
    if not expand_cam:
        cams = resize_maps(cams, feed[img_name].shape[1:3])
    return np.clip(cams, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- comparing maps
def agreement(a, b, undefined: float = np.nan) -> np.ndarray:
    """Spearman rank correlation between maps ``a[i]`` and ``b[i]`` (flattened), one value per image.

    ``a``, ``b``: ``(n, H, W)`` or one ``(H, W)`` map each, same shape.  A constant map (e.g. all zero
    after the ReLU: the model sees no evidence for the target anywhere) has no ranking, so the
    correlation is undefined there: the result is ``undefined`` (default ``nan``; use ``np.nanmean``),
    except that two identical maps give 1.0.  The sanity check counts a blank map as "no agreement"
    with ``undefined=0.0``.
    """
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"agreement: maps must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[None], b[None]
    if a.ndim != 3:
        raise ValueError(f"agreement: expected (n, H, W) maps, got shape {a.shape}")
    out = np.full(a.shape[0], float(undefined))
    for i in range(a.shape[0]):
        x, y = a[i].ravel(), b[i].ravel()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            if np.array_equal(x, y):
                out[i] = 1.0
            continue
        out[i] = spearmanr(x, y).statistic
    return out


# --------------------------------------------------------------------------- model randomisation
def border_share(maps, frac: float = 0.15) -> np.ndarray:
    """Per map, the share of its (non-negative) mass that lies in the outer ``frac`` of the image on
    every side: a crude shortcut detector - evidence on an image's border (fill streaks left by
    augmentation, a slide edge) is not cytology.  NaN for a blank map."""
    m = np.clip(np.asarray(maps, dtype="float64"), 0, None)
    if m.ndim != 3:
        raise ValueError(f"maps: expected (n, height, width), got shape {m.shape}")
    if not 0 < frac < 0.5:
        raise ValueError(f"parameter 'frac': expected a fraction in (0, 0.5), got {frac!r}")
    h, w = m.shape[1:]
    bh, bw = max(1, int(round(h * frac))), max(1, int(round(w * frac)))
    inner = m[:, bh:h - bh, bw:w - bw].sum(axis=(1, 2))
    total = m.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - inner / total, np.nan)


def _fresh_value(layer, var, seed: int):
    """A re-initialised value for ``var`` of ``layer`` from the layer's own initializer (seeded)."""
    import keras

    name = var.name.split("/")[-1].split(":")[0]
    candidates = [f"{name}_initializer"]
    if name in ("kernel", "depthwise_kernel"):
        candidates += ["depthwise_initializer", "kernel_initializer"]
    if name == "pointwise_kernel":
        candidates += ["pointwise_initializer"]
    init = next((getattr(layer, c) for c in candidates if getattr(layer, c, None) is not None), None)
    if init is None:
        init = keras.initializers.GlorotUniform() if len(var.shape) >= 2 else keras.initializers.Zeros()
    init = keras.initializers.get(init)
    cfg = init.get_config()
    if "seed" in cfg:
        init = type(init).from_config({**cfg, "seed": int(seed)})
    return np.asarray(init(tuple(var.shape), dtype=var.dtype))


def _randomize_layer(layer, seed: int) -> None:
    """Re-initialise every weight of ``layer`` in place; the seed of each weight is derived from ``seed``,
    the layer's name and the weight's position, so the same layer gets the same values whichever way
    (one step or a cascade) it is reached."""
    import zlib

    for j, var in enumerate(layer.weights):
        var.assign(_fresh_value(layer, var, (int(seed) + zlib.crc32(f"{layer.name}/{j}".encode())) % (2 ** 31)))


def top_weighted_layers(model, n_layers: int | None = None, from_layer: str | None = None) -> list[str]:
    """Names of the layers :func:`randomize_top_layers` would re-initialise (in graph order)."""
    weighted = [layer for layer in model.layers if layer.weights]
    if n_layers is not None and from_layer is not None:
        raise ValueError("randomize_top_layers: pass n_layers or from_layer, not both")
    if n_layers is None and from_layer is None:
        from_layer = DEFAULT_RANDOMIZE_FROM
    if n_layers is not None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or not 1 <= n_layers <= len(weighted):
            raise ValueError(f"parameter 'n_layers': expected an integer in 1..{len(weighted)} "
                             f"(layers with weights), got {n_layers!r}")
        return [layer.name for layer in weighted[-int(n_layers):]]
    names = _layer_names(model)
    if from_layer not in names:
        raise ValueError(f"parameter 'from_layer': model {model.name!r} has no layer {from_layer!r}; "
                         f"layers with weights, last first: {', '.join(l.name for l in weighted[::-1][:12])}")
    start = names.index(from_layer)
    return [layer.name for layer in model.layers[start:] if layer.weights]


def randomize_top_layers(model, n_layers: int | None = None, from_layer: str | None = None, seed: int = 0):
    """A clone of ``model`` whose top layers have freshly initialised weights; ``model`` is untouched.

    Which layers: the last ``n_layers`` layers that have weights, or every layer with weights from
    ``from_layer`` on (graph order); neither given = from ``"top_conv"`` (the last conv block and the
    head).  Each weight is redrawn from its layer's own initializer (seeded; BatchNorm goes back to
    gamma 1, beta 0, mean 0, variance 1).  This is the cascading model-randomisation test of
    Adebayo et al. (2018).  The clone is not compiled.
    """
    import keras

    targets = top_weighted_layers(model, n_layers, from_layer)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for name in targets:
        _randomize_layer(clone.get_layer(name), seed)
    clone.randomized_layers = list(targets)
    return clone


def cascading_randomization(model, images, target, steps=("image_embedding", "top_conv", "block7a_expand_conv", "all"),
                            seed: int = 0, layer_name: str = DEFAULT_LAYER, inputs=None, reference=None,
                            keep_maps: bool = False):
    """Adebayo et al.'s cascade: re-initialise more and more layers from the top, compare maps each time.

    ``steps``: ``from_layer`` names, top first (each step randomises every weighted layer from there on,
    cumulatively; ``"all"`` = every layer with weights; names the model lacks are skipped).  ``target``:
    fixed per-image targets (pass the trained model's, so both maps explain the same class).
    ``reference``: the trained model's maps (computed with :func:`gradcam_tape` when ``None``).
    Returns ``(table, maps)``: a DataFrame with one row per step (``randomized_from``,
    ``layers_randomized``, ``spearman_mean`` counting blank maps as 0, ``spearman_nanmean`` over the
    defined ones, ``blank_maps``) and ``{step: maps}`` (only with ``keep_maps``).  One clone for all steps;
    ``model`` is untouched.  A step's weights equal :func:`randomize_top_layers` with the same ``seed``
    and that ``from_layer`` (per-layer seeds), so the two agree.
    """
    import keras
    import pandas as pd

    if reference is None:
        reference = gradcam_tape(model, images, target, layer_name=layer_name, inputs=inputs)
    names = _layer_names(model)
    weighted = [layer.name for layer in model.layers if layer.weights]
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    done: list[str] = []
    rows, kept = [], {}
    for step in steps:
        if step != "all" and step not in names:
            continue
        todo = weighted if step == "all" else top_weighted_layers(model, from_layer=step)
        for name in todo:
            if name in done:
                continue
            _randomize_layer(clone.get_layer(name), seed)
            done.append(name)
        maps = gradcam_tape(clone, images, target, layer_name=layer_name, inputs=inputs)
        rho0 = agreement(reference, maps, undefined=0.0)
        rho = agreement(reference, maps)
        rows.append(dict(randomized_from=step, layers_randomized=len(done), spearman_mean=float(np.mean(rho0)),
                         spearman_nanmean=float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
                         blank_maps=int(np.isnan(rho).sum())))
        if keep_maps:
            kept[step] = maps
    if not rows:
        raise ValueError(f"parameter 'steps': none of {list(steps)} is a layer of model {model.name!r}")
    return pd.DataFrame(rows), kept


# --------------------------------------------------------------------------- choosing examples
def select_examples(y_true, y_pred, n_classes: int, per_class: int = 2, probs=None):
    """Up to ``per_class`` correct and ``per_class`` wrong predictions per true class.

    Returns a DataFrame with columns ``index`` (row into the arrays), ``true``, ``pred``, ``kind``
    (``"correct"``/``"wrong"``), ``slot`` (0..per_class-1) and ``confidence`` (probability of the
    predicted class, ``nan`` without ``probs``), ordered by class, kind, slot.  With ``probs`` the most
    confident come first (confidently wrong examples teach most), else table order.
    """
    import pandas as pd

    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"select_examples: y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    conf = np.full(len(y_true), np.nan) if probs is None else np.asarray(probs)[np.arange(len(y_pred)), y_pred]
    rows = []
    for c in range(int(n_classes)):
        for kind, mask in (("correct", (y_true == c) & (y_pred == c)), ("wrong", (y_true == c) & (y_pred != c))):
            idx = np.flatnonzero(mask)
            if probs is not None:
                idx = idx[np.argsort(-conf[idx], kind="stable")]
            for slot, i in enumerate(idx[:per_class]):
                rows.append(dict(index=int(i), true=c, pred=int(y_pred[i]), kind=kind, slot=slot,
                                 confidence=float(conf[i])))
    return pd.DataFrame(rows, columns=["index", "true", "pred", "kind", "slot", "confidence"])


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a class name (``"Superficial-Intermediate"`` -> ``superficial-intermediate``)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "class"


# --------------------------------------------------------------------------- pictures
def _as_rgb_uint8(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"parameter 'image': expected (H, W, 3) RGB or (H, W) gray, got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.dtype != np.uint8:
        img = np.asarray(img, dtype=np.float64)
        if np.isfinite(img).all() and img.max() <= 1.0 + 1e-6 and img.min() >= 0:  # 0..1 floats
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img


def overlay(image, heatmap, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """The heatmap (values in [0, 1]) coloured with ``cmap`` and blended over ``image``: uint8 ``(H, W, 3)``.

    ``image``: uint8 or float RGB (0..255, or 0..1 floats); ``heatmap``: ``(h, w)``, resized to the
    image when its size differs.  ``alpha``: weight of the heatmap (0 = image only, 1 = heatmap only).
    """
    import matplotlib

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"parameter 'alpha': expected a value in [0, 1], got {alpha!r}")
    img = _as_rgb_uint8(image)
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim == 3 and hm.shape[0] == 1:
        hm = hm[0]
    if hm.ndim != 2:
        raise ValueError(f"parameter 'heatmap': expected a 2-D map, got shape {hm.shape}")
    if not np.isfinite(hm).all():
        raise ValueError("parameter 'heatmap': contains NaN or infinite values")
    if hm.shape != img.shape[:2]:
        hm = resize_maps(hm, img.shape[:2])[0]
    colors = matplotlib.colormaps[cmap](np.clip(hm, 0.0, 1.0))[..., :3] * 255.0
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * colors
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_overlay_png(path, image, heatmap, alpha: float = 0.4, cmap: str = "jet", size: int | None = 256,
                     synthetic: bool = False) -> Path:
    """Write the :func:`overlay` of ``image`` and ``heatmap`` as a PNG, atomically; returns the path.

    ``size``: upscale (nearest neighbour, so pixels stay honest) to at least this many pixels on the
    short side, ``None`` keeps the input size.  ``synthetic=True`` adds a red "SYNTHETIC DATA" band
    under the picture, like :func:`lib.plots.save_figure`'s stamp.
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"overlay path {str(path)!r}: expected a '.png' file")
    pic = Image.fromarray(overlay(image, heatmap, alpha=alpha, cmap=cmap))
    if size is not None and min(pic.size) < int(size):
        f = int(np.ceil(int(size) / min(pic.size)))
        pic = pic.resize((pic.width * f, pic.height * f), Image.NEAREST)
    if synthetic:
        band = 18
        framed = Image.new("RGB", (pic.width, pic.height + band), (192, 57, 43))
        framed.paste(pic, (0, 0))
        ImageDraw.Draw(framed).text((4, pic.height + 3), "SYNTHETIC DATA - not SIPaKMeD", fill=(255, 255, 255))
        pic = framed
    with atomic_path(path) as tmp:
        pic.save(tmp, format="PNG")
    return path


def _panel(ax, image, heatmap, alpha, cmap, title, fontsize):
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    if image is None:
        ax.set_facecolor("#f2f2f2")
        if title:
            ax.text(0.5, 0.5, title, ha="center", va="center", fontsize=fontsize, color="0.45",
                    transform=ax.transAxes, wrap=True)
        return
    shown = _as_rgb_uint8(image) if heatmap is None else overlay(image, heatmap, alpha=alpha, cmap=cmap)
    ax.imshow(shown, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=fontsize)


def gallery_figure(images, heatmaps, titles, ncols: int = 4, alpha: float = 0.4, cmap: str = "jet",
                   row_labels=None, suptitle: str | None = None, panel_size: float = 2.1, fontsize: int = 8,
                   colorbar: bool = True):
    """A grid of overlays (row-major, ``ncols`` per row); returns the matplotlib figure (not saved).

    ``images[i]`` ``None`` draws an empty grey panel showing ``titles[i]`` (e.g. "no wrong
    prediction"); ``heatmaps[i]`` ``None`` shows the plain image.  ``row_labels``: one label per row,
    written at the left.  A colour bar explains the map scale (0 = no evidence, 1 = most).
    """
    import matplotlib.pyplot as plt

    n = len(images)
    if not (len(heatmaps) == len(titles) == n) or n == 0:
        raise ValueError(f"gallery_figure: images, heatmaps and titles must have the same non-zero length, got "
                         f"{n}, {len(heatmaps)}, {len(titles)}")
    ncols = max(1, min(int(ncols), n))
    nrows = int(np.ceil(n / ncols))
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"gallery_figure: {nrows} rows but {len(row_labels)} row labels")
    label_w = 1.3 if row_labels is not None else 0.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols + label_w + (0.6 if colorbar else 0),
                                                    (panel_size + 0.35) * nrows + (0.5 if suptitle else 0)),
                             squeeze=False)
    for i in range(nrows * ncols):
        ax = axes[i // ncols][i % ncols]
        if i >= n:
            ax.axis("off")
            continue
        _panel(ax, images[i], heatmaps[i], alpha, cmap, titles[i], fontsize)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r][0].set_ylabel(label, fontsize=fontsize + 1, rotation=0, ha="right", va="center", labelpad=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=fontsize + 3)
    fig.tight_layout()
    if colorbar:
        import matplotlib as mpl

        sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, 1))
        cb = fig.colorbar(sm, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
        cb.set_label("Grad-CAM (0 = none, 1 = strongest)", fontsize=fontsize)
        cb.ax.tick_params(labelsize=fontsize)
    return fig


def methods_figure(images, maps: dict, row_titles=None, alpha: float = 0.4, cmap: str = "jet",
                   panel_size: float = 2.1, fontsize: int = 8, suptitle: str | None = None, scores: dict | None = None):
    """One row per image: the image, then one overlay per entry of ``maps`` (``{column title: (n, H, W)}``).

    ``scores``: optional ``{column title: per-image numbers}`` appended to that column's panel titles
    (e.g. the rank correlation with the first column; ``nan`` reads "blank map: no ranking").  Returns the figure (not saved).
    """
    cols = list(maps)
    n = len(images)
    for k in cols:
        if len(maps[k]) != n:
            raise ValueError(f"methods_figure: column {k!r} has {len(maps[k])} maps for {n} images")
    ims, hms, titles = [], [], []
    for i in range(n):
        ims.append(images[i])
        hms.append(None)
        titles.append("image" if i == 0 else "")
        for k in cols:
            ims.append(images[i])
            hms.append(maps[k][i])
            t = k if i == 0 else ""
            if scores and k in scores:
                v = float(scores[k][i])
                t = (t + "\n" if t else "") + (f"rho = {v:.2f}" if np.isfinite(v) else "blank map: no ranking")
            titles.append(t)
    return gallery_figure(ims, hms, titles, ncols=1 + len(cols), alpha=alpha, cmap=cmap, row_labels=row_titles,
                          suptitle=suptitle, panel_size=panel_size, fontsize=fontsize)


def _empty_slot_text(kind: str, found: int, n_class: int) -> str:
    """What an empty gallery slot says: how many such predictions the class had at all."""
    if n_class == 0:
        return "no test image\nof this class"
    if found == 0:
        return f"no {kind}\nprediction\n({n_class} test image{'s' if n_class != 1 else ''})"
    return f"only {found} {kind}\nprediction{'s' if found != 1 else ''}"


def class_gallery(images, heatmaps, y_true, y_pred, classes, probs=None, per_class: int = 2,
                  suptitle: str | None = None, **kwargs):
    """Per-class gallery: one row per true class, ``per_class`` correct then ``per_class`` wrong overlays.

    Returns ``(figure, selection)`` where ``selection`` is :func:`select_examples`'s table (with class
    names added).  Empty slots say "no correct/wrong example".  ``kwargs`` go to :func:`gallery_figure`.
    """
    classes = list(classes)
    sel = select_examples(y_true, y_pred, len(classes), per_class=per_class, probs=probs)
    ims, hms, titles, empty = [], [], [], []
    for c in range(len(classes)):
        for kind in ("correct", "wrong"):
            part = sel[(sel["true"] == c) & (sel["kind"] == kind)]
            for slot in range(per_class):
                row = part[part["slot"] == slot]
                if row.empty:  # every empty slot says why it is empty (an unlabeled grey box reads as a bug)
                    empty.append(len(ims))
                    ims.append(None)
                    hms.append(None)
                    titles.append(_empty_slot_text(kind, len(part), int((np.asarray(y_true) == c).sum())))
                    continue
                r = row.iloc[0]
                i = int(r["index"])
                ims.append(images[i])
                hms.append(heatmaps[i])
                conf = "" if np.isnan(r["confidence"]) else f" ({r['confidence']:.2f})"
                head = "correct" if kind == "correct" else f"wrong: {classes[int(r['pred'])]}"
                titles.append(f"{head}{conf}")
    labels = [c.replace("-", "-\n") for c in classes]
    fig = gallery_figure(ims, hms, titles, ncols=2 * per_class, row_labels=labels, suptitle=suptitle, **kwargs)
    panels = fig.axes[:len(ims)]  # row-major, as gallery_figure lays them out; the colour bar comes last
    for i in empty:  # an outline, not a grey block: nothing is hidden there
        panels[i].set_facecolor("white")
        for sp in panels[i].spines.values():
            sp.set_visible(True)
            sp.set_linestyle((0, (3, 3)))
            sp.set_edgecolor("0.75")
    sel = sel.assign(true_class=[classes[i] for i in sel["true"]], pred_class=[classes[i] for i in sel["pred"]])
    return fig, sel


# --------------------------------------------------------------------------- notebook 06's steps
def load_explained_model(profile: str, image_size: int | None = None, backbone: str | None = None, models_dir=None):
    """The image branch notebook 03 saved for ``profile``, checked against the notebook's parameters.

    Raises ``FileNotFoundError`` (saying how to produce it) when it is missing, ``ValueError`` when
    ``image_size`` / ``backbone`` are given and differ from the saved model's: explaining a model
    trained some other way would explain the wrong model.
    """
    from lib import config
    from lib.image import image_model

    path = Path(models_dir) / "image_branch.keras" if models_dir else config.models_dir(profile) / "image_branch.keras"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Notebook 06 explains the image branch that notebook 03 trains and saves: run "
            f"notebooks/03_image_branch.ipynb first with the same profile ({profile!r}), e.g. `papermill "
            f"notebooks/03_image_branch.ipynb build/{profile}/notebooks/03_image_branch.ipynb -p profile {profile}`, "
            "or `make report`, which runs the notebooks in order.")
    model = image_model.load_model(path)
    size = int(model.inputs[0].shape[1])
    if image_size is not None and image_size != size:
        raise ValueError(f"parameter 'image_size': {image_size} px, but the saved model takes {size} px; "
                         "leave it None or retrain with notebook 03")
    if backbone is not None and not model.name.endswith(backbone):
        raise ValueError(f"parameter 'backbone': {backbone!r}, but the saved model is {model.name!r}; "
                         "leave it None or retrain with notebook 03")
    return model


def save_gallery_pngs(folder, images, heatmaps, selection, classes, synthetic: bool = False) -> list[str]:
    """One overlay PNG per example of :func:`class_gallery`'s ``selection``: ``gradcam_<class>_<n>.png``.

    Earlier PNGs of that pattern (for these classes) are removed first, so the folder never mixes
    runs.  Returns the file names in ``selection`` order.
    """
    import re

    folder = Path(folder)
    slugs = [slug(c) for c in classes]
    pattern = re.compile(r"gradcam_(" + "|".join(map(re.escape, slugs)) + r")_\d+\.png$")
    for old in folder.iterdir():
        if pattern.fullmatch(old.name):
            old.unlink()
    names, seen = [], {}
    for row in selection.itertuples():
        n = seen.get(row.true, 0)
        seen[row.true] = n + 1
        path = save_overlay_png(folder / f"gradcam_{slugs[row.true]}_{n}.png", images[row.index],
                                heatmaps[row.index], synthetic=synthetic)
        names.append(path.name)
    return names


def agreement_table(pairs: dict, labels):
    """Spearman agreement per image for each ``{column: (maps_a, maps_b)}``, and its per-class summary.

    Returns ``(per_image, summary)``: ``summary`` has one row per label (mean), a row ``"all test
    images"`` and an ``images`` count column.
    """
    import pandas as pd

    per_image = pd.DataFrame({"class": np.asarray(labels), **{k: agreement(a, b) for k, (a, b) in pairs.items()}})
    summary = per_image.groupby("class").mean()
    summary.loc["all test images"] = per_image.drop(columns="class").mean()
    counts = per_image.groupby("class").size().reindex(summary.index).fillna(len(per_image)).astype(int)
    summary.insert(0, "images", counts)
    return per_image, summary


def explain_fusion(path, images, branch_maps, batch_size: int = 32):
    """Grad-CAM of the fusion model's ``risk`` through its image input, tabular input at zeros.

    Zeros are the training mean after the fitted scaler ("an average risk-factor profile").  Returns
    ``None`` when ``path`` does not exist, else a dict: ``risk`` (n,), ``tape`` and ``tfkv`` maps, and
    ``summary`` (tape vs tf-keras-vis and image-branch vs fusion mean Spearman, JSON-ready).
    """
    from lib.fusion.hybrid import load_hybrid

    if not Path(path).exists():
        return None
    fusion = load_hybrid(path, compile=False)
    n_tab = int({t.name: t for t in fusion.inputs}["tabular"].shape[-1])
    feed = {"image": np.asarray(images), "tabular": np.zeros((len(images), n_tab), np.float32)}
    risk = predict(fusion, inputs=feed, batch_size=batch_size).reshape(-1)
    tape = gradcam_tape(fusion, None, target=None, inputs=feed)   # target None: the risk score
    tfkv = gradcam_tfkv(fusion, None, target=None, inputs=feed)   # expand_cam=False inside
    summary = dict(tape_vs_tfkv_spearman=float(np.nanmean(agreement(tape, tfkv))),
                   branch_vs_fusion_spearman=float(np.nanmean(agreement(branch_maps, tape))),
                   n_images=int(len(images)), tabular_input="zeros (training mean after standardisation)")
    return dict(risk=risk, tape=tape, tfkv=tfkv, summary=summary)
