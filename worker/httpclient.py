"""httpx as the FHIR client and the Twilio channel use it, and what httpx lacks against a
hostile server (nothing else is written here).

httpx (over httpcore and h11) does the HTTP: the pool, keep-alive, TLS with the trust store the
SDKs use (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), proxies, strict framing (h11 refuses
`Content-Length: 5,7` or `1_0`, a chunk size of `-1` or `0x1f`, a chunk without its CRLF), and
noticing a kept-alive connection the server closed before a request is written on it.

What it lacks, added here (`fetch` is the one way in):
- A total deadline per request. httpx's timeouts bound each socket operation, so a server that
  drips a byte a second holds a "1 s" request as long as it likes. Every connect, TLS handshake,
  write and read is given at most the time left (an httpcore network backend: its public
  extension point), so the request ends at its deadline with httpx's own timeout exception.
- A size limit on the answer, decoded. httpx inflates each chunk whole (zlib without a
  max_length): a 204 KB gzip becomes 200 MB in memory before anyone can count it. Here the
  raw body is read from `iter_raw` and a gzip answer inflated with zlib's max_length, so a
  bomb is refused after the first bytes past the limit; any other encoding is refused.
- No stale answer. When the server sends more than the answer (a second, unasked response),
  h11 keeps the surplus bytes and hands them out as the next request's answer. A connection
  whose reads went past the answer is reported readable, which httpcore treats as closed by
  the server, so it is dropped instead of reused.

Answers are asked for uncompressed (`Accept-Encoding: identity`): a compressing server (Medplum
among them) sends them chunked, whose end cannot be counted through httpx, so the connection
would not be kept; a kept-alive TLS connection is worth more than compressing answers of a
few kilobytes.

Exceptions are httpx's: httpx.ConnectError, ConnectTimeout and PoolTimeout mean the request
never left this process (`never_sent`); anything else after that may have reached the server.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple

import httpcore
import httpx

# Servers such as Node's close an idle kept-alive connection after 5 s: dropping ours first
# keeps a request from racing the server's close (a race we could not tell from a lost answer).
KEEPALIVE_SECONDS = 4.0


class Answer(NamedTuple):
    """An HTTP answer read whole: status, headers (case-insensitive) and the decoded body."""

    status: int
    headers: httpx.Headers
    body: bytes


class AnswerTooLarge(httpx.RemoteProtocolError):
    """The answer (decoded) is larger than the caller's limit."""


def never_sent(exc: httpx.HTTPError) -> bool:
    """True when the request certainly never left this process: no connection could be made
    (refused, unresolvable, TLS refused, connect timeout), none was free in time, or the request
    itself was invalid. Anything else may have reached the server and been acted on."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                      | httpx.UnsupportedProtocol | httpx.LocalProtocolError)


def new_client(url: str, max_connections: int, timeout: float) -> httpx.Client:
    """One pooled client for the server at `url` (share it between threads): at most
    `max_connections` connections, HTTP/1.1, the proxy the environment names for `url`."""
    transport = _Transport(max_connections, _environment_proxy(url))
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=False,
                        headers={"Accept-Encoding": "identity"})


def fetch(client: httpx.Client, method: str, url: str, *, timeout: float, max_bytes: int,
          headers: Mapping[str, str] | None = None, content: bytes | None = None,
          params: Any = None, auth: tuple[str, str] | None = None) -> Answer:
    """Send one request and read its whole answer within `timeout` seconds in total, the
    decoded body at most `max_bytes`. Raises httpx.TransportError (AnswerTooLarge included) or
    httpx.DecodingError. Redirects are answers; nothing is retried."""
    token = _DEADLINE.set(time.monotonic() + timeout)
    try:
        request = client.build_request(method, url, headers=headers, content=content,
                                       params=params, timeout=timeout)
        with contextlib.closing(client.send(request, auth=auth, stream=True)) as response:
            body = _read_body(response, max_bytes)
            stream = response.extensions.get("network_stream")
            if isinstance(stream, _Stream):
                stream.answered(response)
            return Answer(response.status_code, response.headers, body)
    finally:
        _DEADLINE.reset(token)


def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        inflate: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding in ("", "identity"):
        inflate = None
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise AnswerTooLarge("answer larger than the limit")  # refused before reading it
    else:
        raise httpx.DecodingError("unrequested Content-Encoding")
    body = bytearray()
    for raw in response.iter_raw():
        room = max_bytes - len(body)
        if inflate is None:
            piece = raw
        else:
            try:
                # max_length bounds the memory: at most one byte past the limit is produced.
                piece = inflate.decompress(raw, room + 1)
            except zlib.error as exc:
                raise httpx.DecodingError("bad gzip") from exc
        if len(piece) > room:
            raise AnswerTooLarge("answer larger than the limit")
        body += piece
    if inflate is not None and body and not inflate.eof:
        raise httpx.DecodingError("truncated gzip")
    return bytes(body)


# -- the deadline and the stale-answer check, in the network layer httpcore lets us supply ----

_DEADLINE: ContextVar[float | None] = ContextVar("switchboard_http_deadline", default=None)


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    """The operation's timeout, cut to what is left of the request's deadline."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise late("deadline passed")
    return left if timeout is None else min(timeout, left)


# Where the header block ends (h11 takes a bare LF too), and how much of an answer's start is
# kept to find it: more than httpcore lets a header block grow (100 KB).
_HEAD_END = re.compile(rb"\n\r?\n")
_HEAD_KEPT = 128 * 1024


class _Stream(httpcore.NetworkStream):
    """A connection whose every operation ends by the deadline, and which counts what it read
    since the last request was written."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        self._read = 0
        self._head = bytearray()
        self._dirty = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))
        if len(self._head) < _HEAD_KEPT:
            self._head += data[:_HEAD_KEPT - len(self._head)]
        self._read += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._read:  # the first write of a new request
            self._read = 0
            self._head.clear()
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname,
                                             _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._dirty:
            return True  # httpcore then drops the connection as one the server closed
        return self._inner.get_extra_info(info)

    def answered(self, response: httpx.Response) -> None:
        """The answer was read whole: unless its framing accounts for every byte read, the
        rest may be an unasked answer waiting in h11's buffer, and the connection is not
        reused. Only a Content-Length answer can be counted here (a chunked one's framing is
        not visible through httpx); others are not reused either, which costs a reconnect."""
        end = _HEAD_END.search(self._head)
        length = response.headers.get("content-length")
        if response.status_code in (204, 304) or response.request.method == "HEAD":
            length = "0"
        exact = (end is not None and length is not None and length.isdigit()
                 and "transfer-encoding" not in response.headers
                 and self._read == end.end() + int(length))
        self._dirty = not exact


class _Backend(httpcore.SyncBackend):
    """httpcore's own sockets, each connect held to the deadline and wrapped in a _Stream."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _Stream(super().connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                           local_address, socket_options))


class _Transport(httpx.BaseTransport):
    """httpx's HTTPTransport as it is built, but over the network backend above, which
    HTTPTransport does not let a caller supply."""

    def __init__(self, max_connections: int, proxy: str | None) -> None:
        options: dict[str, Any] = {
            "ssl_context": httpx.create_ssl_context(),  # certifi, or SSL_CERT_FILE/DIR
            "max_connections": max_connections,
            "max_keepalive_connections": max_connections,
            "keepalive_expiry": KEEPALIVE_SECONDS,
            "network_backend": _Backend(),
        }
        self._pool: httpcore.ConnectionPool = (
            httpcore.HTTPProxy(proxy_url=proxy, **options) if proxy
            else httpcore.ConnectionPool(**options))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream,
            extensions=request.extensions)
        with _as_httpx():
            answer = self._pool.handle_request(core)
        assert not isinstance(answer.stream, bytes | httpx.AsyncByteStream)
        return httpx.Response(answer.status, headers=answer.headers,
                              stream=_Body(answer.stream), extensions=answer.extensions)

    def close(self) -> None:
        self._pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx():
            yield from self._stream

    def close(self) -> None:
        with _as_httpx():
            if hasattr(self._stream, "close"):
                self._stream.close()


@contextlib.contextmanager
def _as_httpx() -> Iterator[None]:
    """httpcore's exceptions as httpx's of the same name, as HTTPTransport raises them."""
    try:
        yield
    except httpcore.ConnectionNotAvailable:
        raise
    except Exception as exc:
        for cls in type(exc).__mro__:
            mapped = getattr(httpx, cls.__name__, None) if cls.__module__.startswith(
                "httpcore") else None
            if isinstance(mapped, type) and issubclass(mapped, httpx.TransportError):
                raise mapped(str(exc)) from exc
        raise


def _environment_proxy(url: str) -> str | None:
    """The proxy HTTPS_PROXY / HTTP_PROXY / ALL_PROXY and NO_PROXY name for `url`, as httpx's
    own client reads them (which it stops doing once given a transport)."""
    scheme, _, rest = url.partition("://")
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme.lower()) or proxies.get("all")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"
