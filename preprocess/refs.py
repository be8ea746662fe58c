"""Where a media reference may point: files under media roots, and URLs behind an SSRF guard."""
from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from preprocess.errors import MediaError, ReferenceDenied, ReferenceNotFound

Resolver = Callable[[str, int], Sequence[str]]
AddressCheck = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def is_public_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast only: no loopback, private, link-local, ULA, multicast."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


@dataclass(frozen=True)
class RefPolicy:
    """Where references may point. Local files need roots; URLs are off unless allowed."""

    media_roots: tuple[Path, ...] = ()
    max_file_bytes: int = 512 * 1024 * 1024
    allow_urls: bool = False
    url_schemes: tuple[str, ...] = ("https", "http")
    max_url_bytes: int = 64 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    max_redirects: int = 5
    resolver: Resolver = field(default=system_resolver, compare=False)
    address_allowed: AddressCheck = field(default=is_public_address, compare=False)


@dataclass
class LocalMedia:
    """An open, checked regular file under a media root. The caller closes it."""

    path: Path
    fd: int
    size: int

    @property
    def proc_path(self) -> str:
        """A path to this very open file, safe against the name being swapped afterwards."""
        return f"/proc/self/fd/{self.fd}"

    def read(self) -> bytes:
        with os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)
            return f.read()

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> LocalMedia:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_url(ref: str) -> bool:
    return "://" in ref and not ref.startswith("file://")


def open_local(ref: str, policy: RefPolicy, label: str = "video") -> LocalMedia:
    """Open `ref` (a path or file:// URI) if it is a regular file inside a media root.

    Relative paths are taken relative to the first root. Raises ReferenceDenied for anything
    outside the roots (traversal, symlinks out, devices, FIFOs) and ReferenceNotFound when
    the file does not exist.
    """
    if not policy.media_roots:
        raise ReferenceDenied(f"{label}: this server has no media roots configured, so file "
                              f"references are not allowed; send the bytes instead")
    raw = ref
    if ref.startswith("file://"):
        parsed = urlsplit(ref)
        if parsed.netloc not in ("", "localhost"):
            raise ReferenceDenied(f"{label}: file:// URIs must not name a host "
                                  f"({parsed.netloc!r})")
        raw = unquote(parsed.path)
    if not raw or "\x00" in raw:
        raise MediaError(f"{label}: the reference is empty or contains a NUL byte")
    roots = [r.resolve() for r in policy.media_roots]
    candidate = Path(raw) if os.path.isabs(raw) else roots[0] / raw
    real = Path(os.path.realpath(candidate))
    if not any(_inside(real, root) for root in roots):
        raise ReferenceDenied(f"{label}: {ref!r} is outside the server's media roots")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ReferenceNotFound(f"{label}: {ref!r} does not exist under the media roots") from None
    except OSError as exc:
        raise ReferenceDenied(f"{label}: {ref!r} cannot be opened ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ReferenceDenied(f"{label}: {ref!r} is not a regular file")
    if st.st_size > policy.max_file_bytes:
        os.close(fd)
        raise MediaError(f"{label}: {ref!r} is {st.st_size:,} bytes, over the "
                         f"{policy.max_file_bytes:,}-byte limit")
    os.set_blocking(fd, True)
    return LocalMedia(real, fd, st.st_size)


def _inside(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([path, root]) == str(root)
    except ValueError:
        return False


def fetch_url(url: str, policy: RefPolicy, label: str = "video") -> bytes:
    """GET `url` under the SSRF guard and return the body.

    Each hop's host is resolved once, every address must pass `policy.address_allowed`,
    the connection goes to that validated address, and every redirect is checked again.
    """
    if not policy.allow_urls:
        raise ReferenceDenied(f"{label}: URL fetching is switched off on this server; send the "
                              f"bytes or a path under a media root")
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in policy.url_schemes:
            raise ReferenceDenied(f"{label}: the scheme {scheme!r} is not allowed; use "
                                  f"{' or '.join(policy.url_schemes)}")
        host = parts.hostname
        if not host:
            raise ReferenceDenied(f"{label}: the URL has no host")
        if parts.username or parts.password:
            raise ReferenceDenied(f"{label}: URLs with credentials are not allowed")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ReferenceDenied(f"{label}: the URL's port is not valid") from None
        address = _validated_address(host, port, policy, label)
        status, location, body = _get_once(scheme, host, address, port, parts, policy, label)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise MediaError(f"{label}: a redirect without a Location header")
            url = urljoin(url, location)
            continue
        if status != 200:
            raise ReferenceNotFound(f"{label}: the URL answered HTTP {status}")
        return body
    raise ReferenceDenied(f"{label}: more than {policy.max_redirects} redirects")


def _validated_address(host: str, port: int, policy: RefPolicy, label: str) -> str:
    try:
        answers = list(policy.resolver(host, port))
    except (OSError, UnicodeError):
        raise ReferenceNotFound(f"{label}: the host {host!r} does not resolve") from None
    if not answers:
        raise ReferenceNotFound(f"{label}: the host {host!r} does not resolve")
    for answer in answers:
        addr = ipaddress.ip_address(answer.split("%", 1)[0])
        if not policy.address_allowed(addr):
            raise ReferenceDenied(f"{label}: the host {host!r} resolves to {addr}, which is "
                                  f"not a public address")
    return answers[0]


def _get_once(scheme: str, host: str, address: str, port: int, parts, policy: RefPolicy,
              label: str) -> tuple[int, str | None, bytes]:
    """One GET to the validated address with Host (and SNI) set to the URL's host."""
    try:
        sock = socket.create_connection((address, port), timeout=policy.connect_timeout_s)
    except OSError as exc:
        raise ReferenceNotFound(f"{label}: cannot connect to {host!r} ({exc})") from None
    sock.settimeout(policy.read_timeout_s)
    conn: http.client.HTTPConnection
    try:
        if scheme == "https":
            ctx = ssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, timeout=policy.read_timeout_s)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=policy.read_timeout_s)
        conn.sock = sock
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1],
                                           "User-Agent": "eagle-grpc"})
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_url_bytes:
            raise MediaError(f"{label}: the URL's body is {int(length):,} bytes, over the "
                             f"{policy.max_url_bytes:,}-byte limit")
        body = resp.read(policy.max_url_bytes + 1) if resp.status == 200 else b""
        if len(body) > policy.max_url_bytes:
            raise MediaError(f"{label}: the URL's body is over the "
                             f"{policy.max_url_bytes:,}-byte limit")
        return resp.status, resp.getheader("Location"), body
    except TimeoutError:
        raise MediaError(f"{label}: the URL did not answer within "
                         f"{policy.read_timeout_s:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ReferenceNotFound(f"{label}: fetching the URL failed ({exc})") from None
    finally:
        sock.close()
