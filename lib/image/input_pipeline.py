"""tf.data pipelines from an image table, and the augmentation layers of the image branch.

Decoding
    Files are decoded with Pillow inside ``tf.numpy_function`` rather than ``tf.io.decode_image``:
    SIPaKMeD ships ``.bmp``, and TensorFlow's BMP decoder (TF 2.21, checked) reads an 8-bit *palette*
    BMP's colour indices as gray levels - silently wrong colours - and drops alpha without
    compositing.  Pillow reads BMP (any bit depth), PNG, JPEG and TIFF alike.  Colour conversions (:func:`to_rgb`), documented
    because they change what the network sees:

    * grayscale (``L``, ``1``) -> RGB by copying the gray value into all three channels;
    * with transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent index) -> RGB by
      compositing over **white**, the bright background of a Pap smear (dropping alpha instead would
      turn transparent pixels into whatever colour they happen to store, often black);
    * 16-bit / 32-bit integer or float gray (``I;16``, ``I``, ``F``) -> 8 bit (``I;16`` divided by 257,
      others clipped to 0..255 or, when larger, scaled by their maximum), then as grayscale;
    * anything else (palette, CMYK, YCbCr, ...) -> ``Image.convert("RGB")``.

    Each image is then resized to ``(size, size)`` with antialiased bilinear resampling (aspect ratio
    is not kept: SIPaKMeD crops are roughly square and the published recipe stretches too) and
    cached as uint8, which is 4x smaller than float32; batches are cast to float32 in 0..255, the
    input range of every backbone in :mod:`lib.image.backbones` (preprocessing is inside the model).

Unreadable files
    :func:`make_dataset` first opens every file's header (cheap) and raises ``ValueError`` listing
    the files that are missing or not images.  A file whose header is fine but whose pixels fail to
    decode (truncated) raises while iterating, and the message names the file.  Callers who prefer
    to go on without such files call :func:`drop_unreadable`, which returns the kept rows and the
    list of ``(file, reason)`` skipped: listed, never silent.

Augmentation
    :func:`augmentation_layers` returns Keras preprocessing layers that :mod:`lib.image.image_model` puts
    **inside the model**, right after the ``image`` input.  Why inside rather than mapped over the
    training dataset: Keras random layers are active only when the model runs with
    ``training=True`` (``fit``) and are identity in ``predict``/``evaluate``, so one model and one
    cached pipeline serve training and inference with no way to augment test images by mistake;
    the pipeline's cache holds clean decoded images and every epoch sees fresh random transforms;
    and the saved ``.keras`` model documents its own augmentation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

try:  # Pillow >= 9.1
    from PIL import Image
    _BILINEAR = Image.Resampling.BILINEAR
except AttributeError:  # pragma: no cover
    from PIL import Image
    _BILINEAR = Image.BILINEAR

WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An image file that cannot be read; the message names the file."""


# --------------------------------------------------------------------------- decoding
def to_rgb(im: "Image.Image") -> "Image.Image":
    """Convert any Pillow image to 8-bit RGB (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path, image_size: int) -> np.ndarray:
    """Decode one file to a ``(image_size, image_size, 3)`` uint8 RGB array.

    Raises :class:`ImageDecodeError` (a ``ValueError``) naming the file when it cannot be decoded.
    """
    path = str(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb(im)
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"image file {path!r}: not found ({exc})") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageDecodeError(f"image file {path!r}: cannot decode ({type(exc).__name__}: {exc})") from exc
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), _BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def load_images(table, image_size: int) -> np.ndarray:
    """All images of ``table`` as one ``(n, size, size, 3)`` float32 array in 0..255 (small tables)."""
    paths = _paths(table)
    out = np.empty((len(paths), image_size, image_size, 3), np.float32)
    for i, p in enumerate(paths):
        out[i] = load_image(p, image_size)
    return out


def header_problem(path) -> str | None:
    """``None`` when Pillow can open the file's header, else the reason (cheap: pixels are not read)."""
    try:
        with Image.open(str(path)) as im:
            im.size  # noqa: B018 - touching the header is the check
        return None
    except FileNotFoundError:
        return "not found"
    except Exception as exc:
        return f"not a readable image ({type(exc).__name__}: {exc})"


def drop_unreadable(table, full_decode: bool = False):
    """Split ``table`` into readable rows and a list of ``(file, reason)`` that were dropped.

    ``full_decode=True`` decodes every pixel (catches truncated files; slower), otherwise only
    headers are read.
    """
    skipped, keep = [], []
    for p in _paths(table):
        if full_decode:
            try:
                load_image(p, 8)
                reason = None
            except ImageDecodeError as exc:
                reason = str(exc)
        else:
            reason = header_problem(p)
        keep.append(reason is None)
        if reason is not None:
            skipped.append((p, reason))
    return table.loc[np.asarray(keep, dtype=bool)].copy(), skipped


def check_readable(table) -> None:
    """Raise ``ValueError`` listing every file of ``table`` whose header cannot be read."""
    _, skipped = drop_unreadable(table)
    if skipped:
        shown = "\n".join(f"  {f}: {r}" for f, r in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise ValueError(
            f"{len(skipped)} image file(s) cannot be read:\n{shown}{more}\n"
            "Fix or remove them, or drop them with lib.image.input_pipeline.drop_unreadable(table) "
            "(which lists what it skipped)."
        )


def _paths(table) -> list[str]:
    if "path" not in getattr(table, "columns", []):
        raise ValueError("image table: expected a 'path' column (see CONTRIBUTING.md, 'Image table')")
    return [str(p) for p in table["path"].tolist()]


# --------------------------------------------------------------------------- tf.data
def make_dataset(table, image_size: int, batch_size: int, training: bool = False, seed: int = 42,
                 cache=True, labels: bool = True, check: bool = True):
    """A ``tf.data.Dataset`` of ``(image, label_idx)`` batches (or images only with ``labels=False``).

    Images: float32 ``(batch, size, size, 3)`` in 0..255, RGB.  Labels: int32 from ``label_idx``.
    Order: the table's row order, except with ``training=True`` where the rows are reshuffled every
    epoch (seeded).  ``cache``: ``True`` caches decoded uint8 images in memory after the first pass,
    a path caches them in files there, ``False`` decodes every epoch.  Augmentation is **not** applied
    here: it lives in the model (see the module docstring).
    """
    import tensorflow as tf

    paths = _paths(table)
    if not paths:
        raise ValueError("image table: no rows to make a dataset from")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"parameter 'image_size': expected an integer >= 8, got {image_size!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"parameter 'batch_size': expected a positive integer, got {batch_size!r}")
    if check:
        check_readable(table)
    size = int(image_size)

    def _decode(path):
        return load_image(path.decode("utf-8") if isinstance(path, bytes) else str(path), size)

    def _tf_decode(path):
        img = tf.numpy_function(_decode, [path], tf.uint8, stateful=False)
        img.set_shape((size, size, 3))
        return img

    if labels:
        if "label_idx" not in table.columns:
            raise ValueError("image table: expected a 'label_idx' column for labels (or pass labels=False)")
        y = table["label_idx"].to_numpy().astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices((paths, y))
        ds = ds.map(lambda p, t: (_tf_decode(p), t), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = tf.data.Dataset.from_tensor_slices(paths)
        ds = ds.map(_tf_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is True:
        ds = ds.cache()
    elif cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        ds = ds.cache(str(cache))
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(int(batch_size))
    if labels:
        ds = ds.map(lambda x, t: (tf.cast(x, tf.float32), t), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- augmentation
AUGMENTATION = dict(rotation=0.125, zoom=0.1, brightness=0.1, contrast=0.1)
"""Default strengths: rotation +-45 deg (fraction of a full turn; cells have no up), flips on both
axes, zoom +-10 %, brightness +-10 % of the 0..255 range, contrast factor in [0.9, 1.1]."""


def augmentation_layers(seed: int = 42, rotation: float = AUGMENTATION["rotation"],
                        zoom: float = AUGMENTATION["zoom"], brightness: float = AUGMENTATION["brightness"],
                        contrast: float = AUGMENTATION["contrast"]) -> list:
    """Fresh Keras preprocessing layers (rotation, flips, zoom, brightness, contrast), seeded.

    Active only with ``training=True`` (``fit``); identity in ``predict``.  Inputs are float RGB in
    0..255 (``value_range=(0, 255)``).  Layer names start with ``aug_``.
    """
    import keras

    return [
        keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed, name="aug_rotation"),
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed + 1, name="aug_flip"),
        keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 2, name="aug_zoom"),
        keras.layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed + 3, name="aug_brightness"),
        keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 4, name="aug_contrast"),
    ]
