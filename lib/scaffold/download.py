"""`make data`: fetch the raw data with sha256 checks, progress, resume, and safe extraction.

Two sources (paths are relative to the data root, :func:`lib.config.data_root`):

* ``uci/risk_factors_cervical_cancer.csv``: UCI "Cervical cancer (Risk Factors)", dataset 383.
  Its sha256 is known (``UCI_SHA256``) and always checked.
* ``sipakmed/im_<Class>.7z``: the five official SIPaKMeD per-class archives, extracted in place
  (``sipakmed/im_<Class>/CROPPED/NNN_MM.bmp`` plus the cluster-level files).  **No checksum is
  published for these archives.**  The first download records the sha256 it computed in a
  sidecar ``im_<Class>.7z.sha256`` (``sha256sum`` format) and every later run verifies the archive
  against it: that detects corruption and silent changes, it does not prove the first copy was
  authentic.

Mirrors: ``--base-url U`` (or ``$CERVICAL_KIT_MIRROR``) replaces the official
``scheme://host/path/`` prefix; the file is then fetched from ``U/<path relative to the data
root>``, i.e. ``U/uci/risk_factors_cervical_cancer.csv`` and ``U/sipakmed/im_<Class>.7z``.  So any
kit's data folder served over HTTP (``python -m http.server``) is a mirror, and ``file:///...``
works for a copy on a USB stick.

Command line (exit status 0 ok, 1 error with a one-line message, 2 bad usage)::

    python -m lib.scaffold.download [uci|sipakmed|all] [--data-dir D] [--base-url U] [--class C] [-q]

Offline, it fails within seconds (immediately on a DNS failure, after ``connect_timeout`` seconds
otherwise) and says where to put the file by hand.  Without SIPaKMeD the notebooks fall back to
the synthetic stand-in (stamped SYNTHETIC); the tabular notebooks need the UCI CSV.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import http.client
import json
import os
import posixpath
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lib import config

ENV_MIRROR = "CERVICAL_KIT_MIRROR"

UCI_URL = ("https://archive.ics.uci.edu/ml/machine-learning-databases/00383/"
           "risk_factors_cervical_cancer.csv")
UCI_SHA256 = "8df193ad5c9ff4288fb4c401eef70dcd2cbda404ce7f82ac74c68cfc960ab063"
UCI_SIZE = 102_059

SIPAKMED_URL = "https://www.cs.uoi.gr/~marina/SIPAKMED/im_{cls}.7z"
SIPAKMED_PAGE = "https://www.cs.uoi.gr/~marina/sipakmed.html"
SIPAKMED_CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")
# cropped cells / cluster images per class (DESIGN.md section 3, shared/data/sipakmed/MANIFEST.csv);
# used only when lib.data.manifest is not available for the completeness report
SIPAKMED_COUNTS = {
    "Dyskeratotic": (813, 223),
    "Koilocytotic": (825, 238),
    "Metaplastic": (793, 271),
    "Parabasal": (787, 108),
    "Superficial-Intermediate": (831, 126),
}

USER_AGENT = "hybrid-cervical-kit/0.1 (+lib.scaffold.download)"
CONNECT_TIMEOUT = 10.0   # seconds for the first connection: offline fails fast
RETRY_WAIT = 1.0         # seconds before the first retry after a broken transfer (doubles)

VERBOSE = True           # the CLI's --quiet sets this to False


class DownloadError(OSError):
    """The file could not be fetched (offline, HTTP error, transfer kept breaking).

    The message is one line and says what to do instead.
    """


@dataclass(frozen=True)
class Source:
    """One downloadable file: its official URL and where it goes under the data root."""

    name: str
    url: str
    relpath: str                 # relative to the data root, also the path on a mirror
    sha256: str | None = None    # None: nothing published (SIPaKMeD), see the sidecar
    size: int | None = None

    def url_for(self, base_url: str | None = None) -> str:
        """The official URL, or ``<base_url>/<relpath>`` with a mirror (argument, then $CERVICAL_KIT_MIRROR)."""
        base = base_url if base_url else os.environ.get(ENV_MIRROR, "")
        if not base:
            return self.url
        return base.rstrip("/") + "/" + urllib.parse.quote(self.relpath)


UCI = Source("uci", UCI_URL, "uci/risk_factors_cervical_cancer.csv", UCI_SHA256, UCI_SIZE)
SIPAKMED = {c: Source(f"sipakmed/{c}", SIPAKMED_URL.format(cls=c), f"sipakmed/im_{c}.7z")
            for c in SIPAKMED_CLASSES}


def _say(msg: str) -> None:
    if VERBOSE:
        print(msg, flush=True)


# --------------------------------------------------------------------------- hashing
def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(sha256) -> str | None:
    if sha256 is None:
        return None
    s = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ValueError(f"parameter 'sha256': expected 64 hex digits, got {sha256!r}")
    return s


def read_sidecar(archive) -> str | None:
    """The sha256 recorded next to ``archive`` (``<archive>.sha256``), or None."""
    side = Path(str(archive) + ".sha256")
    if not side.exists():
        return None
    text = side.read_text(encoding="utf-8").split()
    try:
        return _check_sha(text[0] if text else "")
    except ValueError:
        raise ValueError(f"{side}: expected '<64 hex digits>  {Path(archive).name}'; delete it to re-record") from None


def write_sidecar(archive, sha256: str) -> Path:
    """Record ``sha256`` for ``archive`` in ``<archive>.sha256`` (``sha256sum -c`` can read it)."""
    from lib.atomic import write_text

    return _readable(write_text(Path(str(archive) + ".sha256"), f"{sha256}  {Path(archive).name}\n"))


def _readable(path: Path) -> Path:
    """lib.atomic's temp files are 0600; data files are shared, make them rw-r--r--."""
    try:
        os.chmod(path, 0o644)
    except OSError:  # pragma: no cover - not our file
        pass
    return path


# --------------------------------------------------------------------------- HTTP
class _ConnectTimeoutMixin:
    """Connection whose connect uses a short timeout and whose reads use the longer one."""

    read_timeout: float | None = None

    def connect(self):
        super().connect()
        if self.read_timeout is not None and self.sock is not None:
            self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ConnectTimeoutMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ConnectTimeoutMixin, http.client.HTTPSConnection):
    pass


def _conn_factory(cls, read_timeout):
    def make(*args, **kwargs):
        conn = cls(*args, **kwargs)
        conn.read_timeout = read_timeout
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout):
        super().__init__()
        self.read_timeout = read_timeout

    def http_open(self, req):
        return self.do_open(_conn_factory(_HTTPConnection, self.read_timeout), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout):
        super().__init__()
        self.read_timeout = read_timeout

    def https_open(self, req):
        return self.do_open(_conn_factory(_HTTPSConnection, self.read_timeout), req,
                            context=self._context)


def _opener(read_timeout):
    return urllib.request.build_opener(_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout))


def _offline_advice(url: str, dest: Path, official_url: str | None = None) -> str:
    where = url if not official_url or official_url == url else f"{official_url} (official; or {url})"
    return (f"To continue without this download: fetch {where} on a machine with network and put it at {dest} "
            f"(the kit checks it), or point the kit at a mirror with --base-url / ${ENV_MIRROR}, "
            f"or set ${config.ENV_DATA} to a folder that already holds uci/ and sipakmed/. "
            f"Without SIPaKMeD the notebooks fall back to the synthetic stand-in (stamped SYNTHETIC); "
            f"the tabular notebooks need the UCI CSV.")


class _Broken(Exception):
    """A transfer broke after it started: worth a resume."""


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _download(url, dest: Path, sha256, progress, timeout, chunk, connect_timeout, retries, official_url=None):
    """Stream ``url`` into ``dest`` (resumable); return (dest, hex sha256)."""
    dest = Path(dest)
    advice = functools.partial(_offline_advice, url, dest, official_url)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = _opener(timeout)
    host = urllib.parse.urlsplit(url).netloc or url
    wait = RETRY_WAIT
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        hasher = hashlib.sha256()
        if offset:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    hasher.update(block)
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            try:
                resp = opener.open(req, timeout=min(connect_timeout, timeout))
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 416 and offset:
                    # Range not satisfiable: the .part is complete already, or wrong; the hash decides
                    if sha256 is not None and hasher.hexdigest() == sha256:
                        return _finish(part, dest, hasher.hexdigest(), sha256)
                    _say(f"{dest.name}: server refused to resume from byte {offset}; starting again")
                    part.unlink()
                    continue
                if e.code >= 500 and attempt < retries:
                    raise _Broken(f"HTTP {e.code} {e.reason}") from None
                raise DownloadError(
                    f"HTTP {e.code} {e.reason} for {url}. The file may have moved (see "
                    f"{SIPAKMED_PAGE if 'SIPAKMED' in url.upper() else 'https://archive.ics.uci.edu/dataset/383'}). "
                    + advice()) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if attempt == 0 or isinstance(reason, socket.gaierror):
                    # the first probe failed: offline, DNS failure, refused, or no answer in connect_timeout
                    kind = ("DNS lookup failed" if isinstance(reason, socket.gaierror)
                            else "timed out"
                            if isinstance(reason, (socket.timeout, TimeoutError))
                            else f"{type(reason).__name__}: {reason}")
                    raise DownloadError(f"cannot reach {host} ({kind}) to download {url}. "
                                        + advice()) from None
                raise _Broken(f"{type(reason).__name__}: {reason}") from None
            with resp:
                status = getattr(resp, "status", None) or 200
                if offset and status == 206:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != offset:
                        _say(f"{dest.name}: server resumed at byte {start}, not {offset}; starting again")
                        part.unlink()
                        continue
                    _say(f"{dest.name}: resuming from byte {offset}")
                    mode = "ab"
                elif offset:
                    _say(f"{dest.name}: server ignored the resume request (HTTP {status}); starting again")
                    offset, mode, hasher = 0, "wb", hashlib.sha256()
                else:
                    mode = "wb"
                length = resp.headers.get("Content-Length")
                length = int(length) if length and length.isdigit() else None
                total = offset + length if length is not None else None
                received = 0
                bar = _progress_bar(progress, total, offset, dest.name)
                try:
                    with open(part, mode) as out:
                        while True:
                            try:
                                block = resp.read(chunk)
                            except (OSError, http.client.HTTPException) as e:
                                raise _Broken(f"{type(e).__name__}: {e}") from None
                            if not block:
                                break
                            out.write(block)
                            hasher.update(block)
                            received += len(block)
                            if bar is not None:
                                bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
                if length is not None and received < length:
                    raise _Broken(f"connection closed after {offset + received} of {total} bytes")
            return _finish(part, dest, hasher.hexdigest(), sha256)
        except _Broken as e:
            attempt += 1
            if attempt > retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"download of {url} kept breaking ({e}); {kept} bytes kept in {part}: run again to resume. "
                    + advice()) from None
            _say(f"{dest.name}: transfer broke ({e}); resuming in {wait:g} s (try {attempt} of {retries})")
            time.sleep(wait)
            wait *= 2


def _finish(part: Path, dest: Path, actual: str, expected: str | None):
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise ValueError(f"{dest.name}: sha256 mismatch, expected {expected}, got {actual}; "
                         f"the download was deleted (is the mirror serving another version?)")
    os.replace(part, dest)
    return dest, actual


def _progress_bar(progress, total, initial, desc):
    if not progress or not VERBOSE:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, leave=True, dynamic_ncols=True)


def download(url, dest, sha256=None, progress=True, timeout=30, chunk=1 << 16, *,
             connect_timeout=CONNECT_TIMEOUT, retries=3, official_url=None) -> Path:
    """Download ``url`` to ``dest`` (streamed, resumable, verified, atomic); return ``dest``.

    * Idempotent: when ``dest`` exists and matches ``sha256`` nothing touches the network
      ("already present").  When it exists but does not match, ``ValueError`` (a file put there
      by hand is never overwritten silently).  Without ``sha256`` an existing file is kept as is.
    * Streams into ``dest.part`` with a tqdm bar; a later call (or one of ``retries`` automatic
      retries after a broken transfer) resumes with an HTTP ``Range`` request from the
      ``.part`` size, and starts again if the server ignores ``Range``.
    * ``sha256`` is checked before the atomic rename to ``dest``; on a mismatch the ``.part``
      is deleted and ``ValueError`` names the file, the expected and the actual hash.
    * Offline fails fast: DNS errors at once, no connection within ``connect_timeout``
      seconds (``timeout`` is the per-read limit afterwards), raising :class:`DownloadError`
      whose message says where to put the file by hand (``official_url``: the address to
      name there when ``url`` is a mirror).
    """
    dest = Path(dest)
    sha256 = _check_sha(sha256)
    if dest.exists():
        if sha256 is None:
            _say(f"{dest.name}: already present at {dest} (no checksum to verify)")
            return dest
        actual = sha256_file(dest)
        if actual == sha256:
            _say(f"{dest.name}: already present at {dest} (sha256 ok)")
            return dest
        raise ValueError(f"{dest}: already present but its sha256 is {actual}, expected {sha256} "
                         f"(an edited or different copy?); move it away to download the original")
    return _download(url, dest, sha256, progress, timeout, chunk, connect_timeout, retries, official_url)[0]


# --------------------------------------------------------------------------- archives
MAX_MEMBER_BYTES = 256 * 2**20
"""Largest size one archive member may declare (and may write: bytes are counted too).

SIPaKMeD's biggest members are its cluster images, full microscope frames stored as 24-bit BMP
(2048 x 1536 px, about 9.4 MB); 256 MiB is over 25 times that and still harmless on any disk.
"""

MAX_TOTAL_BYTES = 8 * 2**30
"""Largest total the members of one archive may declare (and write).

SIPaKMeD's largest class archive is a few hundred MB; even if each of its 271 cluster images were a
full 2048 x 1536 24-bit frame (~9.4 MB) it would expand to about 2.6 GB, plus ~800 small cropped
cells.  8 GiB is three times that, while the bombs found by probing aimed at 1 GiB from a 156 KB
file and could as well aim at a full disk.
"""

MAX_RATIO = 200
"""Largest accepted expansion (declared size / compressed size), per zip member and per archive.

Cytology images as BMP compress a few times: 24 LBC pap-smear images saved as 24-bit BMP gave
2.2:1 under LZMA (at most 4.4:1) and 1.8:1 under deflate (at most 3.5:1).  The bombs found by
probing expanded 1029:1 (zip; deflate's ceiling is about 1032:1) and 6865:1 (7z).
"""

RATIO_MIN_BYTES = 2**20
"""The ratio is judged only when a member (or the archive) expands to more than this: a small
repetitive file can compress 1000:1 and costs nothing."""

MAX_MEMBERS = 100_000
"""More members than this is refused (a million empty files exhausts inodes at a tiny ratio).
A SIPaKMeD class archive holds a few thousand."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
                   | getattr(os, "O_BINARY", 0))


@dataclass(frozen=True)
class Member:
    """One archive member as declared in the archive's directory (nothing of its data is read).

    ``kind`` is ``"file"``, ``"dir"``, ``"symlink"`` or ``"special"`` (device, FIFO, socket,
    junction); ``parts`` the path components below the target; ``packed`` the compressed size
    where the format declares it per member (zip; a solid 7z has none).
    """

    name: str
    kind: str
    size: int
    parts: tuple = ()
    packed: int | None = None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _member_problem(name: str) -> str | None:
    """Why an archive member name is unsafe to extract, or None."""
    n = name.replace("\\", "/")
    if "\x00" in n:
        return "NUL byte in its name"
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        return "absolute path"
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if not parts:
        return "empty name"
    if ".." in parts:
        norm = posixpath.normpath(n)
        if norm == ".." or norm.startswith("../"):
            return "path escapes the target folder"
        return "'..' in its path"
    return None


def _parts(name: str) -> tuple:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _zip_kind(info: zipfile.ZipInfo) -> str:
    fmt = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
    if fmt == stat.S_IFLNK:
        return "symlink"
    if info.is_dir() or fmt == stat.S_IFDIR:
        return "dir"
    if fmt in (0, stat.S_IFREG):
        return "file"
    return "special"


def _members_7z(archive: Path) -> list:
    import py7zr

    with py7zr.SevenZipFile(archive, "r") as z:
        infos = z.list()
    return [Member(i.filename,
                   "symlink" if i.is_symlink else "dir" if i.is_directory else "file" if i.is_file else "special",
                   int(i.uncompressed or 0), _parts(i.filename))
            for i in infos]


def _members_zip(archive: Path) -> list:
    with zipfile.ZipFile(archive) as z:
        return [Member(i.filename, _zip_kind(i), i.file_size, _parts(i.filename), i.compress_size)
                for i in z.infolist()]


def archive_members(archive) -> list[str]:
    """Member names of a .7z or .zip archive."""
    return [m.name for m in _members(Path(archive))]


def _kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith(".7z"):
        return "7z"
    if name.endswith(".zip"):
        return "zip"
    raise ValueError(f"{archive}: unsupported archive type (expected .7z or .zip)")


def _members(archive: Path) -> list:
    kind = _kind(archive)
    try:
        return _members_7z(archive) if kind == "7z" else _members_zip(archive)
    except FileNotFoundError:
        raise
    except Exception as e:  # py7zr.Bad7zFile, zipfile.BadZipFile, truncated files ...
        raise ValueError(f"{archive}: not a readable {kind} archive ({type(e).__name__}: {e}); "
                         f"delete it (and its .sha256 if you trust the new copy) and download again") from None


_KIND_PROBLEM = {
    "symlink": "it is a symbolic link, and links are never extracted (SIPaKMeD archives hold only regular "
               "files and folders; a link lets a later member write outside the target folder)",
    "special": "it is not a regular file or folder (device, FIFO, socket or junction)",
}


def check_archive(archive) -> list:
    """Check every member of ``archive`` from its directory alone; return the :class:`Member` list.

    Raises ``ValueError`` naming the archive and the member, before anything is written, for:
    absolute paths, drive letters, ``..`` components (escaping or not), NUL bytes; symbolic links and
    anything else that is not a regular file or folder (zip and 7z cannot express hard links; with no
    link ever created, no later member can be written through one); duplicate names (after
    normalising ``./``, ``//`` and ``\\``), or a name used both as a file and as a folder;
    a member declaring more than :data:`MAX_MEMBER_BYTES`, or expanding more than :data:`MAX_RATIO`
    times; more than :data:`MAX_MEMBERS` members or :data:`MAX_TOTAL_BYTES` in all; an archive
    expanding more than :data:`MAX_RATIO` times its own size.
    """
    archive = Path(archive)
    members = _members(archive)

    def refuse(m, why):
        raise ValueError(f"{archive}: refusing to extract member {m.name!r}: {why}; nothing was written")

    if len(members) > MAX_MEMBERS:
        raise ValueError(f"{archive}: refusing to extract: {len(members):,} members, over the limit of "
                         f"{MAX_MEMBERS:,} (MAX_MEMBERS); nothing was written")
    seen: dict = {}
    total = 0
    for m in members:
        problem = _member_problem(m.name) or _KIND_PROBLEM.get(m.kind)
        if problem:
            refuse(m, problem)
        if m.parts in seen:
            refuse(m, f"duplicate name (member {seen[m.parts].name!r} has the same path)")
        seen[m.parts] = m
        if m.size < 0 or m.size > MAX_MEMBER_BYTES:
            refuse(m, f"declares {m.size:,} bytes, over the limit of {_mib(MAX_MEMBER_BYTES)} per member "
                      f"(MAX_MEMBER_BYTES)")
        if m.packed is not None and m.size > RATIO_MIN_BYTES and m.size > MAX_RATIO * max(m.packed, 1):
            refuse(m, f"expands {m.size / max(m.packed, 1):,.0f} times ({m.packed:,} -> {m.size:,} bytes), over "
                      f"the limit of {MAX_RATIO} (MAX_RATIO): a decompression bomb?")
        total += m.size
    for m in members:  # a folder path must not be a file member
        for i in range(1, len(m.parts)):
            up = seen.get(m.parts[:i])
            if up is not None and up.kind != "dir":
                refuse(m, f"stored below {up.name!r}, which is a file")
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"{archive}: refusing to extract: its members declare {total:,} bytes in all, over the "
                         f"limit of {_mib(MAX_TOTAL_BYTES)} (MAX_TOTAL_BYTES); nothing was written")
    packed = archive.stat().st_size
    if total > RATIO_MIN_BYTES and total > MAX_RATIO * max(packed, 1):
        raise ValueError(f"{archive}: refusing to extract: {packed:,} bytes expand to {total:,} "
                         f"({total / max(packed, 1):,.0f} times), over the limit of {MAX_RATIO} (MAX_RATIO): a "
                         f"decompression bomb?; nothing was written")
    return members


def _marker(archive: Path, target: Path) -> Path:
    return target / f".{archive.name}.extracted.json"


def extracted(archive, target) -> bool:
    """True when ``archive`` was fully extracted into ``target`` (marker present, top folders present)."""
    archive, target = Path(archive), Path(target)
    m = _marker(archive, target)
    if not m.exists():
        return False
    try:
        info = json.loads(m.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return all((target / top).exists() for top in info.get("top_level", []))


def _move_into(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; directories are merged, files replaced (each move atomic, no link followed)."""
    if dst.is_dir() and not dst.is_symlink() and src.is_dir() and not src.is_symlink():
        for child in src.iterdir():
            _move_into(child, dst / child.name)
        src.rmdir()
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


def _open_dir(root_fd: int, parts, create: bool) -> int:
    """A descriptor of folder ``root/parts`` walked one component at a time, never through a link."""
    fd = os.dup(root_fd)
    try:
        for p in parts:
            if create:
                try:
                    os.mkdir(p, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


class _Sink:
    """Writes one member into a new file (``O_CREAT | O_EXCL | O_NOFOLLOW``) and counts its bytes.

    More bytes than the member declared raises ``ValueError`` at once: declared sizes were checked
    against the caps, so counting keeps those caps true even when the archive lies.  Duck-types
    py7zr's ``Py7zIO`` (write, read, seek, flush, size, close).
    """

    def __init__(self, archive: Path, member: Member, root: Path, root_fd: int | None):
        self.archive, self.member, self.written = archive, member, 0
        *up, leaf = member.parts
        if root_fd is not None:
            dfd = _open_dir(root_fd, up, create=True)
            try:
                self.fd = os.open(leaf, _NEW_FILE_FLAGS, 0o666, dir_fd=dfd)
            finally:
                os.close(dfd)
        else:  # no dir_fd (Windows): plain paths; safe because no link is ever created in the private folder
            folder = root.joinpath(*up)
            folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(folder / leaf, _NEW_FILE_FLAGS, 0o666)

    def write(self, data) -> int:
        n = len(data)
        if self.written + n > self.member.size:
            raise ValueError(f"{self.archive}: refusing member {self.member.name!r}: it holds more than the "
                             f"{self.member.size:,} bytes it declares (a crafted archive?); the target was "
                             f"left as it was")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.written += n
        return n

    def read(self, size=None) -> bytes:
        return b""

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self.written

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _SinkFactory:
    """py7zr ``WriterFactory``: maps each path py7zr asks for back to a checked member."""

    def __init__(self, archive, root: Path, root_fd, plan: dict):
        self.archive, self.root, self.root_fd, self.plan = archive, root, root_fd, plan
        self.sinks: dict = {}

    def create(self, filename: str) -> _Sink:
        rel = os.path.relpath(filename, self.root)
        m = self.plan.get(_parts(rel)) if not rel.startswith("..") else None
        if m is None or m.kind != "file" or m.parts in self.sinks:
            raise ValueError(f"{self.archive}: py7zr asked to write {filename!r}, which is not a checked member; "
                             f"the target was left as it was")
        sink = self.sinks[m.parts] = _Sink(self.archive, m, self.root, self.root_fd)
        return sink


def _extract_members(archive: Path, kind: str, root: Path, members: list) -> None:
    """Write the checked ``members`` into the private folder ``root``; raise on any surprise."""
    plan = {m.parts: m for m in members}
    use_fd = os.open in os.supports_dir_fd and os.mkdir in os.supports_dir_fd
    root_fd = os.open(root, _DIR_FLAGS) if use_fd else None
    sinks: dict = {}
    try:
        folders = {m.parts for m in members if m.kind == "dir"}
        folders |= {m.parts[:-1] for m in members if m.kind == "file" and len(m.parts) > 1}
        for parts in sorted(folders):
            if root_fd is not None:
                os.close(_open_dir(root_fd, parts, create=True))
            else:
                root.joinpath(*parts).mkdir(parents=True, exist_ok=True)
        if kind == "7z":
            import py7zr

            factory = _SinkFactory(archive, root, root_fd, plan)
            sinks = factory.sinks
            # max_extract_size: py7zr's own byte counter, a second line behind the sinks' counts
            with py7zr.SevenZipFile(archive, "r", max_extract_size=MAX_TOTAL_BYTES) as z:
                z.extractall(path=root, factory=factory)
        else:
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
                if [(i.filename, i.file_size) for i in infos] != [(m.name, m.size) for m in members]:
                    raise ValueError(f"{archive}: changed while being extracted; the target was left as it was")
                for info, m in zip(infos, members):
                    if m.kind != "file":
                        continue
                    sink = sinks[m.parts] = _Sink(archive, m, root, root_fd)
                    # let zipfile inflate past the declared size so that a lie shows in the count,
                    # instead of being cut off silently at the declared length
                    probe = copy.copy(info)
                    probe.file_size = MAX_MEMBER_BYTES + 1
                    with z.open(probe) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            sink.write(block)
                    sink.close()
        for m in members:
            if m.kind == "file":
                got = sinks[m.parts].written if m.parts in sinks else None
                if got != m.size:
                    raise ValueError(f"{archive}: member {m.name!r} gave {got if got is not None else 'no'} bytes, "
                                     f"it declares {m.size:,} (truncated or damaged); delete the archive and "
                                     f"download again; the target was left as it was")
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                if os.path.islink(os.path.join(folder, name)):  # never created; a last check, not the defence
                    raise ValueError(f"{archive}: a link appeared at {name!r} during extraction; the target was "
                                     f"left as it was")
    finally:
        for s in sinks.values():
            s.close()
        if root_fd is not None:
            os.close(root_fd)


def safe_extract(archive, target, *, archive_sha256: str | None = None) -> Path:
    """Extract a .7z (py7zr) or .zip ``archive`` into ``target``, safely, atomically and idempotently.

    * Every member is checked from the archive's directory first (:func:`check_archive`: names,
      kinds, duplicates, declared sizes and ratios); an unsafe one raises ``ValueError`` naming the
      archive and the member before anything is written.
    * Only regular files and folders are created, each file new (``O_EXCL | O_NOFOLLOW``, folders
      walked without following links), in a private temporary folder next to ``target``; bytes are
      counted while writing, so an archive whose data outgrows its declared sizes is stopped.
    * Only when every member is written, complete, is the result moved into ``target`` (renamed
      when ``target`` does not exist yet, else merged: folders merged, files replaced).  Any
      failure leaves ``target`` as it was and removes the temporary folder.
    * A marker ``target/.<archive name>.extracted.json`` (with the archive's sha256) makes a second
      call a no-op; a different archive with the same name is extracted again.
    """
    archive, target = Path(archive), Path(target)
    if not archive.exists():
        raise FileNotFoundError(f"{archive}: archive not found")
    kind = _kind(archive)
    digest = _check_sha(archive_sha256) or sha256_file(archive)
    marker = _marker(archive, target)
    if extracted(archive, target):
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("sha256")
        except ValueError:
            recorded = None
        if recorded == digest:
            _say(f"{archive.name}: already extracted into {target}")
            return target
    members = check_archive(archive)
    real = Path(os.path.realpath(target))  # a symlinked data folder is the user's choice: work where it points
    if real.exists() and not real.is_dir():
        raise ValueError(f"{target}: exists and is not a folder; cannot extract {archive.name} into it")
    made = [p for p in (real.parent, *real.parent.parents) if not p.exists()]
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.extract-", dir=real.parent))
    done = False
    try:
        _say(f"{archive.name}: extracting {len(members)} members into {target}")
        try:
            _extract_members(archive, kind, tmp, members)
        except ValueError:
            raise
        except OSError as e:
            raise OSError(f"{archive}: extraction failed ({type(e).__name__}: {e}); the target {target} was left "
                          f"as it was") from None
        except Exception as e:  # py7zr.Bad7zFile / CrcError / DecompressionBombError, zipfile.BadZipFile, zlib ...
            raise ValueError(f"{archive}: extraction failed ({type(e).__name__}: {e}); the archive may be corrupt "
                             f"or crafted: delete it and download again; the target {target} was left as it "
                             f"was") from None
        tops = sorted(p.name for p in tmp.iterdir())
        from lib.atomic import write_json

        _readable(write_json(_marker(archive, tmp), {
            "archive": archive.name, "sha256": digest, "members": len(members), "top_level": tops,
            "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        if not real.exists():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is 0700; the data folder is shared
            os.rename(tmp, real)
        else:
            for name in tops + [_marker(archive, tmp).name]:
                _move_into(tmp / name, real / name)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for p in made:  # innermost first: only the folders this call created, and only if empty
                try:
                    p.rmdir()
                except OSError:
                    break
    return target


# --------------------------------------------------------------------------- the datasets
def fetch_uci(data_dir=None, base_url=None, progress=True, **kw) -> Path:
    """Download (or verify) the UCI CSV into ``<data root>/uci/``; return its path."""
    dest = config.data_root(data_dir) / UCI.relpath
    return download(UCI.url_for(base_url), dest, sha256=UCI.sha256, progress=progress, official_url=UCI.url, **kw)


def fetch_sipakmed(data_dir=None, base_url=None, progress=True, classes=None, **kw) -> Path:
    """Download, verify and extract the official SIPaKMeD archives into ``<data root>/sipakmed/``.

    No checksum is published: the first download records the sha256 in ``<archive>.sha256``,
    later runs verify against it.  Returns the SIPaKMeD folder; print :func:`sipakmed_report`.
    """
    root = config.data_root(data_dir)
    sdir = root / "sipakmed"
    classes = list(classes) if classes else list(SIPAKMED_CLASSES)
    unknown = [c for c in classes if c not in SIPAKMED]
    if unknown:
        raise ValueError(f"parameter 'classes': unknown SIPaKMeD class(es) {unknown}; expected some of "
                         f"{list(SIPAKMED_CLASSES)}")
    for cls in classes:
        src = SIPAKMED[cls]
        archive = root / src.relpath
        recorded = read_sidecar(archive)
        if not archive.exists():
            if extracted(archive, sdir) or extracted(archive, sdir / f"im_{cls}"):
                _say(f"{archive.name}: already extracted (archive removed); skipping")
                continue
            cells = _count_sipakmed(sdir, [cls])[cls][0]
            if cells >= SIPAKMED_COUNTS[cls][0]:
                _say(f"im_{cls}: already in {sdir} ({cells} cropped cells, no archive); skipping")
                continue
            digest = _download(src.url_for(base_url), archive, recorded, progress, kw.get("timeout", 30),
                               kw.get("chunk", 1 << 16), kw.get("connect_timeout", CONNECT_TIMEOUT),
                               kw.get("retries", 3), src.url)[1]
            if recorded is None:
                _say(f"{archive.name}: no checksum is published for this archive; recorded its sha256 {digest} "
                     f"in {archive.name}.sha256, checked on every later run")
            else:
                _say(f"{archive.name}: sha256 matches the recorded {archive.name}.sha256")
        elif recorded is not None:
            digest = sha256_file(archive)  # verify on reuse; no network
            if digest != recorded:
                raise ValueError(f"{archive}: sha256 is {digest} but {archive.name}.sha256 recorded {recorded} "
                                 f"at its first download: the archive changed or is corrupt; delete both files "
                                 f"to download it again")
            _say(f"{archive.name}: already present (sha256 matches the recorded {archive.name}.sha256)")
        else:
            digest = sha256_file(archive)
            _say(f"{archive.name}: present, no recorded checksum (none is published); recording {digest}")
        if recorded is None:
            write_sidecar(archive, digest)
        names = archive_members(archive)
        top = f"im_{cls}"
        nested = all(n.replace("\\", "/").split("/")[0] == top for n in names)
        safe_extract(archive, sdir if nested else sdir / top, archive_sha256=digest)
    return sdir


def _count_sipakmed(sdir: Path, classes=SIPAKMED_CLASSES) -> dict:
    """{class: (cropped cells, cluster images)} in the official or the Kaggle layout."""
    out = {}
    for cls in classes:
        cells = clusters = 0
        for base in (sdir / f"im_{cls}", sdir / f"im_{cls}" / f"im_{cls}"):
            if (base / "CROPPED").is_dir():
                cells = sum(1 for p in (base / "CROPPED").iterdir() if p.suffix.lower() == ".bmp")
                clusters = sum(1 for p in base.iterdir() if p.suffix.lower() == ".bmp")
                break
        out[cls] = (cells, clusters)
    return out


def sipakmed_report(data_dir=None) -> str:
    """Completeness of ``<data root>/sipakmed`` against the 4049-name manifest.

    Uses ``lib.data.image_data.load_sipakmed`` + ``lib.data.manifest.completeness`` when they exist, else
    counts ``CROPPED/*.bmp`` per class against the published counts.
    """
    sdir = config.sipakmed_dir(data_dir)
    try:
        from lib.data import image_data, manifest

        try:
            ds = image_data.load_sipakmed(sdir, on_bad="skip")  # an unreadable image is reported, not fatal
        except TypeError:
            ds = image_data.load_sipakmed(sdir)
        rep = manifest.completeness(getattr(ds, "table", ds))
        text = rep.to_string() if hasattr(rep, "to_string") else (
            json.dumps(rep, indent=2, default=str) if isinstance(rep, (dict, list)) else str(rep))
        return f"{sdir}:\n{text}"
    except Exception as e:  # not written yet, or another signature: count ourselves
        why = f"{type(e).__name__}: {e}"
    counts = _count_sipakmed(sdir)
    lines = [f"SIPaKMeD completeness for {sdir} (file counts; lib.data.manifest not used: {why}):"]
    for cls, (cells, clusters) in counts.items():
        exp_cells, exp_clusters = SIPAKMED_COUNTS[cls]
        flag = "ok" if cells == exp_cells else "INCOMPLETE" if cells < exp_cells else "more than expected"
        lines.append(f"  {cls:<25} cells {cells:>4}/{exp_cells}  cluster images {clusters:>3}/{exp_clusters}  {flag}")
    total = sum(c for c, _ in counts.values())
    lines.append(f"  total cells {total}/{sum(c for c, _ in SIPAKMED_COUNTS.values())}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """``python -m lib.scaffold.download [uci|sipakmed|all] [--data-dir D] [--base-url U]``; returns the exit status."""
    global VERBOSE
    p = argparse.ArgumentParser(
        prog="python -m lib.scaffold.download",
        description="Download the kit's raw data with sha256 checks, resume and safe extraction.",
        epilog=(f"Mirror layout: <base-url>/{UCI.relpath} and <base-url>/sipakmed/im_<Class>.7z. "
                f"Environment: ${config.ENV_DATA} (data root), ${ENV_MIRROR} (mirror). "
                "Exit status: 0 ok, 1 error, 2 bad usage."))
    p.add_argument("what", nargs="?", default="all", choices=["uci", "sipakmed", "all"],
                   help="which data set (default: all)")
    p.add_argument("--data-dir", default=None,
                   help=f"data root (default: ${config.ENV_DATA}, then data/)")
    p.add_argument("--base-url", default=None,
                   help=f"mirror replacing the official URL prefix (default: ${ENV_MIRROR}, then the official sites)")
    p.add_argument("--class", dest="classes", action="append", choices=list(SIPAKMED_CLASSES), default=None,
                   help="only this SIPaKMeD class (repeatable; default: all five)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per read (default 30)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT,
                   help=f"seconds to wait for a connection (default {CONNECT_TIMEOUT:g})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    args = p.parse_args(argv)
    old = VERBOSE
    VERBOSE = not args.quiet
    kw = dict(timeout=args.timeout, connect_timeout=args.connect_timeout)
    try:
        if args.what in ("uci", "all"):
            path = fetch_uci(args.data_dir, args.base_url, progress=not args.quiet, **kw)
            _say(f"UCI risk factors: {path}")
        if args.what in ("sipakmed", "all"):
            sdir = fetch_sipakmed(args.data_dir, args.base_url, progress=not args.quiet,
                                  classes=args.classes, **kw)
            _say(sipakmed_report(sdir.parent))
        return 0
    except (DownloadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run again to resume (partial downloads are kept as .part)", file=sys.stderr)
        return 1
    finally:
        VERBOSE = old


if __name__ == "__main__":
    sys.exit(main())
