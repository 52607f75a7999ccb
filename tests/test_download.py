"""lib.scaffold.download against a loopback HTTP server (127.0.0.1 only: nothing here touches the internet)."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

py7zr = pytest.importorskip("py7zr")

from lib.scaffold import download as dl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_UCI = ROOT.parent / "shared" / "data" / "uci" / "risk_factors_cervical_cancer.csv"


# --------------------------------------------------------------------------- the local server
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server.ctl
        srv.requests.append((self.path, dict(self.headers)))
        rel = self.path.lstrip("/").split("?")[0]
        if rel in srv.force_status:
            self.send_error(srv.force_status[rel])
            return
        f = srv.root / rel
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not srv.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if srv.cut_next > 0:  # promise the whole body, send part of it, hang up
            srv.cut_next -= 1
            self.wfile.write(body[: srv.cut_at])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class LocalServer:
    """ThreadingHTTPServer on 127.0.0.1 serving ``root``; counts requests; can cut, ignore Range, 404."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, dict]] = []
        self.cut_next = 0        # cut this many next responses ...
        self.cut_at = 0          # ... after this many body bytes
        self.ignore_range = False
        self.force_status: dict[str, int] = {}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.ctl = self
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    s = LocalServer(root)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.delenv(dl.ENV_MIRROR, raising=False)
    monkeypatch.delenv("CERVICAL_KIT_DATA", raising=False)
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    monkeypatch.setattr(dl, "VERBOSE", True)


def _payload(n=300_000, seed=1) -> bytes:
    out, h = bytearray(), hashlib.sha256(str(seed).encode())
    while len(out) < n:
        h = hashlib.sha256(h.digest())
        out += h.digest()
    return bytes(out[:n])


def _serve(server, rel, data: bytes) -> tuple[str, str]:
    f = server.root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f"{server.url}/{rel}", hashlib.sha256(data).hexdigest()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------- download()
def test_full_download_verifies_sha(server, tmp_path):
    data = _payload()
    url, sha = _serve(server, "blob.bin", data)
    dest = tmp_path / "out" / "blob.bin"
    assert dl.download(url, dest, sha256=sha, progress=False) == dest
    assert dest.read_bytes() == data
    assert not (tmp_path / "out" / "blob.bin.part").exists()
    assert len(server.requests) == 1 and "Range" not in server.requests[0][1]


def test_resume_after_truncated_transfer(server, tmp_path):
    data = _payload()
    url, sha = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    part = tmp_path / "blob.bin.part"
    server.cut_next, server.cut_at = 1, 100_000
    with pytest.raises(dl.DownloadError, match="run again to resume"):
        dl.download(url, dest, sha256=sha, progress=False, retries=0)
    assert not dest.exists() and part.stat().st_size == 100_000
    dl.download(url, dest, sha256=sha, progress=False)
    assert server.requests[1][1].get("Range") == "bytes=100000-"
    assert dest.read_bytes() == data and not part.exists()


def test_broken_transfer_is_resumed_automatically(server, tmp_path, capsys):
    data = _payload()
    url, sha = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    server.cut_next, server.cut_at = 2, 70_000
    dl.download(url, dest, sha256=sha, progress=False, retries=3)
    ranges = [h.get("Range") for _, h in server.requests]
    assert ranges == [None, "bytes=70000-", "bytes=140000-"]
    assert dest.read_bytes() == data
    assert "resuming" in capsys.readouterr().out


def test_server_that_ignores_range_restarts(server, tmp_path, capsys):
    data = _payload()
    url, sha = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    server.cut_next, server.cut_at = 1, 50_000
    with pytest.raises(dl.DownloadError):
        dl.download(url, dest, sha256=sha, progress=False, retries=0)
    server.ignore_range = True
    dl.download(url, dest, sha256=sha, progress=False, retries=0)
    assert server.requests[1][1].get("Range") == "bytes=50000-"
    assert dest.read_bytes() == data  # not the prefix twice
    assert "ignored the resume request" in capsys.readouterr().out


def test_complete_part_file_is_finished_on_416(server, tmp_path):
    data = _payload(50_000)
    url, sha = _serve(server, "blob.bin", data)
    (tmp_path / "blob.bin.part").write_bytes(data)
    dl.download(url, tmp_path / "blob.bin", sha256=sha, progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_sha_mismatch_raises_and_leaves_nothing(server, tmp_path):
    url, sha = _serve(server, "blob.bin", _payload())
    wrong = "0" * 64
    dest = tmp_path / "blob.bin"
    with pytest.raises(ValueError) as err:
        dl.download(url, dest, sha256=wrong, progress=False)
    msg = str(err.value)
    assert "blob.bin" in msg and wrong in msg and sha in msg
    assert not dest.exists() and not (tmp_path / "blob.bin.part").exists()


def test_second_call_makes_no_request(server, tmp_path, capsys):
    data = _payload(10_000)
    url, sha = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    dl.download(url, dest, sha256=sha, progress=False)
    n = len(server.requests)
    dl.download(url, dest, sha256=sha, progress=False)
    assert len(server.requests) == n == 1
    assert "already present" in capsys.readouterr().out
    # a different file already at dest is never overwritten silently, and costs no request either
    dest.write_bytes(b"edited copy")
    with pytest.raises(ValueError, match="already present but its sha256"):
        dl.download(url, dest, sha256=sha, progress=False)
    assert dest.read_bytes() == b"edited copy" and len(server.requests) == 1


def test_http_404_is_a_download_error(server, tmp_path):
    with pytest.raises(dl.DownloadError, match="HTTP 404") as err:
        dl.download(f"{server.url}/missing.bin", tmp_path / "missing.bin", progress=False)
    assert str(tmp_path / "missing.bin") in str(err.value)
    assert not (tmp_path / "missing.bin").exists() and not (tmp_path / "missing.bin.part").exists()


def _assert_helpful(msg: str, url: str, dest: Path):
    assert url in msg and str(dest) in msg
    assert dl.ENV_MIRROR in msg and "CERVICAL_KIT_DATA" in msg and "--base-url" in msg
    assert "synthetic stand-in" in msg and "UCI CSV" in msg
    assert "\n" not in msg


def test_unreachable_server_fails_fast_with_advice(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/uci/risk_factors_cervical_cancer.csv"
    dest = tmp_path / "uci" / "risk_factors_cervical_cancer.csv"
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as err:
        dl.download(url, dest, sha256=dl.UCI_SHA256, progress=False)
    assert time.monotonic() - t0 < 3
    _assert_helpful(str(err.value), url, dest)
    assert not dest.exists()


def test_silent_server_times_out(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # the kernel completes the handshake; nobody ever answers
    try:
        t0 = time.monotonic()
        with pytest.raises(dl.DownloadError, match="timed out"):
            dl.download(f"http://127.0.0.1:{s.getsockname()[1]}/x", tmp_path / "x", progress=False,
                        timeout=0.5, connect_timeout=0.5)
        assert time.monotonic() - t0 < 3
    finally:
        s.close()


def test_dns_failure_fails_immediately(tmp_path, monkeypatch):
    def no_dns(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no resolver is contacted
    url = "https://archive.example.invalid/x.csv"
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match="DNS lookup failed") as err:
        dl.download(url, tmp_path / "x.csv", progress=False, retries=5)
    assert time.monotonic() - t0 < 1
    _assert_helpful(str(err.value), url, tmp_path / "x.csv")


def test_mirror_url_replaces_the_official_prefix(monkeypatch):
    assert dl.UCI.url_for() == dl.UCI_URL
    assert dl.UCI.url_for("http://127.0.0.1:9/kit/") == "http://127.0.0.1:9/kit/uci/risk_factors_cervical_cancer.csv"
    monkeypatch.setenv(dl.ENV_MIRROR, "file:///media/usb/data")
    assert dl.SIPAKMED["Parabasal"].url_for() == "file:///media/usb/data/sipakmed/im_Parabasal.7z"
    assert dl.SIPAKMED["Parabasal"].url_for("http://m/") == "http://m/sipakmed/im_Parabasal.7z"


def test_file_url_mirror_works(tmp_path):
    data = _payload(5_000)
    src = tmp_path / "usb" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    dest = tmp_path / "blob.bin"
    dl.download(src.as_uri(), dest, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert dest.read_bytes() == data


# --------------------------------------------------------------------------- safe_extract()
def _evil_7z(path: Path, name: str) -> Path:
    with py7zr.SevenZipFile(path, "w") as z:
        z.writestr(b"fine", "ok/fine.txt")
        z._writestr(b"pwned", name)  # bypasses py7zr's own writer-side check, as a hostile tool would
    return path


def _evil_zip(path: Path, name: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok/fine.txt", b"fine")
        z.writestr(zipfile.ZipInfo(name), b"pwned")
    return path


def _unix_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def _symlink_zip(path: Path, link_name: str, link_target: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok/fine.txt", b"fine")
        z.writestr(_unix_info(link_name, stat.S_IFLNK | 0o777), link_target)
    return path


def _symlink_7z(path: Path, tmp: Path, link_target: str) -> Path:
    src = tmp / "l1" / "l2"  # py7zr stores a link only if its target exists
    src.mkdir(parents=True)
    (tmp / "outside").mkdir()
    (src / "fine.txt").write_bytes(b"fine")
    (src / "link").symlink_to(link_target)
    with py7zr.SevenZipFile(path, "w", dereference=False) as z:
        z.write(src / "link", "ok/link")  # before writestr: py7zr 1.1.4 trips over the reverse order
        z.writestr(b"fine", "ok/fine.txt")
    return path


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its kind and content (links read, never followed)."""
    snap = {}
    for folder, dirs, files in os.walk(root):  # os.walk does not descend into linked folders
        for name in dirs + files:
            p = Path(folder, name)
            if p.is_symlink():
                snap[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[str(p.relative_to(root))] = ("dir",)
            else:
                snap[str(p.relative_to(root))] = ("file", p.read_bytes())
    return snap


@pytest.fixture
def arena(tmp_path):
    """``tmp_path/outer/mid/target`` already holding a file, with victims one, two and three levels up.

    A hostile archive is built in ``tmp_path/archives``; the tests snapshot all of ``tmp_path`` (the
    parents of the target, the target itself, the archive) before and after.
    """
    target = tmp_path / "outer" / "mid" / "target"
    target.mkdir(parents=True)
    (target / "keep.txt").write_bytes(b"the user's file")
    for p in (tmp_path / "outer" / "mid", tmp_path / "outer", tmp_path):
        (p / "victim.txt").write_bytes(b"original")
    (tmp_path / "abs_victim.txt").write_bytes(b"original")
    (tmp_path / "archives").mkdir()
    return target


def _refused_untouched(archive: Path, target: Path, root: Path, match: str) -> str:
    """safe_extract refuses ``archive`` with a message naming it, and nothing under ``root`` changed."""
    before = _snapshot(root)
    with pytest.raises(Exception) as err:  # noqa: PT011 - the type is asserted below, after the snapshot
        dl.safe_extract(archive, target)
    assert _snapshot(root) == before  # no victim overwritten, target as it was, no temporary folder left
    msg = str(err.value)
    assert err.type is ValueError and re.search(match, msg), msg
    assert str(archive) in msg
    return msg


def _chain_zip(path: Path, tmp_path: Path) -> Path:
    """The probe of issue 9: links that resolve inside as text but outside on disk, then files written through them.

    ``d1/d2/d3/d4/x -> ../../../..`` is the extraction folder itself; ``esc -> d1/d2/d3/d4/x/../../../victim.txt``
    reads as ``d1/d2/victim.txt`` but is three levels above the extraction folder; ``e1/.../e40/y`` climbs to
    ``/`` and ``abs`` descends to an absolute path.  Regular files ``esc`` and ``abs`` follow.
    """
    deep = "/".join(f"e{i}" for i in range(1, 41))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(_unix_info("d1/d2/d3/d4/x", stat.S_IFLNK | 0o777), "../../../..")
        z.writestr(_unix_info("esc", stat.S_IFLNK | 0o777), "d1/d2/d3/d4/x/../../../victim.txt")
        z.writestr(_unix_info(f"{deep}/y", stat.S_IFLNK | 0o777), "../" * 40)
        z.writestr(_unix_info("abs", stat.S_IFLNK | 0o777),
                   f"{deep}/y/" + "../" * 40 + str(tmp_path / "abs_victim.txt").lstrip("/"))
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr(_unix_info("esc", stat.S_IFREG | 0o644), b"pwned")
            z.writestr(_unix_info("abs", stat.S_IFREG | 0o644), b"pwned")
    return path


def test_symlink_chain_from_the_issue_writes_nothing_outside(arena, tmp_path):
    archive = _chain_zip(tmp_path / "archives" / "chain.zip", tmp_path)
    msg = _refused_untouched(archive, arena, tmp_path, "'d1/d2/d3/d4/x'.*symbolic link")
    assert "nothing was written" in msg


@pytest.mark.parametrize("member", ["../evil", "ok/../../evil", "ok/./../../evil", "..\\evil",
                                    "/tmp/cervical_kit_abs_evil", "C:/evil"])
@pytest.mark.parametrize("kind", ["7z", "zip"])
def test_safe_extract_refuses_escaping_members(arena, tmp_path, kind, member):
    make = _evil_7z if kind == "7z" else _evil_zip
    archive = make(tmp_path / "archives" / f"bad.{kind}", member)
    stored = dl.archive_members(archive)[-1]  # py7zr's writer may normalise the name it stores
    msg = _refused_untouched(archive, arena, tmp_path, "absolute path|escapes|'\\.\\.'")
    assert f"member {stored!r}" in msg
    assert not Path("/tmp/cervical_kit_abs_evil").exists()


@pytest.mark.parametrize("link_target", ["../../outside", "/etc", "fine.txt"])
@pytest.mark.parametrize("kind", ["7z", "zip"])
def test_safe_extract_refuses_every_symlink(arena, tmp_path, kind, link_target):
    """Links are never created, not even ones pointing inside: SIPaKMeD has none, and none can be abused."""
    if kind == "7z":
        archive = _symlink_7z(tmp_path / "archives" / "bad.7z", tmp_path / "archives", link_target)
    else:
        archive = _symlink_zip(tmp_path / "archives" / "bad.zip", "ok/link", link_target)
    _refused_untouched(archive, arena, tmp_path, "'ok/link'.*symbolic link")


@pytest.mark.parametrize("mode", [stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o644, stat.S_IFSOCK | 0o644])
def test_safe_extract_refuses_special_files(arena, tmp_path, mode):
    archive = tmp_path / "archives" / "special.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/fine.txt", b"fine")
        z.writestr(_unix_info("ok/dev", mode), b"")
    _refused_untouched(archive, arena, tmp_path, "'ok/dev'.*not a regular file")


def test_safe_extract_refuses_members_below_a_symlink(arena, tmp_path):
    archive = tmp_path / "archives" / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(_unix_info("d", stat.S_IFLNK | 0o777), ".")
        z.writestr("d/x.txt", b"x")
    _refused_untouched(archive, arena, tmp_path, "'d'.*symbolic link")


@pytest.mark.parametrize("first,second", [("ok/a.txt", "ok/a.txt"), ("ok/a.txt", "./ok/a.txt"),
                                          ("ok/a.txt", "ok//a.txt"), ("ok/a.txt", "ok\\a.txt")])
@pytest.mark.parametrize("kind", ["7z", "zip"])
def test_safe_extract_refuses_duplicate_names(arena, tmp_path, kind, first, second):
    archive = tmp_path / "archives" / f"dup.{kind}"
    if kind == "7z":
        with py7zr.SevenZipFile(archive, "w") as z:
            z.writestr(b"first", first)
            z._writestr(b"second", second)
    else:
        with zipfile.ZipFile(archive, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zipfile's own "Duplicate name" warning
            z.writestr(first, b"first")
            z.writestr(second, b"second")
    stored = dl.archive_members(archive)  # py7zr's writer may normalise the names it stores
    msg = _refused_untouched(archive, arena, tmp_path, "duplicate name")
    assert f"member {stored[1]!r}" in msg and f"member {stored[0]!r} has the same path" in msg


def test_safe_extract_refuses_a_file_used_as_a_folder(arena, tmp_path):
    archive = tmp_path / "archives" / "clash.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok", b"a file")
        z.writestr("ok/a.txt", b"below it")
    _refused_untouched(archive, arena, tmp_path, "'ok/a.txt'.*stored below 'ok', which is a file")


def _zeros_zip(path: Path, n: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ok/fine.txt", b"fine")
        z.writestr("big.bin", bytes(n))
    return path


def _zeros_7z(path: Path, n: int) -> Path:
    with py7zr.SevenZipFile(path, "w") as z:
        z.writestr(b"fine", "ok/fine.txt")
        z.writestr(bytes(n), "big.bin")
    return path


@pytest.mark.parametrize("kind", ["zip", "7z"])
def test_high_ratio_archives_are_refused_before_writing(arena, tmp_path, kind):
    """16 MiB of zeros: ~16 KB as zip (ratio ~1000, deflate's ceiling), a few KB as 7z (ratio in the thousands)."""
    make = _zeros_zip if kind == "zip" else _zeros_7z
    archive = make(tmp_path / "archives" / f"bomb.{kind}", 16 * 2**20)
    msg = _refused_untouched(archive, arena, tmp_path, "expand.*times.*MAX_RATIO")
    assert "nothing was written" in msg
    with pytest.raises(ValueError, match="MAX_RATIO"):
        dl.check_archive(archive)  # the declared sizes alone condemn it: nothing is decompressed
    assert archive.stat().st_size * dl.MAX_RATIO < 16 * 2**20


def _patch_zip_sizes(path: Path, member: str, file_size: int, crc: int | None = None) -> None:
    """Rewrite the uncompressed size (and CRC) ``member`` declares, in its local header and the central directory."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    data = bytearray(path.read_bytes())
    local = info.header_offset
    assert data[local:local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, local + 22, file_size)
    if crc is not None:
        struct.pack_into("<I", data, local + 14, crc)
    name = member.encode()
    central = data.index(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, file_size)
    if crc is not None:
        struct.pack_into("<I", data, central + 16, crc)
    path.write_bytes(bytes(data))


def test_zip_whose_data_outgrows_its_declared_size_is_stopped(arena, tmp_path):
    """Declares 1,000 bytes (CRC of those 1,000 bytes, ratio harmless) but inflates to 16 MiB.

    zipfile alone would cut the data at the declared size and accept it; the byte count stops it.
    """
    archive = _zeros_zip(tmp_path / "archives" / "liar.zip", 16 * 2**20)
    _patch_zip_sizes(archive, "big.bin", 1000, zlib.crc32(bytes(1000)))
    dl.check_archive(archive)  # the declared sizes pass every cap ...
    msg = _refused_untouched(archive, arena, tmp_path, "'big.bin'.*holds more than the 1,000 bytes it declares")
    assert "left as it was" in msg


def test_zip_declaring_a_huge_member_is_refused_before_writing(arena, tmp_path):
    archive = _zeros_zip(tmp_path / "archives" / "huge.zip", 1000)
    _patch_zip_sizes(archive, "big.bin", 3 * 2**30)
    _refused_untouched(archive, arena, tmp_path, "'big.bin'.*declares 3,221,225,472 bytes.*MAX_MEMBER_BYTES")


def test_total_and_member_count_caps(arena, tmp_path, monkeypatch):
    """Honest, incompressible members under every per-member cap, but too much in all (caps lowered to test size)."""
    archive = tmp_path / "archives" / "many.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        for i in range(3):
            z.writestr(_payload(600_000, seed=i), f"ok/part{i}.bin")
    monkeypatch.setattr(dl, "MAX_TOTAL_BYTES", 2**20, raising=False)
    _refused_untouched(archive, arena, tmp_path, "declare 1,800,000 bytes in all.*MAX_TOTAL_BYTES")
    monkeypatch.setattr(dl, "MAX_TOTAL_BYTES", 2**30, raising=False)
    monkeypatch.setattr(dl, "MAX_MEMBERS", 2, raising=False)
    _refused_untouched(archive, arena, tmp_path, "3 members.*MAX_MEMBERS")
    monkeypatch.setattr(dl, "MAX_MEMBERS", 3, raising=False)
    dl.safe_extract(archive, arena)
    assert (arena / "ok" / "part2.bin").read_bytes() == _payload(600_000, seed=2)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_extraction_leaves_the_target_as_it_was(tmp_path, existing):
    """A member that fails late (bad CRC in the last member) leaves no trace, and no new target folder either."""
    archive = tmp_path / "late.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/first.txt", b"written first")
        z.writestr("ok/last.txt", b"damaged at the end")
    _patch_zip_sizes(archive, "ok/last.txt", len(b"damaged at the end"), crc=12345)
    parent = tmp_path / "data"
    parent.mkdir()
    target = parent / "sipakmed"
    if existing:
        (target / "ok").mkdir(parents=True)
        (target / "ok" / "first.txt").write_bytes(b"an older copy")
    before = _snapshot(tmp_path)
    with pytest.raises(Exception) as err:  # noqa: PT011 - the type is asserted below, after the snapshot
        dl.safe_extract(archive, target)
    assert _snapshot(tmp_path) == before
    assert target.exists() == existing
    assert err.type is ValueError and re.search("late.zip.*CRC.*left as it was", str(err.value)), err.value


def test_safe_extract_reports_a_corrupt_archive(tmp_path):
    archive = tmp_path / "broken.7z"
    archive.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\0" * 40)
    with pytest.raises(ValueError, match="broken.7z"):
        dl.safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def _bmp(shade: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 100, 200)).save(buf, format="BMP")
    return buf.getvalue()


def _official_7z(path: Path, cls: str, cells=((1, 1), (1, 2), (2, 1))) -> Path:
    """A tiny archive in the official SIPaKMeD layout: im_<cls>/NNN.bmp + im_<cls>/CROPPED/NNN_MM.bmp."""
    with py7zr.SevenZipFile(path, "w") as z:
        for nnn in sorted({c for c, _ in cells}):
            z.writestr(b"BMcluster", f"im_{cls}/{nnn:03d}.bmp")
            z.writestr(b"0 0\n", f"im_{cls}/{nnn:03d}.dat")
        for nnn, mm in cells:
            z.writestr(_bmp(10 * nnn + mm), f"im_{cls}/CROPPED/{nnn:03d}_{mm:02d}.bmp")
    return path


def test_safe_extract_good_7z_gives_official_layout_and_is_idempotent(tmp_path, capsys):
    archive = _official_7z(tmp_path / "im_Parabasal.7z", "Parabasal")
    target = tmp_path / "sipakmed"
    assert dl.safe_extract(archive, target) == target
    cropped = target / "im_Parabasal" / "CROPPED"
    assert sorted(p.name for p in cropped.iterdir()) == ["001_01.bmp", "001_02.bmp", "002_01.bmp"]
    assert (target / "im_Parabasal" / "001.bmp").read_bytes() == b"BMcluster"
    assert (target / ".im_Parabasal.7z.extracted.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im_Parabasal.7z", "sipakmed"]  # temp folder gone
    umask = os.umask(0)
    os.umask(umask)
    for p in (target, target / "im_Parabasal", cropped):  # shared data, not the private temp folder's 0700
        assert stat.S_IMODE(p.stat().st_mode) == 0o777 & ~umask
    mtime = (cropped / "001_01.bmp").stat().st_mtime_ns
    dl.safe_extract(archive, target)
    assert "already extracted" in capsys.readouterr().out
    assert (cropped / "001_01.bmp").stat().st_mtime_ns == mtime


def test_safe_extract_merges_into_an_existing_target(tmp_path):
    """A second class archive lands next to the first; empty files and folder entries come out as such."""
    target = tmp_path / "sipakmed"
    dl.safe_extract(_official_7z(tmp_path / "im_Parabasal.7z", "Parabasal"), target)
    archive = tmp_path / "extra.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("im_Extra/", b"")
        z.writestr("im_Extra/empty/", b"")
        z.writestr("im_Extra/none.dat", b"")
        z.writestr("im_Extra/CROPPED/001_01.bmp", _bmp(3))
    dl.safe_extract(archive, target)
    assert (target / "im_Parabasal" / "CROPPED" / "001_01.bmp").exists()
    assert (target / "im_Extra" / "empty").is_dir() and (target / "im_Extra" / "none.dat").read_bytes() == b""
    assert (target / "im_Extra" / "CROPPED" / "001_01.bmp").read_bytes() == _bmp(3)
    assert dl.extracted(archive, target) and dl.extracted(tmp_path / "im_Parabasal.7z", target)


def _two_block_7z(path: Path) -> Path:
    """A 7z with a folder entry, an empty file and two compressed blocks (py7zr extracts blocks in threads)."""
    with py7zr.SevenZipFile(path, "w") as z:
        z.writestr(_payload(30_000, seed=1), "im_X/CROPPED/001_01.bmp")
        z.writestr(b"", "im_X/001.dat")
    with py7zr.SevenZipFile(path, "a") as z:  # appending adds a second block
        z.writestr(_payload(30_000, seed=2), "im_X/CROPPED/001_02.bmp")
    with py7zr.SevenZipFile(path) as z:
        assert z.header.main_streams.unpackinfo.numfolders == 2
    return path


def test_safe_extract_7z_with_two_blocks_and_an_empty_file(tmp_path):
    target = tmp_path / "t"
    dl.safe_extract(_two_block_7z(tmp_path / "two.7z"), target)
    assert (target / "im_X" / "CROPPED" / "001_02.bmp").read_bytes() == _payload(30_000, seed=2)
    assert (target / "im_X" / "001.dat").read_bytes() == b""


def test_safe_extract_7z_damaged_in_its_second_block_leaves_the_target_as_it_was(arena, tmp_path):
    archive = _two_block_7z(tmp_path / "archives" / "two.7z")
    with py7zr.SevenZipFile(archive) as z:  # where the second block's packed bytes start
        start = 32 + z.header.main_streams.packinfo.packpositions[1]
    data = bytearray(archive.read_bytes())
    data[start + 5_000] ^= 0xFF
    archive.write_bytes(bytes(data))
    _refused_untouched(archive, arena, tmp_path, "extraction failed.*left as it was")


# --------------------------------------------------------------------------- the CLI
def _mirror_with_sipakmed(server) -> None:
    (server.root / "sipakmed").mkdir(parents=True, exist_ok=True)
    for cls in dl.SIPAKMED_CLASSES:
        _official_7z(server.root / "sipakmed" / f"im_{cls}.7z", cls)


def test_cli_end_to_end_with_real_uci_file(server, tmp_path, capsys):
    if not SHARED_UCI.exists():
        pytest.skip(f"real UCI CSV not found at {SHARED_UCI} (ROOT.parent/shared/data): "
                    "the end-to-end sha256 check needs it")
    (server.root / "uci").mkdir()
    (server.root / "uci" / "risk_factors_cervical_cancer.csv").write_bytes(SHARED_UCI.read_bytes())
    _mirror_with_sipakmed(server)
    data = tmp_path / "data"
    args = ["all", "--data-dir", str(data), "--base-url", server.url + "/"]
    assert dl.main(args) == 0
    out = capsys.readouterr().out
    csv = data / "uci" / "risk_factors_cervical_cancer.csv"
    assert dl.sha256_file(csv) == dl.UCI_SHA256 and csv.stat().st_size == dl.UCI_SIZE
    for cls in dl.SIPAKMED_CLASSES:
        archive = data / "sipakmed" / f"im_{cls}.7z"
        side = Path(str(archive) + ".sha256").read_text().split()
        assert side == [dl.sha256_file(archive), archive.name]
        assert (data / "sipakmed" / f"im_{cls}" / "CROPPED" / "001_01.bmp").exists()
    assert "no checksum is published" in out and "SIPaKMeD completeness" in out and "INCOMPLETE" in out
    assert {p for p, _ in server.requests} == {"/uci/risk_factors_cervical_cancer.csv"} | {
        f"/sipakmed/im_{c}.7z" for c in dl.SIPAKMED_CLASSES}

    # rerun: nothing is fetched, everything is verified
    n = len(server.requests)
    assert dl.main(args) == 0
    assert len(server.requests) == n
    assert "already present" in capsys.readouterr().out

    # verify on reuse: a changed archive is caught against its sidecar, one line, exit 1
    archive = data / "sipakmed" / "im_Parabasal.7z"
    archive.write_bytes(archive.read_bytes() + b"junk")
    assert dl.main(["sipakmed", "--class", "Parabasal", "--data-dir", str(data), "--base-url", server.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "im_Parabasal.7z.sha256" in err


def test_cli_uci_with_wrong_file_on_mirror_exits_1(server, tmp_path, capsys):
    (server.root / "uci").mkdir()
    (server.root / "uci" / "risk_factors_cervical_cancer.csv").write_text("Age,Biopsy\n18,0\n")
    data = tmp_path / "data"
    assert dl.main(["uci", "-q", "--data-dir", str(data), "--base-url", server.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "sha256 mismatch" in err and dl.UCI_SHA256 in err
    assert _listing(data / "uci") == []


def test_cli_mirror_from_environment(server, tmp_path, monkeypatch):
    _mirror_with_sipakmed(server)
    monkeypatch.setenv(dl.ENV_MIRROR, server.url)
    monkeypatch.setenv("CERVICAL_KIT_DATA", str(tmp_path / "envdata"))
    assert dl.main(["sipakmed", "-q", "--class", "Metaplastic"]) == 0
    assert (tmp_path / "envdata" / "sipakmed" / "im_Metaplastic" / "CROPPED" / "002_01.bmp").exists()
    assert [p for p, _ in server.requests] == ["/sipakmed/im_Metaplastic.7z"]


def test_cli_offline_subprocess_one_line_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (dl.ENV_MIRROR, "CERVICAL_KIT_DATA")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lib.scaffold.download", "uci", "--data-dir", str(tmp_path),
                        "--base-url", f"http://127.0.0.1:{_closed_port()}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 20
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot reach 127.0.0.1") and r.stderr.count("\n") == 1
    assert str(tmp_path / "uci" / "risk_factors_cervical_cancer.csv") in r.stderr
    assert dl.UCI_URL in r.stderr  # behind a mirror the message still names the official address


def test_sipakmed_already_unpacked_by_hand_is_not_downloaded(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.SIPAKMED_COUNTS, "Parabasal", (3, 2))  # the tiny archive's counts
    data = tmp_path / "data"
    dl.safe_extract(_official_7z(tmp_path / "im_Parabasal.7z", "Parabasal"), data / "sipakmed")
    (data / "sipakmed" / ".im_Parabasal.7z.extracted.json").unlink()  # as if copied by hand
    assert dl.main(["sipakmed", "--class", "Parabasal", "--data-dir", str(data), "--base-url", server.url]) == 0
    assert server.requests == []
    assert "3 cropped cells, no archive" in capsys.readouterr().out


def test_cli_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        dl.main(["everything"])
    assert e.value.code == 2
