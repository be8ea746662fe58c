"""Media references: files confined to media roots, URLs behind the SSRF guard (canary: 0 hits)."""
from __future__ import annotations

import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from preprocess.errors import MediaError, ReferenceDenied, ReferenceNotFound
from preprocess.refs import RefPolicy, fetch_url, open_local


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"\x00" * 100)
    (media / "sub").mkdir()
    (media / "sub" / "a.mp4").write_bytes(b"abc")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", media / "escape.mp4")
    os.symlink("/dev/zero", media / "zero.mp4")
    os.symlink(media / "clip.mp4", media / "inside-link.mp4")
    os.mkfifo(media / "fifo.mp4")
    return media


def test_files_inside_the_root_open(root: Path) -> None:
    policy = RefPolicy(media_roots=(root,))
    with open_local("clip.mp4", policy) as f:
        assert f.size == 100 and f.read() == b"\x00" * 100
    with open_local(f"file://{root}/sub/a.mp4", policy) as f:
        assert f.read() == b"abc"
        assert open(f.proc_path, "rb").read() == b"abc"
    with open_local(str(root / "inside-link.mp4"), policy) as f:
        assert f.size == 100


@pytest.mark.parametrize("ref,kind,reason", [
    ("../secret.txt", ReferenceDenied, "is outside the server's media roots"),
    ("sub/../../secret.txt", ReferenceDenied, "is outside the server's media roots"),
    ("/etc/passwd", ReferenceDenied, "is outside the server's media roots"),
    ("file:///etc/passwd", ReferenceDenied, "is outside the server's media roots"),
    ("file://evil.example/etc/passwd", ReferenceDenied, "must not name a host"),
    ("escape.mp4", ReferenceDenied, "is outside the server's media roots"),
    ("zero.mp4", ReferenceDenied, "is outside the server's media roots"),
    ("/dev/zero", ReferenceDenied, "is outside the server's media roots"),
    ("fifo.mp4", ReferenceDenied, "is not a regular file"),
    ("sub", ReferenceDenied, "is not a regular file"),
    ("missing.mp4", ReferenceNotFound, "does not exist under the media roots"),
    ("a\x00b", MediaError, "contains a NUL byte"),
])
def test_references_outside_or_odd_are_refused_quickly(root: Path, ref: str, kind, reason) -> None:
    start = time.monotonic()
    with pytest.raises(kind, match=reason):
        open_local(ref, RefPolicy(media_roots=(root,)))
    assert time.monotonic() - start < 0.2


def test_size_cap_and_no_roots(root: Path) -> None:
    big = root / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(10 * 1024**3)  # a 10 GB sparse file
    with pytest.raises(MediaError, match="over the 1,000-byte limit"):
        open_local("big.mp4", RefPolicy(media_roots=(root,), max_file_bytes=1000))
    with pytest.raises(ReferenceDenied, match="no media roots configured"):
        open_local("clip.mp4", RefPolicy())


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []
    mode = "ok"
    target = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).hits.append(self.path)
        if self.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.end_headers()
        elif self.mode == "slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(1)
        elif self.mode == "endless":
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"y" * 65536)
            except OSError:
                pass
        else:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


def _serve(host: str, mode: str, target: str = ""):
    handler = type(f"H{mode}", (_Recorder,), {"hits": [], "mode": mode, "target": target})
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


@pytest.fixture()
def canary():
    server, handler = _serve("127.0.0.1", "ok")
    yield server.server_address[1], handler
    server.shutdown()


def _only(ip: str):
    return lambda addr: addr == ipaddress.ip_address(ip)


def test_urls_to_internal_addresses_are_refused_with_zero_canary_hits(canary) -> None:
    port, handler = canary
    policy = RefPolicy(allow_urls=True, connect_timeout_s=1, read_timeout_s=1)
    stub = RefPolicy(allow_urls=True, resolver=lambda host, p: ["127.0.0.1"])
    cases = [
        (f"http://127.0.0.1:{port}/", policy, "resolves to 127.0.0.1"),
        (f"http://[::1]:{port}/", policy, "resolves to ::1"),
        (f"http://2130706433:{port}/", policy, "resolves to 127.0.0.1"),
        (f"http://0x7f.1:{port}/", policy, "resolves to 127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", policy, "resolves to 169.254.169.254"),
        ("http://10.0.0.1/", policy, "resolves to 10.0.0.1"),
        (f"http://[::ffff:127.0.0.1]:{port}/", policy, "not a public address"),
        (f"http://public.example:{port}/", stub, "resolves to 127.0.0.1"),
        ("file:///etc/passwd", policy, "scheme 'file' is not allowed"),
        ("gopher://127.0.0.1:70/", policy, "scheme 'gopher' is not allowed"),
        (f"http://user:pw@example.com:{port}/", policy, "credentials"),
        (f"http://127.0.0.1:{port}/", RefPolicy(), "URL fetching is switched off"),
    ]
    for url, pol, reason in cases:
        with pytest.raises(ReferenceDenied, match=reason):
            fetch_url(url, pol)
    assert handler.hits == []


def test_redirects_are_checked_again(canary) -> None:
    port, handler = canary
    redirector, seen = _serve("127.0.0.2", "redirect", f"http://127.0.0.1:{port}/secret")
    try:
        policy = RefPolicy(allow_urls=True, address_allowed=_only("127.0.0.2"))
        with pytest.raises(ReferenceDenied, match="resolves to 127.0.0.1"):
            fetch_url(f"http://127.0.0.2:{redirector.server_address[1]}/start", policy)
        assert seen.hits == ["/start"] and handler.hits == []
    finally:
        redirector.shutdown()


def test_allowed_fetch_timeouts_and_byte_cap() -> None:
    ok, _ = _serve("127.0.0.2", "ok")
    slow, _ = _serve("127.0.0.2", "slow")
    endless, _ = _serve("127.0.0.2", "endless")
    policy = RefPolicy(allow_urls=True, address_allowed=_only("127.0.0.2"), read_timeout_s=0.5,
                       max_url_bytes=1_000_000)
    try:
        assert fetch_url(f"http://127.0.0.2:{ok.server_address[1]}/v.mp4", policy) == b"hello"
        start = time.monotonic()
        with pytest.raises(MediaError, match="did not answer within 0.5 s"):
            fetch_url(f"http://127.0.0.2:{slow.server_address[1]}/", policy)
        assert time.monotonic() - start < 3
        with pytest.raises(MediaError, match="over the 1,000,000-byte limit"):
            fetch_url(f"http://127.0.0.2:{endless.server_address[1]}/", policy)
    finally:
        for server in (ok, slow, endless):
            server.shutdown()
