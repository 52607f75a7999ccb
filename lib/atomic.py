"""Atomic file writes: a failed or interrupted run never leaves a half-written output
and never destroys the previous good one (write to a temporary sibling, then rename)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target, suffix: str | None = None):
    """Yield a temporary path next to ``target``; on success it replaces ``target``.

    ``suffix`` defaults to the target's own suffix so libraries that dispatch on the
    extension (Keras ``.keras``/``.h5``, matplotlib ``.png``) see the right one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix if suffix is not None else target.suffix,
                               dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; outputs are meant to be read (web server, colleagues)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(target, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target, obj, indent: int = 2) -> Path:
    """JSON with sorted keys so reruns diff cleanly; NumPy scalars are converted."""

    def default(o):
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_text(target, json.dumps(obj, indent=indent, sort_keys=True, default=default) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
