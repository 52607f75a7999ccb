"""lib.image.input_pipeline: decoding to RGB, dataset shapes/dtypes/order, unreadable files, augmentation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.image import input_pipeline as ip


def _save(path, arr, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)
    return str(path)


@pytest.fixture
def mixed_table(tmp_path):
    """Four files: RGB .bmp, grayscale .bmp, RGBA .png (left half transparent), RGB .jpg."""
    rgb = np.zeros((10, 14, 3), np.uint8)
    rgb[..., 0] = 200
    gray = np.full((9, 9), 90, np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 150
    rgba[:, 4:, 3] = 255  # right half opaque blue, left half fully transparent
    paths = [
        _save(tmp_path / "a" / "rgb.bmp", rgb),
        _save(tmp_path / "a" / "gray.bmp", gray, "L"),
        _save(tmp_path / "b" / "rgba.png", rgba, "RGBA"),
        _save(tmp_path / "b" / "photo.jpg", rgb, quality=95),
    ]
    return pd.DataFrame({"path": paths, "label": ["a", "a", "b", "b"], "label_idx": [0, 0, 1, 1]})


def test_grayscale_becomes_rgb_by_copying_the_channel():
    im = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "L")
    out = np.asarray(ip.to_rgb(im))
    assert out.shape == (4, 4, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (out[..., 0] == np.arange(16).reshape(4, 4)).all()


def test_rgba_is_composited_over_white():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque: kept
    arr[1, 1] = (10, 20, 30, 0)    # transparent: white
    out = np.asarray(ip.to_rgb(Image.fromarray(arr, "RGBA")))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_sixteen_bit_and_palette_images_become_8bit_rgb(tmp_path):
    im16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(ip.to_rgb(im16)).max() == 255
    pal = Image.fromarray(np.full((6, 6, 3), 77, np.uint8)).convert("P")
    path = tmp_path / "pal.bmp"
    pal.save(path)
    out = ip.load_image(path, 6)
    assert out.dtype == np.uint8 and out.shape == (6, 6, 3) and abs(int(out.mean()) - 77) <= 1


def test_dataset_shapes_dtypes_order_and_rgb(mixed_table):
    ds = ip.make_dataset(mixed_table, 16, 3, training=False)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [3, 1]
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32
    assert batches[0][1].dtype.name == "int32" and list(y) == [0, 0, 1, 1]
    assert 0.0 <= x.min() and x.max() <= 255.0
    assert np.allclose(x[0].mean(axis=(0, 1)), [200, 0, 0], atol=1)          # red stays red
    assert np.allclose(x[1], 90, atol=1)                                     # gray on all 3 channels
    assert np.allclose(x[2][:, :6], 255, atol=2)                             # transparent -> white
    assert np.allclose(x[2][:, -4:], [0, 0, 150], atol=2)                    # opaque blue kept
    assert np.allclose(x[3].mean(axis=(0, 1)), [200, 0, 0], atol=6)          # JPEG decodes too
    # a second pass (from the cache) gives the same images
    x2 = np.concatenate([b[0].numpy() for b in ds])
    assert np.array_equal(x, x2)


def test_images_only_and_training_shuffle_is_seeded(mixed_table):
    only = list(ip.make_dataset(mixed_table, 8, 4, labels=False))
    assert only[0].shape == (4, 8, 8, 3)
    order = lambda seed: [int(v) for b in ip.make_dataset(mixed_table.assign(label_idx=range(4)), 8, 4,  # noqa: E731
                                                             training=True, seed=seed) for v in b[1].numpy()]
    assert sorted(order(3)) == [0, 1, 2, 3]
    assert order(3) == order(3)


def test_unreadable_files_are_named_never_silent(mixed_table, tmp_path):
    bad = tmp_path / "b" / "broken.bmp"
    bad.write_bytes(b"not an image at all")
    missing = str(tmp_path / "b" / "missing.png")
    table = pd.concat([mixed_table, pd.DataFrame({"path": [str(bad), missing], "label": ["b", "b"],
                                                  "label_idx": [1, 1]})], ignore_index=True)
    with pytest.raises(ValueError) as err:
        ip.make_dataset(table, 8, 2)
    assert "broken.bmp" in str(err.value) and "missing.png" in str(err.value)
    kept, skipped = ip.drop_unreadable(table)
    assert len(kept) == 4 and sorted(f for f, _ in skipped) == sorted([str(bad), missing])


def test_truncated_file_fails_with_its_name(tmp_path):
    good = _save(tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ip.ImageDecodeError, match="trunc.png"):
        ip.load_image(trunc, 8)
    table = pd.DataFrame({"path": [str(trunc)], "label_idx": [0]})
    with pytest.raises(Exception, match="trunc.png"):
        list(ip.make_dataset(table, 8, 1))
    _, skipped = ip.drop_unreadable(table, full_decode=True)
    assert skipped and "trunc.png" in skipped[0][0]


def test_augmentation_inactive_at_inference_active_in_training():
    import keras

    inp = keras.Input((24, 24, 3), name="image")
    x = inp
    for layer in ip.augmentation_layers(seed=1):
        x = layer(x)
    model = keras.Model(inp, x)
    assert [layer.name for layer in model.layers[1:]] == ["aug_rotation", "aug_flip", "aug_zoom",
                                                           "aug_brightness", "aug_contrast"]
    batch = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype("float32")
    p1 = model.predict(batch, verbose=0)
    p2 = model.predict(batch, verbose=0)
    assert np.allclose(p1, batch, atol=1e-4) and np.array_equal(p1, p2)
    t = np.asarray(model(batch, training=True))
    assert t.shape == batch.shape and not np.allclose(t, batch, atol=1.0)
    assert 0.0 <= t.min() and t.max() <= 255.0


def test_palette_bmp_keeps_its_colours(tmp_path):
    """TensorFlow's own BMP decoder returns palette indices as gray; ours must return the colours."""
    arr = np.zeros((6, 6, 3), np.uint8)
    arr[..., 0] = 200
    arr[:3, :, 2] = 90
    path = tmp_path / "pal.bmp"
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    out = ip.load_image(path, 6)
    assert tuple(out[0, 0]) == (200, 0, 90) and tuple(out[5, 5]) == (200, 0, 0)
