"""The HTTP boundary of the FHIR client and the Twilio channel: one request in, one answer out;
urllib3 behind it by default.

Why urllib3 rather than httpx: the outbound send is CPU-bound in the worker, and httpx.Client
cost about 1.0 ms of CPU per FHIR request against a local server where a urllib3 pool costs about
0.42 ms (measured; giving httpx a urllib3 transport did not help: httpx's own client is the cost).
Twilio's SDK sends through `requests` by default: 0.61 ms of CPU per send against 0.29 ms
through this boundary (measured on the provider sandbox).
"""

from __future__ import annotations

import http.client
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import urllib3
from urllib3.exceptions import ConnectTimeoutError, EmptyPoolError, NewConnectionError

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
    """The default Http: a urllib3 connection pool per origin (keep-alive, at most `maxsize`
    connections, waiting up to the timeout for a free one), no retries, no redirects."""

    def __init__(self, maxsize: int = 64, proxy: str | None = None) -> None:
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._pools: dict[str, urllib3.HTTPConnectionPool] = {}
        self._proxy = (urllib3.ProxyManager(proxy, maxsize=maxsize, block=True, retries=False)
                       if proxy else None)
        if self._proxy is not None:
            self._proxy.pool_classes_by_scheme = _POOLS

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                 timeout: float) -> HttpAnswer:
        # The timeout bounds connecting, each read, and the wait for a free pooled connection.
        limit = urllib3.Timeout(connect=timeout, read=timeout)
        wait: Any = timeout  # urllib3 annotates pool_timeout as int; it is a queue wait
        hdrs = {**_ACCEPT_ENCODING, **headers}
        try:
            if self._proxy is not None:
                resp = self._proxy.urlopen(method, url, body=body, headers=hdrs, retries=False,
                                           redirect=False, timeout=limit, pool_timeout=wait)
            else:
                origin, target = _split(url)
                pool = self._pools.get(origin) or self._pool(origin)
                resp = pool.urlopen(method, target, body=body, headers=hdrs, retries=False,
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
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        if self._proxy is not None:
            self._proxy.clear()

    def _pool(self, origin: str) -> urllib3.HTTPConnectionPool:
        with self._lock:
            pool = self._pools.get(origin)
            if pool is None:
                scheme, _, host, port, *_ = urllib3.util.parse_url(origin)
                cls = _POOLS.get(scheme or "http")
                if cls is None or not host:
                    raise urllib3.exceptions.LocationValueError("not an http(s) URL")
                pool = cls(host, port, maxsize=self._maxsize, block=True, retries=False)
                self._pools[origin] = pool
            return pool


# http.client's limits on a response's header block.
_MAX_LINE = 65536
_MAX_HEADERS = 100


class _Response(http.client.HTTPResponse):
    """http.client's response, its header block read into the same HTTPMessage by a plain
    split of its lines instead of the email package's parser, which cost 15 µs a response
    (about 60 under load), three responses a send, in a worker whose sends are CPU-bound.

    The rest is http.client's own `begin`: the status line, 100 Continue skipped, chunked or
    Content-Length, whether the connection closes. Headers keep their order and repeats;
    folded lines are joined as the email parser joins them; a line that is not a header
    (no colon) is left out (the email parser took it and everything after it for a body,
    which urllib3 then logged as unparsed)."""

    def begin(self) -> None:
        if self.headers is not None:
            return  # already read
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_header_lines(self.fp)  # the 100 response's headers
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = header_message(_read_header_lines(self.fp))
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding and encoding.lower() == "chunked")
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if (status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED)
                or 100 <= status < 200 or self._method == "HEAD"):
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


def _read_header_lines(fp: Any) -> list[bytes]:
    """The header block's lines up to the blank one, within http.client's limits."""
    lines: list[bytes] = []
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return lines
        lines.append(line)
        if len(lines) > _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")


def header_message(lines: list[bytes]) -> http.client.HTTPMessage:
    """An HTTPMessage of these header lines, as http.client.parse_headers builds it for
    well-formed ones (names and values as sent, ISO-8859-1; a value's leading blanks dropped;
    a folded line kept with its line break, as the email parser keeps it)."""
    message = http.client.HTTPMessage()
    name = ""
    value: list[str] = []
    for raw in lines:
        line = raw.decode("iso-8859-1")
        if line[:1] in (" ", "\t"):
            if name:
                value.append(line)
            continue
        if name:
            message[name] = "".join(value).rstrip("\r\n")
        head, colon, rest = line.partition(":")
        name, value = (head, [rest.lstrip(" \t")]) if colon else ("", [])
    if name:
        message[name] = "".join(value).rstrip("\r\n")
    return message


class _Connection(urllib3.connection.HTTPConnection):
    response_class = _Response


class _TlsConnection(urllib3.connection.HTTPSConnection):
    response_class = _Response


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


_POOLS: dict[str, type[urllib3.HTTPConnectionPool]] = {"http": _Pool, "https": _TlsPool}


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
