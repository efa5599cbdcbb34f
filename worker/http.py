"""The HTTP boundary of the FHIR client and the Twilio channel: one request in, one answer out;
urllib3 behind it by default.

Why urllib3 rather than httpx: the outbound send is CPU-bound in the worker, and httpx.Client
cost about 1.0 ms of CPU per FHIR request against a local server where a urllib3 pool costs about
0.42 ms (measured; giving httpx a urllib3 transport did not help: httpx's own client is the cost).
Twilio's SDK sends through `requests` by default: 0.61 ms of CPU per send against 0.29 ms
through this boundary (measured on the provider sandbox).
"""

from __future__ import annotations

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
                pool = urllib3.connection_from_url(origin, maxsize=self._maxsize, block=True,
                                                   retries=False)
                self._pools[origin] = pool
            return pool


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
