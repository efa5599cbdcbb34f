"""The HTTP boundary of the FHIR client and the Twilio channel: one request in, one answer out;
DirectHttp behind it by default, urllib3 through a proxy.

Why not httpx or `requests`: the outbound send is CPU-bound in the worker, and httpx.Client cost
about 1.0 ms of CPU per FHIR request against a local server where a urllib3 pool cost about
0.42 ms (measured; giving httpx a urllib3 transport did not help: httpx's own client is the
cost). Twilio's SDK sends through `requests` by default: 0.61 ms of CPU per send against 0.29 ms
through urllib3 here (measured on the provider sandbox). DirectHttp says why not urllib3 either.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
import urllib.request
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import urllib3
from urllib3.exceptions import ConnectTimeoutError, EmptyPoolError, NewConnectionError
from urllib3.util.wait import wait_for_read

# Compressed answers, as httpx asked for them (gzip, deflate; br/zstd when installed).
_ACCEPT_ENCODING = {
    "Accept-Encoding": urllib3.util.make_headers(accept_encoding=True)["accept-encoding"]}


class HttpAnswer(NamedTuple):
    """An HTTP answer: status, headers (case-insensitive lookups) and the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Http(Protocol):
    """Send one request to an absolute URL and read the whole answer. Redirects are answers, and
    nothing is retried here. Raises HttpTimeout or HttpTransportError when there is no answer."""

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                 timeout: float) -> HttpAnswer: ...


class HttpTransportError(Exception):
    """No answer: refused, reset, TLS or DNS failure. The text is the cause's class name only
    (never a URL: a query string can carry a phone number).

    `reached` is False only when the request certainly never left this process (no connection
    could be made, or none was free in time); otherwise the server may have acted on it, which
    matters for a request that is not idempotent (a text message)."""

    def __init__(self, cause: str, reached: bool = True) -> None:
        super().__init__(cause)
        self.reached = reached


class HttpTimeout(HttpTransportError):
    """No answer in time: connecting, reading, or waiting for a free pooled connection."""


class Urllib3Http:
    """The Http through a proxy (default_http picks it when the environment names one):
    urllib3's ProxyManager (keep-alive, at most `maxsize` connections per origin, waiting up to
    the timeout for a free one), no retries, no redirects."""

    def __init__(self, proxy: str, maxsize: int = 64) -> None:
        self._proxy = urllib3.ProxyManager(proxy, maxsize=maxsize, block=True, retries=False)

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                 timeout: float) -> HttpAnswer:
        # The timeout bounds connecting, each read, and the wait for a free pooled connection.
        limit = urllib3.Timeout(connect=timeout, read=timeout)
        wait: Any = timeout  # urllib3 annotates pool_timeout as int; it is a queue wait
        hdrs = {**_ACCEPT_ENCODING, **headers}
        try:
            resp = self._proxy.urlopen(method, url, body=body, headers=hdrs, retries=False,
                                       redirect=False, timeout=limit, pool_timeout=wait)
        except NewConnectionError as exc:  # before TimeoutError: urllib3 derives it from that
            # Refused or unresolvable (NameResolutionError is one): nothing was sent.
            raise HttpTransportError(type(exc).__name__, reached=False) from exc
        except (ConnectTimeoutError, EmptyPoolError) as exc:  # no connection, nothing sent
            raise HttpTimeout(type(exc).__name__, reached=False) from exc
        except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise HttpTimeout(type(exc).__name__) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise HttpTransportError(type(exc).__name__) from exc
        return HttpAnswer(resp.status, resp.headers, resp.data)

    def close(self) -> None:
        """Close every pooled connection."""
        self._proxy.clear()


def default_http(url: str, maxsize: int = 64) -> DirectHttp | Urllib3Http:
    """The Http for requests to `url`'s server: DirectHttp, or urllib3 through the proxy the
    environment names for it (HTTPS_PROXY, NO_PROXY)."""
    proxy = environment_proxy(url)
    return Urllib3Http(proxy, maxsize) if proxy else DirectHttp(maxsize)


class DirectHttp:
    """HTTP/1.1 straight to the server over kept-alive connections, pooled per origin (at most
    `maxsize` each, waiting up to the timeout for a free one), TLS for https, gzip and deflate
    answers decoded, no retries, no redirects, no proxy (default_http takes urllib3 for that).

    Why not urllib3 here too: a FHIR request through urllib3's pool and http.client cost about
    0.10 ms of CPU against 0.02 ms for the same bytes written and read here, and a send makes
    three requests on a CPU-bound worker. What goes on the wire is what urllib3 sent: the
    request line with the target percent-encoded the same way, Host, the caller's headers,
    Accept-Encoding, Content-Length with a body. As urllib3 does, a kept-alive connection the
    server has closed meanwhile is noticed before a request is written on it, so a request
    is never lost to a stale connection (which, for a text message, would be an unknown
    outcome)."""

    def __init__(self, maxsize: int = 64) -> None:
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._origins: dict[str, _Origin] = {}
        self._closed = False

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                 timeout: float) -> HttpAnswer:
        origin, target = _split(url)
        site = self._origins.get(origin) or self._origin(origin)
        request = _request_bytes(method, site.host_header, target, headers, body)
        conn = site.take(timeout)
        keep = False
        try:
            try:
                conn.send(request, timeout)
            except OSError as exc:
                # Not a byte may have reached the server, but one may have: the same call
                # can time out or be reset after the request left.
                raise _transport_error(exc, reached=True) from exc
            try:
                answer, keep = conn.read_answer(method)
            except OSError as exc:
                raise _transport_error(exc, reached=True) from exc
            except (ValueError, zlib.error, http.client.HTTPException) as exc:
                raise HttpTransportError(type(exc).__name__) from exc
            return answer
        finally:
            site.give_back(conn, keep and not self._closed)

    def close(self) -> None:
        """Close every idle connection (one in use closes when it is given back)."""
        with self._lock:
            self._closed = True
            origins, self._origins = list(self._origins.values()), {}
        for site in origins:
            site.close()

    def _origin(self, origin: str) -> _Origin:
        with self._lock:
            site = self._origins.get(origin)
            if site is None:
                site = self._origins[origin] = _Origin(origin, self._maxsize)
            return site


def _transport_error(exc: OSError, reached: bool) -> HttpTransportError:
    if isinstance(exc, TimeoutError):
        return HttpTimeout(type(exc).__name__, reached=reached)
    return HttpTransportError(type(exc).__name__, reached=reached)


# Characters left as they are in a request target (RFC 3986 path and query characters, and
# `%`: the caller's own escapes stay); anything else is percent-encoded, as urllib3 does.
_TARGET_SAFE = "/?#[]@!$&'()*+,;=:%-._~"


def _request_bytes(method: str, host: str, target: str, headers: Mapping[str, str],
                   body: bytes | None) -> bytes:
    lines = [f"{method} {quote(target, safe=_TARGET_SAFE)} HTTP/1.1", f"Host: {host}"]
    names = {name.lower() for name in headers}
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: gzip, deflate")
    if "user-agent" not in names:
        lines.append(f"User-Agent: {_USER_AGENT}")
    for name, value in headers.items():
        # A line break in a header would start a header (or a request) of its own.
        if _UNSAFE_HEADER.search(name) or _UNSAFE_VALUE.search(value):
            raise ValueError("invalid header")
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


_UNSAFE_HEADER = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_UNSAFE_VALUE = re.compile(r"[\r\n\x00]")
_USER_AGENT = "switchboard"


class _Origin:
    """The kept-alive connections to one server."""

    def __init__(self, origin: str, maxsize: int) -> None:
        parts = urllib3.util.parse_url(origin)
        if parts.scheme not in ("http", "https") or not parts.host:
            raise HttpTransportError("LocationValueError", reached=False)
        tls = parts.scheme == "https"
        self.host = parts.host.strip("[]")
        default = 443 if tls else 80
        self.port = parts.port or default
        self.host_header = parts.host if self.port == default else f"{parts.host}:{self.port}"
        self._idle: list[_Connection11] = []
        self._free = threading.Semaphore(maxsize)
        self._lock = threading.Lock()
        self._tls = ssl.create_default_context() if tls else None

    def take(self, timeout: float) -> _Connection11:
        if not self._free.acquire(timeout=timeout):
            raise HttpTimeout("EmptyPoolError", reached=False)
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return self._connect(timeout)
                if conn.usable():
                    return conn
                conn.close()
        except BaseException:
            self._free.release()
            raise

    def give_back(self, conn: _Connection11, keep: bool) -> None:
        if keep:
            with self._lock:
                self._idle.append(conn)
        else:
            conn.close()
        self._free.release()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self, timeout: float) -> _Connection11:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except TimeoutError as exc:
            raise HttpTimeout("ConnectTimeoutError", reached=False) from exc
        except OSError as exc:  # refused, unreachable, not resolved
            raise HttpTransportError("NewConnectionError", reached=False) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except TimeoutError as exc:
            sock.close()
            raise HttpTimeout("ConnectTimeoutError", reached=False) from exc
        except OSError as exc:  # the TLS handshake failed: nothing was sent
            sock.close()
            raise HttpTransportError(type(exc).__name__, reached=False) from exc
        return _Connection11(sock)


class _Connection11:
    """One connection: writes a request, reads its answer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def usable(self) -> bool:
        """False if the server closed it (or sent something unasked) while it was idle."""
        if self._buf:
            return False
        try:  # urllib3's own check (poll where there is one: no limit on the descriptor)
            return not wait_for_read(self._sock, timeout=0.0)
        except (OSError, ValueError):
            return False

    def send(self, data: bytes, timeout: float) -> None:
        self._sock.settimeout(timeout)
        self._sock.sendall(data)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def read_answer(self, method: str) -> tuple[HttpAnswer, bool]:
        """The answer and whether the connection may carry another request (read within the
        timeout `send` set on the socket)."""
        while True:
            status_line = self._line()
            version, _, rest = status_line.partition(b" ")
            code, _, _ = rest.partition(b" ")
            if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
                raise http.client.BadStatusLine(status_line[:40].decode("latin-1"))
            status = int(code)
            lines = []
            while True:
                line = self._line()
                if not line:
                    break
                lines.append(line)
                if len(lines) > _MAX_HEADERS:
                    raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
            if status != http.client.CONTINUE:
                break
        headers = urllib3.HTTPHeaderDict()
        for name, value in _header_pairs(lines):
            headers.add(name, value)
        connection = (headers.get("connection") or "").lower()
        keep = ("close" not in connection if version == b"HTTP/1.1"
                else "keep-alive" in connection)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in (headers.get("transfer-encoding") or "").lower():
            body = self._chunked()
        elif headers.get("content-length") is not None:
            length = int(headers["content-length"].split(",")[0])
            if length < 0:
                raise ValueError("negative Content-Length")
            body = self._exactly(length)
        else:  # the body runs to the end of the connection
            body = self._to_eof()
            keep = False
        encoding = (headers.get("content-encoding") or "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:  # raw deflate, as some servers send it
                body = zlib.decompress(body, -zlib.MAX_WBITS)
        elif encoding not in ("", "identity"):
            raise ValueError(f"unrequested Content-Encoding {encoding}")
        return HttpAnswer(status, headers, body), keep

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected("closed before the answer ended")
        self._buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end]).rstrip(b"\r")
                del self._buf[:end + 1]
                return line
            if len(self._buf) > _MAX_LINE:
                raise http.client.LineTooLong("header line")
            self._fill()

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._line().split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                break
            parts.append(self._exactly(size))
            self._exactly(2)  # the CRLF after the chunk
        while self._line():  # trailers, up to the blank line
            pass
        return b"".join(parts)

    def _to_eof(self) -> bytes:
        while True:
            try:
                self._fill()
            except http.client.RemoteDisconnected:
                data = bytes(self._buf)
                self._buf.clear()
                return data


def _header_pairs(lines: list[bytes]) -> list[tuple[str, str]]:
    """(name, value) of each header, folded lines joined by a space, values stripped."""
    pairs: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.decode("iso-8859-1")
        if line[:1] in (" ", "\t"):
            if pairs:
                name, value = pairs[-1]
                pairs[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if colon:
            pairs.append((name.strip(), value.strip()))
    return pairs


# http.client's limits on a response's header block.
_MAX_LINE = 65536
_MAX_HEADERS = 100


def environment_proxy(url: str) -> str | None:
    """The proxy that HTTPS_PROXY / HTTP_PROXY / ALL_PROXY and NO_PROXY name for `url`, as
    httpx (and the Twilio and SendGrid SDKs) honour them; None for a direct connection."""
    scheme, _, rest = url.partition("://")
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme.lower()) or proxies.get("all")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _split(url: str) -> tuple[str, str]:
    """`scheme://host[:port]` and the request target (path and query) of an absolute URL."""
    start = url.find("://")
    if start < 0:
        raise urllib3.exceptions.LocationValueError("not an absolute URL")
    slash = url.find("/", start + 3)
    return (url, "/") if slash < 0 else (url[:slash], url[slash:])
