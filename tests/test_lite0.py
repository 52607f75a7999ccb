"""lib.scaffold.lite0: torch-free reader, Lite0 graph, cached conversion, and an ImageNet sanity check."""
from __future__ import annotations

import collections
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lib.scaffold import lite0

# The few ImageNet classes the sample-photo check needs (index -> name).
IMAGENET_NAMES = {985: "daisy", 442: "bell cote", 698: "palace"}


# --------------------------------------------------------------------------- helpers
class _FakeStorage:
    def __init__(self, key, array):
        self.key, self.array = key, np.ascontiguousarray(array, dtype=np.float32)


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a ``torch`` module for ``pickle`` to *write* tensor state dicts (no torch needed)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:  # noqa: D401 - stand-in type, referenced by name in the pickle
        pass

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called, only pickled by name
        raise AssertionError

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, torch._utils = FloatStorage, utils
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _FakeTensor:
    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


def _pickler(f, storages, legacy):
    p = pickle.Pickler(f, protocol=2)

    def persistent_id(obj):
        if isinstance(obj, _FakeStorage):
            storages[obj.key] = obj
            pid = ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", obj.array.size)
            return pid + (None,) if legacy else pid
        return None

    p.persistent_id = persistent_id
    return p


def write_torch_file(path, state, fmt="legacy"):
    """Write ``state`` ({name: _FakeTensor or other}) in torch's legacy or zip serialisation."""
    storages: dict = {}
    if fmt == "legacy":
        with open(path, "wb") as f:
            pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
            pickle.dump(1001, f, protocol=2)
            pickle.dump(dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4)),
                        f, protocol=2)
            _pickler(f, storages, legacy=True).dump(state)
            pickle.dump(list(storages), f, protocol=2)
            for s in storages.values():
                f.write(struct.pack("<q", s.array.size))
                f.write(s.array.astype("<f4").tobytes())
    else:
        import io

        buf = io.BytesIO()
        _pickler(buf, storages, legacy=False).dump(state)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", buf.getvalue())
            zf.writestr("archive/byteorder", "little")
            for s in storages.values():
                zf.writestr(f"archive/data/{s.key}", s.array.astype("<f4").tobytes())
    return path


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------- the reader
def test_reads_the_package_file_without_torch():
    state = lite0.read_torch_state_dict(lite0.source_weights_path())
    assert "torch" not in sys.modules
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert not any("_se_" in k for k in state)  # Lite: no squeeze-excitation
    assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert np.all(state["_bn1.running_var"] > 0)

    converted = lite0.convert_state_dict(state)
    assert converted["stem_conv"][0].shape == (3, 3, 3, 32)                    # OIHW -> HWIO
    assert converted["block1a_dwconv"][0].shape == (3, 3, 32, 1)              # (C,1,H,W) -> (H,W,C,1)
    assert converted["predictions"][0].shape == (1280, 1000)                  # (out,in) -> (in,out)
    np.testing.assert_array_equal(converted["stem_conv"][0][:, :, 1, 5], state["_conv_stem.weight"][5, 1])
    gamma, beta, mean, var = converted["top_bn"]
    np.testing.assert_array_equal(var, state["_bn1.running_var"])
    assert set(converted) == set(lite0.lite0_layer_order())


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_reader_formats_and_strided_views(tmp_path, fake_torch, fmt):
    base = np.arange(24, dtype=np.float32)
    shared = _FakeStorage("0", base)
    state = collections.OrderedDict(
        a=_FakeTensor(shared, 0, (2, 3), (3, 1)),
        b=_FakeTensor(shared, 6, (3, 2), (1, 3)),          # transposed view into the same storage
        c=_FakeTensor(_FakeStorage("7", [1.5]), 0, (), ()),  # a scalar in its own storage
    )
    path = write_torch_file(tmp_path / f"t.{fmt}.pth", state, fmt)
    out = lite0.read_torch_state_dict(path)
    np.testing.assert_array_equal(out["a"], base[:6].reshape(2, 3))
    np.testing.assert_array_equal(out["b"], base[6:12].reshape(2, 3).T)
    assert out["c"].shape == () and out["c"] == 1.5
    assert list(out) == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_reader_refuses_foreign_globals(tmp_path, fake_torch, fmt):
    marker = tmp_path / "pwned"
    path = write_torch_file(tmp_path / "evil.pth", collections.OrderedDict(x=_Evil(marker)), fmt)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global '(posix|os|nt)\.system'") as err:
        lite0.read_torch_state_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_reader_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        lite0.read_torch_state_dict(missing)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(lite0.source_weights_path().read_bytes()[:200_000])
    with pytest.raises(lite0.WeightsFileError, match="truncated.pth"):
        lite0.read_torch_state_dict(truncated)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="garbage.pth"):
        lite0.read_torch_state_dict(garbage)


def test_convert_rejects_other_networks():
    with pytest.raises(lite0.WeightsFileError, match="missing"):
        lite0.convert_state_dict({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})


# --------------------------------------------------------------------------- hostile tensor layouts
# The reader turns (offset, sizes, strides) from the file into a numpy view, so crafted numbers could
# read memory outside the storage (a segfault at worst).  Each file is loaded in a child Python with
# faulthandler on: a crash fails the test (with the child's traceback) instead of killing pytest.
LITE0_FILE = lite0.__file__  # the module under test; the child loads it from this file
_ROOT = str(Path(__file__).resolve().parents[1])
_LOAD_IN_CHILD = r"""
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("lite0_under_test", sys.argv[2])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
try:
    state = mod.read_torch_state_dict(sys.argv[3])
except ValueError as e:
    print(f"REFUSED {type(e).__name__}: {e}")
    sys.exit(3)
print("LOADED", {k: (v.shape, v.nbytes) for k, v in state.items()})
"""


def _load_in_child(path):
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _LOAD_IN_CHILD, _ROOT, LITE0_FILE, str(path)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


HOSTILE_LAYOUTS = {
    # name: (storage elements, offset, sizes, strides)
    "negative_stride": (4, 3, (10,), (-20_000,)),               # reads 200,000 floats before the buffer
    "mixed_sign_strides": (4, 0, (2, 100_000), (100_000, -99_999)),  # extent looks small; crashed Python
    "stride0_inflates": (1, 0, (4_000, 4_000), (0, 0)),          # 4 bytes -> 64 MB of one repeated float
    "offset_past_end_empty": (4, 1_000_000, (0,), (1,)),         # an empty view far past the storage
    "offset_past_end": (4, 10, (2,), (1,)),                      # (also refused before, without the key)
    "sizes_strides_mismatch": (4, 0, (2, 2), (1,)),
}


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
@pytest.mark.parametrize("case", sorted(HOSTILE_LAYOUTS))
def test_reader_refuses_views_outside_the_storage(tmp_path, fake_torch, case, fmt):
    numel, offset, sizes, strides = HOSTILE_LAYOUTS[case]
    key = f"blocks.{case}.weight"
    state = collections.OrderedDict({
        "ok": _FakeTensor(_FakeStorage("0", np.arange(6)), 0, (2, 3), (3, 1)),
        key: _FakeTensor(_FakeStorage("1", np.arange(numel)), offset, sizes, strides),
    })
    path = write_torch_file(tmp_path / f"{case}.{fmt}.pth", state, fmt)
    rc, out = _load_in_child(path)
    assert rc == 3, f"expected a clean refusal (exit 3), got exit {rc}:\n{out[-3000:]}"
    assert "REFUSED WeightsFileError" in out and str(path) in out and repr(key) in out, out


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_reader_accepts_in_bounds_edge_layouts(tmp_path, fake_torch, fmt):
    """The exact-extent check is not off by one: a view ending on the last element loads."""
    base = np.arange(12, dtype=np.float32)
    s = _FakeStorage("0", base)
    state = collections.OrderedDict(
        tail=_FakeTensor(s, 8, (2, 2), (2, 1)),        # last element read: 8 + 2 + 1 = 11, the storage's last
        one=_FakeTensor(s, 11, (1, 1), (999, 999)),    # size-1 dimensions: their strides never move
        empty=_FakeTensor(s, 12, (0, 5), (5, 1)),      # empty view at the very end
    )
    out = lite0.read_torch_state_dict(write_torch_file(tmp_path / f"edge.{fmt}.pth", state, fmt))
    np.testing.assert_array_equal(out["tail"], base[8:12].reshape(2, 2))
    assert out["one"].shape == (1, 1) and out["one"][0, 0] == 11
    assert out["empty"].shape == (0, 5)
    over = collections.OrderedDict(w=_FakeTensor(s, 9, (2, 2), (2, 1)))   # one element further: refused
    with pytest.raises(lite0.WeightsFileError, match=r"tensor 'w'.*storage '0' holds 12"):
        lite0.read_torch_state_dict(write_torch_file(tmp_path / f"over.{fmt}.pth", over, fmt))


# --------------------------------------------------------------------------- conversion cache
@pytest.mark.slow
def test_conversion_is_cached_and_keyed_by_source(tmp_path):
    import h5py

    n0 = lite0.conversion_count
    p1 = lite0.lite0_weights_path(cache_dir=tmp_path)
    assert p1 == tmp_path / "weights" / lite0.WEIGHTS_FILE_NAME and lite0.conversion_count == n0 + 1
    mtime = p1.stat().st_mtime_ns
    assert lite0.lite0_weights_path(cache_dir=tmp_path) == p1
    assert p1.stat().st_mtime_ns == mtime and lite0.conversion_count == n0 + 1   # reused
    assert not list(p1.parent.glob(".*"))                                        # no temp files left

    other = tmp_path / "other.pth"                                               # a different source
    other.write_bytes(lite0.source_weights_path().read_bytes() + b"\0")
    lite0.lite0_weights_path(cache_dir=tmp_path, source=other)
    assert lite0.conversion_count == n0 + 2
    with h5py.File(p1, "r") as f:
        assert f.attrs[lite0.ATTR_SOURCE_SHA256] == lite0._sha256(other)

    p1.write_bytes(b"not hdf5")                                                  # corrupt cache: reconvert
    lite0.lite0_weights_path(cache_dir=tmp_path, source=other)
    assert lite0.conversion_count == n0 + 3


@pytest.mark.slow
def test_weights_file_errors_name_the_file(tmp_path):
    model = lite0.build_lite0(image_size=32)
    with pytest.raises(FileNotFoundError, match="absent.weights.h5"):
        lite0.load_lite0_imagenet(model, tmp_path / "absent.weights.h5")
    bad = tmp_path / "corrupt.weights.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(lite0.WeightsFileError, match="corrupt.weights.h5"):
        lite0.load_lite0_imagenet(model, bad)


# --------------------------------------------------------------------------- ImageNet check
def _photo(name, size=224):
    from PIL import Image
    from sklearn.datasets import load_sample_image

    # Same resize as lib.image.input_pipeline.load_image: Pillow bilinear (antialiased), aspect not kept.
    img = Image.fromarray(load_sample_image(name)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


@pytest.mark.slow
def test_converted_lite0_classifies_sample_photos():
    import keras

    model = lite0.build_lite0(image_size=224, include_top=True)
    lite0.load_lite0_imagenet(model)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert model.get_layer("top_activation").output.shape[1:] == (7, 7, 1280)
    probs = model.predict(np.stack([_photo("flower.jpg"), _photo("china.jpg")]), verbose=0)
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    top5 = np.argsort(probs, axis=1)[:, ::-1][:, :5]
    assert 985 in top5[0], f"flower.jpg top-5 {top5[0].tolist()} lacks {IMAGENET_NAMES[985]!r}"
    assert {442, 698} & set(top5[1].tolist()), f"china.jpg top-5 {top5[1].tolist()} lacks bell cote / palace"


# --------------------------------------------------------------------------- cache-independent seeding
def _seeded_draws(seed, between):
    """Seed globally, run ``between`` (the weights work under test), then draw the way a notebook does.

    Returns a small model's initial weights (unseeded initialisers), its dropout mask in training
    mode, and one draw each from NumPy's and Python's global generators.
    """
    import random

    import keras

    keras.utils.set_random_seed(seed)
    between()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dropout(0.5),
                              keras.layers.Dense(2)])
    out = model(np.ones((4, 8), np.float32), training=True)
    return [w.copy() for w in model.get_weights()] + [np.asarray(out), np.random.random(3), np.array(random.random())]


def _assert_same_draws(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: draw {i} differs")


@pytest.mark.slow
def test_cold_and_warm_weights_cache_give_the_same_seeded_draws(tmp_path, monkeypatch):
    """Converting (cold cache) or first loading the weights must not consume the seeded global RNG."""
    monkeypatch.setenv("CERVICAL_KIT_CACHE", str(tmp_path / "cache"))
    seed = 1234
    reference = _seeded_draws(seed, lambda: None)

    n0 = lite0.conversion_count
    cold = _seeded_draws(seed, lite0.lite0_weights_path)
    assert lite0.conversion_count == n0 + 1, "the cache was not cold"
    warm = _seeded_draws(seed, lite0.lite0_weights_path)
    assert lite0.conversion_count == n0 + 1, "the cache was not reused"
    _assert_same_draws(cold, warm, "cold vs warm weights cache")
    _assert_same_draws(reference, warm, "no weights work vs warm cache")

    import keras

    def with_head():  # not a standalone Lite0: loaded by name through a reference model, cached in-process
        base = lite0.build_lite0(image_size=32)
        return keras.Model(base.input, keras.layers.Dense(2, name="head")(base.output))

    first_model, again_model = with_head(), with_head()
    lite0._weights_cache.clear()
    first = _seeded_draws(seed, lambda: lite0.load_lite0_imagenet(first_model))
    again = _seeded_draws(seed, lambda: lite0.load_lite0_imagenet(again_model))
    _assert_same_draws(first, again, "first vs in-process cached by-name load")
    _assert_same_draws(reference, first, "no weights work vs first by-name load")
