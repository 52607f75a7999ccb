"""Guards around one pipeline run on a build folder (``build/<profile>/``).

Why: two pipelines on one folder both retrained everything and the last writer won; a
notebook failing at a late cell had already rewritten its metrics; a killed run left
papermill's temporary notebooks behind. So:

- :class:`RunLock` takes an exclusive ``flock`` on ``<run>/.pipeline.lock``; the kernel
  releases it when the process dies, so a lock left by a killed run never blocks;
- :class:`Snapshot` copies the run folder's results before a notebook runs and puts
  back exactly that state if the notebook fails (copies, not hard links: Keras and
  others may rewrite a file in place, which would change a linked "snapshot" too);
- :func:`clean_temp_files` removes the temporary siblings ``lib.atomic.atomic_path``
  leaves when a process is killed between creating and renaming them.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path

LOCK_NAME = ".pipeline.lock"
SNAPSHOT_NAME = ".pipeline-snapshot"
PARTIAL_NAME = ".pipeline-snapshot.partial"
# Top-level entries of a run folder that are not a notebook's results: executed notebooks
# and their stamps (replaced atomically anyway), failed copies, the pipeline's own record,
# its lock and snapshots, caches (derived, safe to lose).
NOT_RESULTS = frozenset({"notebooks", "failed", "pipeline.json", LOCK_NAME, SNAPSHOT_NAME, PARTIAL_NAME,
                         "cache", ".cache", "__pycache__"})

# lib.atomic.atomic_path names its temporary ".<target name>.<8 mkstemp chars><target suffix>"
_ATOMIC_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9]+)$")


class PipelineBusy(RuntimeError):
    """Another pipeline holds the run folder's lock."""


class RunLock:
    """Exclusive lock on one run folder, held for the life of the ``with`` block.

    The holder's pid is written into the lock file so the refusal can name it; the file
    itself is left in place (deleting it would let a third process lock a fresh inode).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd = None

    def __enter__(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise PipelineBusy(f"{self.run_dir} is in use by another pipeline (pid {holder}); "
                               f"wait for it to finish or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _entries(root: Path):
    """Relative paths of the results under ``root``: (files and links, folders)."""
    files, dirs = set(), set()
    if not root.is_dir():
        return files, dirs
    for top in root.iterdir():
        if top.name in NOT_RESULTS:
            continue
        if top.is_dir() and not top.is_symlink():
            dirs.add(Path(top.name))
            for base, subdirs, names in os.walk(top):
                rel = Path(base).relative_to(root)
                for s in subdirs:
                    p = Path(base) / s
                    (files if p.is_symlink() else dirs).add(rel / s)
                for n in names:
                    files.add(rel / n)
        else:
            files.add(Path(top.name))
    return files, dirs


def _copy(src: Path, dst: Path) -> None:
    """Copy one file or link with its metadata; a link stays a link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


def _same(a: Path, b: Path) -> bool:
    """Unchanged since the snapshot: same kind, size and modification time (copy2 keeps mtime to the ns)."""
    try:
        sa, sb = a.lstat(), b.lstat()
    except FileNotFoundError:
        return False
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    return (sa.st_mode & 0o170000) == (sb.st_mode & 0o170000) and sa.st_size == sb.st_size \
        and sa.st_mtime_ns == sb.st_mtime_ns


class Snapshot:
    """A copy of a run folder's results taken before one notebook runs.

    Built in ``.pipeline-snapshot.partial/`` and renamed when complete, so a run killed
    while copying leaves nothing that looks restorable; a complete snapshot found at the
    next start means a run died inside a notebook, and :meth:`restore` (idempotent: it
    copies back, never moves) finishes the job.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / SNAPSHOT_NAME
        self.tree = self.path / "tree"

    @classmethod
    def take(cls, run_dir, notebook: str) -> "Snapshot":
        snap = cls(run_dir)
        partial = snap.run_dir / PARTIAL_NAME
        shutil.rmtree(partial, ignore_errors=True)
        if snap.path.exists():
            raise RuntimeError(f"{snap.path} already exists: restore or remove it before taking a new snapshot")
        try:
            files, dirs = _entries(snap.run_dir)
            for d in dirs:
                (partial / "tree" / d).mkdir(parents=True, exist_ok=True)
            for f in files:
                _copy(snap.run_dir / f, partial / "tree" / f)
            (partial / "tree").mkdir(parents=True, exist_ok=True)
            (partial / "about.json").write_text(json.dumps(
                {"notebook": notebook, "pid": os.getpid(), "taken": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            os.replace(partial, snap.path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return snap

    @classmethod
    def leftover(cls, run_dir) -> "Snapshot | None":
        """The complete snapshot of a run that died inside a notebook, if any; a partial one is removed."""
        run_dir = Path(run_dir)
        shutil.rmtree(run_dir / PARTIAL_NAME, ignore_errors=True)
        snap = cls(run_dir)
        return snap if (snap.path / "about.json").is_file() and snap.tree.is_dir() else None

    @property
    def notebook(self) -> str:
        try:
            return json.loads((self.path / "about.json").read_text())["notebook"]
        except (OSError, ValueError, KeyError):
            return "a notebook"

    def restore(self) -> str:
        """Put the results back exactly as they were; returns what changed, in words."""
        now_files, now_dirs = _entries(self.run_dir)
        then_files, then_dirs = _entries(self.tree)
        removed = restored = 0
        for f in sorted(now_files - then_files):
            (self.run_dir / f).unlink(missing_ok=True)
            removed += 1
        for f in sorted(then_files):
            src, dst = self.tree / f, self.run_dir / f
            if _same(src, dst):
                continue
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            tmp = dst.with_name(f".{dst.name}.restore")
            tmp.unlink(missing_ok=True)
            _copy(src, tmp)
            os.replace(tmp, dst)
            restored += 1
        for d in sorted(now_dirs - then_dirs, key=lambda p: len(p.parts), reverse=True):
            target = self.run_dir / d
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
        for d in then_dirs:
            (self.run_dir / d).mkdir(parents=True, exist_ok=True)
        self.drop()
        return f"{_plural(removed, 'new file')} removed, {_plural(restored, 'changed file')} restored"

    def drop(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def clean_temp_files(*folders) -> list[str]:
    """Remove ``atomic_path`` temporaries (``.01_eda.ipynb.k3j2x8q1.ipynb``) left in ``folders``
    by a killed run; only call it while holding the run's lock. Returns the names removed."""
    gone = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = _ATOMIC_TEMP.match(p.name)
            if m and m["target"].endswith(m["suffix"]) and p.is_file() and not p.is_symlink():
                p.unlink()
                gone.append(p.name)
    return gone
