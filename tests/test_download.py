"""lib.scaffold.download against a loopback HTTP server (127.0.0.1 only: nothing here touches the internet)."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
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


def _symlink_zip(path: Path, link_name: str, link_target: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok/fine.txt", b"fine")
        info = zipfile.ZipInfo(link_name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, link_target)
    return path


def _symlink_7z(path: Path, tmp: Path, link_target: str) -> Path:
    src = tmp / "l1" / "l2"  # py7zr stores a link only if its target exists
    src.mkdir(parents=True)
    (tmp / "outside").mkdir()
    (src / "link").symlink_to(link_target)
    with py7zr.SevenZipFile(path, "w", dereference=False) as z:
        z.write(src / "link", "ok/link")  # before writestr: py7zr 1.1.4 trips over the reverse order
        z.writestr(b"fine", "ok/fine.txt")
    return path


@pytest.mark.parametrize("member", ["../evil", "ok/../../evil", "/tmp/cervical_kit_abs_evil"])
@pytest.mark.parametrize("kind", ["7z", "zip"])
def test_safe_extract_refuses_escaping_members(tmp_path, kind, member):
    make = _evil_7z if kind == "7z" else _evil_zip
    archive = make(tmp_path / f"bad.{kind}", member)
    target = tmp_path / "target"
    with pytest.raises(ValueError) as err:
        dl.safe_extract(archive, target)
    msg = str(err.value)
    assert str(archive) in msg and member in msg
    assert _listing(target) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/cervical_kit_abs_evil").exists()


@pytest.mark.parametrize("link_target", ["../../outside", "/etc"])
@pytest.mark.parametrize("kind", ["7z", "zip"])
def test_safe_extract_refuses_symlinks_pointing_outside(tmp_path, kind, link_target):
    if kind == "7z":
        archive = _symlink_7z(tmp_path / "bad.7z", tmp_path, link_target)
    else:
        archive = _symlink_zip(tmp_path / "bad.zip", "ok/link", link_target)
    target = tmp_path / "target"
    with pytest.raises(ValueError, match="ok/link.*symlink") as err:
        dl.safe_extract(archive, target)
    assert str(archive) in str(err.value)
    assert _listing(target) == []


def test_safe_extract_refuses_members_below_a_symlink(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        info = zipfile.ZipInfo("d")
        info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, ".")
        z.writestr("d/x.txt", b"x")
    with pytest.raises(ValueError, match="below the symlink"):
        dl.safe_extract(archive, tmp_path / "target")
    assert _listing(tmp_path / "target") == []


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
    assert not [p for p in target.iterdir() if p.name.startswith(".extract-")]  # temp folder gone
    mtime = (cropped / "001_01.bmp").stat().st_mtime_ns
    dl.safe_extract(archive, target)
    assert "already extracted" in capsys.readouterr().out
    assert (cropped / "001_01.bmp").stat().st_mtime_ns == mtime


def test_safe_extract_zip_keeps_inside_symlinks(tmp_path):
    archive = _symlink_zip(tmp_path / "ok.zip", "ok/alias.txt", "fine.txt")
    target = tmp_path / "t"
    dl.safe_extract(archive, target)
    assert (target / "ok" / "alias.txt").is_symlink()
    assert (target / "ok" / "alias.txt").read_bytes() == b"fine"


def test_safe_extract_reports_a_corrupt_archive(tmp_path):
    archive = tmp_path / "broken.7z"
    archive.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\0" * 40)
    with pytest.raises(ValueError, match="broken.7z"):
        dl.safe_extract(archive, tmp_path / "t")
    assert _listing(tmp_path / "t") == []


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
